"""Deterministic, anti-aliased rendering of shape scenes.

One primitive, :func:`coverage`, gives an object's covered fraction per pixel (4x4 supersampling);
scenes are alpha-composited from it over the background, and the detector renders its templates
with the very same function. Objects are upright shapes (filled or hollow) or 5x7 digit glyphs.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage

from components.world.palette import BACKGROUNDS, CLASSES, COLOURS, DIGIT

SUPERSAMPLE = 4
STYLES = ("filled", "hollow")
TONES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # per-channel gain and offset applied to the whole rendered image (tone_transfer edits)
    "darker": ((0.7, 0.7, 0.7), (0.0, 0.0, 0.0)),
    "brighter": ((0.7, 0.7, 0.7), (76.5, 76.5, 76.5)),
    "warmer": ((1.0, 1.0, 0.8), (25.0, 5.0, 0.0)),
    "cooler": ((0.8, 1.0, 1.0), (0.0, 0.0, 25.0)),
}
_GLYPHS = {  # 5x7 bitmaps, one string per row
    "0": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
DIGITS: tuple[str, ...] = tuple(_GLYPHS)
_GLYPH_BITS = {d: np.array([[c == "#" for c in row] for row in rows]) for d, rows in _GLYPHS.items()}
DIGIT_ASPECT = 5 / 7
HOLLOW_WIDTH = 0.14  # outline thickness as a fraction of the object's size (at least 2 px)


@dataclass(frozen=True)
class Obj:
    cls: str
    colour: str
    cx: float  # centre of the bounding box, in pixels
    cy: float
    size: float  # bounding-box height in pixels (the side, for shapes)
    style: str = "filled"
    text: str = ""  # the digit, when cls == "digit"

    @property
    def width(self) -> float:
        return self.size * (DIGIT_ASPECT if self.cls == DIGIT else 1.0)

    def box(self) -> tuple[float, float, float, float]:
        hw, hh = self.width / 2, self.size / 2
        return (self.cx - hw, self.cy - hh, self.cx + hw, self.cy + hh)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Obj":
        return cls(str(d["cls"]), str(d["colour"]), float(d["cx"]), float(d["cy"]), float(d["size"]),
                   str(d.get("style", "filled")), str(d.get("text", "")))


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    size: int = 64
    background: str = "grey"
    tone: str = "none"

    def to_json(self) -> dict:
        return {"size": self.size, "background": self.background, "tone": self.tone,
                "objects": [o.to_json() for o in self.objects]}

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(tuple(Obj.from_json(o) for o in d["objects"]), int(d.get("size", 64)),
                   str(d.get("background", "grey")), str(d.get("tone", "none")))

    def with_objects(self, objects) -> "Scene":
        return replace(self, objects=tuple(objects))


def unit_mask(cls: str, u: np.ndarray, v: np.ndarray, text: str = "") -> np.ndarray:
    """Whether box-relative points (u, v in [-1, 1], v down) lie inside the unit shape."""
    au, av = np.abs(u), np.abs(v)
    if cls == "circle":
        return u * u + v * v <= 1.0
    if cls == "square":
        return (au <= 1.0) & (av <= 1.0)
    if cls == "diamond":
        return au + av <= 1.0
    if cls == "triangle":  # apex up, base at v = 1
        return (v <= 1.0) & (au <= (v + 1.0) / 2.0)
    if cls == "cross":
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if cls == "star":
        ang = np.arctan2(u, -v)
        k = (np.mod(ang, 2 * np.pi / 5) - np.pi / 5) / (np.pi / 5)  # -1..1 within a spike
        return np.sqrt(u * u + v * v) <= 0.45 + 0.55 * (1.0 - np.abs(k))
    if cls == DIGIT:
        if text not in _GLYPH_BITS:
            raise ValueError(f"unknown digit {text!r}; digits: {', '.join(DIGITS)}")
        # cells grown by 15 % on each side so diagonal strokes stay connected
        fc, fr = (u + 1.0) * 2.5, (v + 1.0) * 3.5
        inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for r, c in zip(*np.nonzero(_GLYPH_BITS[text])):
            inside |= (fc >= c - 0.15) & (fc <= c + 1.15) & (fr >= r - 0.15) & (fr <= r + 1.15)
        return inside & (au <= 1.0) & (av <= 1.0)
    raise ValueError(f"unknown shape class {cls!r}; classes: {', '.join(CLASSES + (DIGIT,))}")


def coverage(obj: Obj, x0: int, y0: int, w: int, h: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Covered fraction (0..1) of each pixel of the window [x0, x0+w) x [y0, y0+h)."""
    xs = x0 + (np.arange(w * ss, dtype=np.float32) + 0.5) / ss
    ys = y0 + (np.arange(h * ss, dtype=np.float32) + 0.5) / ss
    u = ((xs - obj.cx) / (obj.width / 2))[None, :]  # broadcasting: the mask is (h*ss, w*ss)
    v = ((ys - obj.cy) / (obj.size / 2))[:, None]
    m = unit_mask(obj.cls, u, v, obj.text)
    if obj.style == "hollow":
        t = max(2.0, HOLLOW_WIDTH * obj.size) * ss
        m = m & ~(ndimage.distance_transform_edt(np.pad(m, 1)) [1:-1, 1:-1] > t)
    elif obj.style != "filled":
        raise ValueError(f"unknown style {obj.style!r}; styles: {', '.join(STYLES)}")
    return m.view(np.uint8).reshape(h, ss, w, ss).sum(axis=3, dtype=np.uint8).sum(
        axis=1, dtype=np.uint8).astype(np.float32) * np.float32(1.0 / (ss * ss))


def object_window(obj: Obj, n: int, pad: int = 1) -> tuple[int, int, int, int]:
    """The pixel window (x0, y0, w, h) around an object's box, clipped to an n x n canvas."""
    x0, y0, x1, y1 = obj.box()
    ix0, iy0 = max(0, int(np.floor(x0)) - pad), max(0, int(np.floor(y0)) - pad)
    ix1, iy1 = min(n, int(np.ceil(x1)) + pad), min(n, int(np.ceil(y1)) + pad)
    return ix0, iy0, max(0, ix1 - ix0), max(0, iy1 - iy0)


def object_colour(obj: Obj, jitter_seed: int | None, jitter: int = 8) -> np.ndarray:
    """The object's RGB: its prototype, shifted by up to ±jitter per channel when seeded. The shift
    depends on the seed and the object itself, so an object an edit leaves alone keeps its colour."""
    rgb = np.array(COLOURS[obj.colour], dtype=np.float32)
    if jitter_seed is None or jitter <= 0:
        return rgb
    key = f"{jitter_seed}|{obj.cls}|{obj.colour}|{obj.text}|{obj.cx:.2f}|{obj.cy:.2f}"
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return np.clip(rgb + rng.integers(-jitter, jitter + 1, size=3), 0, 255)


def apply_tone(img: np.ndarray, tone: str) -> np.ndarray:
    """A global per-channel affine colour change (float in, float out)."""
    if tone == "none":
        return img
    if tone not in TONES:
        raise ValueError(f"unknown tone {tone!r}; tones: none, {', '.join(TONES)}")
    gain, offset = (np.array(a, dtype=np.float32) for a in TONES[tone])
    return img * gain + offset


def render(scene: Scene, jitter_seed: int | None = None, jitter: int = 8) -> np.ndarray:
    """The scene as an HxWx3 uint8 image; object colours jitter by up to ±jitter when seeded."""
    n = scene.size
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    for o in scene.objects:
        if o.colour not in COLOURS:
            raise ValueError(f"unknown colour {o.colour!r}; colours: {', '.join(COLOURS)}")
        x0, y0, w, h = object_window(o, n)
        if w == 0 or h == 0:
            continue
        a = coverage(o, x0, y0, w, h)[..., None]
        win = img[y0:y0 + h, x0:x0 + w]
        win[:] = win * (1.0 - a) + object_colour(o, jitter_seed, jitter) * a
    img = apply_tone(img, scene.tone)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ placement
SIZE_RANGE = (0.16, 0.30)  # bounding-box side as a fraction of the canvas
GAP = 3.0  # minimum free pixels between two objects' boxes


def apart(a: Obj, b: Obj, gap: float = GAP) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def fits(o: Obj, others: list[Obj] | tuple[Obj, ...], n: int, gap: float = GAP) -> bool:
    x0, y0, x1, y1 = o.box()
    return x0 >= 1 and y0 >= 1 and x1 <= n - 1 and y1 <= n - 1 and all(apart(o, b, gap) for b in others)


@dataclass(frozen=True)
class Spec:
    """What to place: class, colour, style, digit and an optional size range (fractions of W)."""
    cls: str
    colour: str
    style: str = "filled"
    text: str = ""
    size_range: tuple[float, float] = field(default=SIZE_RANGE)


def place(rng: np.random.Generator, spec: Spec, others: list[Obj] | tuple[Obj, ...], n: int = 64,
          accept=None, tries: int = 400) -> Obj | None:
    """A random non-overlapping position and size for ``spec``; ``accept(obj)`` may add a constraint
    (e.g. a relation). None when nothing fits after ``tries`` draws."""
    lo, hi = spec.size_range
    for _ in range(tries):
        s = float(rng.uniform(lo, hi) * n)
        w = s * (DIGIT_ASPECT if spec.cls == DIGIT else 1.0)
        cx = float(rng.uniform(w / 2 + 1, n - w / 2 - 1))
        cy = float(rng.uniform(s / 2 + 1, n - s / 2 - 1))
        o = Obj(spec.cls, spec.colour, round(cx, 2), round(cy, 2), round(s, 2), spec.style, spec.text)
        if fits(o, others, n) and (accept is None or accept(o)):
            return o
    return None


def place_all(rng: np.random.Generator, specs: list[Spec], n: int = 64, background: str = "grey",
              attempts: int = 50) -> Scene:
    """A scene with every spec placed without overlap (re-drawn from scratch if a layout jams)."""
    for _ in range(attempts):
        objs: list[Obj] = []
        for sp in specs:
            o = place(rng, sp, objs, n)
            if o is None:
                break
            objs.append(o)
        else:
            return Scene(tuple(objs), n, background)
    raise RuntimeError(f"could not place {len(specs)} objects on a {n}px canvas")


def random_scene(rng: np.random.Generator, n_objects: int, size: int = 64,
                 classes: tuple[str, ...] = CLASSES, colours: tuple[str, ...] = tuple(COLOURS),
                 fixed: list[tuple[str, str]] | None = None) -> Scene:
    """Non-overlapping random objects; ``fixed`` pins the (class, colour) of the first ones."""
    specs = []
    for i in range(n_objects):
        cls, colour = (fixed[i] if fixed and i < len(fixed)
                       else (classes[rng.integers(len(classes))], colours[rng.integers(len(colours))]))
        specs.append(Spec(cls, colour))
    return place_all(rng, specs, size)
