"""``shapes_cv``: a VIEScore-compatible GEdit judge for the shapes world, built on the detector.

Like GEdit's VLM judge it sees only the source image, the edited image and the instruction, and
returns integer sub-scores 0-10: SC = min(edit success, over-editing) from both images, PQ =
min(naturalness, artifacts) from the edited image alone, O = sqrt(SC * PQ).

- The instruction is parsed by the world's grammar into an edit; the target is found among the
  source's detections.
- **edit success** = round(10 x credit of the edit's predicate), graded (a recolour to the wrong
  colour 0.2, a replacement of the right class but a new colour 0.7, a move that misses the
  relation 0.3, a resize in proportion to the area ratio reached); an unchanged image scores 0.
- **over-editing** = round(10 x min(p_obj, p_bg, p_pix)): the share of the other objects found again
  (same class and colour, centre within 0.05 W, area ratio 0.8-1.25), halved for each unexplained
  extra object; the background colour kept (ΔE < 10; not for background and tone edits); the
  share of changed pixels (smoothed ΔE > 15) outside the edited regions.
- **naturalness** = round(10 x mean detection confidence x background uniformity);
  **artifacts** = round(10 x (1 - spurious blobs, edge softness and colour impurity)).

Tone edits are judged on the edited image mapped back by a per-channel affine fit, so the objects'
colours and positions can be checked under the new tone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from components.evaluation.geneval import relative_position
from components.evaluation.images import load_png
from components.world.detector import Analysis, Detection, ShapesDetector
from components.world.gedit import matches, parse

NAME = "shapes_cv"
KEEP_SCORE = 0.3  # detections above GenEval's threshold count as objects
SHIFT, NEAR = 0.05, 0.1  # centre tolerance (fraction of W) for a kept object / for the edited target
AREA = (0.8, 1.25)
CHANGED_DE, PIX_FREE, PIX_SPAN = 15.0, 0.01, 0.10
NOISE_OK, NOISE_BAD = 3.0, 20.0  # background noise (RGB std) with full / no uniformity
RESIZE_AREA = {"bigger": 1.3, "smaller": 0.77}
TONE_NEEDED = {"darker": ("L", -10.0), "brighter": ("L", 10.0), "warmer": ("b", 8.0), "cooler": ("b", -8.0)}


@dataclass
class Verdict:
    edit_success: int
    over_editing: int
    naturalness: int
    artifacts: int
    SC: int
    PQ: int
    O: float
    note: str = ""


def _objects(a: Analysis) -> list[Detection]:
    return [d for d in a.detections if d.score > KEEP_SCORE]


def _dist(a: Detection, b: Detection) -> float:
    (ax, ay), (bx, by) = a.centre, b.centre
    return math.hypot(ax - bx, ay - by)


def _same_kind(a: Detection, b: Detection, style: bool = True) -> bool:
    return a.cls == b.cls and a.colour == b.colour and a.text == b.text and (not style or a.style == b.style)


def _match(kept: list[Detection], found: list[Detection], w: int, style: bool = True) -> dict[int, int]:
    """Greedy matching of expected objects to detections: same kind, small shift, similar area."""
    pairs, used = {}, set()
    for i, k in enumerate(kept):
        best = None
        for j, f in enumerate(found):
            if j in used or not _same_kind(k, f, style) or _dist(k, f) > SHIFT * w:
                continue
            if not AREA[0] <= (f.size / k.size) ** 2 <= AREA[1]:
                continue
            if best is None or _dist(k, f) < _dist(k, found[best]):
                best = j
        if best is not None:
            pairs[i] = best
            used.add(best)
    return pairs


def _nearest(d: Detection, pool: list[tuple[int, Detection]], w: int, same_cls: bool = False):
    cands = [(j, f) for j, f in pool if _dist(d, f) <= NEAR * w and (not same_cls or f.cls == d.cls)]
    return min(cands, key=lambda jf: _dist(d, jf[1]), default=(None, None))


def _affine_back(edited: np.ndarray, src: np.ndarray) -> np.ndarray:
    """The edited image mapped back through the per-channel affine map ``edited ~ a * src + b``
    fitted by least squares (the clean source as regressor, so noise does not shrink the fit)."""
    e, s = edited.reshape(-1, 3).astype(np.float64), src.reshape(-1, 3).astype(np.float64)
    out = np.empty_like(e)
    for c in range(3):
        x = np.vstack([s[:, c], np.ones(len(s))]).T
        (a, b), *_ = np.linalg.lstsq(x, e[:, c], rcond=None)
        out[:, c] = (e[:, c] - b) / a if abs(a) > 1e-3 else e[:, c]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(edited.shape)


class ShapesJudge:
    """``evaluate([src, edited], instruction) -> [SC, PQ, O]`` as VIEScore; :meth:`judge` gives all
    sub-scores."""

    name = NAME

    def __init__(self, detector: ShapesDetector | None = None):
        self.detector = detector or ShapesDetector()
        self._cache: dict[bytes, Analysis] = {}

    def evaluate(self, images: list[np.ndarray], instruction: str) -> list[float]:
        v = self.judge(images[0], images[1], instruction)
        return [v.SC, v.PQ, v.O]

    def _analyze_source(self, src: np.ndarray) -> Analysis:
        key = src.tobytes()  # the EN and CN rows share a source: analyse it once
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self.detector.analyze(src)
        return self._cache[key]

    def judge(self, src: np.ndarray, edited: np.ndarray, instruction: str) -> Verdict:
        src, edited = np.asarray(src)[..., :3], np.asarray(edited)[..., :3]
        if edited.shape != src.shape:  # GEdit resizes the edited image to the source's size
            from PIL import Image

            edited = np.asarray(Image.fromarray(edited).resize((src.shape[1], src.shape[0]), Image.BICUBIC))
        edit = parse(instruction)
        a_s = self._analyze_source(src)
        a_q = self.detector.analyze(edited)  # quality is judged on the image as it is
        view = _affine_back(edited, src) if edit["op"] == "tone" else edited
        a_e = a_q if view is edited else self.detector.analyze(view)
        success, over, note = self._semantics(edit, a_s, a_e, a_q)
        nat, art = self._quality(a_q)
        sc, pq = min(success, over), min(nat, art)
        return Verdict(success, over, nat, art, sc, pq, math.sqrt(sc * pq), note)

    # ------------------------------------------------------------------ semantic consistency
    def _semantics(self, edit: dict, a_s: Analysis, a_e: Analysis, a_raw: Analysis) -> tuple[int, int, str]:
        """(edit success, over-editing, note); ``a_e`` analyses the edited image as judged (mapped
        back for tone edits), ``a_raw`` as it is."""
        w = a_s.lab.shape[1]
        S, E = _objects(a_s), _objects(a_e)
        op = edit["op"]
        target = None
        if "target" in edit:
            hits = [d for d in S if matches(d, edit["target"])]
            if not hits:
                return 0, 0, "target not found in the source"
            target = hits[0]
        kept = [d for d in S if d is not target]
        pairs = _match(kept, E, w, style=op != "outline_all")
        free = [(j, f) for j, f in enumerate(E) if j not in pairs.values()]
        credit, result, note = self._credit(edit, S, E, kept, pairs, free, target, a_s, a_e, a_raw, w)
        extras = len(free) - (result is not None)
        p_obj = (len(pairs) / len(kept) if kept else 1.0) * 0.5 ** max(0, extras)
        p_bg = 1.0
        if op not in ("background", "tone"):
            de = float(np.linalg.norm(a_e.background_lab - a_s.background_lab))
            p_bg = float(np.clip(1 - (de - 10) / 10, 0, 1))
        p_pix = self._unchanged_pixels(edit, a_s, a_e, target, result, w)
        over = round(10 * min(p_obj, p_bg, p_pix))
        return round(10 * credit), over, note

    def _credit(self, edit, S, E, kept, pairs, free, target, a_s, a_e, a_raw, w):
        """(credit 0..1, the detection the edit produced or None, note)."""
        op = edit["op"]
        if op == "background":
            de = float(np.linalg.norm(a_e.background_lab - a_s.background_lab))
            if a_e.background_name == edit["colour"]:
                return 1.0, None, ""
            return (0.2 if de > 10 else 0.0), None, f"background {a_e.background_name}"
        if op == "tone":
            channel, need = TONE_NEEDED[edit["tone"]]
            i = 0 if channel == "L" else 2
            delta = float(a_raw.lab[..., i].mean() - a_s.lab[..., i].mean())
            return float(np.clip(delta / need, 0, 1)), None, f"delta {channel} {delta:.1f}"
        if op == "outline_all":
            hollow = sum(E[j].style == "hollow" for j in pairs.values())
            return (hollow / len(kept) if kept else 0.0), None, f"{hollow}/{len(kept)} hollow"
        if op == "add":
            ref = self._find(edit["reference"], S, E, kept, pairs)
            want = [(j, f) for j, f in free if f.cls == edit["object"]["cls"] and f.colour == edit["object"]["colour"]]
            if want:
                ok = [(j, f) for j, f in want if ref is not None and edit["relation"] in relative_position(f.box, ref.box)]
                j, f = (ok or want)[0]
                return (1.0 if ok else 0.6), f, "" if ok else "added, relation not met"
            if free:
                return 0.3, free[0][1], "added the wrong object"
            return 0.0, None, "nothing added"
        if op == "move":
            ref = self._find(edit["reference"], S, E, kept, pairs)
            cands = [(j, f) for j, f in free if _same_kind(f, target)]
            if not cands:
                return 0.0, None, "target lost"
            ok = [(j, f) for j, f in cands if ref is not None and edit["relation"] in relative_position(f.box, ref.box)]
            if ok:
                return 1.0, ok[0][1], ""
            j, f = min(cands, key=lambda jf: _dist(jf[1], target))
            return (0.3 if _dist(f, target) > SHIFT * w else 0.0), f, "relation not met"
        j, f = _nearest(target, free, w, same_cls=op in ("recolour", "hollow", "resize", "remove"))
        if op == "remove":
            if f is not None and f.colour == target.colour:
                return 0.0, f, "target still there"
            return 1.0, None, ""
        if f is None:
            return 0.0, None, "target lost"
        if op == "recolour":
            c = 1.0 if f.colour == edit["colour"] else (0.0 if f.colour == target.colour else 0.2)
            return c, f, f"colour {f.colour}"
        if op == "hollow":
            return (0.0 if f.style != "hollow" else 1.0 if f.colour == target.colour else 0.7), f, f"style {f.style}"
        if op == "resize":
            ratio = (f.size / target.size) ** 2
            need = RESIZE_AREA[edit["direction"]]
            c = (ratio - 1) / (need - 1)
            return float(np.clip(c, 0, 1)), f, f"area ratio {ratio:.2f}"
        if op == "replace":
            if f.cls == edit["cls"]:
                return (1.0 if f.colour == target.colour else 0.7), f, ""
            return (0.0 if f.cls == target.cls else 0.2), f, f"class {f.cls}"
        if op == "retext":
            if f.cls != target.cls:
                return 0.0, f, f"class {f.cls}"
            return (1.0 if f.text == edit["text"] else 0.0 if f.text == target.text else 0.2), f, f"digit {f.text}"
        raise ValueError(f"unknown op {op!r}")

    @staticmethod
    def _find(t: dict, S, E, kept, pairs) -> Detection | None:
        """A named reference object where it is in the edited image (else where it was)."""
        for i, k in enumerate(kept):
            if matches(k, t):
                return E[pairs[i]] if i in pairs else k
        return None

    # ------------------------------------------------------------------ pixels outside the edit
    @staticmethod
    def _unchanged_pixels(edit, a_s: Analysis, a_e: Analysis, target, result, w) -> float:
        h = a_s.lab.shape[0]
        op = edit["op"]
        region = np.ones((h, w), dtype=bool)
        boxes = [d.box for d in (target, result) if d is not None]
        if op == "outline_all":
            boxes += [d.box for d in _objects(a_s)] + [d.box for d in _objects(a_e)]
        for x0, y0, x1, y1 in boxes:
            region[max(0, int(y0) - 3):min(h, int(math.ceil(y1)) + 3), max(0, int(x0) - 3):min(w, int(math.ceil(x1)) + 3)] = False
        if op == "background":  # only the objects' insides must stay
            region = ndimage.binary_erosion(a_s.foreground, iterations=2)
        if not region.any():
            return 1.0
        ls = ndimage.gaussian_filter(a_s.lab, (1, 1, 0))
        le = ndimage.gaussian_filter(a_e.lab, (1, 1, 0))
        changed = np.linalg.norm(ls - le, axis=-1) > CHANGED_DE
        frac = float(changed[region].mean())
        return float(np.clip(1 - (frac - PIX_FREE) / PIX_SPAN, 0, 1))

    # ------------------------------------------------------------------ perceptual quality
    @staticmethod
    def _quality(a: Analysis) -> tuple[int, int]:
        dets = a.detections
        objs = _objects(a)
        conf = float(np.mean([d.score for d in dets])) if dets else 1.0
        uniform = 1 - float(np.clip((a.background_noise - NOISE_OK) / (NOISE_BAD - NOISE_OK), 0, 1))
        naturalness = round(10 * conf * uniform)
        spurious = sum(d.score <= KEEP_SCORE for d in dets) + a.small_blobs
        soft = float(np.mean([1 - d.sharpness for d in objs])) if objs else 0.0
        impure = float(np.mean([np.clip((d.colour_spread - 4) / 12, 0, 1) for d in objs])) if objs else 0.0
        artifacts = round(10 * (1 - float(np.clip(0.2 * spurious + soft + impure, 0, 1))))
        return naturalness, artifacts



# ----------------------------------------------------------------------------- back ends
class Judge:  # the interface (VIEScore's): evaluate([source, edited], instruction) -> [SC, PQ, O]
    name: str

    def evaluate(self, images: list[np.ndarray], instruction: str) -> list[float]: ...


JUDGES = {"shapes_cv": ShapesJudge}  # GEdit's VLM judges (gpt-4.1, qwen2.5-vl) would register here


def get_judge(judge: "str | Judge") -> "Judge":
    if not isinstance(judge, str):
        return judge
    if judge not in JUDGES:
        raise ValueError(f"unknown judge back end {judge!r}; available: {', '.join(JUDGES)}")
    return JUDGES[judge]()


# ----------------------------------------------------------------------------- GEdit's files and statistics
# GEdit's test_gedit_score.py / calculate_statistics.py: CSV columns (the misspelling is GEdit's),
# O = sqrt(SC * PQ) per sample, mean per category, unweighted mean over the categories.
CSV_COLUMNS = ("source_image", "edited_image", "instruction", "sementics_score", "quality_score",
               "intersection_exist", "instruction_language")


class GEditInputError(ValueError):
    """A GEdit output folder, benchmark file or CSV is malformed (the message names the file)."""


def statistics(rows: list[dict], language: str, groups: list[str] | None = None,
               intersection_only: bool = False) -> dict:
    """``calculate_statistics.py`` on CSV-like rows (``sementics_score``, ``quality_score``,
    ``instruction_language``, ``intersection_exist`` and a ``task_type`` per row): per category the
    mean SC, PQ and O with O_i = sqrt(SC_i * PQ_i); ``average`` = unweighted mean over the
    categories present. ``language`` "zh" is read as "cn" (GEdit's argparse choice vs. its data)."""
    language = "cn" if language == "zh" else language
    cats: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["instruction_language"] != language:
            continue
        if intersection_only and not _truthy(r["intersection_exist"]):
            continue
        sc, pq = float(r["sementics_score"]), float(r["quality_score"])
        cats.setdefault(r["task_type"], []).append((sc, pq, math.sqrt(sc * pq)))
    order = [g for g in (groups or list(cats)) if g in cats]
    per = {g: {"SC": float(np.mean([v[0] for v in cats[g]])), "PQ": float(np.mean([v[1] for v in cats[g]])),
               "O": float(np.mean([v[2] for v in cats[g]])), "n": len(cats[g])} for g in order}
    avg = {k: (float(np.mean([per[g][k] for g in order])) if order else 0.0) for k in ("SC", "PQ", "O")}
    return {"categories": per, **avg}


def _truthy(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("true", "1", "yes")


def format_statistics(stats: dict, title: str = "") -> str:
    """The lines calculate_statistics.py prints: ``group: SC, PQ, O`` with 3 decimals."""
    lines = [title] if title else []
    lines += [f"{g}: {v['SC']:.3f}, {v['PQ']:.3f}, {v['O']:.3f}" for g, v in stats["categories"].items()]
    lines.append(f"Average: {stats['SC']:.3f}, {stats['PQ']:.3f}, {stats['O']:.3f}")
    return "\n".join(lines)


def write_csvs(results: list[dict], out_dir: Path, model: str) -> list[Path]:
    """GEdit's CSVs: ``<model>_<group>_gpt_score.csv`` per category and ``<model>_combined_gpt_score.csv``."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["task_type"], []).append(r)
    paths = []
    for name, rows in [*groups.items(), ("combined", results)]:
        p = out_dir / f"{model}_{name}_gpt_score.csv"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        paths.append(p)
    return paths


def read_csv(path: Path) -> list[dict]:
    """A GEdit score CSV; the category of each row is taken from its edited image's folder
    (``.../fullset/<task_type>/<language>/<key>.png``) when there is no ``task_type`` column."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise GEditInputError(f"{path}: cannot read ({e})") from None
    for i, r in enumerate(rows, 2):
        missing = [c for c in ("sementics_score", "quality_score", "instruction_language") if not r.get(c)]
        if missing:
            raise GEditInputError(f"{path}:{i}: missing column(s) {', '.join(missing)}")
        try:
            float(r["sementics_score"]), float(r["quality_score"])
        except ValueError:
            raise GEditInputError(f"{path}:{i}: scores must be numbers") from None
        if not r.get("task_type"):
            parts = Path(r.get("edited_image", "")).parts
            if len(parts) < 3:
                raise GEditInputError(f"{path}:{i}: no task_type column and no category folder in edited_image")
            r["task_type"] = parts[-3]
    return rows


def summarize(results: list[dict], judge: str) -> dict:
    """Per language: SC, PQ, O (macro over categories), the categories, and the intersection subset."""
    out: dict = {"judge": judge, "n": len(results)}
    from components.world.gedit import CATEGORIES, LANGUAGES

    for lang in LANGUAGES:
        if any(r["instruction_language"] == lang for r in results):
            s = statistics(results, lang, list(CATEGORIES))
            s["intersection"] = {k: v for k, v in statistics(results, lang, list(CATEGORIES), True).items()
                                 if k != "categories"}
            out[lang] = s
    return out


def score_gedit(rows: list[dict], sources: list[np.ndarray], edited: list[np.ndarray],
                judge: "str | Judge" = "shapes_cv", return_results: bool = False) -> dict:
    """Score edits in memory: ``rows`` are GEdit rows (``task_type, key, instruction,
    instruction_language, Intersection_exist``), ``sources[i]`` / ``edited[i]`` their images."""
    if not len(rows) == len(sources) == len(edited):
        raise ValueError(f"{len(rows)} rows, {len(sources)} sources, {len(edited)} edited images")
    j = get_judge(judge)
    results = []
    for r, s, e in zip(rows, sources, edited):
        sc, pq, _ = j.evaluate([np.asarray(s), np.asarray(e)], r["instruction"])
        lang = r["instruction_language"]
        results.append({"source_image": f"fullset/{r['task_type']}/{lang}/{r['key']}_SRCIMG.png",
                        "edited_image": f"fullset/{r['task_type']}/{lang}/{r['key']}.png",
                        "instruction": r["instruction"], "sementics_score": sc, "quality_score": pq,
                        "intersection_exist": bool(r.get("Intersection_exist", True)),
                        "instruction_language": lang, "task_type": r["task_type"], "key": r["key"]})
    out = summarize(results, j.name)
    if return_results:
        out["results"] = results
    return out


# ----------------------------------------------------------------------------- folders
def _load_png(path: Path) -> np.ndarray:
    return load_png(path, GEditInputError)


def read_benchmark(path: Path) -> list[dict]:
    """GEdit-shapes rows (``benchmarks/gedit/gedit.jsonl``), validated."""
    from components.world.datasets import DatasetError, validate_dataset

    path = Path(path)
    folder = path.parent if path.suffix == ".jsonl" else path
    try:
        validate_dataset(folder, "gedit")
    except DatasetError as e:
        raise GEditInputError(str(e)) from None
    return [json.loads(x) for x in (folder / "gedit.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]


def benchmark_rows(seed: int = 0, scale: float = 1.0) -> list[dict]:
    """The GEdit-shapes rows generated in memory (the same as the world_data stage writes)."""
    from components.world.gedit import make_samples, rows_of

    return [r for s in make_samples(seed, scale) for r in rows_of(s, f"images/{s['key']}.png")]


def write_folder(rows: list[dict], sources: list[np.ndarray], edited: list[np.ndarray], model_dir: Path) -> Path:
    """GEdit's output layout: ``<model_dir>/fullset/<task_type>/<lang>/<key>.png`` and ``<key>_SRCIMG.png``."""
    from PIL import Image

    model_dir = Path(model_dir)
    for r, s, e in zip(rows, sources, edited):
        d = model_dir / "fullset" / r["task_type"] / r["instruction_language"]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(e, dtype=np.uint8)).save(d / f"{r['key']}.png")
        Image.fromarray(np.asarray(s, dtype=np.uint8)).save(d / f"{r['key']}_SRCIMG.png")
    return model_dir


def evaluate_folder(model_dir: Path, rows: list[dict] | None = None, judge: "str | Judge" = "shapes_cv",
                    out_dir: Path | None = None, languages: tuple[str, ...] = ("en", "cn")) -> dict:
    """Score GEdit's output layout under ``model_dir`` (``fullset/<task>/<lang>/<key>.png`` with
    ``<key>_SRCIMG.png``) against the benchmark ``rows`` (default: GEdit-shapes generated in memory).
    Writes GEdit's CSVs into ``<model_dir>/<judge>/eval_results_new/`` (or ``out_dir``) and
    ``summary.json``; rows without an edited image are skipped and counted as missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GEditInputError(f"{model_dir}: no such directory")
    full = model_dir / "fullset"
    if not full.is_dir():
        raise GEditInputError(f"{model_dir}: no fullset/ folder (expected fullset/<task_type>/<language>/<key>.png)")
    rows = benchmark_rows() if rows is None else rows
    j = get_judge(judge)
    results, missing = [], 0
    for r in rows:
        lang = r["instruction_language"]
        if lang not in languages:
            continue
        d = full / r["task_type"] / lang
        e_path, s_path = d / f"{r['key']}.png", d / f"{r['key']}_SRCIMG.png"
        if not e_path.exists():
            missing += 1
            continue
        if not s_path.exists():
            raise GEditInputError(f"{s_path}: missing (GEdit's layout keeps the source next to the edit)")
        sc, pq, _ = j.evaluate([_load_png(s_path), _load_png(e_path)], r["instruction"])
        results.append({"source_image": str(s_path), "edited_image": str(e_path), "instruction": r["instruction"],
                        "sementics_score": sc, "quality_score": pq,
                        "intersection_exist": bool(r.get("Intersection_exist", True)),
                        "instruction_language": lang, "task_type": r["task_type"], "key": r["key"]})
    if not results:
        raise GEditInputError(f"{full}: none of the {missing} benchmark rows has an edited image "
                              "(fullset/<task_type>/<language>/<key>.png)")
    out = Path(out_dir) if out_dir is not None else model_dir / j.name / "eval_results_new"
    write_csvs(results, out, model_dir.name)
    summary = summarize(results, j.name)
    summary["missing"] = missing
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
