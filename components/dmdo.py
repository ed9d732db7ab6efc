"""The ``dmdo`` stage: distribution matching distillation via ODE (Hyper-Bagel §3.2.3, Fig. 4).

Three models: the generator ``G`` (the 6-step student, from the ``tscd`` parent), the real
score (the frozen CFG-distilled teacher, the stage's ``teacher`` input) and the fake score
(initialised as a copy of the real one, DMD's convention). All are velocity models with the
CFG scales embedded. Per step, for a batch of one task with per-sample scales:

1. ``x_T ~ N(0, I)``; ``G`` runs its deterministic 6-step Euler ODE (no gradient) and the whole
   trajectory ``x_T = x_{t_0}, x_{t_1}, ..., x_{t_6} = x0`` is kept.
2. Fake-score updates (``fake_updates`` of them, DMD2's two-time-scale ratio, default 5), each
   at fresh ``t``: ``x_t = (1 - t) x0 + t x_T`` (interpolation between the trajectory's own
   endpoints, not fresh noise) and::

       L_fake = E || v_fake(x_t, t, c) - (x_T - x0) ||^2

3. One generator update: per sample a stored point ``x_{t_k}`` (``k`` uniform over the 6 steps),
   one differentiable step to ``x^0 = x_{t_k} - t_k v_G(x_{t_k}, t_k, c)``; a new ``t'`` and
   ``x^_{t'} = (1 - t') x^0 + t' x_T`` with the same ``x_T``; the real and fake models predict
   ``x0_real = x^_{t'} - t' v_real`` and ``x0_fake = x^_{t'} - t' v_fake``; DMD's normalised
   gradient and loss::

       grad  = (x0_fake - x0_real) / mean|x^0 - x0_real|        (per sample)
       L_gen = 0.5 || x^0 - stopgrad(x^0 - grad) ||^2             (so dL/dx^0 = grad)

No regression loss and no GAN regulariser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components import sampling
from components.distill import (DistillParams, build_state, copy_generator, evaluate_common, export_student, guided,
                                load_model, optimise, raw, velocity_fn, world_batch)
from components.training import Export, StageContext, TrainState, step_generator, warmup_lr

WEIGHT_EPS = 1e-6


class Params(DistillParams):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(2e-5, gt=0, le=1.0, description="generator learning rate")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    fake_lr: float = Field(1e-4, gt=0, le=1.0, description="fake score learning rate")
    fake_updates: int = Field(5, ge=1, description="fake-score updates per generator update (DMD2's TTUR)")


# ---------------------------------------------------------------- the formulas

def endpoint_interpolate(x0: torch.Tensor, x_T: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t x_T``: a point between the trajectory's endpoints."""
    return sampling.interpolate(x0, x_T, t)


def fake_loss(v_fake: torch.Tensor, x0: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
    """``|| v_fake - (x_T - x0) ||^2``, the fake score's regression on the generator's own ODE pairs."""
    return F.mse_loss(v_fake.float(), (x_T - x0).detach())


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The data point a velocity points back to: ``x_t - t v``."""
    return x_t - sampling.per_sample_view(t, x_t) * v


def dmd_gradient(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's ``(x0_fake - x0_real) / mean|x0_hat - x0_real|``, the mean taken per sample."""
    w = (x0_hat - x0_real).abs().flatten(1).mean(1).clamp(min=WEIGHT_EPS)
    return torch.nan_to_num((x0_fake - x0_real) / sampling.per_sample_view(w, x0_hat))


def dmd_loss(x0_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 || x0_hat - stopgrad(x0_hat - grad) ||^2`` (mean): its gradient w.r.t. ``x0_hat`` is ``grad / numel``."""
    return 0.5 * F.mse_loss(x0_hat.float(), (x0_hat - grad).detach().float())


def trajectory(velocity, x_T: torch.Tensor, at, num_steps: int, shift: float) -> tuple[list[torch.Tensor], list[float]]:
    """The generator's deterministic Euler ODE from ``x_T``: ``num_steps + 1`` points and their times.
    ``at(t)`` gives the condition in force at the per-sample times ``t``."""
    ts = sampling.timesteps(num_steps, shift)
    xs = [x_T]
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            tt = torch.full((x_T.shape[0],), t)
            xs.append(sampling.euler_step(xs[-1], velocity(xs[-1], tt, at(tt)), t, t_next))
    return xs, ts


# ---------------------------------------------------------------- stage

def setup(ctx: StageContext) -> TrainState:
    p: Params = ctx.params
    gen = load_model(ctx.parent_dir, "few-step generator (tscd)", p.bf16)
    real = load_model(ctx.extra.get("teacher"), "real score: the CFG-distilled teacher (cfg_distill)", p.bf16)
    for what, m in (("the generator (parent)", gen), ("the real score (teacher)", real)):
        if not m.embedded_cfg:
            raise ValueError(f"dmdo needs CFG-distilled models; {what} has no scale embeddings")
    generator = ctx.wrap_module(copy_generator(gen.generator, trainable=True))
    fake = ctx.wrap_module(copy_generator(real.generator, trainable=True))
    return build_state(ctx, gen, {"generator": generator, "fake": fake}, {"generator": p.lr, "fake": p.fake_lr},
                       {"real": copy_generator(real.generator, trainable=False)})


def train_step(state: TrainState, step: int) -> dict[str, float]:
    p: Params = state.extra["params"]
    g = step_generator(p.seed, step, state.extra["rank"])
    x_data, cond, is_edit, s_txt, s_img = world_batch(state, g)  # the data gives conditions only
    n = x_data.shape[0]
    at = lambda t: guided(cond, is_edit, t, s_txt, s_img)  # noqa: E731  (scales in force at t)
    gen, fake = state.modules["generator"], state.modules["fake"]
    x_T = torch.randn(x_data.shape, generator=g)
    xs, ts = trajectory(velocity_fn(gen, p.bf16), x_T, at, p.sample_steps, p.shift)
    x0 = xs[-1]

    # 2. the fake score learns the generator's own distribution at every t
    f_losses = []
    for _ in range(p.fake_updates):
        t = sampling.sample_train_t(n, shift=p.shift, generator=g)
        v = velocity_fn(fake, p.bf16)(endpoint_interpolate(x0, x_T, t), t, at(t))
        loss = fake_loss(v, x0, x_T)
        optimise(state.optimizers["fake"], loss, fake.parameters(), p.grad_clip, warmup_lr(p.fake_lr, step, p.warmup))
        f_losses.append(loss.item())

    # 3. one differentiable generator step from a stored point, then DMD's gradient
    k = torch.randint(0, p.sample_steps, (n,), generator=g)
    x_k = torch.stack([xs[int(k[i])][i] for i in range(n)])
    t_k = torch.tensor([ts[int(i)] for i in k], dtype=torch.float32)
    x0_hat = x0_from_velocity(x_k, velocity_fn(gen, p.bf16)(x_k, t_k, at(t_k)), t_k)
    t2 = sampling.sample_train_t(n, shift=p.shift, generator=g)
    x_t2 = endpoint_interpolate(x0_hat.detach(), x_T, t2)
    with torch.no_grad():
        x0_real = x0_from_velocity(x_t2, velocity_fn(state.extra["real"], p.bf16)(x_t2, t2, at(t2)), t2)
        x0_fake = x0_from_velocity(x_t2, velocity_fn(fake, p.bf16)(x_t2, t2, at(t2)), t2)
        grad = dmd_gradient(x0_hat.detach(), x0_real, x0_fake)
    loss = dmd_loss(x0_hat, grad)
    gnorm = optimise(state.optimizers["generator"], loss, gen.parameters(), p.grad_clip, warmup_lr(p.lr, step, p.warmup))
    return {"fake_loss": sum(f_losses) / len(f_losses), "dmd_loss": loss.item(), "grad_norm": gnorm,
            "fake_real_gap": (x0_fake - x0_real).abs().mean().item(), "edit": float(is_edit)}


def export(state: TrainState) -> Export:
    return export_student(state, raw(state.modules["generator"]), "dmdo")


def evaluate(state: TrainState) -> dict[str, float]:
    return evaluate_common(state)
