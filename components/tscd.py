"""The ``tscd`` stage: trajectory segmented consistency distillation (Hyper-Bagel §3.2.2, Hyper-SD).

Hyper-SD's TSCD in one stage with ``segments = 3`` (no 8 -> 4 -> 2 -> 1 progression). Time is
discretised on the unshifted axis ``u`` (``u = 1`` noise, ``u = 0`` data; ``t = shift(u)``,
the sampler's own mapping) into ``grid_steps`` intervals. Per sample:

- ``u_n`` uniform on the grid (``n >= 1``), ``u_{n-1} = u_n - 1/N`` one grid step toward data;
- the segment of ``u_n`` is ``(u_b, u_b + 1/k]``, its data-side start ``u_b``;
- ``u_end ~ U[u_b, u_{n-1}]``;
- ``x_{t_n} = (1 - t_n) x0 + t_n eps`` from the world data.

With ``Psi(x, v, t -> s) = x - v (t - s)`` (one Euler step of the flow ODE), the loss is::

    L_TSCD = d( Psi(x_{t_n}, f_stu(x_{t_n}, t_n, c), t_end),
                Psi(x^_{t_{n-1}}, f_stu^-(x^_{t_{n-1}}, t_{n-1}, c), t_end) ),
    x^_{t_{n-1}} = Psi(x_{t_n}, f_teacher(x_{t_n}, t_n, c), t_{n-1})      (one-step teacher solve)

where ``f_stu^-`` is the student's EMA and the teacher is the frozen CFG-distilled model (the
parent; its CFG is embedded, so the teacher solve is one pass at the sampled scales). The
distance ``d`` is adversarial only (hinge) by default, as Hyper-Bagel has it, with a
multi-head discriminator on a trainable copy of the teacher (``components/models/discriminator.py``)
judging the two points at ``t_end``::

    L_D = E[ max(0, 1 - D(target)) + max(0, 1 + D(pred)) ],   L_G = -E[ D(pred) ]

``distance: hybrid`` is Hyper-SD's original: ``mse_weight * ||pred - target||^2 + adv_weight * L_G``.
The 6-NFE sampler takes 2 Euler steps per segment: the 7 times of ``timesteps(6)`` contain
the segment boundaries ``u = 1, 2/3, 1/3, 0``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from components import sampling
from components.distill import (DistillParams, build_state, copy_generator, evaluate_common, export_student, guided,
                                load_model, optimise, raw, velocity_fn, world_batch)
from components.models.discriminator import MultiHeadDiscriminator
from components.training import Export, StageContext, TrainState, ema_update, step_generator, warmup_lr


class Params(DistillParams):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(2e-5, gt=0, le=1.0)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(20, ge=1)
    segments: int = Field(3, ge=1, description="TSCD segments (Hyper-Bagel: 3, in a single stage)")
    grid_steps: int = Field(48, ge=1, description="discretisation of u in [0, 1]; a multiple of segments")
    ema_decay: float = Field(0.95, ge=0, lt=1, description="decay of the EMA target f_stu^-")
    distance: Literal["adversarial", "hybrid"] = Field("adversarial", description="adversarial (Hyper-Bagel) | "
                                                                                   "hybrid (Hyper-SD: MSE + GAN)")
    mse_weight: float = Field(1.0, ge=0, description="hybrid: weight of the MSE term")
    adv_weight: float = Field(1.0, ge=0, description="weight of the generator's adversarial term")
    disc_lr: float = Field(2e-5, gt=0, le=1.0)
    disc_blocks: list[int] | None = Field(None, description="backbone blocks with a head (null: 3 spread evenly)")

    @model_validator(mode="after")
    def _grid(self) -> "Params":
        if self.grid_steps % self.segments:
            raise ValueError(f"grid_steps ({self.grid_steps}) must be a multiple of segments ({self.segments})")
        if self.sample_steps % self.segments:
            raise ValueError(f"sample_steps ({self.sample_steps}) must be a multiple of segments ({self.segments})")
        return self


# ---------------------------------------------------------------- segments and the loss

def segment_start(n: torch.Tensor, grid_steps: int, segments: int) -> torch.Tensor:
    """``u_b``, the data-side start of the segment holding grid point ``u_n = n / N`` (``n >= 1``):
    segment ``j`` covers ``(j/k, (j+1)/k]``."""
    per = grid_steps // segments
    return ((n - 1) // per * per).double() / grid_steps


def sample_points(n_samples: int, grid_steps: int, segments: int, g: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_n, u_{n-1}, u_end)`` per sample, ``u_end ~ U[u_b, u_{n-1}]``."""
    n = torch.randint(1, grid_steps + 1, (n_samples,), generator=g)
    u_n, u_prev = n.double() / grid_steps, (n - 1).double() / grid_steps
    u_b = segment_start(n, grid_steps, segments)
    u_end = u_b + (u_prev - u_b) * torch.rand(n_samples, generator=g, dtype=torch.float64)
    return u_n, u_prev, u_end


def psi(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Psi(x, v, t -> s)``: one Euler step of the flow ODE from ``t`` to ``s``."""
    return sampling.euler_step(x, v, t, s)


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def hinge_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    return -d_fake.mean()


def generator_loss(d_pred: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, distance: str,
                   mse_weight: float, adv_weight: float) -> torch.Tensor:
    """``d(pred, target)`` as the student sees it: adversarial only, or Hyper-SD's MSE + adversarial."""
    adv = adv_weight * hinge_g_loss(d_pred)
    if distance == "hybrid":
        return mse_weight * F.mse_loss(pred, target.detach()) + adv
    return adv


# ---------------------------------------------------------------- stage

def setup(ctx: StageContext) -> TrainState:
    p: Params = ctx.params
    parent = load_model(ctx.parent_dir, "CFG-distilled model (cfg_distill)", p.bf16)
    if not parent.embedded_cfg:
        raise ValueError("tscd starts from a CFG-distilled model (with scale embeddings); the parent has none")
    student = ctx.wrap_module(copy_generator(parent.generator, trainable=True))
    disc = ctx.wrap_module(MultiHeadDiscriminator(copy_generator(parent.generator, trainable=True), p.disc_blocks))
    modules = {"student": student, "student_ema": copy_generator(parent.generator, trainable=False),
               "discriminator": disc}
    return build_state(ctx, parent, modules, {"student": p.lr, "discriminator": p.disc_lr},
                       {"teacher": copy_generator(parent.generator, trainable=False)},
                       betas={"discriminator": (0.0, 0.99)})


def train_step(state: TrainState, step: int) -> dict[str, float]:
    p: Params = state.extra["params"]
    g = step_generator(p.seed, step, state.extra["rank"])
    x0, cond, is_edit, s_txt, s_img = world_batch(state, g)
    noise = torch.randn(x0.shape, generator=g)
    u_n, u_prev, u_end = sample_points(x0.shape[0], p.grid_steps, p.segments, g)
    t_n, t_prev, t_end = (sampling.shift_t(u, p.shift).float() for u in (u_n, u_prev, u_end))
    x_n = sampling.interpolate(x0, noise, t_n)
    at = lambda t: guided(cond, is_edit, t, s_txt, s_img)  # noqa: E731  (scales in force at t)
    student, disc = state.modules["student"], state.modules["discriminator"]

    pred = psi(x_n, velocity_fn(student, p.bf16)(x_n, t_n, at(t_n)), t_n, t_end)
    with torch.no_grad():
        x_prev = psi(x_n, velocity_fn(state.extra["teacher"], p.bf16)(x_n, t_n, at(t_n)), t_n, t_prev)
        target = psi(x_prev, velocity_fn(state.modules["student_ema"], p.bf16)(x_prev, t_prev, at(t_prev)),
                     t_prev, t_end)

    d_in = lambda x: disc(x, t_end, at(t_end)).float()  # noqa: E731
    d_loss = hinge_d_loss(d_in(target), d_in(pred.detach()))
    optimise(state.optimizers["discriminator"], d_loss, disc.parameters(), p.grad_clip,
             warmup_lr(p.disc_lr, step, p.warmup))

    disc.requires_grad_(False)
    try:
        g_loss = generator_loss(d_in(pred), pred, target, p.distance, p.mse_weight, p.adv_weight)
        gnorm = optimise(state.optimizers["student"], g_loss, student.parameters(), p.grad_clip,
                         warmup_lr(p.lr, step, p.warmup))
    finally:
        disc.requires_grad_(True)
    ema_update(state.modules["student_ema"], raw(student), p.ema_decay)
    return {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "grad_norm": gnorm,
            "mse": F.mse_loss(pred.detach(), target).item(), "edit": float(is_edit)}


def export(state: TrainState) -> Export:
    return export_student(state, raw(state.modules["student"]), "tscd")


def evaluate(state: TrainState) -> dict[str, float]:
    return evaluate_common(state)
