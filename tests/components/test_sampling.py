"""Flow-matching conventions, the Euler sampler, BAGEL's CFG and the NFE count."""

from __future__ import annotations

import pytest
import torch

from components import sampling as S


def test_shift_formula():
    assert S.shift_t(0.0) == 0.0
    assert S.shift_t(1.0) == 1.0
    assert S.shift_t(0.5) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(S.shift_t(t, 1.0), t)
    assert torch.allclose(S.shift_t(t, 3.0), 3 * t / (1 + 2 * t))


def test_train_t_is_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    t = S.sample_train_t(20000, generator=g)
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.75, abs=0.02)  # shift of sigmoid(0) = 0.5


def test_interpolation_and_velocity_target():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = S.interpolate(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * eps[1])
    v = S.velocity_target(x0, eps)
    assert torch.allclose(v, eps - x0)
    # x_t - t * v recovers the data: the velocity points from data to noise
    assert torch.allclose(xt - t.view(-1, 1, 1, 1) * v, x0, atol=1e-6)


def test_euler_step_and_schedule():
    x, v = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.allclose(S.euler_step(x, v, 0.8, 0.5), x - 2.0 * 0.3)
    ts = S.timesteps(50)
    assert len(ts) == 51 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[25] == pytest.approx(S.shift_t(0.5))


def test_euler_with_the_exact_velocity_reaches_the_data():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    out = S.sample(lambda x, t, c: eps - x0, eps, None, num_steps=7)
    assert torch.allclose(out, x0, atol=1e-5)


# ---------------------------------------------------------------- BAGEL's CFG, transcribed

def bagel_combine(v_t, cfg_text_v_t, cfg_img_v_t, cfg_text_scale, cfg_img_scale, cfg_renorm_type,
                  cfg_renorm_min):
    """BAGEL ``_forward_flow``'s serial_text_img combination for one image, tokens x channels."""
    if cfg_text_scale > 1.0:
        if cfg_renorm_type == "text_channel":
            v_t_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
            norm_v_t = torch.norm(v_t, dim=-1, keepdim=True)
            norm_v_t_text_ = torch.norm(v_t_text_, dim=-1, keepdim=True)
            scale = (norm_v_t / (norm_v_t_text_ + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)
            v_t_text = v_t_text_ * scale
            if cfg_img_scale > 1.0:
                v_t = cfg_img_v_t + cfg_img_scale * (v_t_text - cfg_img_v_t)
            else:
                v_t = v_t_text
        else:
            v_t_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
            if cfg_img_scale > 1.0:
                v_t_ = cfg_img_v_t + cfg_img_scale * (v_t_text_ - cfg_img_v_t)
            else:
                v_t_ = v_t_text_
            if cfg_renorm_type == "global":
                norm_v_t = torch.norm(v_t)
                norm_v_t_ = torch.norm(v_t_)
            elif cfg_renorm_type == "channel":
                norm_v_t = torch.norm(v_t, dim=-1, keepdim=True)
                norm_v_t_ = torch.norm(v_t_, dim=-1, keepdim=True)
            scale = (norm_v_t / (norm_v_t_ + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)
            v_t = v_t_ * scale
    return v_t


def to_tokens(v, p):
    """(C, H, W) -> (H/p * W/p, C * p * p): BAGEL's patchified latent tokens."""
    c, h, w = v.shape
    return v.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c * p * p)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("scales", [(4.0, 1.0), (4.0, 1.5), (1.0, 1.0), (6.0, 2.0)])
@pytest.mark.parametrize("renorm_min", [0.0, 0.5])
@pytest.mark.parametrize("patch", [1, 2])
def test_cfg_combination_matches_bagel(renorm, scales, renorm_min, patch):
    g = torch.Generator().manual_seed(3)
    v, v_nt, v_ni = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    out = S.combine_cfg(v, v_nt, v_ni, *scales, renorm, renorm_min, token_patch=patch)
    for i in range(3):  # BAGEL renorms one image (a packed sequence of batch 1) at a time
        ref = bagel_combine(to_tokens(v[i], patch), to_tokens(v_nt[i], patch), to_tokens(v_ni[i], patch),
                            *scales, renorm, renorm_min)
        assert torch.allclose(to_tokens(out[i], patch), ref, atol=1e-5)


def test_renorm_never_amplifies():
    g = torch.Generator().manual_seed(4)
    v, v_nt, v_ni = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    out = S.combine_cfg(v, v_nt, v_ni, 4.0, 1.5, "global", 0.0)
    assert torch.all(S.image_norm(out) <= S.image_norm(v) + 1e-5)
    out = S.combine_cfg(v, v_nt, v_ni, 4.0, 1.0, "global", 1.0)  # renorm_min 1 disables renorm
    assert torch.allclose(out, v_nt + 4.0 * (v - v_nt))


def test_cfg_interval_gating():
    assert S.EDIT_CFG.scales_at(1.0) == (4.0, 1.5)
    assert S.EDIT_CFG.scales_at(0.41) == (4.0, 1.5)
    assert S.EDIT_CFG.scales_at(0.4) == (1.0, 1.0)  # lower bound excluded, as in BAGEL
    assert S.T2I_CFG.scales_at(1e-4) == (4.0, 1.0)


# ---------------------------------------------------------------- sampler with CFG and real NFE counts

class Recorder:
    """A fake model: velocity depends on the condition so the combination is observable."""

    def __init__(self):
        self.calls: list[tuple[float, str]] = []

    def __call__(self, x, t, cond):
        self.calls.append((float(t[0]), cond))
        k = {"full": 1.0, "no_text": 0.5, "no_image": 0.25}[cond]
        return k * x + t.view(-1, 1, 1, 1)


def test_nfe_counts_t2i_100_and_edit_132():
    x = torch.randn(4, 2, 4, 4)
    conds = S.Conditions("full", "no_text", "no_image")
    counter = S.NFECounter(Recorder())
    S.sample(counter, x, conds, num_steps=50, cfg=S.T2I_CFG)
    assert counter.nfe == 100 and counter.evaluations == 400
    counter.reset()
    S.sample(counter, x, conds, num_steps=50, cfg=S.EDIT_CFG)
    assert counter.nfe == 132
    inside = [t for t in S.timesteps(50)[:-1] if 0.4 < t <= 1.0]
    assert len(inside) == 41  # 41 * 3 + 9 * 1 = 132
    counter.reset()
    S.sample(counter, x, "full", num_steps=6)  # no guidance: one pass per step
    assert counter.nfe == 6


def test_the_counter_clocks_the_time_spent_inside_the_passes(monkeypatch):
    """``seconds`` adds the clock's advance across each pass and nothing outside them."""
    clock = iter(range(1000))
    monkeypatch.setattr(S.time, "perf_counter", lambda: float(next(clock)) ** 2)  # pass k spans (2k+1)^2 - (2k)^2
    counter = S.NFECounter(Recorder())
    S.sample(counter, torch.randn(1, 2, 4, 4), "full", num_steps=3)
    assert counter.nfe == 3 and counter.seconds == 1 + 5 + 9
    counter.reset()
    assert counter.seconds == 0.0 and counter.nfe == 0


def test_sampler_runs_the_right_passes_and_combination():
    rec = Recorder()
    x = torch.randn(2, 2, 4, 4)
    conds = S.Conditions("full", "no_text", "no_image")
    cfg = S.CFG(text_scale=3.0, image_scale=2.0, interval=(0.4, 1.0), renorm_type="global", renorm_min=1.0)
    out = S.sample(rec, x, conds, num_steps=5, cfg=cfg)
    ref = x.clone()
    ts = S.timesteps(5)
    for t, tn in zip(ts[:-1], ts[1:]):
        tt = torch.full((2,), t)
        v = rec(ref, tt, "full")
        if 0.4 < t <= 1.0:
            v_txt = rec(ref, tt, "no_text") + 3.0 * (v - rec(ref, tt, "no_text"))
            v = rec(ref, tt, "no_image") + 2.0 * (v_txt - rec(ref, tt, "no_image"))
        ref = ref - v * (t - tn)
    assert torch.allclose(out, ref, atol=1e-6)
    assert [c for _, c in rec.calls[:3]] == ["full", "no_text", "no_image"]


def test_missing_condition_is_a_clear_error():
    with pytest.raises(ValueError, match="no_image"):
        S.sample(Recorder(), torch.zeros(1, 1, 2, 2), S.Conditions("full", "no_text"), num_steps=2,
                 cfg=S.EDIT_CFG)
