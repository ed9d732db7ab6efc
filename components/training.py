"""The shared training loop every trainable stage runs through.

A stage is one module in ``components/`` that defines:

- ``Params``: a pydantic model (extra="forbid") holding the stage's section of
  ``params.yaml``; it must have ``steps`` and may use the common fields of
  :class:`TrainParams`;
- ``setup(ctx: StageContext) -> TrainState``: builds models, optimisers and
  data from the parent checkpoint and the data directory;
- ``train_step(state: TrainState, step: int) -> dict[str, float]``: one
  optimisation step (its loss reads against the paper's equation);
- ``export(state: TrainState) -> Export``: the weights and JSON config of the
  stage's final model;
- optionally ``evaluate(state: TrainState) -> dict[str, float]``: metrics on
  the final model, computed by rank 0 only.

:func:`run_training` owns everything else: the step loop, resuming from a
training-state checkpoint, reporting checkpoints every N steps and metrics.
It knows nothing of Ray; the caller passes a :class:`Reporter` that does the
reporting (Ray Train in ``tasks/``, an in-process one in the unit tests).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from components import checkpoints


class TrainParams(BaseModel):
    """Fields every trainable stage shares; stages subclass it."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of parameters, data order and noise")
    steps: int = Field(100, ge=1, description="optimisation steps")
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=1.0)
    checkpoint_every: int = Field(50, ge=1, description="report a resumable checkpoint every N steps")
    log_every: int = Field(10, ge=1)


@dataclass
class StageContext:
    """What a stage's ``setup`` may read. Paths are already verified by the runner."""

    params: Any
    data_dir: Path | None
    parent_dir: Path | None
    rank: int = 0
    world_size: int = 1
    # Wraps a trainable module for data-parallel training (DDP under Ray Train).
    wrap_module: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    extra: dict[str, Path] = field(default_factory=dict)  # other input checkpoints by name
    stage: str = ""  # the stage's name in dvc.yaml (for log lines)


@dataclass
class TrainState:
    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    data: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Export:
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # name -> HxWx3 uint8 grid


class Reporter(Protocol):
    def resume_dir(self) -> Path | None: ...

    def report(self, step: int, metrics: dict[str, float], state_dir: Path | None) -> None: ...


class LocalReporter:
    """In-process reporter: keeps the latest state directory on disk (tests, local mode)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.history: list[tuple[int, dict[str, float]]] = []

    def resume_dir(self) -> Path | None:
        latest = self.root / "latest"
        return latest if latest.exists() else None

    def report(self, step: int, metrics: dict[str, float], state_dir: Path | None) -> None:
        self.history.append((step, dict(metrics)))
        if state_dir is not None:
            checkpoints.replace_dir(state_dir, self.root / "latest", copy=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random generator of one training step, seeded by (seed, step, rank): a resumed run
    draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)


def warmup_lr(base: float, step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then ``base``."""
    return base * min(1.0, (step + 1) / max(1, warmup))


def scheduled_lr(base: float, step: int, warmup: int, total: int, schedule: str = "constant") -> float:
    """:func:`warmup_lr`, then ``constant`` (``base``) or ``linear``: decayed in a straight line from
    ``base`` at step 0 to 0 at step ``total`` (the anneal of a warm-up / stable / decay schedule)."""
    lr = warmup_lr(base, step, warmup)
    if schedule == "linear":
        return lr * max(0.0, 1.0 - step / max(1, total))
    if schedule != "constant":
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant or linear)")
    return lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model``, parameter by parameter."""
    for e, m in zip(ema.parameters(), getattr(model, "module", model).parameters()):
        e.lerp_(m, 1.0 - decay)


def run_training(stage: Any, ctx: StageContext, reporter: Reporter,
                 progress: Callable[[int, int, dict[str, float]], None] | None = None,
                 fault_hook: Callable[[int], None] | None = None) -> TrainState:
    """Run ``stage`` from step 0, or from the reporter's latest state, to ``params.steps``.

    ``state.extra`` gets ``history`` (metrics every ``log_every`` steps, kept across
    resumes, after any history the stage's ``setup`` put there, e.g. an imported model's; steps
    that return no metrics are not logged) and ``resumed_from`` (the step training continued from); ``progress`` hears of a
    resume as ``(start, steps, {"resumed_from": start})`` before the first step.
    """
    params = ctx.params
    seed_everything(params.seed + 1009 * ctx.rank)
    state = stage.setup(ctx)
    start = 0
    history: list[dict[str, float]] = list(state.extra.get("history", []))
    resume = reporter.resume_dir()
    if resume is not None:
        start, extra = checkpoints.load_train_state(resume, state.modules, state.optimizers)
        history = list(extra.get("history", []))
        if progress is not None:  # a resumed run says so before its first step
            progress(start, params.steps, {"resumed_from": float(start)})
    state.extra["resumed_from"] = start
    metrics: dict[str, float] = {}
    t_loop = time.perf_counter()
    for step in range(start, params.steps):
        if fault_hook is not None:
            fault_hook(step)
        metrics = {k: float(v) for k, v in stage.train_step(state, step).items()}
        done = step + 1
        last = done == params.steps
        if metrics and (done % params.log_every == 0 or last):
            history.append({"step": done, **metrics})
            if progress is not None:
                progress(done, params.steps, metrics)
        if done % params.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory(prefix="trainstate-") as tmp:
                state_dir = None
                if ctx.rank == 0:
                    state_dir = Path(tmp) / "state"
                    checkpoints.save_train_state(state_dir, state.modules, state.optimizers, done,
                                                 {"history": history})
                reporter.report(done, {"step": done, **metrics}, state_dir)
    state.extra["history"] = history
    state.extra["loop_s"] = time.perf_counter() - t_loop
    return state
