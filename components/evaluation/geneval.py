"""GenEval's scoring rules (djghosh13/geneval ``evaluation/evaluate_images.py`` and
``summary_scores.py``), re-implemented with the detector as a swappable back end.

Behaviour kept from GenEval:

- per class: detections sorted by score, kept if ``score > threshold`` (0.3; 0.9 for the
  ``counting`` tag, include and exclude alike), at most ``max_objects`` (16), greedy NMS at
  ``max_overlap`` (1.0 = off);
- clauses: includes ANDed, excludes ORed; count = the ``count`` best detections must exist;
  colour and position look only at those; exclude fails at ``>= count`` detections;
  position compares every (object, target) pair with :func:`relative_position` (margin 0.1);
- reason strings as GenEval words them; one ``results.jsonl`` row per image with the keys
  ``filename, tag, prompt, correct, reason, metadata, details`` (metadata and details are
  JSON strings);
- summary: image-level accuracy per tag, overall = unweighted mean of the tags' accuracies,
  plus the share of correct images and of prompts with any correct image.

Folder layout read: ``<dir>/<NNNNN>/metadata.jsonl`` (one JSON object) and
``<dir>/<NNNNN>/samples/<NNNN>.png``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from components.evaluation.images import load_png

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

DetectedObject = tuple[np.ndarray, Any]  # (array([x1, y1, x2, y2, score]), mask or None)


class GenEvalInputError(ValueError):
    """A GenEval image folder or metadata line is malformed (the message names the file)."""


class Detector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> dict[str, list[DetectedObject]]: ...

    def classify_colours(self, image: np.ndarray, objects: list[DetectedObject], classname: str) -> list[str]: ...


def _shapes_cv() -> Detector:
    from components.world.detector import ShapesDetector

    return ShapesDetector()


# Back ends by name. GenEval's own (mask2former + openclip) would register here when installed.
DETECTORS: dict[str, Callable[[], Detector]] = {"shapes_cv": _shapes_cv}


def get_detector(detector: str | Detector) -> Detector:
    if not isinstance(detector, str):
        return detector
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector back end {detector!r}; available: {', '.join(DETECTORS)}")
    return DETECTORS[detector]()


@dataclass(frozen=True)
class Options:
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1


# ----------------------------------------------------------------------------- geometry
def compute_iou(box_a, box_b) -> float:
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in box_b[:4])
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _box(obj) -> np.ndarray:
    """x1, y1, x2, y2 of a detection ``(box, mask)`` or of a bare box."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and np.ndim(obj[0]) == 1:
        obj = obj[0]
    return np.asarray(obj, dtype=np.float64)[:4]


def relative_position(obj_a, obj_b, threshold: float = 0.1) -> set[str]:
    """GenEval's relations of object A to object B (each ``(box, mask)`` or a box): the centre
    offset, shrunk per axis by ``threshold`` x (sum of the two boxes' sizes) toward zero, over
    the offset's length; a component beyond ±0.5 names the relation (image y grows downward).
    Overlapping or touching boxes (no offset left) have no relation."""
    a, b = _box(obj_a), _box(obj_b)
    centre_a, centre_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dim_a, dim_b = np.abs(a[2:] - a[:2]), np.abs(b[2:] - b[:2])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# ----------------------------------------------------------------------------- one image
def keep_detections(raw: dict[str, list[DetectedObject]], tag: str, options: Options = Options()
                    ) -> dict[str, list[DetectedObject]]:
    """GenEval's post-processing: threshold (strictly above), cap at max_objects, greedy NMS."""
    threshold = options.counting_threshold if tag == "counting" else options.threshold
    kept: dict[str, list[DetectedObject]] = {}
    for cls, objs in raw.items():
        order = sorted(objs, key=lambda o: -float(o[0][4]))
        order = [o for o in order if float(o[0][4]) > threshold][:options.max_objects]
        chosen: list[DetectedObject] = []
        while order:
            top = order.pop(0)
            chosen.append(top)
            order = [o for o in order
                     if options.max_overlap == 1 or compute_iou(top[0], o[0]) < options.max_overlap]
        if chosen:
            kept[cls] = chosen
    return kept


def evaluate(image: np.ndarray | None, objects: dict[str, list[DetectedObject]], metadata: dict,
             classify_colours: Callable[[Any, list[DetectedObject], str], list[str]],
             options: Options = Options()) -> tuple[bool, str]:
    """GenEval's clause check: (correct, newline-joined reasons)."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        matched = True
        found = objects.get(cls, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colours = classify_colours(image, found, cls)
                want = req["color"]
                if colours.count(want) < count:
                    correct = matched = False
                    reasons.append(f"expected {want} {cls}>={count}, found {colours.count(want)} {want}; and "
                                   + ", ".join(f"{colours.count(c)} {c}" for c in COLORS if c in colours))
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in groups[target]:
                            rels = relative_position(obj, tgt, options.position_threshold)
                            if rel not in rels:
                                correct = matched = False
                                reasons.append(f"expected {cls} {rel} target, found {' and '.join(rels)} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls = req["class"]
        if len(objects.get(cls, [])) >= int(req["count"]):
            correct = False
            reasons.append(f"expected {cls}<{req['count']}, found {len(objects[cls])}")
    return correct, "\n".join(reasons)


def evaluate_image(image: np.ndarray, metadata: dict, detector: Detector, filename: str = "",
                   options: Options = Options()) -> dict:
    """One ``results.jsonl`` row, GenEval's keys."""
    detected = keep_detections(detector.detect(image), metadata["tag"], options)
    ok, reason = evaluate(image, detected, metadata, detector.classify_colours, options)
    return {
        "filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"],
        "correct": bool(ok), "reason": reason, "metadata": json.dumps(metadata),
        "details": json.dumps({cls: [[float(v) for v in box] for box, _ in objs] for cls, objs in detected.items()}),
    }


# ----------------------------------------------------------------------------- aggregation
def _wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 5), round(min(1.0, centre + half), 5)]


def summarize(results: Iterable[dict], detector: str = "shapes_cv") -> dict:
    """``summary_scores.py``: image-level accuracy per tag (in order of first appearance),
    overall = unweighted mean over the tags present, plus image and prompt (any correct) shares
    and a 95 % Wilson interval per tag."""
    rows = list(results)
    tags: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in rows:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    per_tag = {t: float(np.mean(v)) for t, v in tags.items()}
    return {
        "detector": detector,
        "n_images": len(rows), "n_prompts": len(prompts),
        "correct_images": float(np.mean([r["correct"] for r in rows])) if rows else 0.0,
        "correct_prompts": float(np.mean(list(prompts.values()))) if prompts else 0.0,
        "tags": per_tag,
        "tag_counts": {t: [int(sum(v)), len(v)] for t, v in tags.items()},
        "tag_ci95": {t: _wilson(int(sum(v)), len(v)) for t, v in tags.items()},
        "overall": float(np.mean(list(per_tag.values()))) if per_tag else 0.0,
    }


def format_summary(summary: dict) -> str:
    """The lines ``summary_scores.py`` prints."""
    lines = [f"Total images: {summary['n_images']}", f"Total prompts: {summary['n_prompts']}",
             f"% correct images: {summary['correct_images']:.2%}",
             f"% correct prompts: {summary['correct_prompts']:.2%}"]
    for tag, acc in summary["tags"].items():
        k, n = summary["tag_counts"][tag]
        lines.append(f"{tag:<16} = {acc:.2%} ({k} / {n})")
    lines.append(f"Overall score (avg. over tasks): {summary['overall']:.5f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- in memory
def score_geneval(metadata_rows: list[dict], images_per_prompt: list[list[np.ndarray]],
                  detector: str | Detector = "shapes_cv", options: Options = Options(),
                  return_results: bool = False) -> dict:
    """Score generated images without writing GenEval's folder layout: ``images_per_prompt[i]``
    are the samples of ``metadata_rows[i]``. ``return_results`` adds the per-image rows."""
    if len(metadata_rows) != len(images_per_prompt):
        raise ValueError(f"{len(metadata_rows)} metadata rows but {len(images_per_prompt)} image lists")
    det = get_detector(detector)
    results = [evaluate_image(np.asarray(img), meta, det, f"{i:05d}/samples/{j:04d}.png", options)
               for i, (meta, imgs) in enumerate(zip(metadata_rows, images_per_prompt)) for j, img in enumerate(imgs)]
    summary = summarize(results, det.name)
    summary["options"] = asdict(options)
    if return_results:
        summary["results"] = results
    return summary


def samples_per_prompt(metadata_rows: list[dict], samples: int, min_task_images: int = 0) -> list[int]:
    """Images to draw for each prompt: GenEval's ``samples`` each, and more for a task with so few
    prompts that ``samples`` each would give it fewer than ``min_task_images`` images (every prompt of
    that task then gets ``ceil(min_task_images / prompts)``). The overall score is the mean of the six
    task accuracies, so a task of 6 prompts (24 images) moves it as much as one of 99 (396 images);
    sampling its few prompts more keeps GenEval's prompts and weights and narrows that task's noise."""
    if samples < 1 or min_task_images < 0:
        raise ValueError(f"samples must be >= 1 and min_task_images >= 0; got {samples} and {min_task_images}")
    per_tag: dict[str, int] = {}
    for meta in metadata_rows:
        per_tag[meta["tag"]] = per_tag.get(meta["tag"], 0) + 1
    return [max(samples, math.ceil(min_task_images / per_tag[meta["tag"]])) for meta in metadata_rows]


# ----------------------------------------------------------------------------- folders
_SAMPLE = re.compile(r"\d+\.png")


def validate_metadata(meta: Any, where: str) -> dict:
    """Check one metadata object against GenEval's schema; GenEvalInputError names the field."""
    if not isinstance(meta, dict):
        raise GenEvalInputError(f"{where}: expected a JSON object")
    for key, typ in (("tag", str), ("prompt", str), ("include", list)):
        if not isinstance(meta.get(key), typ):
            raise GenEvalInputError(f"{where}: field {key!r} must be a {typ.__name__}")
    for part in ("include", "exclude"):
        clauses = meta.get(part, [])
        if not isinstance(clauses, list):
            raise GenEvalInputError(f"{where}: field {part!r} must be a list")
        for j, c in enumerate(clauses):
            at = f"{where}: field '{part}[{j}]"
            if not isinstance(c, dict) or not isinstance(c.get("class"), str):
                raise GenEvalInputError(f"{at}.class' must be a str")
            if not isinstance(c.get("count"), int) or isinstance(c.get("count"), bool) or c["count"] < 0:
                raise GenEvalInputError(f"{at}.count' must be a non-negative int")
            if "color" in c and not isinstance(c["color"], str):
                raise GenEvalInputError(f"{at}.color' must be a str")
            if "position" in c:
                p = c["position"]
                if (not isinstance(p, list) or len(p) != 2 or not isinstance(p[0], str)
                        or not isinstance(p[1], int) or not 0 <= p[1] < j):
                    raise GenEvalInputError(f"{at}.position' must be [relation, index of an earlier include]")
    return meta


def read_metadata_file(path: Path) -> list[dict]:
    """``evaluation_metadata.jsonl``: one metadata object per line, validated."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenEvalInputError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            rows.append(validate_metadata(meta, f"{path}:{i}"))
    return rows


def read_folder(images_dir: Path) -> list[tuple[dict, list[Path]]]:
    """GenEval's layout: numbered sub-folders with ``metadata.jsonl`` and ``samples/NNNN.png``."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise GenEvalInputError(f"{images_dir}: no such directory")
    out = []
    for sub in sorted(p for p in images_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        mfile = sub / "metadata.jsonl"
        if not mfile.exists():
            raise GenEvalInputError(f"{mfile}: missing")
        try:
            meta = json.loads(mfile.read_text())
        except json.JSONDecodeError as e:
            raise GenEvalInputError(f"{mfile}: not valid JSON ({e.msg})") from None
        validate_metadata(meta, str(mfile))
        samples = sorted(p for p in (sub / "samples").glob("*.png") if _SAMPLE.fullmatch(p.name))
        out.append((meta, samples))
    if not out:
        raise GenEvalInputError(f"{images_dir}: no numbered prompt folders (NNNNN/metadata.jsonl)")
    return out


def write_folder(metadata_rows: list[dict], images_per_prompt: list[list[np.ndarray]], out_dir: Path) -> Path:
    """Write images in GenEval's layout (what a generator's script would produce)."""
    from PIL import Image

    out_dir = Path(out_dir)
    for i, (meta, imgs) in enumerate(zip(metadata_rows, images_per_prompt)):
        sub = out_dir / f"{i:05d}"
        (sub / "samples").mkdir(parents=True, exist_ok=True)
        (sub / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for j, img in enumerate(imgs):
            Image.fromarray(np.asarray(img, dtype=np.uint8)).save(sub / "samples" / f"{j:04d}.png")
    return out_dir


def _load_png(path: Path) -> np.ndarray:
    return load_png(path, GenEvalInputError)


def evaluate_folder(images_dir: Path, out_dir: Path | None = None, detector: str | Detector = "shapes_cv",
                    options: Options = Options()) -> dict:
    """Score a GenEval image folder: writes ``results.jsonl`` (GenEval's rows) and
    ``summary.json`` (with the back end's name) into ``out_dir`` (default: ``images_dir``)."""
    images_dir = Path(images_dir)
    entries = read_folder(images_dir)
    det = get_detector(detector)
    results = [evaluate_image(_load_png(p), meta, det, str(p), options) for meta, paths in entries for p in paths]
    summary = summarize(results, det.name)
    summary["options"] = asdict(options)
    out = Path(out_dir) if out_dir is not None else images_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
