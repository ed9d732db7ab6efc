"""The 6-NFE path on tiny tensors and a tiny teacher: each loss against a direct transcription of its
formula, the zero-initialised scale embeddings, DMDO's interpolation identities, DMD's gradient
direction, TSCD's segments, and each stage training, exporting and sampling with 1 pass per step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components import base, cfg_distill, checkpoints, dmdo, sampling, tscd
from components.distill import copy_generator
from components.inference import Teacher
from components.models.discriminator import MultiHeadDiscriminator, default_blocks
from components.models.generator import GenCondition, Generator, GeneratorConfig
from components.training import LocalReporter, StageContext, run_training
from tests.components.test_base import TINY, tiny_world

SMOKE = dict(steps=3, batch_size=4, checkpoint_every=3, log_every=1, warmup=1)


def tiny_gen(seed: int = 0, **kw) -> Generator:
    torch.manual_seed(seed)
    g = Generator(GeneratorConfig(vocab_size=20, in_channels=2, sample_size=8, patch_size=2, width=32, depth=3,
                                  heads=2, text_layers=1, max_text_len=6, **kw))
    for m in g.modules():  # the output projections start at zero: give the model a non-trivial output
        if isinstance(m, torch.nn.Linear) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight, std=0.05)
    return g.eval()


def cond(n: int, edit: bool = False) -> GenCondition:
    text = torch.randint(1, 20, (n, 6))
    src = torch.randn(n, 2, 8, 8) if edit else None
    return GenCondition(text, src, pad_id=0)


# ---------------------------------------------------------------- CFG distillation

def test_zero_initialised_scale_embeddings_leave_the_output_unchanged():
    teacher = tiny_gen()
    student = copy_generator(teacher, trainable=True)
    assert {"text_scale", "image_scale"} <= set(student.extra_embed)
    x, t, c = torch.randn(3, 2, 8, 8), torch.rand(3), cond(3, edit=True)
    with torch.no_grad():
        ref = teacher(x, t, c)
        for s_txt, s_img in ((1.0, 1.0), (4.0, 1.5), (torch.tensor([1.0, 3.0, 5.0]), torch.tensor([1.0, 2.0, 2.5]))):
            assert torch.equal(student(x, t, c.with_scales(s_txt, s_img)), ref)
    # after a training step the scales do change the output: the embeddings are live
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    student(x, t, c.with_scales(4.0, 1.5)).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(student(x, t, c.with_scales(4.0, 1.5)), student(x, t, c.with_scales(1.0, 1.0)))


def test_cfg_target_is_bagels_combination_with_per_sample_gated_scales():
    gen = tiny_gen(1)
    n = 4
    x, c = torch.randn(n, 2, 8, 8), cond(n, edit=True)
    t = torch.tensor([0.9, 0.5, 0.3, 0.2])  # the last two lie outside editing's interval (0.4, 1]
    s_txt, s_img = torch.tensor([4.0, 2.0, 5.0, 3.0]), torch.tensor([1.5, 2.5, 2.0, 1.2])
    with torch.no_grad():
        got = cfg_distill.teacher_target(gen, x, t, c, True, s_txt, s_img, bf16=False, token_patch=1)
        v, v_nt, v_ni = gen(x, t, c), gen(x, t, c.without_text()), gen(x, t, c.without_image())
    for i in range(n):  # a direct transcription, one sample at a time
        if t[i] <= 0.4:
            assert torch.allclose(got[i], v[i], atol=1e-6)
            continue
        vt = v_nt[i] + s_txt[i] * (v[i] - v_nt[i])
        tok = lambda u: u.pow(2).sum(0, keepdim=True).sqrt()  # noqa: E731  (per-token norm over channels)
        vt = vt * (tok(v[i]) / (tok(vt) + 1e-8)).clamp(0.0, 1.0)
        want = v_ni[i] + s_img[i] * (vt - v_ni[i])
        assert torch.allclose(got[i], want, atol=1e-5)
    # T2I: text guidance only, global renorm per image
    c2 = cond(n)
    with torch.no_grad():
        got = cfg_distill.teacher_target(gen, x, t, c2, False, s_txt, torch.ones(n), bf16=False, token_patch=1)
        v, v_nt = gen(x, t, c2), gen(x, t, c2.without_text())
    for i in range(n):
        vt = v_nt[i] + s_txt[i] * (v[i] - v_nt[i])
        want = vt * (v[i].norm() / (vt.norm() + 1e-8)).clamp(0.0, 1.0)
        assert torch.allclose(got[i], want, atol=1e-5)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(cfg_distill.cfg_distill_loss(a, b), ((a - b) ** 2).mean())


# ---------------------------------------------------------------- TSCD

def test_tscd_segments():
    n = torch.arange(1, 7)
    assert tscd.segment_start(n, 6, 3).tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    g = torch.Generator().manual_seed(0)
    u_n, u_prev, u_end = tscd.sample_points(4096, 48, 3, g)
    u_b = tscd.segment_start((u_n * 48).round().long(), 48, 3)
    assert torch.allclose(u_n - u_prev, torch.full_like(u_n, 1 / 48))
    assert bool(((u_b <= u_end) & (u_end <= u_prev)).all())
    assert bool((u_b < u_n).all()) and bool((u_n <= u_b + 1 / 3 + 1e-12).all())  # u_n lies in (u_b, u_b + 1/k]
    # the 6-NFE sampler takes two steps per segment: its times contain the boundaries
    times = sampling.timesteps(6)
    assert [times[i] for i in (0, 2, 4, 6)] == pytest.approx([float(sampling.shift_t(torch.tensor(u, dtype=torch.float64)))
                                                              for u in (1.0, 2 / 3, 1 / 3, 0.0)])
    with pytest.raises(ValueError, match="multiple of segments"):
        tscd.Params(grid_steps=50)


def test_tscd_losses_against_their_formulas():
    d_real, d_fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.3, 1.0])
    want_d = np.mean([max(0, 1 - r) for r in d_real.tolist()]) + np.mean([max(0, 1 + f) for f in d_fake.tolist()])
    assert tscd.hinge_d_loss(d_real, d_fake).item() == pytest.approx(want_d)
    assert tscd.hinge_g_loss(d_fake).item() == pytest.approx(-d_fake.mean().item())
    pred, target = torch.randn(3, 2), torch.randn(3, 2)
    assert tscd.generator_loss(d_fake, pred, target, "adversarial", 1.0, 0.5).item() == pytest.approx(
        -0.5 * d_fake.mean().item())
    assert tscd.generator_loss(d_fake, pred, target, "hybrid", 2.0, 0.5).item() == pytest.approx(
        2.0 * ((pred - target) ** 2).mean().item() - 0.5 * d_fake.mean().item(), rel=1e-6)
    x, v = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    t, s = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.5])
    assert torch.allclose(tscd.psi(x, v, t, s), x - v * (t - s).view(2, 1, 1, 1))


def test_multi_head_discriminator_reads_intermediate_blocks():
    assert default_blocks(6) == [1, 3, 5] and default_blocks(2) == [0, 1]
    d = MultiHeadDiscriminator(copy_generator(tiny_gen(), trainable=True))
    x, t, c = torch.randn(3, 2, 8, 8), torch.rand(3), cond(3)
    out = d(x, t, c.with_scales(4.0, 1.0))
    assert out.shape == (3,)
    out.sum().backward()
    assert d.backbone.blocks[0].qkv.weight.grad is not None  # the backbone is trainable
    with pytest.raises(ValueError, match="outside"):
        MultiHeadDiscriminator(tiny_gen(), blocks=[7])


# ---------------------------------------------------------------- DMDO

def test_dmdo_interpolation_identities():
    x0, x_T = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    t = torch.tensor([0.0, 0.37, 1.0])
    x_t = dmdo.endpoint_interpolate(x0, x_T, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], x_T[2])
    assert torch.allclose(x_t[1], 0.63 * x0[1] + 0.37 * x_T[1])
    # the fake model's target x_T - x0 is the velocity of that line: it points x_t back to x0
    assert torch.allclose(dmdo.x0_from_velocity(x_t, x_T - x0, t), x0, atol=1e-6)
    v = torch.randn_like(x0)
    assert torch.allclose(dmdo.fake_loss(v, x0, x_T), ((v - (x_T - x0)) ** 2).mean())


def test_dmd_gradient_and_loss_against_their_formulas():
    x0_hat, real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    grad = dmdo.dmd_gradient(x0_hat, real, fake)
    for i in range(2):
        w = (x0_hat[i] - real[i]).abs().mean()
        assert torch.allclose(grad[i], (fake[i] - real[i]) / w)
    x = x0_hat.clone().requires_grad_(True)
    dmdo.dmd_loss(x, grad).backward()
    assert torch.allclose(x.grad, grad / grad.numel(), atol=1e-7)  # d/dx of 0.5 * mean((x - sg(x - g))^2)


def test_a_step_along_dmds_gradient_reduces_the_fake_real_discrepancy():
    """Real data sits at mu_r, the generator's at mu_g (a learnable offset). Point-mass velocity models:
    for a point mass at m, x_t = (1 - t) m + t x_T and v = (x_t - m) / t. The fake model tracks the
    generator; one SGD step on the DMD loss must move the generator toward the real data."""
    torch.manual_seed(0)
    mu_r = torch.full((1, 2, 4, 4), 1.0)
    theta = torch.nn.Parameter(torch.full((1, 2, 4, 4), -1.0))
    opt = torch.optim.SGD([theta], lr=20.0)

    def point_mass_velocity(m):
        return lambda x_t, t: (x_t - m) / sampling.per_sample_view(t, x_t)

    def discrepancy(x0_hat, x_T, t2):
        x_t = dmdo.endpoint_interpolate(x0_hat.detach(), x_T, t2)
        real = dmdo.x0_from_velocity(x_t, point_mass_velocity(mu_r)(x_t, t2), t2)
        fake = dmdo.x0_from_velocity(x_t, point_mass_velocity(theta.detach())(x_t, t2), t2)
        return real, fake

    x_T = torch.randn(8, 2, 4, 4)
    t2 = torch.rand(8) * 0.9 + 0.05
    x0_hat = theta.expand(8, -1, -1, -1)
    real, fake = discrepancy(x0_hat, x_T, t2)
    before = (fake - real).abs().mean().item()
    loss = dmdo.dmd_loss(x0_hat, dmdo.dmd_gradient(x0_hat.detach(), real, fake))
    opt.zero_grad()
    loss.backward()
    opt.step()
    real, fake = discrepancy(theta.expand(8, -1, -1, -1), x_T, t2)
    after = (fake - real).abs().mean().item()
    assert after < before


# ---------------------------------------------------------------- the stages on a tiny teacher

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def teacher_dir(world, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("base")
    state = run_training(base, StageContext(params=base.Params(**TINY), data_dir=world, parent_dir=None),
                         LocalReporter(root / "r"))
    exp = base.export(state)
    checkpoints.save_checkpoint(root / "ckpt", exp.tensors, exp.config, {"stage": "base"})
    return root / "ckpt"


def _train(module, world: Path, parent: Path, out: Path, extra=None, **kw) -> Path:
    params = module.Params(**{**SMOKE, **kw})
    ctx = StageContext(params=params, data_dir=world, parent_dir=parent, extra=extra or {})
    state = run_training(module, ctx, LocalReporter(out / "r"))
    exp = module.export(state)
    metrics = module.evaluate(state)
    checkpoints.save_checkpoint(out / "ckpt", exp.tensors, exp.config, {"metrics": metrics}, exp.samples)
    return out / "ckpt"


def test_the_three_stages_chain_and_sample_with_one_pass_per_step(world, teacher_dir, tmp_path):
    cfg_dir = _train(cfg_distill, world, teacher_dir, tmp_path / "cfg", sample_steps=4)
    cfg_model = Teacher.load(cfg_dir)
    assert cfg_model.embedded_cfg and cfg_model.default_steps == 4
    tscd_dir = _train(tscd, world, cfg_dir, tmp_path / "tscd", sample_steps=3, grid_steps=6)
    dmdo_dir = _train(dmdo, world, tscd_dir, tmp_path / "dmdo", extra={"teacher": cfg_dir}, sample_steps=3,
                      fake_updates=2)
    six = Teacher.load(dmdo_dir)
    assert six.embedded_cfg and six.default_steps == 3
    assert checkpoints.read_json(dmdo_dir / "manifest.json")["metrics"] == {"nfe_t2i": 3.0, "nfe_edit": 3.0}
    for name in ("t2i", "edit"):
        assert (dmdo_dir / "samples" / f"{name}.png").exists()
    img = six.generate(["a photo of a red circle"] * 2, seed=1)
    assert img.shape == (2, 64, 64, 3) and six.last_nfe == 3
    src = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    six.edit(src, ["make the circle blue"], seed=1, num_steps=6)
    assert six.last_nfe == 6  # one pass per step, editing CFG included
    # the teacher keeps BAGEL's CFG passes: 2 per T2I step
    teacher = Teacher.load(teacher_dir)
    teacher.generate(["a photo of a red circle"], num_steps=3)
    assert not teacher.embedded_cfg and teacher.last_nfe == 6
    with pytest.raises(ValueError, match="CFG-distilled"):
        tscd.setup(StageContext(params=tscd.Params(**SMOKE, grid_steps=6, sample_steps=3), data_dir=world,
                                parent_dir=teacher_dir))


def test_the_student_starts_as_the_teacher(world, teacher_dir, tmp_path):
    """At step 0 the CFG-distilled student's unguided pass equals the teacher's conditional pass."""
    state = cfg_distill.setup(StageContext(params=cfg_distill.Params(**SMOKE), data_dir=world,
                                           parent_dir=teacher_dir))
    teacher, student = state.extra["teacher"], state.modules["student"]
    x, t = torch.randn(2, *state.data.t2i.shape[1:]), torch.tensor([0.7, 0.2])
    c = GenCondition(state.data.t2i_text[:2], pad_id=state.data.pad_id)
    with torch.no_grad():
        assert torch.equal(student(x, t, c.with_scales(4.0, 1.0)), teacher(x, t, c))
    metrics = cfg_distill.train_step(state, 0)
    assert metrics["cfg_loss"] > 0 and np.isfinite(metrics["grad_norm"])  # guided targets differ from it
