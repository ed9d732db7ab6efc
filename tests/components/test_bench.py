"""The benchmark report's own machinery: the `speed` section (random weights) and per-section provenance."""

from __future__ import annotations

import json

import pytest
import torch

from components import base
from components.base_eval import untrained_pair
from tests.components.test_draft import setup_dirs  # noqa: F401  (the tiny base + world fixture)


class _Workspace:
    def __init__(self, params: dict):
        self.params = params

    def resolved_params(self):
        return self.params


TINY = {"gen_width": 32, "gen_depth": 2, "gen_heads": 2, "gen_text_layers": 1, "und_hidden": 32, "und_layers": 2,
        "und_heads": 2, "und_kv_heads": 1, "und_intermediate": 64, "ae_channels": [8, 16]}


@pytest.fixture
def tiny_profile(monkeypatch, tmp_path):
    import tasks.project

    ws = _Workspace({"base": dict(TINY), "dmdo": {"sample_steps": 3}, "dmdo_eval": {"batch": 2}})
    monkeypatch.setattr(tasks.project, "workspace", lambda project, profile: ws)
    monkeypatch.setattr(tasks.project, "find_project", lambda: tmp_path)
    return ws


def test_untrained_pair_is_the_trained_architecture_and_its_student():
    p = base.Params(**TINY)
    pair = untrained_pair(p, sample_steps=6, shift=3.0)
    teacher, student = pair["teacher"], pair["student"]
    assert not teacher.embedded_cfg and teacher.default_steps == 50
    assert student.embedded_cfg and student.default_steps == 6
    # the student is the teacher's generator plus the (zero-initialised) scale embeddings
    t_sd, s_sd = teacher.generator.state_dict(), student.generator.state_dict()
    assert set(t_sd) < set(s_sd)
    assert all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    assert student.generator.cfg.width == p.gen_width and student.generator.cfg.depth == p.gen_depth


def test_speed_section_times_teacher_and_student(tiny_profile):
    from flows.bench import speed_section

    torch.set_num_threads(1)
    rep = speed_section("smoke")
    assert rep["nfe"] == {"teacher_t2i": 100.0, "teacher_edit": 132.0, "t2i": 3.0, "edit": 3.0}
    assert set(rep["speedup"]) == {"t2i_b1", "t2i_b2", "edit_b1", "edit_b2"}
    for k, v in rep["speedup"].items():  # the median of the rounds' paired ratios, within their range
        lo, hi = rep["speedup_range"][k]
        assert 0 < lo <= v <= hi
    assert all(not k.endswith("rounds_s") for t in rep["sample_s"].values() for k in t)  # the best times only
    assert rep["conditions"]["weights"] == "random"
    # an imported teacher is not an architecture the section can build
    tiny_profile.params["base"] = {**TINY, "source": "import", "import_path": "x", "import_md5": "0" * 32}
    with pytest.raises(ValueError, match="import"):
        speed_section("smoke")


def test_the_batch1_breakdown_splits_each_call_into_passes_and_the_rest():
    """`distill6`'s `batch1`: per task each model's call, its passes and the rest (NFE as counted), the
    student's per-call parts timed alone, and the speed-ups and budgets derived from them."""
    from components.base_eval import batch1_breakdown, compare_speed

    torch.set_num_threads(1)
    pair = {k: m.frozen() for k, m in untrained_pair(base.Params(**TINY), sample_steps=3, shift=3.0).items()}
    timing = compare_speed(pair, batch=2, repeats=2)
    rep = batch1_breakdown(timing, pair, "teacher", "student", {"t2i": 15.0})
    assert set(rep) == {"t2i", "edit"}
    assert (rep["t2i"]["teacher"]["nfe"], rep["t2i"]["student"]["nfe"]) == (100, 3)
    assert (rep["edit"]["teacher"]["nfe"], rep["edit"]["student"]["nfe"]) == (132, 3)
    assert set(rep["t2i"]["parts_ms"]) == {"text", "decode"} and set(rep["edit"]["parts_ms"]) == {"text", "decode", "source"}
    for task, row in rep.items():
        for name in ("teacher", "student"):
            r = row[name]
            assert 0 < r["passes_ms"] < r["call_ms"] and r["other_ms"] == pytest.approx(r["call_ms"] - r["passes_ms"], abs=2e-3)
        t, s = row["teacher"], row["student"]
        assert row["speedup"] == pytest.approx(t["call_ms"] / s["call_ms"], abs=0.01)
        assert row["passes_only"] == pytest.approx(t["passes_ms"] / s["passes_ms"], abs=0.01)
        floor = sum(row["parts_ms"].values())
        # the report's figures are rounded to 1e-3 ms before this recomputation: bound the error that makes
        den, half = s["passes_ms"] + floor, 5e-4
        ratio = t["call_ms"] / den
        slack = 0.005 + ratio * (half / t["call_ms"] + (len(row["parts_ms"]) + 1) * half / den)
        assert row["ceiling"] == pytest.approx(ratio, abs=slack)
    # the per-call work the student may do beside its passes to reach the bar against the teacher's call
    t, s = rep["t2i"]["teacher"]["call_ms"], rep["t2i"]["student"]["passes_ms"]
    o = rep["t2i"]["other_allowed_ms"]
    assert rep["t2i"]["bar"] == 15.0 and t / (s + o) == pytest.approx(15.0, rel=1e-3)
    assert "bar" not in rep["edit"] and "other_allowed_ms" not in rep["edit"]


def test_speed_comparison_times_only_the_tasks_a_model_can_do(monkeypatch):
    """An instruction the models cannot read (a word outside their vocabulary) leaves the editing
    cells out, for every model, instead of failing the comparison."""
    import components.base_eval as be

    torch.set_num_threads(1)
    pair = untrained_pair(base.Params(**TINY), sample_steps=2, shift=3.0)
    prompt, src, _ = be.speed_inputs()
    monkeypatch.setattr(be, "speed_inputs", lambda: (prompt, src, "make it sparkle"))
    timing = be.compare_speed(pair, batch=2, repeats=1)
    for name in ("teacher", "student"):
        assert set(timing[name]) == {"t2i_b2_s", "t2i_b1_s", "nfe_t2i", "t2i_b2_rounds_s", "t2i_b1_rounds_s",
                                     "t2i_b2_pass_rounds_s", "t2i_b1_pass_rounds_s"}
        assert all(v > 0 for k, v in timing[name].items() if not k.endswith("rounds_s"))
        for cell in ("t2i_b1", "t2i_b2"):  # one round (repeats=1); the best is the round's sample
            assert len(timing[name][f"{cell}_rounds_s"]) == 1
            assert timing[name][f"{cell}_rounds_s"][0] == pytest.approx(timing[name][f"{cell}_s"], abs=1e-6)
    assert timing["teacher"]["nfe_t2i"] == 100.0 and timing["student"]["nfe_t2i"] == 2.0


def test_each_section_records_the_run_that_measured_it(monkeypatch, tmp_path):
    import flows.bench as bench

    monkeypatch.setattr(bench, "SECTIONS", {"one": lambda profile: {"x": 1}, "two": lambda profile: {"y": 2}})
    bench.run_bench("smoke", ["one"], tmp_path)
    first = json.loads((tmp_path / "benchmark.json").read_text())["provenance"]["one"]
    report = bench.run_bench("default", ["two"], tmp_path)
    assert report["provenance"]["one"] == first and first["profile"] == "smoke"
    assert report["provenance"]["two"]["profile"] == "default" and report["profile"] == "default"
    assert {"platform", "cores", "bf16_native"} <= set(report["provenance"]["two"]["machine"])
    md = (tmp_path / "BENCHMARK.md").read_text()
    assert md.count("Measured by `") == 2 and "(smoke profile)" in md and "(default profile)" in md


def test_a_frozen_model_samples_the_same_images_and_cannot_be_saved():
    """``Teacher.frozen`` (the CLI's, the evaluations' and the benchmark's models) samples from the parts
    sampling runs anyway, without re-checking their weights in every call: the same images."""
    import numpy as np

    from components import sampling
    from components.base_eval import speed_inputs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = untrained_pair(base.Params(**TINY), sample_steps=2, shift=3.0)["student"]
    with torch.no_grad():  # away from the zero-initialised output layer, so the generator draws something
        for p in student.generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt, src, instr = speed_inputs()
    frozen = student.frozen()
    assert frozen.sampling_only and not student.sampling_only
    assert frozen.inference_parts() == (frozen.generator, frozen.autoencoder)
    images = {}
    for name, model in (("student", student), ("frozen", frozen)):
        images[name] = (model.generate([prompt, prompt], seed=3), model.edit(src[None], [instr], seed=4),
                        model.generate([prompt], seed=3, num_steps=3, cfg=sampling.CFG(text_scale=2.0)))
    for a, b in zip(images["student"], images["frozen"]):
        assert np.array_equal(a, b)
    assert frozen.last_nfe == student.last_nfe == 3
    assert not np.array_equal(images["frozen"][0][0], frozen.generate([prompt], seed=4)[0])  # it does draw
    with pytest.raises(RuntimeError, match="frozen"):
        frozen.tensors()
    assert set(student.tensors())


def test_a_speedup_is_the_median_of_the_rounds_paired_ratios():
    """A round's teacher and student samples are seconds apart: the speed-up pairs them and takes the
    median, so a slow stretch that fell on one model's best sample does not decide it; without rounds
    it is the ratio of the two times."""
    from components.base_eval import speedup_ranges, speedups

    teacher = {"t2i_b1_s": 0.40, "t2i_b1_rounds_s": [0.40, 0.50, 0.60],
               "edit_b1_s": 0.60}
    student = {"t2i_b1_s": 0.020, "t2i_b1_rounds_s": [0.025, 0.025, 0.020],
               "edit_b1_s": 0.030}
    # paired ratios 16, 20, 30: the median 20; without rounds, the ratio of the times
    assert speedups(teacher, student, 16) == {"t2i_b1": 20.0, "edit_b1": 20.0}
    assert speedup_ranges(teacher, student, 16) == {"t2i_b1": [16.0, 30.0], "edit_b1": [20.0, 20.0]}
    teacher["t2i_b1_rounds_s"] = [0.40, 0.48, 0.60]  # ratios 16, 19.2, 30; the bests' ratio stays 20
    assert speedups(teacher, student, 16)["t2i_b1"] == 19.2


def test_a_stage_record_says_when_its_last_run_resumed_a_saved_run():
    from flows.bench import stage_record

    fresh = {"metrics": {"step": 300.0, "resumed_from": 0.0}, "timing": {"stage_s": 605.8}}
    assert stage_record(fresh) == {"train_steps": 300.0, "stage_s": 605.8}
    resumed = {"metrics": {"step": 300.0, "resumed_from": 300.0}, "timing": {"stage_s": 44.0}}
    assert stage_record(resumed) == {"train_steps": 300.0, "stage_s": 44.0, "resumed_from": 300.0}
    assert stage_record({}) == {"train_steps": None, "stage_s": None}


def test_distill6_records_how_each_evaluation_stage_scored():
    from flows.bench import eval_settings

    params = {"base_eval": {"samples": 1, "gedit_scale": 0.25, "extra_steps": [6]}, "dmdo_eval": {"batch": 16}}
    assert eval_settings(params, "base_eval") == {"samples": 1, "min_task_images": 0, "gedit_scale": 0.25,
                                                  "num_steps": None, "extra_steps": [6]}
    # a stage that sets none of them scored at the evaluation's defaults (GenEval's 4 images, all of GEdit)
    assert eval_settings(params, "dmdo_eval") == {"samples": 4, "min_task_images": 0, "gedit_scale": 1.0,
                                                  "num_steps": None, "extra_steps": []}
    assert eval_settings({}, "tscd_eval")["samples"] == 4


def test_speculative_bound_section_decodes_the_draft_stages_prompts_with_the_oracle(monkeypatch, tmp_path, setup_dirs):
    """The `speculative_bound` section reads the profile's base and world outs, decodes the draft
    stage's held-out prompts with the perfect free draft (every output the target's own) and sets the
    trained draft's figures beside it when the draft out has them."""
    import tasks.project
    from components import draft
    from components.base_data import load_world
    from components.inference import Teacher
    from flows.bench import speculative_bound_section

    torch.set_num_threads(1)
    world, ckpt = setup_dirs
    outs = {"base": ckpt, "world_data": world, "draft": tmp_path / "draft"}
    ws = _Workspace({"draft": {"eval_prompts": 6, "max_new_tokens": 12, "chain": 4}})
    ws.out_path = outs.__getitem__
    monkeypatch.setattr(tasks.project, "workspace", lambda project, profile: ws)
    monkeypatch.setattr(tasks.project, "find_project", lambda: tmp_path)
    rep = speculative_bound_section("smoke")
    assert rep["n_prompts"] == 6 and rep["identical_fraction"] == 1.0 and rep["speedup"] > 0
    teacher = Teacher.load(ckpt)
    images, prompts, kinds = draft.heldout_inputs(load_world(world), teacher, 6, 0)
    assert {k: v["n_prompts"] for k, v in rep["by_kind"].items()} == {k: kinds.count(k) for k in set(kinds)}
    plain = teacher.understanding.float().eval()  # the section's token count is the target's answers'
    assert rep["tokens"] == sum(len(plain.generate(img[None], [p], 12)[0]) for img, p in zip(images, prompts))
    assert rep["conditions"]["chain"] == 4 and "trained_draft" not in rep  # no draft out yet
    (tmp_path / "draft").mkdir()
    (tmp_path / "draft" / "manifest.json").write_text(json.dumps({"metrics": {"tau": 3.5, "speedup": 1.1,
                                                                              "tau_qa": 2.0, "speedup_qa": 0.9}}))
    assert speculative_bound_section("smoke")["trained_draft"] == {"tau": 3.5, "speedup": 1.1,
                                                                   "by_kind": {"qa": {"tau": 2.0, "speedup": 0.9}}}


def test_the_evaluation_seed_moves_the_noise_not_the_benchmark_sets(tmp_path):
    """`seed` is the sampling noise only: another value scores the same GEdit-shapes edits (the edit set
    has its own `gedit_seed`, as the prompt set has `geneval_seed`), and another `gedit_seed` draws others."""
    from components.base_eval import Params, _gedit

    torch.set_num_threads(1)
    teacher = untrained_pair(base.Params(**TINY), sample_steps=2, shift=3.0)["student"].frozen()

    def edits(**kw) -> list[str]:
        out = tmp_path / "_".join(f"{k}{v}" for k, v in kw.items())
        out.mkdir()
        _gedit(teacher, Params(gedit_scale=0.01, batch=8, num_steps=2, **kw), out, lambda msg: None)
        return [",".join(line.split(",")[:4]) for line in (out / "gedit.csv").read_text().splitlines()[1:]]

    ref = edits(seed=0)
    assert ref and edits(seed=3) == ref
    assert edits(seed=0, gedit_seed=1) != ref
    assert Params().gedit_seed == 0 and Params().und_seed == 0  # the default sets are the ones scored so far


def test_geneval_tops_up_the_small_tasks_and_keeps_genevals_own_images(tmp_path, setup_dirs):
    """`min_task_images` adds images to the prompts of the tasks that have too few; the images of
    GenEval's own `samples` rounds are the ones drawn without it (same batches, same seeds)."""
    from components.base_eval import Params, _geneval
    from components.inference import Teacher

    torch.set_num_threads(1)
    teacher = Teacher.load(setup_dirs[1]).frozen()

    def files(**kw) -> dict[str, bytes]:
        out = tmp_path / "_".join(f"{k}{v}" for k, v in kw.items())
        summary, _, unknown = _geneval(teacher, Params(geneval_per_tag=2, samples=1, batch=4, num_steps=2, **kw),
                                       out, lambda msg: None)
        return {str(p.relative_to(out / "geneval")): p.read_bytes()
                for p in sorted((out / "geneval").glob("*/samples/*.png"))}

    plain, topped = files(), files(min_task_images=3)
    rows = [json.loads((tmp_path / "min_task_images3" / "geneval" / f"{i:05d}" / "metadata.jsonl").read_text())
            for i in range(len({k.split("/")[0] for k in topped}))]
    tags = [r["tag"] for r in rows]
    want = {i: max(1, -(-3 // tags.count(tag))) for i, tag in enumerate(tags)}
    assert {i: sum(k.startswith(f"{i:05d}/") for k in topped) for i in want} == want
    assert len(topped) > len(plain) and all(topped[k] == v for k, v in plain.items())
    assert len(set(topped.values())) > len(set(plain.values())) > 1  # the extra images are new samples
