"""Measurements of the shapes world's evaluators (the benchmark report's ``world`` section).

- ``detector``: shape, colour and exact-count accuracy of the ``shapes_cv`` detector on random
  scenes (1-5 objects) rendered with Gaussian blur (σ 0.7 px) and Gaussian noise (σ 8/255), and
  its throughput in images/s on one core (numpy/BLAS and torch limited to one thread);
- ``geneval_oracle``: GenEval-shapes accuracy per tag and overall when every prompt's samples
  are oracle renders (4 per prompt, as GenEval), plus how often each controlled corruption fails
  its prompt;
- ``gedit_oracle``: GEdit-shapes SC / PQ / O per language for the renderer's oracle edits, plus
  the no-op (source returned unchanged) and noisy-oracle controls.

The same functions, with smaller sizes, back the tests in tests/components/.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

import numpy as np
from scipy import ndimage

from components.evaluation.geneval import Options, evaluate_image, get_detector, score_geneval
from components.world.geneval_prompts import corrupt_metadata, make_prompts, oracle_scene
from components.world.render import random_scene, render

NOISE_SIGMA, BLUR_SIGMA = 8.0, 0.7  # in 0..255 units (8/255 of the range) and pixels
CORRUPTIONS = ("wrong_colour", "count_off", "swapped_relation", "missing_object")
# The reason GenEval gives when each corruption is caught (evaluate_images.py's wording).
REASONS = {
    "wrong_colour": re.compile(r"expected (\w+) (\w+)>=\d+, found \d+ \1; and .+"),
    "count_off": re.compile(r"expected (\w+)>=\d+, found \d+|expected (\w+)<\d+, found \d+"),
    "swapped_relation": re.compile(r"expected \w+ (left of|right of|above|below) target, found .* target"),
    "missing_object": re.compile(r"expected \w+>=\d+, found \d+"),
}


def degrade(img: np.ndarray, rng: np.random.Generator, noise: float = NOISE_SIGMA, blur: float = BLUR_SIGMA
            ) -> np.ndarray:
    """Gaussian blur (σ ``blur`` px), then Gaussian noise (σ ``noise`` in 0..255), rounded to uint8."""
    x = np.asarray(img, dtype=np.float32)
    if blur > 0:
        x = ndimage.gaussian_filter(x, (blur, blur, 0))
    if noise > 0:
        x = x + rng.normal(0.0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@contextmanager
def one_core():
    """numpy's BLAS pools and torch limited to one thread for the block."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def detector_accuracy(n_scenes: int = 600, seed: int = 0, noise: float = NOISE_SIGMA, blur: float = BLUR_SIGMA,
                      max_objects: int = 5, threshold: float = Options.threshold) -> dict:
    """Per object: shape and colour of the detection nearest its centre (a miss counts as wrong);
    per image: the number of detections above ``threshold`` equals the number of objects."""
    det = get_detector("shapes_cv")
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, int(rng.integers(1, max_objects + 1))) for _ in range(n_scenes)]
    images = [degrade(render(s, jitter_seed=seed * 7919 + i), rng, noise, blur) for i, s in enumerate(scenes)]
    shape_ok = colour_ok = objects = count_ok = 0
    confusions: dict[str, int] = {}
    with one_core():
        t0 = time.perf_counter()
        analyses = [det.analyze(img) for img in images]
        seconds = time.perf_counter() - t0
    for scene, a in zip(scenes, analyses):
        found = [d for d in a.detections if d.score > threshold]
        count_ok += len(found) == len(scene.objects)
        for o in scene.objects:
            objects += 1
            d = min(found, key=lambda d: np.hypot(d.centre[0] - o.cx, d.centre[1] - o.cy), default=None)
            if d is None or np.hypot(d.centre[0] - o.cx, d.centre[1] - o.cy) > 0.25 * o.size:
                confusions[f"{o.cls}->missed"] = confusions.get(f"{o.cls}->missed", 0) + 1
                continue
            shape_ok += d.cls == o.cls
            colour_ok += d.colour == o.colour
            for a_, b_ in ((o.cls, d.cls), (o.colour, d.colour)):
                if a_ != b_:
                    confusions[f"{a_}->{b_}"] = confusions.get(f"{a_}->{b_}", 0) + 1
    return {"shape_acc": shape_ok / objects, "colour_acc": colour_ok / objects, "count_acc": count_ok / n_scenes,
            "images_per_s": n_scenes / seconds, "n_images": n_scenes, "n_objects": objects,
            "noise_sigma": noise, "blur_sigma": blur, "detector": det.name, "confusions": confusions}


def oracle_images(rows: list[dict], n_samples: int = 4, seed: int = 0) -> list[list[np.ndarray]]:
    """``n_samples`` oracle renders (own layout and colour jitter each) of every metadata row."""
    rng = np.random.default_rng(seed)
    return [[render(oracle_scene(m, rng), jitter_seed=seed * 100_003 + i * 16 + j) for j in range(n_samples)]
            for i, m in enumerate(rows)]


def geneval_oracle(rows: list[dict] | None = None, n_samples: int = 4, seed: int = 0) -> dict:
    """GenEval-shapes summary (per tag, overall) of oracle renders of every prompt."""
    rows = make_prompts() if rows is None else rows
    return score_geneval(rows, oracle_images(rows, n_samples, seed), "shapes_cv", return_results=True)


def geneval_corruptions(rows: list[dict] | None = None, kinds: tuple[str, ...] = CORRUPTIONS, n_samples: int = 1,
                        seed: int = 0) -> dict[str, dict]:
    """For each corruption: every prompt it applies to, rendered corrupted and scored against the
    original metadata. ``fail_rate`` = share scored wrong; ``reason_rate`` = share scored wrong
    with the reason GenEval gives for that defect."""
    rows = make_prompts() if rows is None else rows
    det = get_detector("shapes_cv")
    rng = np.random.default_rng(seed)
    out = {}
    for kind in kinds:
        fails = reasons = n = 0
        examples: list[str] = []
        for i, meta in enumerate(rows):
            if not _applies(meta, kind):
                continue
            for j in range(n_samples):
                bad = corrupt_metadata(meta, kind, rng)
                img = render(oracle_scene(bad, rng), jitter_seed=i * 16 + j)
                r = evaluate_image(img, meta, det)
                n += 1
                fails += not r["correct"]
                hit = not r["correct"] and bool(REASONS[kind].search(r["reason"]))
                reasons += hit
                if hit and len(examples) < 3:
                    examples.append(f"{meta['prompt']}: {r['reason']}")
        out[kind] = {"n": n, "fail_rate": fails / n if n else float("nan"),
                     "reason_rate": reasons / n if n else float("nan"), "examples": examples}
    return out


def _applies(meta: dict, kind: str) -> bool:
    """The corruption's intended tasks: colour on colors/color_attr, count on counting, relation on
    position, a missing object on two_object (and every task: each needs all its objects)."""
    inc = meta["include"]
    if kind == "wrong_colour":
        return any("color" in c for c in inc)
    if kind == "count_off":
        return meta["tag"] == "counting"
    if kind == "swapped_relation":
        return any("position" in c for c in inc)
    return kind == "missing_object"


def gedit_oracle(scale: float = 1.0, seed: int = 0, controls: bool = True, noise: float = 12.0) -> dict:
    """GEdit-shapes of the oracle edits per language (SC, PQ, O, categories); with ``controls``
    also the no-op edit (the source returned) and the oracle with Gaussian noise ``noise``."""
    from components.evaluation.gedit_judge import ShapesJudge, score_gedit
    from components.world.gedit import make_samples, rows_of

    samples = make_samples(seed, scale)
    rows, srcs, tgts = [], [], []
    for k, s in enumerate(samples):
        src, tgt = render(s["source"], jitter_seed=k), render(s["target"], jitter_seed=k)
        for r in rows_of(s, f"images/{s['key']}.png"):
            rows.append(r)
            srcs.append(src)
            tgts.append(tgt)
    judge = ShapesJudge()
    out = {"oracle": score_gedit(rows, srcs, tgts, judge)}
    if controls:
        rng = np.random.default_rng(seed)
        out["noop"] = score_gedit(rows, srcs, srcs, judge)
        out["noise"] = score_gedit(rows, srcs, [degrade(t, rng, noise, 0.0) for t in tgts], judge)
    return out


def _round(x, nd: int = 4):
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    return x


def world_benchmark(n_detector: int = 600, geneval_samples: int = 4, gedit_scale: float = 1.0) -> dict:
    """The report's ``world`` section: ``detector``, ``geneval_oracle``, ``gedit_oracle`` (+ controls)."""
    t0 = time.perf_counter()
    det = detector_accuracy(n_detector)
    g = geneval_oracle(n_samples=geneval_samples)
    corr = geneval_corruptions()
    ge = gedit_oracle(gedit_scale)

    def lang(s: dict) -> dict:
        return {k: s[k] for k in ("SC", "PQ", "O")}

    langs = [x for x in ("en", "cn") if x in ge["oracle"]]
    return _round({
        "detector": {k: det[k] for k in ("shape_acc", "colour_acc", "count_acc", "images_per_s", "n_images",
                                         "n_objects", "noise_sigma", "blur_sigma", "detector")},
        "geneval_oracle": {**g["tags"], "overall": g["overall"], "n_prompts": g["n_prompts"],
                           "n_images": g["n_images"], "detector": g["detector"]},
        "geneval_corruptions": {k: {"fail_rate": v["fail_rate"], "reason_rate": v["reason_rate"], "n": v["n"]}
                                for k, v in corr.items()},
        "gedit_oracle": {**{x: lang(ge["oracle"][x]) for x in langs},
                         "min_category": {x: {m: min(c[m] for c in ge["oracle"][x]["categories"].values())
                                              for m in ("SC", "PQ")} for x in langs},
                         "judge": ge["oracle"]["judge"], "n_rows": ge["oracle"]["n"]},
        "gedit_controls": {"noop": {x: lang(ge["noop"][x]) for x in langs},
                           "noise_sigma_12": {x: lang(ge["noise"][x]) for x in langs}},
        "seconds": time.perf_counter() - t0,
    })
