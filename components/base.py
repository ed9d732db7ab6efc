"""The ``base`` stage: the teacher (BAGEL's role), trained on the world data or imported.

``source: train`` trains, in one stage:

1. steps ``[0, ae_steps)``: the autoencoder (the latent space, BAGEL's VAE role), ``ae_updates``
   updates per step; with
   ``gen_space: pixel`` there is none (the generation expert draws the image itself, at
   ``64 / gen_pixel_factor`` pixels per side, and every step trains it);
2. steps ``[ae_steps, steps)``: the generation expert by flow matching in that latent space
   (BAGEL's loss: MSE between the predicted velocity and ``eps - x0`` at
   ``x_t = (1 - t) x0 + t eps``, logit-normal ``t`` shifted by 3), on a mix of T2I pairs and
   edit triplets, with text and source-image dropout so the CFG passes exist; an EMA of
   its weights is exported;
3. every step: the understanding expert (next-token cross-entropy on answers and captions), plus,
   from the scenes the rows carry, the object heads' loss (``und_object_loss``) and the locate
   head's (``und_locate_loss``: where each object a question names lies, read at its name's last
   token, and with ``und_locate_colours`` its colour too) and the count head's (``und_count_loss``:
   how many objects the description a count or existence question asks about fits);
   ``und_kind_weights`` draws rows of some question kinds more often.

``source: import`` loads a base checkpoint from ``import_path`` (verified against
``import_md5`` before anything reads it) and exports it unchanged, with its lineage.
``source: finetune`` loads it the same way and trains it further: its architecture, tokenizer
and autoencoder (frozen: no autoencoder phase) are kept, both experts and the generator's EMA
start from its weights, ``train_s`` goes on from its own, and the checkpoint names it as its
parent (``finetuned_from``); with ``train_generation: false`` only the understanding expert trains
and the generator is the parent's, byte for byte. With ``lr_schedule: linear`` this is the anneal of a warm-up /
stable / decay schedule: the full profile's teacher trained at a constant rate, and a short
linear decay on top of it scored higher on GenEval-shapes and GEdit-shapes (reports/NOTES.md,
twentieth session).
Every random draw of a step comes from a generator seeded by (seed, step, rank), so a
resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from components import checkpoints, sampling
from components.base_data import CAPTION_PROMPT, Rows, WorldSets, load_world, object_cells
from components.gen_data import GenData, images_to_unit
from components.evaluation.geneval import score_geneval
from components.inference import InputError, Teacher, autocast
from components.models.autoencoder import AutoencoderConfig, SampleSpace, make_autoencoder
from components.models.generator import GenCondition, Generator, GeneratorConfig
from components.models.tokens import Tokenizer, split
from components.models.understanding import IGNORE, Understanding, UnderstandingConfig
from components.world.geneval_prompts import make_prompts
from components.world.palette import CLASSES, COLOUR_NAMES
from components.world.render import Scene
from components.world.prompts import NUMBERS
from components.world.understanding import QUESTION_KINDS, counted, question_kind, referents
from components.training import (Export, StageContext, TrainParams, TrainState, ema_update, scheduled_lr, set_lr,
                                 step_generator, warmup_lr)

CALIBRATION_IMAGES = 512


class Params(TrainParams):
    source: Literal["train", "import", "finetune"] = "train"
    import_path: str | None = Field(None, description="base checkpoint directory to import (or fine-tune)")
    import_md5: str | None = Field(None, description="its DVC directory md5, checked before use")
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="both experts' learning rate after the warm-up: constant, or linear: decayed to 0 "
                                "at the last step (each expert over its own steps)")

    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1, le=4096, description="generation expert batch")
    lr: float = Field(5e-4, gt=0, le=1.0, description="generation expert learning rate")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    warmup: int = Field(100, ge=0, description="linear learning-rate warm-up steps (each expert)")
    bf16: bool = Field(True, description="bfloat16 autocast where the CPU has native bfloat16 (AVX512-BF16, AMX); "
                                                "float32 elsewhere (components.inference.bf16_native)")
    data_limit: int | None = Field(None, ge=1, description="read at most this many rows per data set")

    ae_steps: int = Field(300, ge=0, description="autoencoder steps, before the generation expert (latent space only)")
    ae_updates: int = Field(1, ge=1, description="autoencoder updates per autoencoder step (each on a fresh batch): "
                                                 "an update costs a fraction of a step's understanding work")
    ae_batch_size: int = Field(32, ge=1)
    ae_lr: float = Field(2e-3, gt=0)
    ae_channels: tuple[int, ...] = Field((32, 64), min_length=1, max_length=4,
                                         description="autoencoder channels per 2x level: 2 levels give 16x16 "
                                                     "latents, 3 give 8x8")
    latent_channels: int = Field(4, ge=1)

    gen_space: Literal["latent", "pixel"] = Field(
        "latent", description="latent: in the autoencoder's latent space; pixel: on the image itself")
    gen_pixel_factor: int = Field(1, ge=1, le=4, description="pixel space: the generator draws at 64 / this per "
                                                             "side, scaled up bicubically (2: 32x32)")
    gen_prediction: Literal["velocity", "x0"] = Field(
        "velocity", description="what the generator's last layer predicts (the loss is BAGEL's velocity MSE either way)")
    gen_head_channels: int = Field(0, ge=0, description="0: linear un-patchify; >0: the generator's conv head")
    gen_text_mask: bool = Field(True, description="mask the text's padding out of the generator's attention and "
                                                   "pooled text (BAGEL's context holds no padding)")
    gen_width: int = Field(192, ge=16)
    gen_depth: int = Field(6, ge=1)
    gen_heads: int = Field(4, ge=1)
    gen_patch: int = Field(2, ge=1)
    gen_text_layers: int = Field(2, ge=0)
    max_text_len: int = Field(32, ge=4)
    edit_fraction: float = Field(0.5, ge=0, le=1, description="share of edit triplets in a batch")
    edit_after: int = Field(0, ge=0, description="generation steps on T2I pairs alone before the edit triplets join "
                                                 "(a shared text pathway learns captions far slower beside "
                                                 "instructions; see reports/NOTES.md)")
    text_dropout: float = Field(0.1, ge=0, le=1, description="P(text dropped): the text-free CFG pass")
    image_dropout: float = Field(0.1, ge=0, le=1, description="P(source dropped): the image-free CFG pass")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    train_shift: float = Field(sampling.SHIFT, gt=0, description="shift of the logit-normal training t (BAGEL: 3; "
                                                                 "< 1 trains more at low noise, see reports/NOTES.md)")

    und_hidden: int = Field(128, ge=16)
    und_layers: int = Field(16, ge=1)
    und_heads: int = Field(4, ge=1)
    und_kv_heads: int = Field(2, ge=1)
    und_intermediate: int = Field(384, ge=16)
    und_grid: int = Field(8, ge=1)
    und_encoder: Literal["patch", "cnn"] = Field("patch", description="the understanding expert's image encoder")
    und_object_loss: float = Field(0.0, ge=0, description="weight of the object heads' loss on the image tokens "
                                                          "(class and colour per grid cell, from the rows' scenes)")
    und_locate_loss: float = Field(0.0, ge=0, description="weight of the locate head's loss: at the last token of "
                                                          "each object a question names, where that object lies "
                                                          "(components/models/understanding.py)")
    und_locate_bins: int = Field(8, ge=2, description="columns (and rows) the locate head places an object among")
    und_locate_layer: int = Field(0, ge=0, description="the layer the locate head reads (0: half the depth)")
    und_locate_colours: bool = Field(False, description="the locate head also predicts each named object's colour "
                                                        "(in the same loss); needs und_locate_loss > 0")
    und_count_loss: float = Field(0.0, ge=0, description="weight of the count head's loss: at the last token of the "
                                                         "description a count or existence question asks about, how "
                                                         "many objects fit it (read at und_locate_layer)")
    und_kind_weights: dict[str, float] = Field(default_factory=dict, description="question kind -> how many times as "
                                               "often its rows are drawn (e.g. {position: 4}); other rows weigh 1")
    und_batch_size: int = Field(32, ge=1)
    und_lr: float = Field(1e-3, gt=0)
    und_every: int = Field(1, ge=1, description="train the understanding expert every N steps")
    train_generation: bool = Field(True, description="False (source finetune only): train the understanding expert "
                                                     "alone; the generator and its EMA stay the parent's, byte for byte")

    sample_steps: int = Field(50, ge=1, description="Euler steps of the exported sample grids")
    probe_every: int = Field(0, ge=0, description="every N generation steps, score the EMA generator on a few "
                                                  "GenEval-shapes prompts (metric geneval_probe; 0: off)")
    probe_per_tag: int = Field(12, ge=1, description="probe prompts per GenEval tag (one sample each)")
    probe_seed: int = Field(1, ge=0, description="probe prompt seed (not the benchmark's 43)")
    eval_rows: int = Field(128, ge=0, description="held-out Q&A rows scored by evaluate")

    @model_validator(mode="after")
    def _check(self) -> "Params":
        if self.source in ("import", "finetune") and not (self.import_path and self.import_md5):
            raise ValueError(f"source {self.source!r} needs import_path and import_md5")
        unknown = sorted(set(self.und_kind_weights) - set(QUESTION_KINDS))
        if unknown:
            raise ValueError(f"und_kind_weights: unknown question kind(s) {unknown}; kinds: {', '.join(QUESTION_KINDS)}")
        if any(w <= 0 for w in self.und_kind_weights.values()):
            raise ValueError("und_kind_weights must be > 0 (leave a kind out to keep its rows at weight 1)")
        if self.und_locate_colours and self.und_locate_loss <= 0:
            raise ValueError("und_locate_colours is an output of the locate head; it needs und_locate_loss > 0")
        if not self.train_generation and self.source != "finetune":
            raise ValueError("train_generation: false keeps a parent's generator; it needs source: finetune")
        if self.source == "train" and self.ae_phase >= self.steps:
            raise ValueError(f"ae_steps ({self.ae_steps}) must be below steps ({self.steps})")
        if self.source == "train" and self.gen_space == "latent" and self.ae_steps < 1:
            raise ValueError("a latent-space generator needs ae_steps >= 1 to train its autoencoder")
        return self

    @property
    def ae_phase(self) -> int:
        """Steps spent on the autoencoder: none in pixel space, nor when fine-tuning (it is kept)."""
        return 0 if self.gen_space == "pixel" or self.source == "finetune" else self.ae_steps


class Clock(torch.nn.Module):
    """Training seconds, kept in the training state so resumes add up."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seconds", torch.zeros((), dtype=torch.float64))


def _raw(m: torch.nn.Module) -> torch.nn.Module:
    return getattr(m, "module", m)


# ---------------------------------------------------------------- setup

def build_teacher(p: Params, tok: Tokenizer) -> Teacher:
    ae = make_autoencoder(AutoencoderConfig(kind="pixel" if p.gen_space == "pixel" else "conv",
                                            latent_channels=p.latent_channels, channels=p.ae_channels,
                                            pixel_factor=p.gen_pixel_factor if p.gen_space == "pixel" else 1))
    gen = Generator(GeneratorConfig(
        vocab_size=len(tok), pad_id=tok.pad_id, max_text_len=p.max_text_len, in_channels=ae.cfg.sample_channels,
        sample_size=ae.cfg.latent_size, patch_size=p.gen_patch, width=p.gen_width, depth=p.gen_depth,
        heads=p.gen_heads, text_layers=p.gen_text_layers, prediction=p.gen_prediction,
        head_channels=p.gen_head_channels, text_mask=p.gen_text_mask))
    heads = p.und_object_loss > 0  # the object heads exist only when their loss is trained
    und = Understanding(UnderstandingConfig(
        vocab_size=len(tok), pad_id=tok.pad_id, sep_id=tok.sep_id, eos_id=tok.eos_id, hidden=p.und_hidden,
        layers=p.und_layers, heads=p.und_heads, kv_heads=p.und_kv_heads, intermediate=p.und_intermediate,
        grid=p.und_grid, encoder=p.und_encoder, object_classes=len(CLASSES) if heads else 0,
        object_colours=len(COLOUR_NAMES) if heads else 0,
        locate_bins=p.und_locate_bins if p.und_locate_loss > 0 else 0, locate_layer=p.und_locate_layer,
        locate_colours=len(COLOUR_NAMES) if p.und_locate_loss > 0 and p.und_locate_colours else 0,
        count_classes=len(NUMBERS) if p.und_count_loss > 0 else 0))
    return Teacher(ae, gen, und, tok, bf16=p.bf16)


def _tokenizer(world: WorldSets) -> Tokenizer:
    texts = list(world.t2i.texts)
    for rows in (world.edit, world.und_train, world.und_heldout):
        if rows is not None:
            texts += rows.texts + rows.answers
    return Tokenizer.from_texts(texts)


def setup(ctx: StageContext) -> TrainState:
    p: Params = ctx.params
    if p.source == "import":
        return _setup_import(ctx)
    if ctx.data_dir is None:
        raise ValueError("the base stage trains on the world data; no data directory was given")
    world = load_world(ctx.data_dir, limit=p.data_limit)
    extra = {}
    if p.source == "finetune":  # the imported teacher, trained further: its tokenizer, frozen autoencoder and clock
        teacher, extra["finetuned_from"], manifest = _load_import(ctx)
        metrics = manifest.get("metrics") or {}
        und = teacher.understanding
        if p.und_locate_loss > 0 and und.locate_head is None:
            und.add_locate_head(p.und_locate_bins, p.und_locate_layer)
        if p.und_locate_loss > 0 and p.und_locate_colours and und.locate_colour_head is None:
            und.add_locate_colours(len(COLOUR_NAMES))
        if p.und_count_loss > 0 and und.count_head is None:
            und.add_count_head(len(NUMBERS))
    else:
        teacher, metrics = build_teacher(p, _tokenizer(world)), {}
    ema = Generator(teacher.generator.cfg)
    ema.load_state_dict(teacher.generator.state_dict())
    ema.requires_grad_(False)
    trainable = teacher.autoencoder.trainable and p.ae_phase > 0  # the pixel space has no weights
    clock = Clock()
    clock.seconds.fill_(float(metrics.get("train_s") or 0.0))  # a fine-tune's time adds to its parent's
    modules = {"autoencoder": ctx.wrap_module(teacher.autoencoder) if trainable else teacher.autoencoder,
               "generator": ctx.wrap_module(teacher.generator),
               "generator_ema": ema, "understanding": ctx.wrap_module(teacher.understanding), "clock": clock}
    optimizers = {
        "gen": torch.optim.AdamW(modules["generator"].parameters(), lr=p.lr, weight_decay=0.0),
        "und": torch.optim.AdamW(modules["understanding"].parameters(), lr=p.und_lr, weight_decay=0.01),
    }
    if trainable:
        optimizers["ae"] = torch.optim.AdamW(modules["autoencoder"].parameters(), lr=p.ae_lr, weight_decay=0.0)
    data = {"world": world, "gen_text": {}, "und": _und_rows(world, teacher),
            "und_objects": _und_objects(world, teacher), "und_locate": _und_locate(world, teacher),
            "und_count": _und_count(world, teacher),
            "und_weights": _und_weights(world, p.und_kind_weights)}
    return TrainState(modules, optimizers, data, extra={"params": p, "rank": ctx.rank, "teacher": teacher, **extra})


def _load_import(ctx: StageContext) -> tuple[Teacher, dict, dict]:
    """The teacher at ``import_path`` (md5-checked before it is read), its lineage and its manifest."""
    p: Params = ctx.params
    path = ctx.extra.get("import") or Path(str(p.import_path))
    if "://" in str(path) or str(path).startswith("models:/"):
        raise ValueError(f"import_path {path} is remote: the stage runner fetches it (tasks/stage_exec.py)")
    ckpt = checkpoints.load_checkpoint(Path(path), p.import_md5)
    teacher = Teacher.from_parts(ckpt.config, ckpt.tensors)
    teacher.bf16 = p.bf16
    lineage = {"path": str(p.import_path), "md5": p.import_md5,
               **{k: ckpt.manifest.get(k) for k in ("stage", "profile", "git_sha", "params_hash", "mlflow_run_id",
                                                     "prefect_flow_run_id", "data", "parent")}}
    return teacher, lineage, ckpt.manifest


def _setup_import(ctx: StageContext) -> TrainState:
    teacher, lineage, manifest = _load_import(ctx)
    # the run that trained it: its training curve becomes this stage's history (the report's curve)
    return TrainState({}, {}, None, extra={"params": ctx.params, "teacher": teacher, "imported": lineage,
                                           "imported_metrics": manifest.get("metrics") or {},
                                           "history": list(manifest.get("history") or [])})


def _und_rows(world: WorldSets, teacher: Teacher) -> list[tuple[list[int], list[int]]] | None:
    if world.und_train is None:
        return None
    tok = teacher.tokenizer
    return [(teacher.prompt_ids(q), tok.encode(a) + [tok.eos_id])
            for q, a in zip(world.und_train.texts, world.und_train.answers)]


def _und_objects(world: WorldSets, teacher: Teacher) -> dict[str, torch.Tensor] | None:
    """The object heads' targets of every understanding row, ``{name: (N, grid*grid)}``; None without heads."""
    und = teacher.understanding
    if world.und_train is None or not und.object_heads:
        return None
    rows = world.und_train
    scenes = rows.scenes or [None] * len(rows)
    cells = [object_cells(s, und.cfg.grid, und.cfg.image_size, CLASSES, COLOUR_NAMES) for s in scenes]
    return {name: torch.tensor([c[name] for c in cells], dtype=torch.long) for name in und.object_heads}


def _und_locate(world: WorldSets, teacher: Teacher) -> list[list[tuple[int, ...]]] | None:
    """The locate head's targets of every understanding row: (index of the name's last token in the
    question's ids, column, row of the named object's centre[, its colour's index in COLOUR_NAMES when
    the head predicts colours]) per object the question names; None without a locate head. Rows
    without a scene, or whose question names no object, have none."""
    und = teacher.understanding
    if world.und_train is None or und.locate_head is None:
        return None
    bins = und.cfg.locate_bins
    out = []
    for question, sc in _questions_and_scenes(world.und_train):
        targets = []
        if sc is not None:
            for prefix, obj in referents(question, sc):
                cell = [min(bins - 1, int(c * bins / sc.size)) for c in (obj.cx, obj.cy)]
                colour = (COLOUR_NAMES.index(obj.colour),) if und.locate_colour_head is not None else ()
                targets.append((len(teacher.encode(prefix)) - 1, *cell, *colour))
        out.append(targets)
    return out


def _und_count(world: WorldSets, teacher: Teacher) -> list[tuple[int, int] | None] | None:
    """The count head's target of every understanding row: (index of the description's last token in
    the question's ids, how many objects fit it) for count and existence questions, else None; None
    without a count head."""
    und = teacher.understanding
    if world.und_train is None or und.count_head is None:
        return None
    out: list[tuple[int, int] | None] = []
    for question, sc in _questions_and_scenes(world.und_train):
        got = counted(question, sc) if sc is not None else None
        out.append(None if got is None or got[1] >= und.cfg.count_classes
                   else (len(teacher.encode(got[0])) - 1, got[1]))
    return out


def _questions_and_scenes(rows: Rows):
    """Each row's question and its scene (None for a row without one)."""
    scenes = rows.scenes or [None] * len(rows)
    for question, scene in zip(rows.texts, scenes):
        yield question, Scene.from_json(scene) if scene is not None else None


def _und_weights(world: WorldSets, kind_weights: dict[str, float]) -> torch.Tensor | None:
    """Each understanding row's weight when batches are drawn (``und_kind_weights``); None: uniform."""
    if world.und_train is None or not kind_weights:
        return None
    return torch.tensor([kind_weights.get(question_kind(q), 1.0) for q in world.und_train.texts],
                        dtype=torch.float64)


# ---------------------------------------------------------------- training

def train_step(state: TrainState, step: int) -> dict[str, float]:
    p: Params = state.extra["params"]
    if p.source == "import":
        return {}
    t0 = time.time()
    g = step_generator(p.seed, step, state.extra["rank"])
    metrics: dict[str, float] = {}
    if step < p.ae_phase:
        metrics.update(_ae_step(state, step, g))
    elif p.train_generation:
        metrics.update(_gen_step(state, step - p.ae_phase, g))
    if state.data["und"] is not None and step % p.und_every == 0:
        metrics.update(_und_step(state, step // p.und_every, g))
    clock = state.modules["clock"].seconds
    clock += time.time() - t0
    metrics["train_s"] = float(clock)  # the probe below is monitoring, not training: not counted
    gen_steps = step + 1 - p.ae_phase
    if p.probe_every and p.train_generation and gen_steps > 0 and gen_steps % p.probe_every == 0:
        metrics["geneval_probe"] = probe_geneval(state)
    return metrics


def probe_geneval(state: TrainState) -> float:
    """GenEval-shapes overall of the EMA generator on ``probe_per_tag`` prompts per tag (seed
    ``probe_seed``, one sample each, BAGEL's T2I CFG): a quality curve while training, far
    noisier than the benchmark (each prompt moves it by 1/n). Prompts with words the
    tokenizer lacks are skipped."""
    p: Params = state.extra["params"]
    modes = {name: m.training for name, m in state.modules.items()}
    teacher = final_teacher(state)  # switches the experts to eval mode; restored below
    try:
        rows = state.extra.get("probe_rows")
        if rows is None:  # drawn and checked against the vocabulary once per run
            rows = state.extra["probe_rows"] = [r for r in make_prompts(seed=p.probe_seed, n=p.probe_per_tag)
                                                if _known(teacher, r["prompt"])]
        if not rows:
            return math.nan
        images = teacher.generate([r["prompt"] for r in rows], seed=p.seed, num_steps=p.sample_steps)
        return float(score_geneval(rows, [[im] for im in images])["overall"])
    finally:
        for name, m in state.modules.items():
            _raw(m).train(modes[name])


def _known(teacher: Teacher, prompt: str) -> bool:
    try:
        teacher.text_ids([prompt])
    except InputError:
        return False
    return True


def _ae_step(state: TrainState, step: int, g: torch.Generator) -> dict[str, float]:
    """``ae_updates`` autoencoder updates (warm-up counted in updates); the last one's losses."""
    p: Params = state.extra["params"]
    t2i = state.data["world"].t2i
    ae, opt = state.modules["autoencoder"], state.optimizers["ae"]
    for update in range(step * p.ae_updates, (step + 1) * p.ae_updates):
        idx = torch.randint(0, len(t2i), (p.ae_batch_size,), generator=g)
        set_lr(opt, warmup_lr(p.ae_lr, update, p.warmup))
        with autocast(p.bf16):
            loss, logs = ae(images_to_unit(t2i.images[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return logs


def _gen_data(state: TrainState) -> GenData:
    """Latents of every T2I image and edit pair; the autoencoder is frozen from here on
    (calibrated once, when the generation phase starts; a resumed run restores the calibration)."""
    data = state.data.get("gen")
    if data is not None:
        return data
    p: Params = state.extra["params"]
    ae: SampleSpace = _raw(state.modules["autoencoder"])
    world = state.data["world"]
    if not ae.is_calibrated:
        ae.calibrate(images_to_unit(world.t2i.images[:CALIBRATION_IMAGES]))
    ae.eval().requires_grad_(False)
    teacher: Teacher = state.extra["teacher"]
    data = state.data["gen"] = GenData.build(world, ae, teacher.text_ids, teacher.tokenizer.pad_id, p.bf16)
    return data


def _gen_batch(state: TrainState, step: int, g: torch.Generator) -> tuple[torch.Tensor, GenCondition]:
    """A batch of T2I pairs and edit triplets (none before ``edit_after``) with text and source dropout."""
    p: Params = state.extra["params"]
    data = _gen_data(state)
    n_edit = round(p.batch_size * p.edit_fraction) if data.has_edits and step >= p.edit_after else 0
    x0, cond = data.batch(p.batch_size - n_edit, n_edit, g)
    if n_edit:
        keep = (torch.rand(n_edit, generator=g) >= p.image_dropout).float()
        cond.has_source = torch.cat([cond.has_source[:-n_edit], keep])
    drop = torch.rand(p.batch_size, generator=g) < p.text_dropout
    cond.text = torch.where(drop[:, None], torch.full_like(cond.text, data.pad_id), cond.text)
    return x0, cond


def _gen_step(state: TrainState, step: int, g: torch.Generator) -> dict[str, float]:
    """BAGEL's flow-matching loss: ``|v(x_t, t, c) - (eps - x0)|^2`` at ``x_t = (1 - t) x0 + t eps``."""
    p: Params = state.extra["params"]
    x0, cond = _gen_batch(state, step, g)
    noise = torch.randn(x0.shape, generator=g)
    t = sampling.sample_train_t(x0.shape[0], shift=p.train_shift, generator=g)
    model, opt = state.modules["generator"], state.optimizers["gen"]
    set_lr(opt, scheduled_lr(p.lr, step, p.warmup, p.steps - p.ae_phase, p.lr_schedule))
    with autocast(p.bf16):
        v = model(sampling.interpolate(x0, noise, t), t, cond)
    loss = F.mse_loss(v.float(), sampling.velocity_target(x0, noise))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema_update(state.modules["generator_ema"], _raw(model), min(p.ema_decay, (1 + step) / (10 + step)))
    return {"gen_loss": loss.item()}


def _und_batch(state: TrainState, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Images, right-padded ``question sep answer eos`` ids, labels on the answer and eos only, and
    the auxiliary targets: ``objects`` (the object heads'), ``locate`` (the locate head's, ``(K, 4)``,
    or ``(K, 5)`` with colours) and ``count`` (the count head's, ``(K, 3)``)
    where the model has those heads. Rows are drawn uniformly, or by ``und_kind_weights``."""
    p: Params = state.extra["params"]
    rows, weights = state.data["und"], state.data.get("und_weights")
    if weights is None:
        idx = torch.randint(0, len(rows), (p.und_batch_size,), generator=g)
    else:
        idx = torch.multinomial(weights, p.und_batch_size, replacement=True, generator=g)
    width = max(len(rows[i][0]) + len(rows[i][1]) for i in idx.tolist())
    ids = torch.full((len(idx), width), state.extra["teacher"].tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    for r, i in enumerate(idx.tolist()):
        q, a = rows[i]
        ids[r, :len(q) + len(a)] = torch.tensor(q + a)
        labels[r, len(q):len(q) + len(a)] = torch.tensor(a)
    aux = {}
    objects = state.data.get("und_objects")
    if objects is not None:
        aux["objects"] = {name: t[idx] for name, t in objects.items()}
    locate = state.data.get("und_locate")
    if locate is not None:
        width = 4 + (state.extra["teacher"].understanding.locate_colour_head is not None)
        aux["locate"] = torch.tensor([(r, *t) for r, i in enumerate(idx.tolist()) for t in locate[i]],
                                     dtype=torch.long).reshape(-1, width)
    count = state.data.get("und_count")
    if count is not None:
        aux["count"] = torch.tensor([(r, *count[i]) for r, i in enumerate(idx.tolist()) if count[i] is not None],
                                    dtype=torch.long).reshape(-1, 3)
    return images_to_unit(state.data["world"].und_train.images[idx]), ids, labels, aux


def _und_step(state: TrainState, step: int, g: torch.Generator) -> dict[str, float]:
    p: Params = state.extra["params"]
    images, ids, labels, aux = _und_batch(state, g)
    model, opt = state.modules["understanding"], state.optimizers["und"]
    set_lr(opt, scheduled_lr(p.und_lr, step, p.warmup, math.ceil(p.steps / p.und_every), p.lr_schedule))
    logs = {}
    with autocast(p.bf16):
        if not aux:
            lm_loss = loss = model(images, ids, labels)
        else:
            losses = model(images, ids, labels, **aux)
            lm_loss = loss = losses["lm"]
            for name, weight in (("object", p.und_object_loss), ("locate", p.und_locate_loss),
                                 ("count", p.und_count_loss)):
                if name in losses:
                    logs[f"und_{name}_loss"] = losses[name].item()
                    loss = loss + weight * losses[name]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"und_loss": lm_loss.item(), **logs}


# ---------------------------------------------------------------- export and evaluation

def final_teacher(state: TrainState) -> Teacher:
    """The stage's model: the imported teacher, or the trained experts with the EMA generator."""
    t: Teacher = state.extra["teacher"]
    if state.extra["params"].source == "import":
        return t
    m = state.modules
    return Teacher(_raw(m["autoencoder"]).eval(), m["generator_ema"].eval(), _raw(m["understanding"]).eval(),
                   t.tokenizer, bf16=t.bf16)


def export(state: TrainState) -> Export:
    teacher = final_teacher(state)
    config = teacher.config()
    # the checkpoint it is, or the one it was trained from
    for extra_key, config_key in (("imported", "imported_from"), ("finetuned_from", "finetuned_from")):
        if extra_key in state.extra:
            config[config_key] = state.extra[extra_key]
    samples = _samples(state, teacher) if state.data is not None else {}
    return Export(teacher.tensors(), config, samples)


def _hwc(u8: torch.Tensor) -> np.ndarray:
    return u8.permute(0, 2, 3, 1).numpy()


def _row(images: np.ndarray) -> np.ndarray:
    return np.concatenate(list(images), axis=1)


def _samples(state: TrainState, teacher: Teacher, n: int = 8) -> dict[str, np.ndarray]:
    """T2I samples of the first prompts (a row), edits as source | result | reference rows."""
    p: Params = state.extra["params"]
    world: WorldSets = state.data["world"]
    prompts = world.t2i.texts[:n]
    out = {"t2i": _row(teacher.generate(prompts, seed=p.seed, num_steps=p.sample_steps))}
    state.extra["nfe_t2i"] = teacher.last_nfe
    if world.edit is not None:
        k = min(4, len(world.edit))
        src = _hwc(world.edit.images[:k])
        res = teacher.edit(src, world.edit.texts[:k], seed=p.seed, num_steps=p.sample_steps)
        ref = _hwc(world.edit.targets[:k])
        state.extra["nfe_edit"] = teacher.last_nfe
        out["edit"] = np.concatenate([_row(np.stack(r)) for r in zip(src, res, ref)], axis=0)
    return out


def evaluate(state: TrainState) -> dict[str, float]:
    """Held-out exact-answer accuracy (Q&A rows, not captions), NFE counted while sampling, train_s."""
    p: Params = state.extra["params"]
    out: dict[str, float] = {}
    if "imported" in state.extra:
        out.update({k: float(v) for k, v in state.extra["imported_metrics"].items()
                    if k in ("train_s",) and isinstance(v, (int, float))})
    else:
        out["train_s"] = float(state.modules["clock"].seconds)
    for key in ("nfe_t2i", "nfe_edit"):
        if key in state.extra:
            out[key] = float(state.extra[key])
    held = state.data["world"].und_heldout if state.data is not None else None
    if held is not None and p.eval_rows:
        out["und_heldout_acc"] = answer_accuracy(final_teacher(state), held, p.eval_rows)
    return out


def answer_accuracy(teacher: Teacher, rows: Rows, limit: int, batch: int = 32) -> float:
    """Share of Q&A rows (captions excluded) whose greedy answer equals the reference word for word."""
    return answer_accuracy_by_kind(teacher, rows, limit, batch)["overall"]


def answer_accuracy_by_kind(teacher: Teacher, rows: Rows, limit: int, batch: int = 32) -> dict[str, float]:
    """:func:`answer_accuracy` (``overall``) and the same share per question kind
    (``components/world/understanding.question_kind``; questions of no known kind count in ``overall`` only)."""
    idx = [i for i, q in enumerate(rows.texts) if q != CAPTION_PROMPT][:limit]
    if not idx:
        return {"overall": math.nan}
    right: dict[str, list[int]] = {}
    for s in range(0, len(idx), batch):
        part = idx[s:s + batch]
        answers = teacher.ask(_hwc(rows.images[part]), [rows.texts[i] for i in part])
        for a, i in zip(answers, part):
            ok = int(split(a) == split(rows.answers[i]))
            for key in ("overall", question_kind(rows.texts[i])):
                if key is not None:
                    right.setdefault(key, []).append(ok)
    return {k: sum(v) / len(v) for k, v in right.items()}
