"""What the three 6-NFE distillation stages share (``cfg_distill``, ``tscd``, ``dmdo``).

- :class:`DistillParams`: the common fields (scale ranges, training shift, task mix, the
  student's sampler);
- :func:`load_model`: a generation model checkpoint (the base format, md5-verified by the
  runner before this reads it) as a :class:`~components.inference.Teacher`;
- :func:`world_batch`: a batch of one task from the world data, with per-sample CFG scales
  drawn from the stage's ranges (text U[1, 5]; image U[1.0, 2.5] for edits, 1 for T2I) and
  gated by that task's BAGEL CFG interval at each sample's time;
- :func:`copy_generator`: trainable or frozen copies (students, EMA targets, critics);
- :func:`export_student`: the student as a model of the base format (same autoencoder,
  understanding expert and tokenizer) whose ``sampler`` names its default number of steps,
  with sample grids made by that sampler.

Every stage draws each step's randomness from a generator seeded by (seed, step, rank), so a
resumed run continues as an uninterrupted one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from components import sampling
from components.base_data import WorldSets, load_world
from components.gen_data import GenData
from components.inference import Teacher, velocity_fn  # noqa: F401 (velocity_fn: the stages import it from here)
from components.models.generator import SCALE_EMBEDDINGS, GenCondition, Generator
from components.training import Export, StageContext, TrainParams, TrainState, set_lr


class DistillParams(TrainParams):
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-4, gt=0, le=1.0)
    warmup: int = Field(20, ge=0, description="linear learning-rate warm-up steps")
    grad_clip: float = Field(1.0, gt=0)
    bf16: bool = Field(True, description="bfloat16 autocast where the CPU has native bfloat16 (AVX512-BF16, AMX); "
                                                "float32 elsewhere (components.inference.bf16_native)")
    data_limit: int | None = Field(None, ge=1, description="read at most this many rows per data set")
    edit_fraction: float = Field(0.5, ge=0, le=1, description="share of steps on edit triplets")
    shift: float = Field(3.0, ge=3.0, description="timestep shift of training and sampling (paper: >= 3)")
    text_scale_range: tuple[float, float] = Field((1.0, 5.0), description="text CFG scale ~ U[a, b]")
    image_scale_range: tuple[float, float] = Field((1.0, 2.5), description="image CFG scale ~ U[a, b] (edits)")
    sample_steps: int = Field(6, ge=1, description="the student's default sampler steps (1 pass each)")

    @model_validator(mode="after")
    def _ranges(self) -> "DistillParams":
        for name in ("text_scale_range", "image_scale_range"):
            lo, hi = getattr(self, name)
            if not 1.0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 1 <= a <= b, got [{lo}, {hi}]")
        return self


# ---------------------------------------------------------------- models

def load_model(path: Path | None, what: str, bf16: bool = True) -> Teacher:
    if path is None:
        raise ValueError(f"this stage reads the {what} checkpoint; none was given")
    model = Teacher.load(Path(path))
    model.bf16 = bf16
    return model


def copy_generator(gen: Generator, trainable: bool, scale_embeddings: bool = True) -> Generator:
    """A copy of ``gen`` (with the CFG scale embeddings, zero-initialised, if it lacks them)."""
    out = copy.deepcopy(gen)
    missing = [n for n in SCALE_EMBEDDINGS if n not in out.extra_embed]
    if scale_embeddings and missing:
        out.add_extra_embeddings(missing)
    out.train(trainable).requires_grad_(trainable)
    return out


def raw(m: torch.nn.Module) -> torch.nn.Module:
    return getattr(m, "module", m)


# ---------------------------------------------------------------- data

def build_state(ctx: StageContext, model: Teacher, modules: dict[str, torch.nn.Module], lrs: dict[str, float],
                extra: dict, betas: dict[str, tuple[float, float]] | None = None) -> TrainState:
    """The stage's training state: an AdamW per trainable module (``lrs``), the world data encoded by
    ``model``'s autoencoder and tokenizer, and the prompts and edits of the exported grids."""
    optimizers = {name: torch.optim.AdamW(modules[name].parameters(), lr=lr, weight_decay=0.0,
                                          betas=(betas or {}).get(name, (0.9, 0.999)))
                  for name, lr in lrs.items()}
    p: DistillParams = ctx.params
    if ctx.data_dir is None:
        raise ValueError("distillation trains on the world data; no data directory was given")
    world = load_world(ctx.data_dir, limit=p.data_limit)
    data = GenData.build(world, model.autoencoder, model.text_ids, model.tokenizer.pad_id, p.bf16)
    return TrainState(modules, optimizers, data, extra={"params": p, "rank": ctx.rank, "base": model, **extra,
                                                        **grid_inputs(world)})


def task_cfg(is_edit: bool) -> sampling.CFG:
    """BAGEL's CFG settings of the task: its interval and renorm (the scales are sampled)."""
    return sampling.EDIT_CFG if is_edit else sampling.T2I_CFG


def sample_scales(p: DistillParams, n: int, is_edit: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (text, image) scales: text ~ U[text range]; image ~ U[image range] for edits, else 1."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    s_txt = uniform(*p.text_scale_range)
    s_img = uniform(*p.image_scale_range) if is_edit else torch.ones(n)
    return s_txt, s_img


def world_batch(state: TrainState, g: torch.Generator) -> tuple[torch.Tensor, GenCondition, bool, torch.Tensor,
                                                                 torch.Tensor]:
    """``(x0, cond, is_edit, text_scale, image_scale)`` for one step (scales not yet gated)."""
    p: DistillParams = state.extra["params"]
    x0, cond, is_edit = state.data.task_batch(p.batch_size, p.edit_fraction, g)
    s_txt, s_img = sample_scales(p, x0.shape[0], is_edit, g)
    return x0, cond, is_edit, s_txt, s_img


def guided(cond: GenCondition, is_edit: bool, t: torch.Tensor, s_txt: torch.Tensor, s_img: torch.Tensor
           ) -> GenCondition:
    """``cond`` with the scales in force at ``t`` (BAGEL's interval gating of the task)."""
    return cond.with_scales(*sampling.gate_scales(task_cfg(is_edit), t, s_txt, s_img))


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, params, clip: float, lr: float) -> float:
    """One AdamW step on ``loss`` with gradient clipping; returns the gradient norm."""
    set_lr(opt, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params), clip)
    opt.step()
    return float(norm)


# ---------------------------------------------------------------- export

def student_model(base: Teacher, generator: Generator, sample_steps: int, shift: float) -> Teacher:
    gen = copy.deepcopy(raw(generator)).eval().requires_grad_(False)
    return Teacher(base.autoencoder, gen, base.understanding, base.tokenizer, bf16=base.bf16,
                   sampler={"num_steps": sample_steps, "shift": shift, "kind": "embedded_cfg"})


def _row(images: np.ndarray) -> np.ndarray:
    return np.concatenate(list(images), axis=1)


def export_student(state: TrainState, generator: Generator, stage: str, n: int = 8) -> Export:
    """The student in the base format, with T2I and edit sample grids from its own sampler."""
    p: DistillParams = state.extra["params"]
    model = student_model(state.extra["base"], generator, p.sample_steps, p.shift)
    config = model.config()
    config["distilled_by"] = stage
    samples: dict[str, np.ndarray] = {}
    prompts = state.extra.get("sample_prompts") or []
    if prompts:
        samples["t2i"] = _row(model.generate(prompts[:n], seed=p.seed))
        state.extra["nfe_t2i"] = model.last_nfe
    edits = state.extra.get("sample_edits")
    if edits is not None:
        src, texts = edits
        res = model.edit(src, texts, seed=p.seed)
        state.extra["nfe_edit"] = model.last_nfe
        samples["edit"] = np.concatenate([_row(np.stack(r)) for r in zip(src, res)], axis=0)
    return Export(model.tensors(), config, samples)


def grid_inputs(world: WorldSets, n: int = 8) -> dict:
    """Prompts and edits shown in the exported grids (the first rows of the world data)."""
    out: dict = {"sample_prompts": world.t2i.texts[:n]}
    if world.edit is not None:
        k = min(4, len(world.edit))
        out["sample_edits"] = (world.edit.images[:k].permute(0, 2, 3, 1).numpy(), world.edit.texts[:k])
    return out


def evaluate_common(state: TrainState) -> dict[str, float]:
    return {k: float(state.extra[k]) for k in ("nfe_t2i", "nfe_edit") if k in state.extra}
