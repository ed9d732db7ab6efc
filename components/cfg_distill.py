"""The ``cfg_distill`` stage: CFG distillation (Hyper-Bagel §3.2.1), stage 1 of the 6-NFE path.

The student is the teacher's generator plus two timestep-style embeddings, one for the text
CFG scale and one for the image CFG scale (sinusoidal -> MLP, summed into the timestep
embedding where ``t``'s is added; last layer zero-initialised, so at step 0 the student is
the teacher's conditional pass). Per step, for a batch of one task (T2I or editing):

- ``x0`` from the world data, ``eps ~ N(0, I)``, ``t`` logit-normal shifted by ``shift >= 3``,
  ``x_t = (1 - t) x0 + t eps``;
- scales ``s_txt ~ U[1, 5]``, and for edits ``s_img ~ U[1.0, 2.5]`` (else 1), gated by the
  task's BAGEL CFG interval at ``t`` (editing: [0.4, 1]);
- the target is the teacher's CFG-combined velocity exactly as BAGEL combines it (serial
  text-then-image, with the task's renorm: ``global`` for T2I, ``text_channel`` for editing):
  ``v_cfg = CFG(v(x_t, t, c), v(x_t, t, c_no_text), v(x_t, t, c_no_image); s_txt, s_img)``;
- the student runs one pass: ``v_s = v_theta(x_t, t, c, s_txt, s_img)``.

Loss (the paper states none; the natural choice, see reference §1.2)::

    L_cfg = E || v_theta(x_t, t, c, s_txt, s_img) - v_cfg(x_t, t, c; s_txt, s_img) ||^2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components import sampling
from components.distill import (DistillParams, build_state, copy_generator, evaluate_common, export_student, guided,
                                load_model, optimise, raw, task_cfg, velocity_fn, world_batch)
from components.training import Export, StageContext, TrainState, step_generator, warmup_lr


class Params(DistillParams):
    steps: int = Field(400, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(20, ge=1)
    sample_steps: int = Field(50, ge=1, description="the CFG-distilled model keeps 50 steps, 1 pass each")


def cfg_distill_loss(v_student: torch.Tensor, v_cfg: torch.Tensor) -> torch.Tensor:
    """``mean || v_student - v_cfg ||^2`` (the target carries no gradient)."""
    return F.mse_loss(v_student.float(), v_cfg.detach().float())


def setup(ctx: StageContext) -> TrainState:
    p: Params = ctx.params
    base = load_model(ctx.parent_dir, "teacher (base)", p.bf16)
    teacher = copy_generator(base.generator, trainable=False, scale_embeddings=False)
    student = copy_generator(base.generator, trainable=True)
    return build_state(ctx, base, {"student": ctx.wrap_module(student)}, {"student": p.lr}, {"teacher": teacher})


def teacher_target(teacher, x_t: torch.Tensor, t: torch.Tensor, cond, is_edit: bool, s_txt: torch.Tensor,
                   s_img: torch.Tensor, bf16: bool, token_patch: int) -> torch.Tensor:
    """The teacher's CFG-combined velocity with per-sample gated scales (2 passes T2I, 3 editing)."""
    cfg = task_cfg(is_edit)
    g_txt, g_img = sampling.gate_scales(cfg, t, s_txt, s_img)
    conds = sampling.Conditions(cond, cond.without_text(), cond.without_image())
    with torch.no_grad():
        return sampling.cfg_velocity(velocity_fn(teacher, bf16), x_t, t, conds, g_txt, g_img, cfg, token_patch)


def train_step(state: TrainState, step: int) -> dict[str, float]:
    p: Params = state.extra["params"]
    g = step_generator(p.seed, step, state.extra["rank"])
    x0, cond, is_edit, s_txt, s_img = world_batch(state, g)
    noise = torch.randn(x0.shape, generator=g)
    t = sampling.sample_train_t(x0.shape[0], shift=p.shift, generator=g)
    x_t = sampling.interpolate(x0, noise, t)
    teacher = state.extra["teacher"]
    target = teacher_target(teacher, x_t, t, cond, is_edit, s_txt, s_img, p.bf16, teacher.cfg.patch_size)
    model = state.modules["student"]
    v = velocity_fn(model, p.bf16)(x_t, t, guided(cond, is_edit, t, s_txt, s_img))
    loss = cfg_distill_loss(v, target)
    gnorm = optimise(state.optimizers["student"], loss, model.parameters(), p.grad_clip, warmup_lr(p.lr, step, p.warmup))
    return {"cfg_loss": loss.item(), "grad_norm": gnorm, "edit": float(is_edit)}


def export(state: TrainState) -> Export:
    return export_student(state, raw(state.modules["student"]), "cfg_distill")


def evaluate(state: TrainState) -> dict[str, float]:
    return evaluate_common(state)
