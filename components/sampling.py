"""BAGEL's flow matching, Euler sampler and classifier-free guidance, generic over the model.

Conventions (``reference/hyper-bagel-method.md`` §1.2, §1.4; BAGEL ``bagel.py``):

- ``x_t = (1 - t) * x0 + t * eps``; ``t = 1`` is pure noise, ``t = 0`` is data;
- the model predicts the velocity ``eps - x0`` (pointing from data to noise);
- training ``t`` is logit-normal, ``sigmoid(N(0, 1))``, then shifted by
  ``t' = s * t / (1 + (s - 1) * t)`` with ``s = 3``;
- sampling runs Euler ``x <- x - v * dt`` over the same shift applied to
  ``linspace(1, 0, steps + 1)``;
- CFG as in BAGEL's ``_forward_flow``: a text-free pass and an image-free pass,
  combined serially (text, then image), gated by ``interval[0] < t <= interval[1]``,
  with renorm ``global`` (per image), ``channel`` (per token) or ``text_channel``
  (per token, applied to the text-guided velocity before the image step).

The sampler only needs a ``velocity(x, t, cond) -> v`` callable, so the teacher with
CFG and the distilled few-step students (CFG embedded: the scales in force go to the model
through ``cond.with_scales``, one pass per step) share it; :func:`cfg_velocity` is also the
target of CFG distillation, with per-sample scales.
Wrap the callable in :class:`NFECounter` to count the forward passes actually run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

SHIFT = 3.0
RENORM_EPS = 1e-8

Velocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


# ---------------------------------------------------------------- schedule and training targets

def shift_t(t: torch.Tensor | float, shift: float = SHIFT) -> torch.Tensor | float:
    """BAGEL's timestep shift ``s * t / (1 + (s - 1) * t)``; ``shift > 1`` spends more time near noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_train_t(n: int, shift: float = SHIFT, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal training timesteps, shifted: ``shift_t(sigmoid(N(0, 1)))``, shape ``(n,)``."""
    return shift_t(torch.sigmoid(torch.randn(n, generator=generator)), shift)


def per_sample_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per sample ``(B,)`` shaped to broadcast against ``like`` ``(B, ...)``."""
    return t.to(like).reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) * x0 + t * noise`` with one ``t`` per sample."""
    tb = per_sample_view(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``noise - x0``."""
    return noise - x0


def timesteps(num_steps: int, shift: float = SHIFT) -> list[float]:
    """The ``num_steps + 1`` shifted times from 1 (noise) to 0 (data) that Euler visits."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return [float(v) for v in shift_t(base, shift)]


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor,
               t_next: float | torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE from ``t`` down to ``t_next``: ``x - v * (t - t_next)``."""
    dt = t - t_next
    if torch.is_tensor(dt):
        dt = per_sample_view(dt, x)
    return x - v * dt


# ---------------------------------------------------------------- classifier-free guidance

RenormType = Literal["global", "channel", "text_channel"]


@dataclass(frozen=True)
class CFG:
    """BAGEL's guidance settings. A scale of 1 (or less) switches that pass off."""

    text_scale: float = 1.0
    image_scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    renorm_type: RenormType = "global"
    renorm_min: float = 0.0

    def scales_at(self, t: float) -> tuple[float, float]:
        """(text, image) scales at time ``t``: both 1 outside ``interval[0] < t <= interval[1]``."""
        lo, hi = self.interval
        return (self.text_scale, self.image_scale) if lo < t <= hi else (1.0, 1.0)


NO_CFG = CFG()
# BAGEL's GenEval script (eval/gen/gen_images_mp.py): text scale 4, interval [0, 1], global renorm.
T2I_CFG = CFG(text_scale=4.0, image_scale=1.0, interval=(0.0, 1.0), renorm_type="global", renorm_min=0.0)
# BAGEL's GEdit script (eval/gen/gedit/gen_images_gedit.py): 4 / 1.5, interval [0.4, 1], text_channel.
EDIT_CFG = CFG(text_scale=4.0, image_scale=1.5, interval=(0.4, 1.0), renorm_type="text_channel", renorm_min=0.0)


def token_norm(v: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """L2 norm of each token, broadcast back to ``v``'s shape.

    A token is the last dimension of a ``(B, N, D)`` sequence, or a ``patch x patch`` block
    of every channel of a ``(B, C, H, W)`` map (BAGEL's tokens are 2x2 latent patches).
    """
    if v.dim() == 4:
        sq = v.pow(2).sum(1, keepdim=True)
        if patch > 1:
            sq = F.avg_pool2d(sq, patch) * (patch * patch)
            sq = sq.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        return sq.sqrt()
    return v.norm(dim=-1, keepdim=True)


def image_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over everything but the batch dimension (BAGEL's ``global``, per image)."""
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def _renorm(v_ref: torch.Tensor, v_new: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
            renorm_min: float) -> torch.Tensor:
    scale = (norm(v_ref) / (norm(v_new) + RENORM_EPS)).clamp(min=renorm_min, max=1.0)
    return v_new * scale


Scale = float | torch.Tensor  # one scale for the batch, or one per sample ``(B,)``


def _active(scale: Scale) -> bool:
    return bool((torch.as_tensor(scale) > 1.0).any())


def _per_sample(scale: Scale, like: torch.Tensor) -> Scale:
    """A tensor of per-sample scales, clamped at 1 (a sample at 1 is unguided), shaped to broadcast."""
    if not torch.is_tensor(scale):
        return scale
    return per_sample_view(scale.clamp(min=1.0), like)


def combine_cfg(v: torch.Tensor, v_no_text: torch.Tensor | None, v_no_image: torch.Tensor | None,
                text_scale: Scale, image_scale: Scale, renorm_type: RenormType = "global",
                renorm_min: float = 0.0, token_patch: int = 1) -> torch.Tensor:
    """BAGEL's serial text-then-image guidance with renorm.

    ``v_txt = v_no_text + s_txt * (v - v_no_text)`` (``text_channel``: rescaled per token by
    ``clamp(|v| / |v_txt|, renorm_min, 1)``), then ``v_out = v_no_image + s_img * (v_txt - v_no_image)``
    (``global``/``channel``: rescaled by ``clamp(|v| / |v_out|, renorm_min, 1)`` per image/token).
    A scale of 1 or less skips its term (and its pass); with both off ``v`` is returned as is.
    Scales may be per-sample tensors ``(B,)`` (CFG distillation's targets); a sample whose
    scale is 1 then gets exactly the unguided velocity, since both formulas reduce to ``v``.
    """
    use_text, use_image = _active(text_scale), _active(image_scale)
    if not (use_text or use_image):
        return v
    tok = lambda u: token_norm(u, token_patch)  # noqa: E731
    v_txt = v
    if use_text:
        v_txt = v_no_text + _per_sample(text_scale, v) * (v - v_no_text)
        if renorm_type == "text_channel":
            v_txt = _renorm(v, v_txt, tok, renorm_min)
    v_out = v_no_image + _per_sample(image_scale, v) * (v_txt - v_no_image) if use_image else v_txt
    if renorm_type == "global":
        v_out = _renorm(v, v_out, image_norm, renorm_min)
    elif renorm_type == "channel":
        v_out = _renorm(v, v_out, tok, renorm_min)
    return v_out


def gate_scales(cfg: "CFG", t: torch.Tensor, text_scale: torch.Tensor, image_scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample scales in force at per-sample times ``t``: 1 outside ``cfg.interval``."""
    lo, hi = cfg.interval
    inside = (t > lo) & (t <= hi)
    one = torch.ones_like(text_scale)
    return torch.where(inside, text_scale, one), torch.where(inside, image_scale, one)


def cfg_velocity(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, conds: "Conditions",
                 text_scale: Scale, image_scale: Scale, cfg: "CFG", token_patch: int = 1) -> torch.Tensor:
    """The guided velocity of BAGEL's CFG at ``(x, t)``: the conditional pass, a text-free pass when
    a text scale is above 1 and an image-free pass when an image scale is above 1, combined by
    :func:`combine_cfg` with ``cfg``'s renorm. The scales are those in force (already gated)."""
    v = velocity(x, t, conds.full)
    v_nt = velocity(x, t, _need(conds.no_text, "no_text")) if _active(text_scale) else None
    v_ni = velocity(x, t, _need(conds.no_image, "no_image")) if _active(image_scale) else None
    return combine_cfg(v, v_nt, v_ni, text_scale, image_scale, cfg.renorm_type, cfg.renorm_min, token_patch)


# ---------------------------------------------------------------- sampler and NFE counting

@dataclass
class Conditions:
    """The conditioning of each CFG pass: ``full``, and the text-free / image-free variants."""

    full: Any
    no_text: Any = None
    no_image: Any = None


class NFECounter:
    """Wraps a velocity callable and counts the forward passes it really runs.

    ``passes`` is the number of batched calls: each call evaluates the model once for every
    image in its batch, so it is the NFE per image. ``evaluations`` sums the batch sizes.
    ``seconds`` is the wall time spent inside the passes (on CPU a pass has returned its result
    when the call returns), so a sampling call's time splits into its passes and the rest.
    """

    def __init__(self, velocity: Velocity):
        self.velocity = velocity
        self.passes = 0
        self.evaluations = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        self.passes += 1
        self.evaluations += int(x.shape[0])
        t0 = time.perf_counter()
        v = self.velocity(x, t, cond)
        self.seconds += time.perf_counter() - t0
        return v

    @property
    def nfe(self) -> int:
        return self.passes

    def reset(self) -> None:
        self.passes = self.evaluations = 0
        self.seconds = 0.0


def sample(velocity: Velocity, noise: torch.Tensor, cond: Conditions | Any, num_steps: int = 50,
           shift: float = SHIFT, cfg: CFG = NO_CFG, token_patch: int = 1, embedded: bool = False) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` (t = 1) to data (t = 0) with Euler steps.

    Per step, BAGEL's CFG (:func:`cfg_velocity`): the conditional pass, plus a text-free pass
    when the text scale in force is above 1 and an image-free pass when the image scale in
    force is above 1. With ``embedded`` (a CFG-distilled student) the scales in force are given
    to the model instead, through ``cond.with_scales``, and every step is one pass. A plain
    ``cond`` (not :class:`Conditions`) means no guidance.
    """
    conds = cond if isinstance(cond, Conditions) else Conditions(cond)
    ts = timesteps(num_steps, shift)
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        s_txt, s_img = cfg.scales_at(t)
        if embedded:
            v = velocity(x, tt, conds.full.with_scales(s_txt, s_img))
        else:
            v = cfg_velocity(velocity, x, tt, conds, s_txt, s_img, cfg, token_patch)
        x = euler_step(x, v, t, t_next)
    return x


def _need(cond: Any, name: str) -> Any:
    if cond is None:
        raise ValueError(f"this CFG setting needs the {name} condition, which was not given")
    return cond
