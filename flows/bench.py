"""`hyperbagel bench`: run the profile (or reuse its finished outputs), measure, write the report.

Writes ``reports/benchmark.json`` and ``reports/BENCHMARK.md`` with the machine, the
profile, the command and the date: of the last run in the header, and of the run that
measured each section in ``provenance`` (a report can hold sections of several runs). Each
section is a function registered in ``SECTIONS``; a section that cannot be measured records
its error instead of numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from components.checkpoints import read_json
from components.world.understanding import QUESTION_KINDS

SPEED_REPEATS = 6  # distill6 and speed: at least this many rounds per task and batch, teacher and student alternating
SPEED_CELL_S = 40.0  # ... and of as many more as fit in this many seconds per task and batch (compare_speed)
SPEEDUP_BARS = {"t2i": 15.0, "edit": 20.0}  # issue 4: the 6-NFE model's wall-clock speed-up at batch 1 and 16


def speed_cell_s(profile: str) -> float:
    """Seconds a speed cell samples for: none beyond its rounds in the smoke profile (a check, not a
    measurement), ``SPEED_CELL_S`` otherwise."""
    return 0.0 if profile == "smoke" else SPEED_CELL_S


class PeakRss:
    """Peak resident memory of this process and all its descendants (Ray workers, DVC, stages)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the figures depend on, bfloat16 included: without native bfloat16 the generation stages run
    in float32 (components.inference.bf16_native), so the same profile times differently."""
    import psutil
    import torch

    from components.inference import bf16_native

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(), "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "gpu": torch.cuda.is_available(), "bf16_native": bf16_native()}


def pipeline_section(profile: str) -> dict[str, Any]:
    from flows.pipeline import pipeline
    from tasks.project import find_project, workspace

    with PeakRss() as rss:
        t0 = time.time()
        first = pipeline(profile=profile)
        total = time.time() - t0
    t1 = time.time()
    second = pipeline(profile=profile)
    noop = time.time() - t1
    ws = workspace(find_project(), profile)
    stage_s, loop_s, reused = {}, 0.0, []
    for name in ws.order():
        r = first["stages"][name]
        timing = (read_json(ws.out_path(name) / "manifest.json").get("timing") or {})
        if r["executed"]:
            stage_s[name] = round(r["seconds"], 2)
            loop_s += float(timing.get("loop_s", 0.0))
        else:  # reused: report the timing recorded when it last ran
            reused.append(name)
            stage_s[name] = round(float(timing.get("stage_s", 0.0)), 2)
    executed_total = sum(v for k, v in stage_s.items() if k not in reused)
    return {
        "total_s": round(total, 2), "stage_s": stage_s,
        "overhead_fraction": round((total - loop_s) / total, 4) if executed_total else None,
        "noop_rerun_s": round(noop, 2), "noop_rerun_executed": sum(r["executed"] for r in second["stages"].values()),
        "peak_rss_mb": round(rss.peak, 1), "reused_stages": reused,
    }


def world_section(profile: str) -> dict[str, Any]:
    from components.world.bench import world_benchmark

    return world_benchmark()


def _training_curve(history: list[dict], keys: tuple[str, ...], path: Path) -> None:
    """A small PNG of the training curves (loss against step), drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h, pad = 480, 240, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad // 2, w - 10, h - pad], outline="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    steps = [r["step"] for r in history if "step" in r]
    if not steps:
        img.save(path)
        return
    s0, s1 = min(steps), max(steps) or 1
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in history if key in r and r[key] == r[key]]
        if len(pts) < 2:
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        xy = [(pad + (st - s0) / max(1, s1 - s0) * (w - pad - 10),
               h - pad - (v - lo) / max(1e-12, hi - lo) * (h - 1.5 * pad)) for st, v in pts]
        d.line(xy, fill=colours[i % 4], width=2)
        d.text((pad + 5 + 110 * i, h - pad + 8), f"{key} {lo:.3g}..{hi:.3g}", fill=colours[i % 4])
    img.save(path)


def base_section(profile: str) -> dict[str, Any]:
    """The teacher (issue 7): read from the profile's `base` and `base_eval` outs (the pipeline
    section runs them); sample grids and the training curve are copied next to the report."""
    import shutil

    from tasks.project import find_project, workspace

    ws = workspace(find_project(), profile)
    base = read_json(ws.out_path("base") / "manifest.json")
    ev = read_json(ws.out_path("base_eval") / "results.json")
    m = ev["metrics"]
    reports = find_project() / "reports" / "base"
    reports.mkdir(parents=True, exist_ok=True)
    images = []
    for folder in (ws.out_path("base") / "samples", ws.out_path("base_eval") / "samples"):
        for png in sorted(folder.glob("*.png")) if folder.exists() else []:
            shutil.copyfile(png, reports / png.name)
            images.append(f"base/{png.name}")
    history = base.get("history") or []
    _training_curve(history, ("ae_l1", "gen_loss", "und_loss"), reports / "training_curve.png")
    images.append("base/training_curve.png")
    src = (base.get("params") or {}).get("source", "train")
    return {
        "source": src,
        "geneval": {"overall": m.get("geneval_overall"), "tasks": ev["geneval"]["tags"]},
        "gedit": {lang: {k: ev["gedit"][lang][k] for k in ("SC", "PQ", "O")} for lang in ev["gedit"]},
        "understanding_accuracy": m.get("understanding_accuracy"),
        "understanding_kinds": {k: m[f"understanding_{k}"] for k in QUESTION_KINDS if f"understanding_{k}" in m},
        "nfe": {"t2i": m.get("nfe_t2i"), "edit": m.get("nfe_edit")},
        "train_s": (base.get("metrics") or {}).get("train_s"),
        "stage_s": {"base": (base.get("timing") or {}).get("stage_s"),
                    "base_eval": (read_json(ws.out_path("base_eval") / "manifest.json").get("timing") or {})
                    .get("stage_s")},
        "sample_s": {k: m.get(f"{k}_s") for k in ("t2i_b1", "t2i_b16", "edit_b1", "edit_b16")},
        "geneval_unknown_prompts": m.get("geneval_unknown_prompts"),
        # which prompt words the teacher reads (components/evaluation/text_reading.py), every noise level
        "text_gains": ev.get("text_gains"),
        "training_steps": (base.get("metrics") or {}).get("step"),
        "images": images,
    }


def _geneval_row(results: dict[str, Any], key: str, steps: float | None) -> dict[str, Any]:
    g = results[key]
    return {"overall": g["overall"], "tasks": g["tags"], "steps": steps}


def _gedit_row(results: dict[str, Any]) -> dict[str, Any]:
    return {lang: {k: results["gedit"][lang][k] for k in ("SC", "PQ", "O")} for lang in results.get("gedit", {})}


EVAL_SETTINGS = ("samples", "min_task_images", "gedit_scale", "num_steps", "extra_steps")


def eval_settings(params: dict[str, Any], stage: str) -> dict[str, Any]:
    """How an evaluation stage scored its model (images per GenEval prompt, the share of GEdit's
    per-category counts, the steps), read from its resolved params as the stage itself reads them, so
    a report run on reduced evaluation says so next to its figures."""
    from components.base_eval import Params as EvalParams

    return EvalParams.model_validate(params.get(stage) or {}).model_dump(include=set(EVAL_SETTINGS))


def timed_speedups(models: dict[str, Any], slow: str, fast: str, batch: int, profile: str,
                   bars: dict[str, float] | None = None) -> dict[str, Any]:
    """``models`` timed in alternation (``compare_speed``): ``speedup`` of ``fast`` against ``slow`` (the
    median of the rounds' paired ratios), ``speedup_range`` (their extremes) and ``sample_s`` (each
    model's best seconds per image and its NFE, without the per-round samples); with ``bars``, also
    ``batch1``: the same batch-1 rounds split into passes and the rest (``batch1_breakdown``)."""
    from components.base_eval import batch1_breakdown, compare_speed, speedup_ranges, speedups

    timing = compare_speed(models, batch, repeats=SPEED_REPEATS, min_seconds=speed_cell_s(profile))
    out = {"speedup": speedups(timing[slow], timing[fast], batch),
           "speedup_range": speedup_ranges(timing[slow], timing[fast], batch),
           "sample_s": {name: {k: v for k, v in t.items() if not k.endswith("_rounds_s")}
                        for name, t in timing.items()}}
    if bars is not None:
        out["batch1"] = batch1_breakdown(timing, models, slow, fast, bars)
    return out


def stage_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """A training stage's steps and wall time from its manifest, and the step it resumed from when its
    last run continued a saved run (its ``stage_s`` is then that last run's time, not the training's)."""
    metrics = manifest.get("metrics") or {}
    out = {"train_steps": metrics.get("step"), "stage_s": (manifest.get("timing") or {}).get("stage_s")}
    if metrics.get("resumed_from"):
        out["resumed_from"] = metrics["resumed_from"]
    return out


def distill6_section(profile: str) -> dict[str, Any]:
    """The 6-NFE path (issue 4): Table 2 and Table 3 from the evaluation stages' results, the NFE
    counted, and the wall-clock speedup of the 6-NFE model against the teacher, both timed here,
    in this process, in alternation (batch 1 and 16; `compare_speed`), with `batch1`: where a batch-1
    call's time goes and the speed-up its passes allow (`batch1_breakdown`)."""
    import shutil

    from components.evaluation import paired
    from components.inference import Teacher
    from tasks.project import find_project, workspace

    ws = workspace(find_project(), profile)
    ev = {name: read_json(ws.out_path(name) / "results.json")
          for name in ("base_eval", "cfg_distill_eval", "tscd_eval", "dmdo_eval")}
    params = ws.resolved_params()

    def steps(name: str) -> float | None:
        return ev[name]["metrics"].get("num_steps")

    def extra(name: str) -> tuple[str, float] | tuple[None, None]:
        n = (params.get(name) or {}).get("extra_steps") or []
        return (f"geneval_s{n[0]}", float(n[0])) if n and f"geneval_s{n[0]}" in ev[name] else (None, None)

    geneval = {"teacher": _geneval_row(ev["base_eval"], "geneval", steps("base_eval"))}
    key, n = extra("base_eval")
    if key:
        geneval["teacher_6step"] = _geneval_row(ev["base_eval"], key, n)
    geneval["cfg_distill_50"] = _geneval_row(ev["cfg_distill_eval"], "geneval", steps("cfg_distill_eval"))
    key, n = extra("cfg_distill_eval")
    if key:
        geneval["cfg_distill_6"] = _geneval_row(ev["cfg_distill_eval"], key, n)
    geneval["tscd"] = _geneval_row(ev["tscd_eval"], "geneval", steps("tscd_eval"))
    geneval["dmdo"] = _geneval_row(ev["dmdo_eval"], "geneval", steps("dmdo_eval"))
    gedit = {"teacher": _gedit_row(ev["base_eval"]), "dmdo": _gedit_row(ev["dmdo_eval"])}
    for row in ("cfg_distill", "tscd"):
        gedit[row] = _gedit_row(ev[f"{row}_eval"])

    models = {"teacher": Teacher.load(ws.out_path("base")).frozen(), "dmdo": Teacher.load(ws.out_path("dmdo")).frozen()}
    batch = int((params.get("dmdo_eval") or {}).get("batch", 16))
    speed = timed_speedups(models, "teacher", "dmdo", batch, profile, bars=SPEEDUP_BARS)
    reports = find_project() / "reports" / "distill6"
    reports.mkdir(parents=True, exist_ok=True)
    images = []
    for stage in ("cfg_distill", "tscd", "dmdo"):
        for png in sorted((ws.out_path(stage) / "samples").glob("*.png")):
            shutil.copyfile(png, reports / f"{stage}_{png.name}")
            images.append(f"distill6/{stage}_{png.name}")
    for png in sorted((ws.out_path("dmdo_eval") / "samples").glob("*.png")):
        shutil.copyfile(png, reports / f"dmdo_eval_{png.name}")
        images.append(f"distill6/dmdo_eval_{png.name}")
    curves = {}
    for stage, keys in (("cfg_distill", ("cfg_loss",)), ("tscd", ("d_loss", "g_loss", "mse")),
                        ("dmdo", ("fake_loss", "dmd_loss", "fake_real_gap"))):
        m = read_json(ws.out_path(stage) / "manifest.json")
        _training_curve(m.get("history") or [], keys, reports / f"{stage}_curve.png")
        images.append(f"distill6/{stage}_curve.png")
        curves[stage] = stage_record(m)
    dm = ev["dmdo_eval"]["metrics"]
    t = ev["base_eval"]["metrics"]
    teacher_dir, student_dir = ws.out_path("base_eval"), ws.out_path("dmdo_eval")
    intervals = {"geneval": paired.paired_drop(paired.geneval_scores(teacher_dir / "geneval" / "results.jsonl"),
                                               paired.geneval_scores(student_dir / "geneval" / "results.jsonl"))}
    for lang in gedit["dmdo"]:
        intervals[f"gedit_{lang}_O"] = paired.paired_drop(paired.gedit_scores(teacher_dir / "gedit.csv", lang),
                                                          paired.gedit_scores(student_dir / "gedit.csv", lang))
    return {
        "geneval": geneval, "gedit": gedit,
        "nfe": {"t2i": dm.get("nfe_t2i"), "edit": dm.get("nfe_edit"),
                "teacher_t2i": t.get("nfe_t2i"), "teacher_edit": t.get("nfe_edit")},
        **speed,
        "evaluation": {name: eval_settings(params, name) for name in ev},
        "acceptance": {
            "geneval_drop": round(geneval["teacher"]["overall"] - geneval["dmdo"]["overall"], 4),
            "gedit_O_drop": {lang: round(gedit["teacher"][lang]["O"] - gedit["dmdo"][lang]["O"], 4)
                             for lang in gedit["dmdo"]},
            # the same drops from the per-item files, with a 95 % paired-bootstrap interval over the
            # prompts / edits (components/evaluation/paired.py): how much of a drop is the item sample
            "drop_ci95": {k: {"drop": round(v["drop"], 4), "lo": round(v["lo"], 4), "hi": round(v["hi"], 4),
                              "items": int(v["n"])} for k, v in intervals.items()},
        },
        "stages": curves,
        "images": images,
    }


def _finite(x: Any) -> Any:
    """NaN (a metric with no rounds to count) as null, recursively."""
    if isinstance(x, float):
        return None if x != x else x
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def speed_section(profile: str) -> dict[str, Any]:
    """Sampling speed on this machine before any training: the profile's teacher architecture (BAGEL's
    CFG, 100 NFE per image, 132 per edit) and a 6-NFE student of its generator, both with random
    weights (a pass costs the same whatever the weights), timed like `distill6` (alternately, in this
    process, batch 1 and the `dmdo_eval` batch). Minutes instead of the pipeline's hours; `distill6`
    times the trained checkpoints."""
    from components import base, dmdo
    from components.base_eval import untrained_pair
    from tasks.project import find_project, workspace

    params = workspace(find_project(), profile).resolved_params()
    bp = base.Params.model_validate(params.get("base") or {})
    if bp.source != "train":
        raise ValueError("the speed section times the architecture the base stage trains; with source "
                         f"`{bp.source}` the teacher is the imported checkpoint's: see the `distill6` section")
    dp = dmdo.Params.model_validate(params.get("dmdo") or {})
    batch = int((params.get("dmdo_eval") or {}).get("batch", 16))
    pair = {name: m.frozen() for name, m in untrained_pair(bp, dp.sample_steps, dp.shift).items()}
    speed = timed_speedups(pair, "teacher", "student", batch, profile)
    best = speed["sample_s"]
    return {**speed,
            "nfe": {"teacher_t2i": best["teacher"].get("nfe_t2i"), "teacher_edit": best["teacher"].get("nfe_edit"),
                    "t2i": best["student"].get("nfe_t2i"), "edit": best["student"].get("nfe_edit")},
            "conditions": {"weights": "random", "batch": batch, "repeats": SPEED_REPEATS,
                           "min_seconds": speed_cell_s(profile),
                           "timing": "alternating samples of about one teacher call each; speedup: the median "
                                     "of the rounds' paired ratios, speedup_range their extremes",
                           "bf16_requested": bp.bf16, "generator": {"space": bp.gen_space, "width": bp.gen_width,
                                                                    "depth": bp.gen_depth, "patch": bp.gen_patch}}}


def speculative_section(profile: str) -> dict[str, Any]:
    """Speculative decoding (issue 5). The main numbers are the `draft` stage's own evaluation
    (identical fraction, τ, n-α, tokens/s and speedup, measured in one run on `eval_prompts`
    held-out prompts); the Table 1 ablation trains every variant here, in process, with
    `draft.ablation_steps` from the profile's base checkpoint and decodes `draft.ablation_prompts`
    of the same prompts (components/draft_ablation.py)."""
    import tempfile

    from components import draft, speculative
    from components.draft_ablation import run_ablation
    from tasks.project import find_project, workspace

    ws = workspace(find_project(), profile)
    manifest = read_json(ws.out_path("draft") / "manifest.json")
    base_md5 = ws.out_md5("base")
    if (manifest.get("parent") or {}).get("md5") != base_md5:
        raise RuntimeError(f"the draft out was trained on another base checkpoint than dvc.lock's ({base_md5}); "
                           f"run `hyperbagel run --profile {profile} --stage draft` first")
    m = manifest.get("metrics") or {}
    if "tau" not in m:
        raise RuntimeError("the draft stage recorded no speculative metrics (eval_prompts: 0?)")
    params = draft.Params.model_validate(ws.resolved_params().get("draft") or {})
    if manifest.get("params") != params.model_dump(mode="json"):
        raise RuntimeError(f"the draft out was trained with other `draft` parameters than the profile's; "
                           f"run `hyperbagel run --profile {profile} --stage draft` first")
    with tempfile.TemporaryDirectory(prefix="draft-ablation-") as tmp:
        ablation = run_ablation(params, ws.out_path("base"), ws.out_path("world_data"), Path(tmp),
                                progress=lambda line: print(f"[speculative] ablation {line}", flush=True))
    return _finite({
        "n_prompts": int(m["n_prompts"]), "identical_fraction": m.get("identical_fraction"), "tau": m.get("tau"),
        "alpha": [m.get(f"alpha_{n}", float("nan")) for n in range(1, params.chain + 1)],
        "tokens_per_s": {"target": m.get("tokens_per_s_target"), "speculative": m.get("tokens_per_s_speculative")},
        "speedup": m.get("speedup"),
        "by_kind": {kind: {key: m.get(f"{key}_{kind}") for key in speculative.KIND_METRICS}
                    for kind in (draft.KIND_QA, draft.KIND_CAPTION) if f"tau_{kind}" in m},
        **({"tree": _tree_figures(m, params)} if "tree_tau" in m else {}),
        "ablation": {v: {"tau": r["tau"], "speedup": r["speedup"]} for v, r in ablation.items()},
        "ablation_detail": ablation,
        "conditions": {"chain": params.chain, "stop_below": params.stop_below, "delay": params.delay,
                       "max_new_tokens": params.max_new_tokens, "batch": 1,
                       "heldout_world": m.get("heldout_world"), "heldout_fresh": m.get("heldout_fresh"),
                       "draft_steps": params.steps, "ablation_steps": params.ablation_steps,
                       "ablation_prompts": params.ablation_prompts},
    })


def speculative_bound_section(profile: str) -> dict[str, Any]:
    """The ceiling of issue 5's speed-up on this machine: the profile's base model (the target)
    decodes the `draft` stage's held-out prompts alone and then with a perfect draft that costs
    nothing (`components/speculative.oracle_benchmark`: each round proposes the target's own next
    `chain` tokens, all accepted). No draft, whatever its training, accepts more per round or drafts
    for less, so its tokens/s speed-up on these prompts stays below this one. Next to it, the trained
    draft's figures from its stage (a separate run: their target timings differ)."""
    from components import draft, speculative
    from components.base_data import load_world
    from components.inference import Teacher
    from tasks.project import find_project, workspace

    ws = workspace(find_project(), profile)
    params = draft.Params.model_validate(ws.resolved_params().get("draft") or {})
    if not params.eval_prompts:
        raise ValueError("draft.eval_prompts is 0: no held-out prompts to decode")
    teacher = Teacher.load(ws.out_path("base"))
    target = teacher.understanding.float().eval().requires_grad_(False)
    world = load_world(ws.out_path("world_data"), limit=params.data_limit)
    images, prompts, kinds = draft.heldout_inputs(world, teacher, params.eval_prompts, params.seed)
    res = speculative.oracle_benchmark(target, images, prompts, params.max_new_tokens, params.chain, kinds)
    out: dict[str, Any] = {**{k: v for k, v in res.report().items() if k != "alpha"}, "tokens": res.tokens,
                           "conditions": {"draft": "oracle: the target's own next tokens, free", "chain": params.chain,
                                          "max_new_tokens": params.max_new_tokens, "batch": 1,
                                          "prompts": "the draft stage's held-out prompts (eval_prompts, seed)"}}
    manifest_path = ws.out_path("draft") / "manifest.json"
    if manifest_path.exists():
        m = read_json(manifest_path).get("metrics") or {}
        out["trained_draft"] = {"tau": m.get("tau"), "speedup": m.get("speedup"),
                                "by_kind": {kind: {"tau": m.get(f"tau_{kind}"), "speedup": m.get(f"speedup_{kind}")}
                                            for kind in (draft.KIND_QA, draft.KIND_CAPTION) if f"tau_{kind}" in m}}
    return _finite(out)


def _tree_figures(m: dict[str, float], params) -> dict[str, Any]:
    """The token tree's figures from the draft stage's metrics (``tree_*``), decoded in the same run as the chain."""
    from components import draft, speculative

    return {"topk": params.tree_topk, "nodes": params.tree_nodes, "depth": params.chain,
            **{key: m.get(f"tree_{key}") for key in ("identical_fraction", "tau", "speedup")},
            "tokens_per_s": {"target": m.get("tokens_per_s_target"), "speculative": m.get("tree_tokens_per_s")},
            "alpha": [m.get(f"tree_alpha_{n}", float("nan")) for n in range(1, params.chain + 1)],
            "by_kind": {kind: {key: m.get(f"tree_{key}_{kind}") for key in speculative.TREE_KIND_METRICS}
                        for kind in (draft.KIND_QA, draft.KIND_CAPTION) if f"tree_tau_{kind}" in m}}


SECTIONS: dict[str, Callable[[str], dict[str, Any]]] = {
    "pipeline": pipeline_section,
    "world": world_section,
    "base": base_section,
    "distill6": distill6_section,
    "speed": speed_section,
    "speculative": speculative_section,
    "speculative_bound": speculative_bound_section,
}


def run_bench(profile: str, sections: list[str] | None, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "benchmark.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    import subprocess

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    run = {"machine": machine(), "profile": profile, "git_sha": sha or None,
           "command": " ".join(["hyperbagel", *sys.argv[1:]]) if sys.argv else "hyperbagel bench",
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    report.update(run)  # the header: the last run
    for name in sections or list(SECTIONS):
        t0 = time.time()
        try:
            report[name] = SECTIONS[name](profile)
        except Exception as e:  # record what failed; other sections still run
            report[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        report.setdefault("section_s", {})[name] = round(time.time() - t0, 1)
        # each section's own provenance: a report collects sections of several runs (and machines)
        report.setdefault("provenance", {})[name] = run
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    (out_dir / "BENCHMARK.md").write_text(to_markdown(report))
    return report


def _describe(m: dict[str, Any]) -> str:
    return (f"{m['cores']} cores, {m['memory_gb']} GiB, {m.get('cpu_model') or m['cpu']}, {m['platform']}, "
            f"Python {m['python']}, torch {m['torch']}, GPU: {m['gpu']}, "
            f"native bfloat16: {m.get('bf16_native', 'not recorded')}")


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Benchmark report", "",
             f"- command: `{report['command']}`", f"- profile: `{report['profile']}`", f"- date: {report['date']}",
             f"- git: `{report.get('git_sha')}`",
             f"- machine: {_describe(m)}", ""]
    for name in SECTIONS:
        if name not in report:
            continue
        lines += [f"## {name}", ""]
        run = (report.get("provenance") or {}).get(name)
        if run:
            lines += [f"Measured by `{run['command']}` ({run['profile']} profile) at git `{run['git_sha']}` on "
                      f"{run['date']}; machine: {_describe(run['machine'])}."
                      + (f" {run['note']}" if run.get("note") else ""), ""]
        lines += ["```json", json.dumps(report[name], indent=2, default=str), "```", ""]
        for img in report[name].get("images", []) if isinstance(report[name], dict) else []:
            lines += [f"![{img}]({img})", ""]
    return "\n".join(lines)
