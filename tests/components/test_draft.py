"""The draft stage on a tiny world and a tiny base teacher: the intermediate layer at
initialisation, KV-cached drafting equals a full forward, training lowers the loss, resume gives
the same weights, export/load, evaluate (lossless on held-out prompts), the ablation switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from components import base, checkpoints, draft, speculative
from components.base_data import load_world
from components.inference import InputError, Teacher
from components.models.draft import Draft, DraftConfig, target_states
from components.training import LocalReporter, StageContext, run_training
from tests.components.test_base import TINY, tiny_world

SMALL = dict(steps=8, batch_size=4, checkpoint_every=4, log_every=1, warmup=1, lr=3e-3, max_new_tokens=12,
             eval_prompts=6, regen_batch=16)


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("draft")
    world = tiny_world(root / "world", n=24)
    st = run_training(base, StageContext(base.Params(**{**TINY, "steps": 40, "und_layers": 4}), world, None),
                      LocalReporter(root / "base"))
    exp = base.export(st)
    checkpoints.save_checkpoint(root / "ckpt", exp.tensors, exp.config, {"stage": "base"})
    return world, root / "ckpt"


def _ctx(dirs, **kw) -> StageContext:
    world, ckpt = dirs
    return StageContext(params=draft.Params(**{**SMALL, **kw}), data_dir=world, parent_dir=ckpt)


def _states(target, n: int = 2):
    images = torch.rand(n, 3, 64, 64) * 2 - 1
    ids = torch.randint(3, target.cfg.vocab_size, (n, 7))
    with torch.no_grad():
        embeds = target._embed(images, ids)
        out = target.lm(inputs_embeds=embeds, output_hidden_states=True)
    return target_states(out), embeds


def test_params_variants_and_parent_are_required(setup_dirs):
    assert draft.Params().variant == "ours" and draft.Params().ce_lambda() == 0.1
    assert draft.Params(variant="no_ce").ce_lambda() == 0.0 and draft.Params(variant="eagle3").ce_lambda() == 0.0
    with pytest.raises(ValueError):
        draft.Params(variant="bogus")
    with pytest.raises(ValueError, match="base checkpoint"):
        draft.setup(StageContext(draft.Params(**SMALL), setup_dirs[0], None))


def test_at_initialisation_fc1_reads_eagle3_three_level_features(setup_dirs):
    target = Teacher.load(setup_dirs[1]).understanding
    states, embeds = _states(target)
    lo, mid, hi = DraftConfig.for_target(target).levels
    eagle3 = torch.cat([states[:, :, lo], states[:, :, mid], states[:, :, hi]], dim=-1)
    ours = Draft.from_target(target, draft.Params().draft_config(target))
    fc = Draft.from_target(target, draft.Params(variant="eagle3").draft_config(target))
    with torch.no_grad():
        assert torch.equal(ours.fusion_input(states), eagle3)       # CA output projection at zero: skip only
        assert torch.equal(fc.fusion_input(states), eagle3)         # vanilla EAGLE-3's fc input
        f_in = ours.fuse(states, torch.arange(states.shape[1]))
        assert torch.count_nonzero(f_in) == 0                       # fc1 at zero, Dec the identity
        assert torch.count_nonzero(ours.fc2(torch.cat([f_in, embeds], -1))) == 0  # fc2 at zero
    # the draft layers start as the target's last two, head and norm are the target's (frozen)
    for mine, theirs in zip(ours.layers, target.lm.model.layers[-2:]):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    assert torch.equal(ours.lm_head.weight, target.lm.lm_head.weight) and not ours.lm_head.weight.requires_grad
    # without zero-init the fc1 input is no longer the three levels
    nz = Draft.from_target(target, draft.Params(variant="no_zero_init").draft_config(target))
    with torch.no_grad():
        assert not torch.equal(nz.fusion_input(states), eagle3)


def test_cached_drafting_equals_a_full_forward(setup_dirs):
    target = Teacher.load(setup_dirs[1]).understanding
    states, embeds = _states(target, 1)
    d = Draft.from_target(target, draft.Params(variant="no_zero_init").draft_config(target)).eval()
    t = states.shape[1]
    pos = torch.arange(t)
    with torch.no_grad():
        full = d.step(d.fuse(states, pos), embeds, pos, None)
        dec, cache = DynamicCache(), DynamicCache()
        parts = []
        for a, b in ((0, t - 5), (t - 5, t - 1), (t - 1, t)):
            feat = d.fuse(states[:, a:b], pos[a:b], dec)
            parts.append(d.step(feat, embeds[:, a:b], pos[a:b], cache))
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)


def test_ttt_mask_is_causal_then_diagonal():
    m = draft.ttt_allowed(3, 2)
    assert m.shape == (3, 9)
    assert m[:, :3].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert torch.equal(m[:, 3:6], torch.eye(3, dtype=torch.bool)) and torch.equal(m[:, 6:], torch.eye(3, dtype=torch.bool))


def test_loss_reads_as_kl_plus_lambda_ce():
    lt, ld = torch.randn(5, 7), torch.randn(5, 7)
    pt = lt.softmax(-1)
    kl = (pt * (pt.log() - ld.log_softmax(-1))).sum(-1)
    ce = -ld.log_softmax(-1)[torch.arange(5), lt.argmax(-1)]
    assert torch.allclose(draft.draft_loss(ld, lt, 0.1), kl + 0.1 * ce, atol=1e-6)
    assert torch.allclose(draft.draft_loss(lt, lt, 0.0), torch.zeros(5), atol=1e-6)


def test_trains_lowers_the_loss_resumes_exports_and_is_lossless(setup_dirs, tmp_path):
    torch.set_num_threads(1)
    full = run_training(draft, _ctx(setup_dirs, steps=30, checkpoint_every=10), LocalReporter(tmp_path / "a"))
    losses = [h["loss"] for h in full.extra["history"]]
    assert all(l == l for l in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses

    # the training answers are the target's own greedy answers
    target = full.extra["target"]
    q, a = full.data["seqs"][0]
    img = full.data["images"][:1].float() / 127.5 - 1.0
    assert target.generate(img, [q], SMALL["max_new_tokens"])[0] + [target.cfg.eos_id] == a

    # resume: interrupted at step 4, continued to 8, equals 8 uninterrupted steps
    ref = run_training(draft, _ctx(setup_dirs), LocalReporter(tmp_path / "b"))
    rep = LocalReporter(tmp_path / "c")
    run_training(draft, _ctx(setup_dirs, steps=4), rep)
    resumed = run_training(draft, _ctx(setup_dirs), rep)
    assert resumed.extra["resumed_from"] == 4
    for (k, x), y in zip(ref.modules["draft"].state_dict().items(), resumed.modules["draft"].state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k

    # export -> safetensors + JSON -> the same draft
    exp = draft.export(full)
    md5 = checkpoints.save_checkpoint(tmp_path / "ckpt", exp.tensors, exp.config, {"stage": "draft"})
    loaded = draft.load_draft(tmp_path / "ckpt", target, md5)
    assert all(torch.equal(a, b) for a, b in zip(full.modules["draft"].state_dict().values(),
                                                 loaded.state_dict().values()))
    other = Teacher.load(setup_dirs[1]).understanding
    other.cfg = other.cfg.model_copy(update={"layers": 99})
    with pytest.raises(InputError, match="another target"):
        draft.load_draft(tmp_path / "ckpt", other)

    # the Teacher-level speculative answer (what `hyperbagel ask --speculative` prints)
    teacher = full.extra["teacher"]
    u8 = full.data["images"][:1].permute(0, 2, 3, 1).numpy()
    answer, stats = speculative.ask(teacher, loaded, u8, "what colour is the shape?", 12, compare=True)
    assert isinstance(answer, str)
    assert stats["identical"] == 1.0 and {"tokens_per_s", "tokens_per_s_target"} <= set(stats)
    tree_answer, tree_stats = speculative.ask(teacher, loaded, u8, "what colour is the shape?", 12, compare=True,
                                              tree_topk=2, tree_nodes=6)
    assert tree_answer == answer and tree_stats["identical"] == 1.0

    # evaluate: the stage's metrics on held-out prompts
    m = draft.evaluate(full)
    assert m["identical_fraction"] == 1.0 and m["tau"] >= 1.0 and m["speedup"] > 0
    # as many prompts as asked: the world's few held-out rows, topped up with fresh scenes
    assert m["n_prompts"] == SMALL["eval_prompts"] == m["heldout_world"] + m["heldout_fresh"]
    assert m["heldout_fresh"] > 0
    assert m["tokens_per_s_target"] > 0 and "alpha_1" in m
    # ... and per kind: the held-out Q&A and captions partition them
    kinds = [k for k in (draft.KIND_QA, draft.KIND_CAPTION) if f"n_prompts_{k}" in m]
    assert kinds == [draft.KIND_QA, draft.KIND_CAPTION]
    assert sum(m[f"n_prompts_{k}"] for k in kinds) == m["n_prompts"]
    assert not any(k.startswith("tree_") for k in m)
    # ... and with a token tree too, the same prompts decoded a third time
    full.extra["params"] = full.extra["params"].model_copy(update={"tree_topk": 2, "tree_nodes": 6})
    t = draft.evaluate(full)
    assert t["tree_identical_fraction"] == 1.0 and t["tree_tau"] >= 1.0 and t["tree_nodes"] == 6.0
    assert {f"tree_{key}_{k}" for key in ("tau", "speedup") for k in kinds} <= set(t)
    assert t["tau"] == m["tau"] and t["n_prompts"] == m["n_prompts"]

    # lossless on 20+ held-out prompts (a larger held-out split of the same world)
    held = load_world(setup_dirs[0], heldout_fraction=0.9).und_heldout
    assert len(held) >= 20
    prompts = [full.extra["teacher"].prompt_ids(q) for q in held.texts]
    bench = speculative.benchmark(target, loaded, held.images.float() / 127.5 - 1.0, prompts, 12, chain=10)
    assert bench.n_prompts == len(held) and bench.identical_fraction == 1.0


@pytest.mark.parametrize("variant", ["eagle3", "no_zero_init_no_ce"])
def test_ablation_variants_train(setup_dirs, tmp_path, variant):
    st = run_training(draft, _ctx(setup_dirs, steps=2, variant=variant), LocalReporter(tmp_path / variant))
    d = st.modules["draft"]
    assert (d.cfg.fusion, len(d.layers)) == (("fc", 1) if variant == "eagle3" else ("meta", 2))
    assert all(h["loss"] == h["loss"] for h in st.extra["history"])
