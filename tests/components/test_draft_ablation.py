"""The draft's held-out prompts (the world's held-out rows topped up with fresh scenes, never a
training image) and the Table 1 ablation runner on a tiny teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components import draft
from components.base_data import CAPTION_PROMPT, load_world
from components.draft_ablation import VARIANTS, run_ablation
from components.world.datasets import WorldDataParams, build_world_data
from components.world.heldout import CAPTION_EVERY, fresh_prompts, image_key
from components.world.understanding import caption
from tests.components.test_draft import SMALL, setup_dirs  # noqa: F401  (the tiny base + world fixture)


def _keys(rows) -> set[str]:
    if rows is None:
        return set()
    out = {image_key(x) for x in rows.images.permute(0, 2, 3, 1).numpy()}
    if rows.targets is not None:
        out |= {image_key(x) for x in rows.targets.permute(0, 2, 3, 1).numpy()}
    return out


def test_fresh_prompts_are_deterministic_prefixes_of_qa_and_captions():
    a, b = fresh_prompts(30, seed=3), fresh_prompts(12, seed=3)
    assert all(np.array_equal(x.image, y.image) and x.question == y.question for x, y in zip(a, b))
    assert [p.kind == "caption" for p in a] == [i % CAPTION_EVERY == CAPTION_EVERY - 1 for i in range(30)]
    for p in a:
        assert p.image.shape == (64, 64, 3) and p.image.dtype == np.uint8
        if p.kind == "caption":
            assert p.question is None and p.answer == caption(p.scene)
        else:
            assert p.question.endswith("?") and p.answer
    assert len({image_key(p.image) for p in a}) == 30            # 30 distinct scenes
    other = fresh_prompts(5, seed=4)
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, other))
    # an excluded render is skipped: the list starts at the next scene
    skipped = fresh_prompts(3, seed=3, exclude={image_key(a[0].image)})
    assert not np.array_equal(skipped[0].image, a[0].image)
    with pytest.raises(ValueError, match="refuses"):
        fresh_prompts(2, keep=lambda p: False)


def test_fresh_prompts_never_coincide_with_the_world_datas_images(tmp_path):
    # the world stage's own generator at its default seed (0): fresh scenes are other scenes
    root = tmp_path / "world"
    build_world_data(root, WorldDataParams(n_t2i=60, gedit_scale=0.02, geneval_n=2))
    world = load_world(root)
    n_held = len(world.und_heldout) if world.und_heldout is not None else 0
    rows = draft.heldout_rows(world, n_held + 80, seed=0)
    assert len(rows) == n_held + 80 and len(rows.answers) == len(rows)
    if n_held:  # the world's held-out rows come first, unchanged
        assert torch.equal(rows.images[:n_held], world.und_heldout.images)
        assert rows.texts[:n_held] == world.und_heldout.texts
    fresh = rows.images[n_held:].permute(0, 2, 3, 1).numpy()
    training = set().union(*(_keys(r) for r in (world.t2i, world.edit, world.und_train, world.und_heldout)))
    assert not {image_key(x) for x in fresh} & training
    # no fresh scene is a scene of the Q&A or caption sets either (not only other pixels)
    import json
    scenes = {json.dumps(json.loads(line)["scene"], sort_keys=True)
              for kind in ("qa", "captions") for line in (root / kind / f"{kind}.jsonl").read_text().splitlines()}
    mine = {json.dumps(p.scene.to_json(), sort_keys=True) for p in fresh_prompts(80, seed=0)}
    assert not mine & scenes
    assert CAPTION_PROMPT in rows.texts[n_held:]
    # a smaller request is a prefix (the ablation decodes the first prompts of evaluate's)
    small = draft.heldout_rows(world, n_held + 7, seed=0)
    assert torch.equal(small.images, rows.images[:n_held + 7]) and small.texts == rows.texts[:n_held + 7]


def test_ablation_trains_every_variant_with_one_budget_and_decodes_the_same_prompts(setup_dirs, tmp_path):  # noqa: F811
    torch.set_num_threads(1)
    world, ckpt = setup_dirs
    params = draft.Params(**{**SMALL, "ablation_steps": 2, "ablation_prompts": 3})
    out = run_ablation(params, ckpt, world, tmp_path)
    assert tuple(out) == VARIANTS
    for v, r in out.items():
        assert {"tau", "speedup"} <= set(r), v
        assert r["tau"] >= 1.0 and r["speedup"] > 0
        assert r["identical_fraction"] == 1.0                     # lossless whatever the draft
        assert r["n_prompts"] == 3 and r["steps"] == 2 and r["final_loss"] == r["final_loss"]
    c = {v: r["config"] for v, r in out.items()}
    # Table 1: vanilla EAGLE-3 = FC over 3 levels + 1 fresh layer, KL only
    assert c["eagle3"] == {"fusion": "fc", "draft_layers": 1, "init_from_target": False, "zero_init": False,
                           "ce_weight": 0.0}
    assert c["ours"] == {"fusion": "meta", "draft_layers": 2, "init_from_target": True, "zero_init": True,
                         "ce_weight": 0.1}
    assert c["no_zero_init"] == {**c["ours"], "zero_init": False}
    assert c["no_ce"] == {**c["ours"], "ce_weight": 0.0}
    assert c["no_zero_init_no_ce"] == {**c["ours"], "zero_init": False, "ce_weight": 0.0}
    # each variant trained from its own fresh state (nothing resumed across variants)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(VARIANTS)


def test_heldout_prompts_are_ones_the_teacher_can_read(setup_dirs):  # noqa: F811
    from components.inference import InputError, Teacher

    world_dir, ckpt = setup_dirs
    teacher, world = Teacher.load(ckpt), load_world(world_dir)

    def readable(text: str) -> bool:
        try:
            teacher.prompt_ids(text)
        except InputError:
            return False
        return True

    loose = draft.heldout_rows(world, 60, seed=0)
    assert not all(readable(t) for t in loose.texts)  # the tiny world's vocabulary misses some words
    rows = draft.heldout_rows(world, 60, seed=0, teacher=teacher)
    assert len(rows) == 60 and all(readable(t) for t in rows.texts)


def test_understanding_rows_are_the_worlds_held_out_questions_then_fresh_ones(setup_dirs):  # noqa: F811
    from components.base_eval import understanding_rows
    from components.inference import Teacher

    world_dir, ckpt = setup_dirs
    teacher, world = Teacher.load(ckpt), load_world(world_dir)
    held = world.und_heldout
    held_qa = [i for i, q in enumerate(held.texts) if q != CAPTION_PROMPT] if held is not None else []
    n = len(held_qa) + 25
    rows = understanding_rows(world, n, teacher)
    assert len(rows) == n and len(rows.answers) == n
    assert CAPTION_PROMPT not in rows.texts  # questions only: captions are not exact-answer rows
    assert rows.texts[:len(held_qa)] == [held.texts[i] for i in held_qa]
    assert rows.answers[:len(held_qa)] == [held.answers[i] for i in held_qa]
    fresh = rows.images[len(held_qa):].permute(0, 2, 3, 1).numpy()
    training = set().union(*(_keys(r) for r in (world.t2i, world.edit, world.und_train, world.und_heldout)))
    assert not {image_key(x) for x in fresh} & training
    for q in rows.texts:
        teacher.prompt_ids(q)  # every question is in the teacher's vocabulary (raises InputError otherwise)
    small = understanding_rows(world, n - 10, teacher)
    assert small.texts == rows.texts[:n - 10] and torch.equal(small.images, rows.images[:n - 10])


def test_answer_accuracy_by_kind_splits_the_overall_share_by_question_kind(setup_dirs):  # noqa: F811
    from components.base import _hwc, answer_accuracy, answer_accuracy_by_kind
    from components.base_eval import understanding_rows
    from components.inference import Teacher
    from components.models.tokens import split
    from components.world.understanding import question_kind

    world_dir, ckpt = setup_dirs
    teacher, world = Teacher.load(ckpt).frozen(), load_world(world_dir)
    rows = understanding_rows(world, 40, teacher)
    answers = teacher.ask(_hwc(rows.images), rows.texts)
    right = [split(a) == split(b) for a, b in zip(answers, rows.answers)]
    kinds = [question_kind(q) for q in rows.texts]
    got = answer_accuracy_by_kind(teacher, rows, 40, batch=7)  # batches that do not divide the rows
    assert got["overall"] == pytest.approx(sum(right) / len(right))
    assert got["overall"] == answer_accuracy(teacher, rows, 40)
    assert set(got) == {"overall"} | {k for k in kinds if k is not None}
    for kind in set(kinds) - {None}:
        mine = [r for r, k in zip(right, kinds) if k == kind]
        assert got[kind] == pytest.approx(sum(mine) / len(mine))
    assert answer_accuracy_by_kind(teacher, rows.subset([]), 40) == {"overall": pytest.approx(float("nan"), nan_ok=True)}


class _Workspace:
    """The three things the report section reads from a profile's workspace."""

    def __init__(self, outs: dict, md5: dict, params: dict):
        self.outs, self.md5, self.params = outs, md5, params

    def out_path(self, stage):
        return self.outs[stage]

    def out_md5(self, stage):
        return self.md5[stage]

    def resolved_params(self):
        return self.params


def test_report_section_has_the_issues_keys(setup_dirs, tmp_path, monkeypatch):  # noqa: F811
    import tasks.project
    from components import checkpoints
    from components.training import LocalReporter, StageContext, run_training
    from flows.bench import speculative_section

    torch.set_num_threads(1)
    world, ckpt = setup_dirs
    values = {**SMALL, "steps": 2, "ablation_steps": 1, "ablation_prompts": 2, "eval_prompts": 5, "tree_topk": 2,
              "tree_nodes": 8}
    params = draft.Params(**values)
    state = run_training(draft, StageContext(params, world, ckpt), LocalReporter(tmp_path / "train"))
    out = tmp_path / "draft"
    out.mkdir()
    checkpoints.write_json(out / "manifest.json", {"parent": {"md5": "abc"}, "params": params.model_dump(mode="json"),
                                                   "metrics": draft.evaluate(state)})
    ws = _Workspace({"draft": out, "base": ckpt, "world_data": world}, {"base": "abc"}, {"draft": values})
    monkeypatch.setattr(tasks.project, "workspace", lambda project, profile: ws)
    monkeypatch.setattr(tasks.project, "find_project", lambda: tmp_path)
    rep = speculative_section("smoke")
    assert {"n_prompts", "identical_fraction", "tau", "alpha", "tokens_per_s", "speedup", "ablation"} <= set(rep)
    assert rep["n_prompts"] == 5 and rep["identical_fraction"] == 1.0 and len(rep["alpha"]) == 10
    assert set(rep["tokens_per_s"]) == {"target", "speculative"}
    assert rep["by_kind"] and sum(k["n_prompts"] for k in rep["by_kind"].values()) == 5
    assert all(set(k) == {"n_prompts", "tokens", "tau", "speedup"} for k in rep["by_kind"].values())
    tree = rep["tree"]  # the token tree, decoded in the same evaluation
    assert (tree["topk"], tree["nodes"], tree["depth"], tree["identical_fraction"]) == (2, 8, 10, 1.0)
    assert set(tree["by_kind"]) == set(rep["by_kind"]) and len(tree["alpha"]) == 10
    assert tree["tokens_per_s"]["target"] == rep["tokens_per_s"]["target"]  # one run: the same target timings
    assert tree["speedup"] == pytest.approx(tree["tokens_per_s"]["speculative"] / tree["tokens_per_s"]["target"])
    assert set(rep["ablation"]) == set(VARIANTS)
    assert all(set(v) == {"tau", "speedup"} for v in rep["ablation"].values())
    # a draft out from another base checkpoint, or other parameters, is refused
    ws.md5["base"] = "other"
    with pytest.raises(RuntimeError, match="another base"):
        speculative_section("smoke")
    ws.md5["base"], ws.params = "abc", {"draft": {**values, "chain": 4}}
    with pytest.raises(RuntimeError, match="other `draft` parameters"):
        speculative_section("smoke")
