"""``shapes_cv``: a detector with no learned weights, by analysis-by-synthesis.

1. CIELAB; background = median of the border pixels; ``dbg`` = ΔE76 to it, smoothed (σ 0.7 px);
   foreground = holes-filled ``dbg > 20``, 8-connected components, tiny ones dropped.
2. Per component: colour = median Lab of its most saturated core pixels, nearest of the 10
   prototypes; soft alpha by projecting each pixel on the background -> object colour line.
3. Shape by template fit: for every class (and digit glyph) the size follows from the alpha mass
   and the class's area fraction, the centre from the alpha centroid; the template is rendered by
   the scene renderer itself and compared by soft IoU (also against a blurred template, as generated
   images are soft); the best class wins, its template box is the box. A hollow variant is tried
   when the silhouette has a hole.
4. Score = clip((IoU - 0.55) / 0.25, 0, 1): a calibrated confidence, so GenEval's thresholds keep
   their meaning (0.3 ~ IoU 0.625, counting's 0.9 ~ IoU 0.775). Fitted on renders with noise and
   blur: real shapes at noise σ 16 have IoU >= 0.80 (1st percentile), noise blobs at σ 30 <= 0.47.

:meth:`ShapesDetector.detect` returns GenEval's structure ``{class: [(array([x1, y1, x2, y2, score]),
mask), ...]}`` sorted by score; :meth:`ShapesDetector.analyze` the richer :class:`Analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
from scipy import ndimage

from components.world.palette import CLASSES, DIGIT, HOLLOW_CLASSES, nearest_colour, rgb_to_lab
from components.world.render import DIGIT_ASPECT, DIGITS, Obj, coverage, unit_mask

NAME = "shapes_cv"
FG_DELTA_E = 20.0
SMOOTH_SIGMA = 0.7
MIN_AREA_FRACTION = 0.005
TEMPLATE_BLUR = 0.8
IOU_ZERO, IOU_SPAN = 0.55, 0.25  # score = clip((IoU - IOU_ZERO) / IOU_SPAN, 0, 1)
DIGIT_TRY_BELOW = 0.85  # try digit glyphs when no shape fits better than this
REFINE_BELOW = 0.9  # refine the two best placements when the best fits worse than this
_EIGHT = np.ones((3, 3), dtype=bool)
_FIVE = np.ones((5, 5), dtype=bool)


def _template_stats() -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """Per template (class, digit): area fraction of its box, box aspect, centroid offset (u, v)."""
    g = (np.arange(400, dtype=np.float32) + 0.5) / 200 - 1.0
    u, v = np.meshgrid(g, g)
    out = {}
    for cls, text in [(c, "") for c in CLASSES] + [(DIGIT, d) for d in DIGITS]:
        m = unit_mask(cls, u, v, text)
        out[(cls, text)] = (float(m.mean()), DIGIT_ASPECT if cls == DIGIT else 1.0,
                            float(u[m].mean()), float(v[m].mean()))
    return out


_TEMPLATES = _template_stats()
_SHAPES = [(c, "", "filled") for c in CLASSES]
_HOLLOW = [(c, "", "hollow") for c in HOLLOW_CLASSES]
_GLYPHS = [(DIGIT, d, "filled") for d in DIGITS]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not reach the border filled in."""
    lab, _ = ndimage.label(~mask)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return mask | ((lab > 0) & ~np.isin(lab, edge))


def score_from_iou(iou: float) -> float:
    return float(np.clip((iou - IOU_ZERO) / IOU_SPAN, 0.0, 1.0))


@dataclass
class Detection:
    cls: str
    colour: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray  # bool HxW, the fitted silhouette (alpha > 0.5)
    style: str = "filled"
    text: str = ""
    iou: float = 0.0
    size: float = 0.0
    colour_delta_e: float = 0.0  # distance of the measured colour to its prototype
    colour_spread: float = 0.0  # robust spread (ΔE) of the object's core colour
    sharpness: float = 1.0  # 90th percentile alpha gradient on the boundary / a crisp edge's

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def as_obj(self) -> Obj:
        cx, cy = self.centre
        return Obj(self.cls, self.colour, cx, cy, self.size, self.style, self.text)


@dataclass
class Analysis:
    detections: list[Detection]  # every component, best score first
    background_lab: np.ndarray
    background_name: str
    small_blobs: int  # foreground specks below the minimum object area
    image: np.ndarray = field(repr=False)
    lab: np.ndarray = field(repr=False)
    foreground: np.ndarray = field(repr=False)  # bool HxW, holes filled

    @cached_property
    def background_noise(self) -> float:
        """Robust standard deviation (RGB units, mean over channels) of the background pixels at
        least 2 px away from any object."""
        quiet = ~ndimage.binary_dilation(self.foreground, _FIVE)
        rgb = self.image.reshape(-1, 3)[quiet.ravel()].astype(np.float32)
        if not len(rgb):
            return 0.0
        return float(np.mean(1.4826 * np.median(np.abs(rgb - np.median(rgb, axis=0)), axis=0)))


def colour_of(lab: np.ndarray, dbg: np.ndarray, region: np.ndarray) -> tuple[str, float, float, np.ndarray]:
    """Name, ΔE to its prototype, spread and median Lab of the object inside ``region``: its most
    saturated core pixels (so the anti-aliased rim and a hollow shape's hole do not count)."""
    core = ndimage.binary_erosion(region, _EIGHT)
    pick = core if core.sum() >= 3 else region
    d = dbg[pick]
    sel = lab[pick][d >= 0.75 * d.max()] if d.size else lab[pick]
    med = np.median(sel, axis=0)
    spread = float(np.median(np.linalg.norm(sel - med, axis=1))) if len(sel) else 0.0
    name, dist = nearest_colour(med)
    return name, dist, spread, med


def _soft_iou(a: np.ndarray, t: np.ndarray) -> float:
    den = np.maximum(a, t).sum()
    return float(np.minimum(a, t).sum() / den) if den > 0 else 0.0


_BLUR_TAPS = np.exp(-0.5 * (np.arange(-2, 3) / TEMPLATE_BLUR) ** 2)
_BLUR_TAPS = (_BLUR_TAPS / _BLUR_TAPS.sum()).astype(np.float32)


def _blur(t: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur (σ = TEMPLATE_BLUR, 5 taps, zeros outside): a template as a soft
    generator would draw it."""
    h, w = t.shape
    p = np.zeros((h + 4, w + 4), dtype=np.float32)
    p[2:-2, 2:-2] = t
    r = sum(_BLUR_TAPS[k] * p[:, k:k + w] for k in range(5))
    return sum(_BLUR_TAPS[k] * r[k:k + h] for k in range(5))


def _iou_soft(alpha: np.ndarray, t: np.ndarray) -> float:
    """Soft IoU against the template as rendered and against it blurred (generated images are soft)."""
    return max(_soft_iou(alpha, t), _soft_iou(alpha, _blur(t)))


def _place(alpha_place: np.ndarray, alpha: np.ndarray, x0: int, y0: int, candidates: list[tuple[str, str, str]]
           ) -> list[tuple[float, Obj]]:
    """Each candidate (class, digit, style) placed from the mass (-> size) and centroid (-> centre)
    of ``alpha_place`` (the silhouette, holes filled, for shapes) and scored by soft IoU with
    ``alpha`` on a coarse grid."""
    h, w = alpha.shape
    mass = float(alpha_place.sum())
    my = float(alpha_place.sum(axis=1) @ np.arange(h)) / mass + y0 + 0.5
    mx = float(alpha_place.sum(axis=0) @ np.arange(w)) / mass + x0 + 0.5
    out = []
    for cls, text, style in candidates:
        k, aspect, ou, ov = _TEMPLATES[(cls, text)]
        s = float(np.sqrt(mass / (k * aspect)))
        o = Obj(cls, "red", mx - ou * aspect * s / 2, my - ov * s / 2, s, style, text)
        out.append((_iou_soft(alpha, coverage(o, x0, y0, w, h, ss=2)), o))
    return out


def _refine(alpha: np.ndarray, x0: int, y0: int, iou: float, o: Obj) -> tuple[float, Obj]:
    """Coordinate search over size and centre (two rounds of shrinking steps): blur and noise bias
    the mass-based size of thin strokes."""
    h, w = alpha.shape
    steps = {"size": 0.05 * o.size, "cx": 0.5, "cy": 0.5}
    for _ in range(2):
        for key, step in steps.items():
            for sign in (1, -1):
                cand = replace(o, **{key: getattr(o, key) + sign * step})
                c_iou = _iou_soft(alpha, coverage(cand, x0, y0, w, h, ss=2))
                if c_iou > iou:
                    iou, o = c_iou, cand
                    break
        steps = {k: v / 2 for k, v in steps.items()}
    return iou, o


class ShapesDetector:
    """GenEval-compatible detector and colour classifier for the shapes world (no weights)."""

    name = NAME

    def analyze(self, image: np.ndarray) -> Analysis:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] < 3:
            raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
        img = img[..., :3]
        n_h, n_w = img.shape[:2]
        lab = rgb_to_lab(img)
        border = np.concatenate([lab[0], lab[-1], lab[1:-1, 0], lab[1:-1, -1]])
        bg = np.median(border, axis=0)
        dbg = np.linalg.norm(lab - bg, axis=-1)
        smooth = ndimage.gaussian_filter(lab, (SMOOTH_SIGMA, SMOOTH_SIGMA, 0))
        fg_raw = np.linalg.norm(smooth - bg, axis=-1) > FG_DELTA_E
        filled = _fill_holes(fg_raw)
        labels, n = ndimage.label(filled, structure=_EIGHT)
        min_area = max(4, MIN_AREA_FRACTION * n_h * n_w)
        dets, small = [], 0
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            y0, y1 = max(0, sl[0].start - 2), min(n_h, sl[0].stop + 2)
            x0, x1 = max(0, sl[1].start - 2), min(n_w, sl[1].stop + 2)
            comp = labels[y0:y1, x0:x1] == i
            if comp.sum() < min_area:
                small += int(comp.sum() >= 2)
                continue
            d = self._component(lab[y0:y1, x0:x1], dbg[y0:y1, x0:x1], bg, comp, fg_raw[y0:y1, x0:x1] & comp,
                                x0, y0, (n_h, n_w))
            if d is not None:
                dets.append(d)
        dets.sort(key=lambda d: -d.score)
        bg_name, _ = nearest_colour(bg, with_background=True)
        return Analysis(dets, bg, bg_name, small, img, lab, filled)

    def _component(self, lab, dbg, bg, comp, ring, x0, y0, shape) -> Detection | None:
        colour, dist, spread, obj_lab = colour_of(lab, dbg, ring if ring.any() else comp)
        dvec = obj_lab - bg
        den = float(dvec @ dvec)
        if den < 1e-6:
            return None
        region = ndimage.binary_dilation(comp, _EIGHT)
        alpha = np.clip(((lab - bg) @ dvec) / den, 0.0, 1.0) * region
        holes = comp & ~ring
        alpha_fill = alpha.copy()
        if holes.sum() >= 2:
            alpha_fill[ndimage.binary_dilation(holes, _EIGHT) & comp] = 1.0
        if alpha_fill.sum() < 4:
            return None
        fits = _place(alpha_fill, alpha, x0, y0, _SHAPES)
        if holes.sum() >= 2:  # a hollow shape or a glyph with a counter (0, 4, 6, 8, 9)
            fits += _place(alpha_fill, alpha, x0, y0, _HOLLOW) + _place(alpha, alpha, x0, y0, _GLYPHS)
        elif max(f[0] for f in fits) < DIGIT_TRY_BELOW:
            fits += _place(alpha, alpha, x0, y0, _GLYPHS)
        fits.sort(key=lambda f: -f[0])
        if fits[0][0] < REFINE_BELOW:
            fits = sorted((_refine(alpha, x0, y0, *f) for f in fits[:2]), key=lambda f: -f[0])
        obj = fits[0][1]
        h, w = alpha.shape
        tmpl = coverage(obj, x0, y0, w, h)
        iou = _iou_soft(alpha, tmpl)
        mask = np.zeros(shape, dtype=bool)
        mask[y0:y0 + comp.shape[0], x0:x0 + comp.shape[1]] = tmpl > 0.5
        gy, gx = np.gradient(alpha)
        band = region & ~ndimage.binary_erosion(comp, _EIGHT, iterations=2)
        grad = np.hypot(gx, gy)[band]
        sharp = float(np.clip(np.percentile(grad, 90) / 0.45, 0, 1)) if grad.size else 1.0
        return Detection(obj.cls, colour, obj.box(), score_from_iou(iou), mask, obj.style, obj.text, iou, obj.size,
                         dist, spread, sharp)

    def detect(self, image: np.ndarray) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """GenEval's structure: per class, (array([x1, y1, x2, y2, score]), mask), best score first."""
        out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for d in self.analyze(image).detections:
            out.setdefault(d.cls, []).append((np.array([*d.box, d.score], dtype=np.float64), d.mask))
        return out

    def classify_colours(self, image: np.ndarray, objects: list, classname: str) -> list[str]:
        """GenEval's colour step: the colour name of each (box, mask) object."""
        lab = rgb_to_lab(np.asarray(image)[..., :3])
        border = np.concatenate([lab[0], lab[-1], lab[1:-1, 0], lab[1:-1, -1]])
        dbg = np.linalg.norm(lab - np.median(border, axis=0), axis=-1)
        names = []
        for box, mask in objects:
            region = mask if mask is not None and mask.any() else _box_mask(box, lab.shape[:2])
            names.append(colour_of(lab, dbg, region)[0])
        return names


def _box_mask(box, shape) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box[:4])
    m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return m
