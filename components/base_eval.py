"""The evaluation stages (``base_eval``, ``cfg_distill_eval``, ``tscd_eval``, ``dmdo_eval``): a generation
model on GenEval-shapes, GEdit-shapes (EN and CN) and held-out Q&A.

The model is the teacher (BAGEL's CFG, 50 steps) or a distilled student (CFG embedded, its own
default steps: 50 after ``cfg_distill``, 6 after ``tscd`` and ``dmdo``); ``num_steps`` overrides
that default and ``extra_steps`` adds GenEval-only rows at other step counts (``geneval_s{N}_*``
metrics: the teacher with 6 steps, the CFG-distilled model with 6).

GenEval-shapes: every prompt of :func:`components.world.geneval_prompts.make_prompts`, ``samples``
images each (GenEval's 4; more for the prompts of a task with fewer than ``min_task_images`` images),
sampled with BAGEL's T2I CFG; scored by :func:`components.evaluation.geneval.score_geneval` (overall =
mean of the six tasks).
GEdit-shapes: the benchmark's samples (``gedit_scale`` of GEdit's per-category counts), each
edited in EN and CN with BAGEL's editing CFG; judged by
:class:`components.evaluation.gedit_judge.ShapesJudge` (SC, PQ, O; macro average over categories).
Understanding: exact-answer accuracy on the world data's held-out Q&A rows.
Text reading (a teacher only): :func:`text_reading`, the loss gain of the right prompt against its
shape words, its colour words or the whole prompt changed, on ``text_rows`` T2I rows of the world
data (``text_gain_shape`` / ``_colour`` / ``_prompt`` at t = 0.85; every level in results.json).

NFE are counted (real forward passes of the generator) and sampling time per image is measured at
batch 1 and at ``batch``. Results: ``geneval/`` (GenEval's folder layout and results.jsonl),
``gedit.csv``, ``results.json``, and sample grids in ``samples/``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from components import sampling
from components.base import Params as BaseParams
from components.base import answer_accuracy_by_kind, build_teacher
from components.base_data import CAPTION_PROMPT, Rows, WorldSets, load_world
from components.checkpoints import load_checkpoint
from components.evaluation import geneval
from components.evaluation.gedit_judge import ShapesJudge
from components.evaluation.text_reading import DEFAULT_T, LAYOUT_T, text_gains
from components.gen_data import images_to_unit
from components.distill import student_model
from components.draft import heldout_rows
from components.inference import InputError, Teacher, autocast, to_tensor
from components.models.generator import SCALE_EMBEDDINGS, GenCondition, Generator
from components.models.tokens import Tokenizer
from components.training import StageContext
from components.world import gedit, geneval_prompts
from components.world.heldout import CAPTION_EVERY
from components.world.render import render


SPEED_PROMPT = "a photo of a red circle"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of the sampling noise (the benchmark sets keep their own seeds, so "
                                           "another value scores the same prompts, edits and questions)")
    geneval_seed: int = Field(43, ge=0, description="seed of the GenEval-shapes prompt set")
    gedit_seed: int = Field(0, ge=0, description="seed of the GEdit-shapes edit set")
    und_seed: int = Field(0, ge=0, description="seed of the fresh scenes that top up the held-out questions")
    geneval_per_tag: int = Field(100, ge=1, description="prompts drawn per tag before de-duplication")
    samples: int = Field(4, ge=1, description="images per GenEval prompt (GenEval: 4)")
    min_task_images: int = Field(0, ge=0, description="a GenEval task with fewer images than this samples each of "
                                                      "its prompts more (0: GenEval's protocol; "
                                                      "components/evaluation/geneval.samples_per_prompt)")
    gedit_scale: float = Field(1.0, gt=0, le=1, description="share of GEdit's per-category counts")
    und_rows: int = Field(512, ge=0, description="held-out Q&A rows scored: the world's held-out questions, "
                                                "then questions about fresh scenes (components/draft.heldout_rows)")
    num_steps: int | None = Field(None, ge=1, description="Euler steps (null: the model's own; BAGEL: 50)")
    extra_steps: list[int] = Field(default_factory=list, description="GenEval-only rows at these step counts")
    gedit: bool = Field(True, description="score GEdit-shapes EN and CN")
    text_rows: int = Field(256, ge=0, description="T2I rows of the world data on which a teacher's reading of shape "
                                                  "and colour words is measured (text_gain_* metrics; 0: off)")
    batch: int = Field(16, ge=1, description="sampling batch; time per image is also taken at batch 1")
    torch_threads: int = Field(2, ge=1)


def _grid(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    pad = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(pad, axis=0)


def _timed(fn, *args, **kwargs) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _batch_or_each(fn, n: int, fallback) -> tuple[list[np.ndarray], int]:
    """``fn(indices)`` on the whole batch; if the model cannot read one of its texts (a word it
    never saw), each item alone, with ``fallback(i)`` for the unreadable ones. Returns the images
    and the number of unreadable items."""
    try:
        return list(fn(list(range(n)))), 0
    except InputError:
        out, bad = [], 0
        for i in range(n):
            try:
                out.append(fn([i])[0])
            except InputError:
                bad += 1
                out.append(fallback(i))
        return out, bad


def _geneval(teacher: Teacher, p: Params, out_dir: Path, log, num_steps: int | None = None,
             name: str = "geneval") -> tuple[dict, dict[str, np.ndarray], int]:
    rows = geneval_prompts.make_prompts(seed=p.geneval_seed, n=p.geneval_per_tag)
    counts = geneval.samples_per_prompt(rows, p.samples, p.min_task_images)
    images: list[list[np.ndarray]] = [[] for _ in rows]
    unknown = 0
    for s in range(max(counts)):
        # the first ``samples`` rounds draw every prompt (the batches and seeds of GenEval's own
        # protocol); later rounds only the prompts of the tasks that need more images
        todo = [i for i, n in enumerate(counts) if n > s]
        for b in range(0, len(todo), p.batch):
            part = [rows[i] for i in todo[b:b + p.batch]]
            grey = np.full((64, 64, 3), 127, dtype=np.uint8)  # an unreadable prompt scores 0
            out, n_bad = _batch_or_each(
                lambda idx: teacher.generate([part[i]["prompt"] for i in idx], seed=p.seed + 7919 * s + b,
                                             num_steps=num_steps), len(part), lambda i: grey)
            unknown += n_bad
            for i, img in enumerate(out):
                images[todo[b + i]].append(np.asarray(img))
        log(f"{name}: sample {s + 1}/{max(counts)} of {len(todo)} prompts")
    geneval.write_folder(rows, images, out_dir / name)
    summary = geneval.score_geneval(rows, images, return_results=True)
    with open(out_dir / name / "results.jsonl", "w") as f:
        for r in summary.pop("results"):
            f.write(json.dumps(r, default=str) + "\n")
    by_tag: dict[str, list[np.ndarray]] = defaultdict(list)
    for r, imgs in zip(rows, images):
        if len(by_tag[r["tag"]]) < 8:
            by_tag[r["tag"]].append(imgs[0])
    grid = _grid([np.concatenate(v, axis=1) for v in by_tag.values()])
    return summary, {f"{name}_by_tag": grid}, unknown


def _gedit(teacher: Teacher, p: Params, out_dir: Path, log) -> tuple[dict, dict[str, np.ndarray]]:
    judge = ShapesJudge()
    samples = gedit.make_samples(seed=p.gedit_seed, scale=p.gedit_scale)
    scores: dict[str, dict[str, list[tuple[float, float, float]]]] = defaultdict(lambda: defaultdict(list))
    csv = ["task_type,key,instruction_language,instruction,SC,PQ,O"]
    shown: list[np.ndarray] = []
    for lang in gedit.LANGUAGES:
        for b in range(0, len(samples), p.batch):
            part = samples[b:b + p.batch]
            src = np.stack([render(s["source"]) for s in part])
            texts = [gedit.instruction(s["edit"], lang, s["variant"]) for s in part]
            edited, _ = _batch_or_each(  # an instruction the model cannot read: nothing is edited
                lambda idx: teacher.edit(src[idx], [texts[i] for i in idx], seed=p.seed + b, num_steps=p.num_steps),
                len(part), lambda i: src[i])
            for s, x, y, t in zip(part, src, edited, texts):
                sc, pq, o = judge.evaluate([x, np.asarray(y)], t)
                scores[lang][s["task_type"]].append((sc, pq, o))
                csv.append(",".join([s["task_type"], s["key"], lang, json.dumps(t, ensure_ascii=False),
                                     f"{sc:g}", f"{pq:g}", f"{o:.4f}"]))
                if lang == "en" and len(shown) < 8:
                    shown.append(np.concatenate([x, np.asarray(y)], axis=1))
        log(f"gedit: {lang} done ({len(samples)} edits)")
    (out_dir / "gedit.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    summary = {}
    for lang, cats in scores.items():  # category means, then the macro average over categories
        means = {c: np.mean(np.array(v), axis=0) for c, v in cats.items()}
        summary[lang] = {k: float(np.mean([m[i] for m in means.values()])) for i, k in enumerate(("SC", "PQ", "O"))}
        summary[lang]["categories"] = {c: {"SC": float(m[0]), "PQ": float(m[1]), "O": float(m[2])}
                                       for c, m in means.items()}
    return summary, {"gedit_source_result": _grid(shown)} if shown else {}


@functools.cache
def speed_inputs() -> tuple[str, np.ndarray, str]:
    """What every speed measurement samples: a fixed prompt, and the first GEdit-shapes edit's source
    image and English instruction. Built once per process; the image is read-only (shared)."""
    first = gedit.make_samples(seed=0, scale=0.01)[0]
    src = render(first["source"])
    src.flags.writeable = False
    return SPEED_PROMPT, src, gedit.instruction(first["edit"], "en", first["variant"])


SPEED_CELLS = [(task, big) for task in ("t2i", "edit") for big in (True, False)]  # batch ``batch``, then 1


def speed_call(task: str, b: int, num_steps: int | None = None, seed: int = 0):
    """``model -> images``: the call every speed measurement times, T2I or an edit of
    :func:`speed_inputs` at batch ``b``."""
    prompt, src, instr = speed_inputs()
    if task == "t2i":
        return lambda m: m.generate([prompt] * b, seed=seed, num_steps=num_steps)
    return lambda m: m.edit(np.repeat(src[None], b, axis=0), [instr] * b, seed=seed, num_steps=num_steps)


def _warm(fn, models: dict[str, Teacher]) -> dict[str, Teacher]:
    """The models that can run ``fn`` (one untimed call each; a model that does not know the
    instruction's words cannot edit)."""
    able = {}
    for name, model in models.items():
        try:
            fn(model)
        except InputError:
            continue
        able[name] = model
    return able


def sampling_speed(model: Teacher, batch: int, num_steps: int | None = None, seed: int = 0,
                   repeats: int = 1) -> dict[str, float]:
    """Seconds per image (best of ``repeats``, after one untimed warm-up call per shape) at ``batch``
    and at batch 1 for T2I and editing, on :func:`speed_inputs`, and the NFE counted per image."""
    out: dict[str, float] = {}
    for task, big in SPEED_CELLS:
        b = batch if big else 1
        fn = speed_call(task, b, num_steps, seed)
        if _warm(fn, {"model": model}):
            out[f"{task}_b{b}_s"] = min(_timed(fn, model)[1] for _ in range(repeats)) / b
            out[f"nfe_{task}"] = float(model.last_nfe)
    return out


def compare_speed(models: dict[str, Teacher], batch: int, repeats: int = 6,
                  min_seconds: float = 0.0) -> dict[str, dict[str, Any]]:
    """Seconds per image of every model (T2I and editing, at ``batch`` and at batch 1, on
    :func:`speed_inputs`) and the NFE counted per image, for a speedup between them.

    Per cell, after an untimed warm-up call of each model and one more call that sizes its samples,
    the models are timed in alternation (teacher, student, teacher, ...), ``repeats`` samples each,
    and a cell's time is a model's best sample. A sample spans about the same wall time for every
    model, as timeit's loops do: the faster model's sample is the mean of as many consecutive calls
    as fit in one call of the slowest (a 6-NFE call lasts ~1/20 of the teacher's). So a change in
    the machine's speed (another tenant, a clock change) falls on both alike, and the best of a few
    short calls, which can catch a quiet instant the long call cannot, does not stand against the
    best of a few long ones. With ``min_seconds``, a cell takes more than ``repeats`` rounds until it
    has lasted that long: a batch-1 round lasts ~1 s and a batch-16 one ~6 s, and on a shared machine
    whose speed drifts by 10-20 % for seconds at a time, the best of 6 one-second samples moved the
    batch-1 speed-up by as much (17.1x and 20.1x in two back-to-back runs of the same models).
    Each round's samples are also kept (``{cell}_rounds_s``, seconds per image): a round's teacher and
    student samples are seconds apart, so their ratio is paired against the machine's drift
    (:func:`speedups`); ``{cell}_pass_rounds_s`` are the same rounds' seconds per image inside the
    generator's passes (:attr:`Teacher.last_pass_s`; :func:`batch1_breakdown`). A model that cannot
    edit has no editing cells."""
    timing: dict[str, dict[str, float]] = {name: {} for name in models}
    for task, big in SPEED_CELLS:
        b = batch if big else 1
        fn = speed_call(task, b)
        able = _warm(fn, models)
        if not able:
            continue
        once = {name: _timed(fn, model)[1] for name, model in able.items()}
        loops = {name: max(1, round(max(once.values()) / t)) for name, t in once.items()}
        samples: dict[str, list[float]] = {name: [] for name in able}
        passes: dict[str, list[float]] = {name: [] for name in able}
        start, rounds = time.perf_counter(), 0
        while rounds < repeats or time.perf_counter() - start < min_seconds:
            rounds += 1
            for name, model in able.items():
                in_passes = 0.0
                t0 = time.perf_counter()
                for _call in range(loops[name]):
                    fn(model)
                    in_passes += model.last_pass_s
                samples[name].append((time.perf_counter() - t0) / loops[name] / b)
                passes[name].append(in_passes / loops[name] / b)
        for name, model in able.items():
            timing[name][f"{task}_b{b}_s"] = min(samples[name])
            timing[name][f"{task}_b{b}_rounds_s"] = [round(v, 6) for v in samples[name]]
            timing[name][f"{task}_b{b}_pass_rounds_s"] = [round(v, 6) for v in passes[name]]
            timing[name][f"nfe_{task}"] = float(model.last_nfe)
    return timing


def text_reading(teacher: Teacher, rows, t_values=DEFAULT_T) -> dict[float, dict[str, float]]:
    """:func:`components.evaluation.text_reading.text_gains` of a teacher's generator on T2I ``rows``
    (images and prompts), under the precision it samples with; swapped words are drawn from the
    words its tokenizer knows."""
    gen, space = teacher.inference_parts()
    pad = teacher.tokenizer.pad_id
    with torch.no_grad(), autocast(teacher.bf16):
        x0 = space.encode(images_to_unit(rows.images)).float()
        return text_gains(gen, lambda tx: gen.with_context(GenCondition(teacher.text_ids(tx), pad_id=pad)), x0,
                          list(rows.texts), t_values, known=set(teacher.tokenizer.tokens()))


def understanding_rows(world: WorldSets, n: int, teacher: Teacher, seed: int = 0) -> Rows:
    """``n`` held-out questions: the world's held-out Q&A (a few percent of its rows: 90 in the
    default world), then questions about fresh scenes of the world's generator that no world image
    equals and whose words the teacher's tokenizer knows (the draft's held-out prompts, captions
    left out). Deterministic; a smaller ``n`` gives a prefix."""
    held = world.und_heldout
    held_texts = held.texts if held is not None else []
    missing = max(n - sum(q != CAPTION_PROMPT for q in held_texts), 0)
    # fresh prompt i is a caption when i % CAPTION_EVERY is the last slot: one call fetches enough questions
    fresh = missing + (missing - 1) // (CAPTION_EVERY - 1) if missing else 0
    rows = heldout_rows(world, len(held_texts) + fresh, seed, teacher)
    return rows.subset([i for i, q in enumerate(rows.texts) if q != CAPTION_PROMPT][:n])


def untrained_pair(p: BaseParams, sample_steps: int, shift: float, seed: int = 0) -> dict[str, Teacher]:
    """``{"teacher": ..., "student": ...}`` with random weights: the teacher that base parameters ``p``
    train, and a CFG-distilled student of its generator (scale embeddings, ``sample_steps`` passes).
    What the pipeline would time, before any training: a pass's compute does not depend on the weights."""
    prompt, _, instr = speed_inputs()
    tok = Tokenizer.from_texts([prompt, instr])
    torch.manual_seed(seed)
    teacher = build_teacher(p, tok)
    for part in (teacher.autoencoder, teacher.generator, teacher.understanding):
        part.eval()
    gen = Generator(teacher.generator.cfg)
    gen.load_state_dict(teacher.generator.state_dict())
    gen.add_extra_embeddings(SCALE_EMBEDDINGS)
    return {"teacher": teacher, "student": student_model(teacher, gen, sample_steps, shift)}


def speedups(slow: dict[str, Any], fast: dict[str, Any], batch: int) -> dict[str, float]:
    """``{task_bB: slow / fast}`` for T2I and editing at batch 1 and ``batch``, where both were timed:
    the median over :func:`compare_speed`'s rounds of the round's paired ratio where both kept their
    rounds, else the ratio of the two times."""
    return {cell: round(float(np.median(r)), 2) for cell, r in round_ratios(slow, fast, batch).items()}


def speedup_ranges(slow: dict[str, Any], fast: dict[str, Any], batch: int) -> dict[str, list[float]]:
    """``{task_bB: [lowest, highest]}`` of the rounds' paired ratios (:func:`speedups`)."""
    return {cell: [round(min(r), 2), round(max(r), 2)] for cell, r in round_ratios(slow, fast, batch).items()}


def round_ratios(slow: dict[str, Any], fast: dict[str, Any], batch: int) -> dict[str, list[float]]:
    """``{task_bB: [slow / fast per round]}``: paired by round where both kept the same number of rounds
    (:func:`compare_speed`), else the one ratio of their times."""
    out = {}
    for task in ("t2i", "edit"):
        for b in (1, batch):
            k, rk = f"{task}_b{b}_s", f"{task}_b{b}_rounds_s"
            if rk in slow and rk in fast and len(slow[rk]) == len(fast[rk]):
                out[f"{task}_b{b}"] = [s / f for s, f in zip(slow[rk], fast[rk])]
            elif k in slow and k in fast:
                out[f"{task}_b{b}"] = [slow[k] / fast[k]]
    return out


def per_call_parts(model: Teacher, task: str, repeats: int = 200) -> dict[str, float]:
    """Seconds of each part of a batch-1 sampling call of :func:`speed_inputs` that is not a generator
    pass, timed alone in a tight loop (median of ``repeats``): ``text`` (encoding the prompt, once per
    call), ``decode`` (the latent to pixels) and for an edit ``source`` (encoding the source image).
    Every model that samples through an autoencoder and a text encoder pays at least these per call."""
    prompt, src, instr = speed_inputs()
    generator, space = model.inference_parts()
    cond = GenCondition(model.text_ids([prompt if task == "t2i" else instr]), pad_id=model.tokenizer.pad_id)
    g = generator.cfg
    z = torch.randn(1, g.in_channels, g.sample_size, g.sample_size, generator=torch.Generator().manual_seed(0))
    parts = {"text": lambda: generator.with_context(cond), "decode": lambda: space.decode(z)}
    if task == "edit":
        x = to_tensor(src, model.autoencoder.cfg.image_size)
        parts["source"] = lambda: space.encode(x)
    out = {}
    with torch.no_grad(), autocast(model.bf16):
        for name, fn in parts.items():
            for _ in range(10):
                fn()
            out[name] = float(np.median([_timed(fn)[1] for _ in range(repeats)]))
    return out


def batch1_breakdown(timing: dict[str, dict[str, Any]], models: dict[str, Teacher], slow: str, fast: str,
                     bars: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Where a batch-1 call's time goes, and the speed-up its generator passes allow, from
    :func:`compare_speed`'s batch-1 rounds (``timing``).

    Per task and model, the median over the rounds of the call time (``call_ms``), of the part spent in
    its generator passes (``passes_ms``, :class:`NFECounter`'s clock) and the rest (``other_ms``: text
    and source encoding, decoding, noise, the sampler). ``passes_only`` is ``slow``'s passes over
    ``fast``'s: the speed-up if neither call did anything else. ``parts_ms`` are ``fast``'s per-call parts
    timed alone (:func:`per_call_parts`), the least per-call work its call can do; ``ceiling`` is
    ``slow``'s call over ``fast``'s passes plus those parts: the speed-up if ``fast`` did nothing else
    (with the passes as they are, a bound: the slow model's own per-call work and its guidance
    arithmetic stay in its call). For ``bars[task]`` (the speed-up asked for), ``other_allowed_ms`` is the
    per-call work ``fast`` may do beside its passes to reach it against ``slow``'s call:
    ``call_slow / bar - P_fast``."""
    out: dict[str, dict[str, Any]] = {}
    for task in ("t2i", "edit"):
        rk, pk = f"{task}_b1_rounds_s", f"{task}_b1_pass_rounds_s"
        if not all(rk in timing[name] and pk in timing[name] for name in (slow, fast)):
            continue
        row: dict[str, Any] = {}
        for name in (slow, fast):
            call, passes = (float(np.median(timing[name][k])) * 1e3 for k in (rk, pk))
            row[name] = {"call_ms": round(call, 3), "passes_ms": round(passes, 3), "other_ms": round(call - passes, 3),
                         "nfe": int(timing[name][f"nfe_{task}"])}
        parts = {k: v * 1e3 for k, v in per_call_parts(models[fast], task).items()}
        p_fast, floor = row[fast]["passes_ms"], sum(parts.values())
        row["speedup"] = round(row[slow]["call_ms"] / row[fast]["call_ms"], 2)
        row["passes_only"] = round(row[slow]["passes_ms"] / p_fast, 2)
        row["parts_ms"] = {k: round(v, 3) for k, v in parts.items()}
        row["ceiling"] = round(row[slow]["call_ms"] / (p_fast + floor), 2)
        bar = bars.get(task)
        if bar:
            row["bar"] = bar
            row["other_allowed_ms"] = round(row[slow]["call_ms"] / bar - p_fast, 3)
        out[task] = row
    return out


def run(ctx: StageContext, out_dir: Path) -> dict[str, float]:
    p: Params = ctx.params
    torch.set_num_threads(p.torch_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples").mkdir(exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{ctx.stage or 'base_eval'}] {msg}", flush=True)

    ck = load_checkpoint(ctx.extra["evaluates"])
    teacher = Teacher.from_parts(ck.config, ck.tensors).frozen()  # sampling only
    metrics: dict[str, float] = {"num_steps": float(p.num_steps or teacher.default_steps)}
    results: dict = {"model": {"stage": ck.manifest.get("stage"), "md5": ck.manifest.get("md5"),
                               "sampler": teacher.sampler, "embedded_cfg": teacher.embedded_cfg}}

    summary, grids, unknown = _geneval(teacher, p, out_dir, log, p.num_steps)
    results["geneval"] = summary
    metrics["geneval_overall"] = float(summary["overall"])
    for tag, acc in summary["tags"].items():
        metrics[f"geneval_{tag}"] = float(acc)
    metrics["geneval_unknown_prompts"] = float(unknown)
    for steps in p.extra_steps:
        name = f"geneval_s{steps}"
        extra, g_extra, _ = _geneval(teacher, p, out_dir, log, steps, name)
        results[name] = extra
        grids.update(g_extra)
        metrics[f"{name}_overall"] = float(extra["overall"])
        for tag, acc in extra["tags"].items():
            metrics[f"{name}_{tag}"] = float(acc)

    if p.gedit:
        gsum, g2 = _gedit(teacher, p, out_dir, log)
        grids.update(g2)
        results["gedit"] = gsum
        for lang, s in gsum.items():
            for k in ("SC", "PQ", "O"):
                metrics[f"gedit_{lang}_{k}"] = s[k]

    if p.und_rows:
        questions = understanding_rows(load_world(ctx.data_dir), p.und_rows, teacher, p.und_seed)
        by_kind = answer_accuracy_by_kind(teacher, questions, p.und_rows, batch=p.batch)
        metrics["understanding_accuracy"] = by_kind.pop("overall")
        for kind, acc in by_kind.items():  # where the answers go wrong: understanding_position, ...
            metrics[f"understanding_{kind}"] = acc
        metrics["understanding_rows"] = float(len(questions))
    else:
        metrics["understanding_accuracy"] = math.nan

    if p.text_rows and not teacher.embedded_cfg:
        gains = text_reading(teacher, load_world(ctx.data_dir, limit=p.text_rows).t2i)
        results["text_gains"] = {str(t): g for t, g in gains.items()}
        for kind, gain in gains[LAYOUT_T].items():
            metrics[f"text_gain_{kind}"] = gain
        log("text gain at t = {}: {}".format(LAYOUT_T, ", ".join(f"{k} {v:.3f}" for k, v in
                                                                     gains[LAYOUT_T].items())))

    metrics.update(sampling_speed(teacher, p.batch, p.num_steps, p.seed))
    results["metrics"] = metrics
    from PIL import Image

    for name, img in grids.items():
        Image.fromarray(img).save(out_dir / "samples" / f"{name}.png")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    log(f"GenEval overall {metrics['geneval_overall']:.3f}, GEdit O en "
        f"{metrics.get('gedit_en_O', math.nan):.2f} cn {metrics.get('gedit_cn_O', math.nan):.2f}, "
        f"understanding {metrics['understanding_accuracy']:.3f}")
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
