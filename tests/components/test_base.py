"""The base stage on a tiny world: trains, resumes to the same result, exports, loads, answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components import base, checkpoints
from components.base_data import object_cells
from components.inference import ImageSizeError, InputError, Teacher
from components.training import LocalReporter, StageContext, run_training
from components.world.datasets import WorldDataParams, build_world_data
from components.world.palette import COLOUR_NAMES
from components.world.prompts import NUMBERS
from components.world.render import random_scene, render

TINY = dict(steps=6, ae_steps=2, checkpoint_every=3, log_every=1, batch_size=4, ae_batch_size=4,
            ae_channels=(8, 16), gen_width=32, gen_depth=2, gen_heads=2, gen_text_layers=1, und_hidden=32,
            und_layers=2, und_heads=2, und_kv_heads=1, und_intermediate=64, und_batch_size=4, sample_steps=2,
            eval_rows=4, warmup=2)


def _write(folder: Path, kind: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_world(root: Path, n: int = 12) -> Path:
    """The world stage's T2I pairs, plus small edit / Q&A / caption sets in the base loader's format."""
    build_world_data(root, WorldDataParams(n_t2i=n, seed=1))
    rng = np.random.default_rng(0)
    edit, qa, cap = [], [], []
    for d in ("edit", "qa", "captions"):
        (root / d / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = random_scene(rng, 1)
        o = scene.objects[0]
        new = "blue" if o.colour != "blue" else "red"
        img = render(scene)
        out = render(type(scene)((type(o)(o.cls, new, o.cx, o.cy, o.size),), scene.size))
        Image.fromarray(img).save(root / "edit" / "images" / f"{i}_in.png")
        Image.fromarray(out).save(root / "edit" / "images" / f"{i}_out.png")
        edit.append({"id": f"e{i}", "instruction": f"make the {o.cls} {new}", "input_image": f"images/{i}_in.png",
                     "output_image": f"images/{i}_out.png"})
        for d in ("qa", "captions"):
            Image.fromarray(img).save(root / d / "images" / f"{i}.png")
        qa.append({"id": f"q{i}", "image": f"images/{i}.png", "question": "what colour is the shape?",
                   "answer": o.colour, **({"scene": scene.to_json()} if i % 2 == 0 else {})})
        cap.append({"id": f"c{i}", "image": f"images/{i}.png", "caption": f"there is a {o.colour} {o.cls}."})
    _write(root / "edit", "edit", edit)
    _write(root / "qa", "qa", qa)
    _write(root / "captions", "captions", cap)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_world(tmp_path_factory.mktemp("world"))


def ctx(world: Path, **kw) -> StageContext:
    return StageContext(params=base.Params(**{**TINY, **kw}), data_dir=world, parent_dir=None)


def test_params_defaults_validate_and_import_needs_a_path():
    p = base.Params()
    assert p.source == "train" and p.und_layers >= 16 and p.ae_steps < p.steps
    with pytest.raises(ValueError, match="import_path"):
        base.Params(source="import")
    with pytest.raises(ValueError, match="extra"):
        base.Params(bogus=1)


def test_trains_resumes_exports_and_loads(world, tmp_path):
    torch.set_num_threads(1)
    full = run_training(base, ctx(world), LocalReporter(tmp_path / "a"))
    hist = full.extra["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    assert "ae_l1" in hist[0] and "gen_loss" in hist[2] and "und_loss" in hist[0]
    assert all(np.isfinite(v) for h in hist for v in h.values())

    rep = LocalReporter(tmp_path / "b")
    run_training(base, ctx(world, steps=3), rep)  # interrupted at step 3, after calibration
    resumed = run_training(base, ctx(world), rep)
    assert resumed.extra["resumed_from"] == 3
    for name in ("autoencoder", "generator", "generator_ema", "understanding"):
        for (k, a), b in zip(full.modules[name].state_dict().items(), resumed.modules[name].state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), (name, k)

    exp = base.export(full)
    assert exp.samples["t2i"].shape == (64, 64 * 8, 3) and exp.samples["edit"].shape == (64 * 4, 64 * 3, 3)
    metrics = base.evaluate(full)
    assert metrics["nfe_t2i"] == 2 * TINY["sample_steps"] and 0 <= metrics["und_heldout_acc"] <= 1
    assert metrics["train_s"] > 0
    md5 = checkpoints.save_checkpoint(tmp_path / "ckpt", exp.tensors, exp.config,
                                     {"stage": "base", "history": full.extra["history"]}, exp.samples)

    teacher = Teacher.load(tmp_path / "ckpt", md5)
    img = teacher.generate(["a photo of a red circle"], num_steps=50)
    assert img.shape == (1, 64, 64, 3) and img.dtype == np.uint8 and teacher.last_nfe == 100
    edited = teacher.edit(img, ["make the circle blue"], num_steps=50)
    assert edited.shape == (1, 64, 64, 3) and teacher.last_nfe == 132
    assert isinstance(teacher.ask(img, ["what colour is the shape?"], max_new_tokens=3)[0], str)
    ref = base.final_teacher(full)
    assert np.array_equal(ref.generate(["a photo of a red circle"], num_steps=50), img)

    with pytest.raises(InputError, match="'hexagon'"):
        teacher.generate(["a photo of a red hexagon"])
    with pytest.raises(ImageSizeError, match="64x64"):
        teacher.edit(np.zeros((1, 32, 32, 3), np.uint8), ["make the circle blue"])

    # the import source: the same weights back, md5 checked first, lineage carried
    imp = run_training(base, StageContext(base.Params(source="import", import_path=str(tmp_path / "ckpt"),
                                                      import_md5=md5, steps=1), None, None),
                       LocalReporter(tmp_path / "c"))
    again = base.export(imp)
    assert again.config["imported_from"]["md5"] == md5
    assert all(torch.equal(again.tensors[k], v) for k, v in exp.tensors.items())
    # the training curve is the imported run's (the import's own no-op step logs nothing)
    assert full.extra["history"] and imp.extra["history"] == full.extra["history"]
    with pytest.raises(checkpoints.ChecksumMismatch):
        run_training(base, StageContext(base.Params(source="import", import_path=str(tmp_path / "ckpt"),
                                                    import_md5="0" * 32 + ".dir", steps=1), None, None),
                     LocalReporter(tmp_path / "d"))


def test_finetune_continues_an_imported_teacher_with_its_lineage_and_clock(world, tmp_path, monkeypatch):
    """source finetune: the imported teacher's weights are the start (its autoencoder frozen, no
    autoencoder phase), training moves the experts, train_s goes on from the parent's, the export
    names its parent, a resume gives the same weights, and a wrong md5 stops it before training."""
    torch.set_num_threads(1)
    parent = run_training(base, ctx(world), LocalReporter(tmp_path / "p"))
    exp = base.export(parent)
    parent_s = base.evaluate(parent)["train_s"]
    md5 = checkpoints.save_checkpoint(tmp_path / "ckpt", exp.tensors, exp.config,
                                      {"stage": "base", "metrics": {"train_s": parent_s}}, exp.samples)
    with pytest.raises(ValueError, match="finetune"):
        base.Params(source="finetune")
    seen = []
    real = base.scheduled_lr
    monkeypatch.setattr(base, "scheduled_lr", lambda *a: seen.append(a) or real(*a))
    kw = dict(source="finetune", import_path=str(tmp_path / "ckpt"), import_md5=md5, steps=4, lr_schedule="linear",
              und_every=2)
    start = base.setup(ctx(world, **kw))
    assert all(torch.equal(a, b) for a, b in zip(start.modules["generator"].state_dict().values(),
                                                  checkpoints.sub_state(exp.tensors, "generator").values()))
    assert "ae" not in start.optimizers and float(start.modules["clock"].seconds) == pytest.approx(parent_s)

    tuned = run_training(base, ctx(world, **kw), LocalReporter(tmp_path / "f"))
    assert [h["step"] for h in tuned.extra["history"]] == [1, 2, 3, 4]
    assert "gen_loss" in tuned.extra["history"][0] and "ae_l1" not in tuned.extra["history"][0]
    # (base rate, steps it decays over, schedule): the generator over 4 steps, the understanding expert over 2
    assert {(a[0], a[3], a[4]) for a in seen} == {(base.Params().lr, 4, "linear"), (base.Params().und_lr, 2, "linear")}
    out = base.export(tuned)
    assert out.config["finetuned_from"]["md5"] == md5 and "imported_from" not in out.config
    for k, v in exp.tensors.items():  # the autoencoder is the parent's; the experts moved
        if k.startswith("autoencoder."):
            assert torch.equal(out.tensors[k], v), k
    moved = [k for k, v in exp.tensors.items() if k.startswith(("generator.", "understanding.")) and
             not torch.equal(out.tensors[k], v)]
    assert moved
    assert base.evaluate(tuned)["train_s"] > parent_s

    # interrupted at step 2 and resumed: the same weights as without the interruption (a constant rate, as
    # the interruption is made by running 2 of the steps, and a linear decay depends on the steps asked for)
    const = {**kw, "lr_schedule": "constant"}
    whole = run_training(base, ctx(world, **const), LocalReporter(tmp_path / "w"))
    rep = LocalReporter(tmp_path / "r")
    run_training(base, ctx(world, **{**const, "steps": 2}), rep)
    resumed = run_training(base, ctx(world, **const), rep)
    assert resumed.extra["resumed_from"] == 2
    for name in ("generator", "generator_ema", "understanding"):
        for a, b in zip(whole.modules[name].state_dict().values(), resumed.modules[name].state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    with pytest.raises(checkpoints.ChecksumMismatch):
        run_training(base, ctx(world, **{**kw, "import_md5": "0" * 32 + ".dir"}), LocalReporter(tmp_path / "x"))


def test_finetune_of_the_understanding_expert_alone_keeps_the_parents_generator(world, tmp_path):
    """train_generation false: only the understanding expert trains (no gen_loss, no quality probe), and the
    exported generator is the parent's byte for byte; without source finetune it is refused."""
    torch.set_num_threads(1)
    exp = base.export(run_training(base, ctx(world), LocalReporter(tmp_path / "p")))
    md5 = checkpoints.save_checkpoint(tmp_path / "ckpt", exp.tensors, exp.config, {"stage": "base"}, exp.samples)
    with pytest.raises(ValueError, match="train_generation"):
        base.Params(train_generation=False)
    kw = dict(source="finetune", import_path=str(tmp_path / "ckpt"), import_md5=md5, steps=3,
              train_generation=False, probe_every=1, probe_per_tag=1)
    tuned = run_training(base, ctx(world, **kw), LocalReporter(tmp_path / "u"))
    hist = tuned.extra["history"]
    assert len(hist) == 3 and all("und_loss" in h and "gen_loss" not in h and "geneval_probe" not in h
                                  for h in hist)
    out = base.export(tuned)
    for k, v in exp.tensors.items():
        if k.startswith(("generator.", "autoencoder.")):
            assert torch.equal(out.tensors[k], v), k
    assert any(not torch.equal(out.tensors[k], v) for k, v in exp.tensors.items() if k.startswith("understanding."))


def _position_world(src: Path, dst: Path) -> Path:
    """``src`` with its Q&A replaced by the world's own questions (with scenes) about two-object scenes."""
    import shutil

    from components.world.understanding import ask

    shutil.copytree(src, dst)
    rng, rows = np.random.default_rng(3), []
    while len(rows) < 12:
        scene = random_scene(rng, 2)
        qa = ask(scene, ("position", "colour", "count")[len(rows) % 3], rng)
        if qa is None:
            continue
        Image.fromarray(render(scene)).save(dst / "qa" / "images" / f"p{len(rows)}.png")
        rows.append({"id": f"p{len(rows)}", "image": f"images/p{len(rows)}.png", "question": qa[0], "answer": qa[1],
                     "scene": scene.to_json()})
    _write(dst / "qa", "qa", rows)
    return dst


def test_locate_head_fine_tunes_on_the_objects_the_questions_name(world, tmp_path):
    """und_locate_loss > 0 on a fine-tune: the parent's expert gets a locate head; its targets are the
    last token of each name a question holds and the named object's column and row; und_kind_weights
    draws position rows more often; the head is saved and reloads."""
    from components.world.understanding import referents
    from components.world.render import Scene

    torch.set_num_threads(1)
    pworld = _position_world(world, tmp_path / "w")
    exp = base.export(run_training(base, ctx(pworld), LocalReporter(tmp_path / "p")))
    assert not any("locate_head" in k for k in exp.tensors)
    md5 = checkpoints.save_checkpoint(tmp_path / "ckpt", exp.tensors, exp.config, {"stage": "base"}, exp.samples)
    with pytest.raises(ValueError, match="unknown question kind"):
        base.Params(und_kind_weights={"positions": 2.0})
    kw = dict(source="finetune", import_path=str(tmp_path / "ckpt"), import_md5=md5, steps=3, train_generation=False,
              und_locate_loss=1.0, und_locate_bins=4, und_kind_weights={"position": 5.0})
    tuned = run_training(base, ctx(pworld, **kw), LocalReporter(tmp_path / "u"))
    teacher, data = tuned.extra["teacher"], tuned.data
    rows = data["world"].und_train
    assert teacher.understanding.cfg.locate_bins == 4 and teacher.understanding.cfg.locate_at == 1
    n_position = 0
    for i, (q, targets) in enumerate(zip(rows.texts, data["und_locate"])):
        refs = referents(q, Scene.from_json(rows.scenes[i])) if rows.scenes[i] else []
        assert len(targets) == len(refs)
        ids = teacher.encode(q)
        for (prefix, obj), (token, col, row) in zip(refs, targets):
            assert teacher.tokenizer.decode([ids[token]]) == prefix.split()[-1]  # the name's last word
            assert (col, row) == (int(obj.cx * 4 / 64), int(obj.cy * 4 / 64))
        n_position += q.startswith("where is")
        assert data["und_weights"][i].item() == (5.0 if q.startswith("where is") else 1.0)
    assert 0 < n_position < len(rows)
    where = teacher.encode("where")[0]
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([base._und_batch(tuned, g)[1][:, 0] for _ in range(50)])
    share, uniform = (drawn == where).float().mean().item(), n_position / len(rows)
    assert share > uniform + 0.2  # weighted 5:1, position rows come up far more often than their share
    hist = tuned.extra["history"]
    assert len(hist) == 3 and all(np.isfinite(h["und_locate_loss"]) for h in hist)
    out = base.export(tuned)
    assert out.tensors["understanding.locate_head.weight"].shape == (8, TINY["und_hidden"])
    md5b = checkpoints.save_checkpoint(tmp_path / "ckpt2", out.tensors, out.config, {"stage": "base"}, out.samples)
    again = Teacher.load(tmp_path / "ckpt2", md5b)
    assert torch.equal(again.understanding.locate_head.weight, teacher.understanding.locate_head.weight.detach())
    assert again.understanding.locate_colour_head is None
    # a second fine-tune of that checkpoint gives the same head a colour output: the named object's colour
    with pytest.raises(ValueError, match="und_locate_loss"):
        base.Params(und_locate_colours=True)
    # (and a count head: how many objects a count question's description fits, at its last word)
    kw2 = {**kw, "import_path": str(tmp_path / "ckpt2"), "import_md5": md5b, "und_locate_colours": True,
           "und_count_loss": 1.0}
    coloured = run_training(base, ctx(pworld, **kw2), LocalReporter(tmp_path / "c"))
    und = coloured.extra["teacher"].understanding
    assert und.cfg.locate_colours == len(COLOUR_NAMES) and und.cfg.count_classes == len(NUMBERS)
    n_count = 0
    for q, a, target in zip(rows.texts, rows.answers, coloured.data["und_count"]):
        if not q.startswith("how many"):
            assert target is None
            continue
        token, n = target
        assert NUMBERS[n] == a and teacher.tokenizer.decode([teacher.encode(q)[token]]) == q.split()[-3]
        n_count += 1
    assert n_count > 0 and all(np.isfinite(h["und_count_loss"]) for h in coloured.extra["history"])
    for i, (q, targets) in enumerate(zip(rows.texts, coloured.data["und_locate"])):
        refs = referents(q, Scene.from_json(rows.scenes[i])) if rows.scenes[i] else []
        assert [t[:3] for t in targets] == data["und_locate"][i]
        assert [t[3] for t in targets] == [COLOUR_NAMES.index(obj.colour) for _, obj in refs]
    assert base._und_batch(coloured, g)[3]["locate"].shape[1] == 5
    out2 = base.export(coloured)
    assert out2.tensors["understanding.locate_colour_head.weight"].shape == (len(COLOUR_NAMES), TINY["und_hidden"])
    assert out2.tensors["understanding.count_head.weight"].shape == (len(NUMBERS), TINY["und_hidden"])


@pytest.mark.parametrize("factor,patch", [(1, 8), (2, 4)])
def test_pixel_space_x0_generator_trains_every_step_exports_and_loads(world, tmp_path, factor, patch):
    """gen_space pixel: no autoencoder phase, the generator draws RGB (at 64 / factor per side) and
    predicts x0; the checkpoint reloads to the same 64x64 images."""
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="ae_steps"):
        base.Params(**{**TINY, "ae_steps": 0})  # a latent generator needs its autoencoder
    state = run_training(base, ctx(world, gen_space="pixel", gen_pixel_factor=factor, gen_prediction="x0",
                                   gen_patch=patch, ae_steps=0, gen_head_channels=4, probe_every=3, probe_per_tag=2),
                         LocalReporter(tmp_path / "a"))
    hist = state.extra["history"]
    assert all("gen_loss" in h and "ae_l1" not in h for h in hist) and len(hist) == TINY["steps"]
    # the quality probe ran at generation steps 3 and 6, and left the experts in training mode
    probes = [h["geneval_probe"] for h in hist if "geneval_probe" in h]
    assert [h["step"] for h in hist if "geneval_probe" in h] == [3, 6] and all(0 <= v <= 1 for v in probes)
    assert state.modules["generator"].training and state.modules["understanding"].training
    gen = state.modules["generator"]
    assert gen.cfg.in_channels == 3 and gen.cfg.sample_size == 64 // factor and gen.cfg.prediction == "x0"
    assert gen.cfg.head_channels == 4
    assert list(state.modules["autoencoder"].parameters()) == [] and "ae" not in state.optimizers
    exp = base.export(state)
    md5 = checkpoints.save_checkpoint(tmp_path / "ckpt", exp.tensors, exp.config,
                                     {"stage": "base", "history": state.extra["history"]}, exp.samples)
    teacher = Teacher.load(tmp_path / "ckpt", md5)
    img = teacher.generate(["a photo of a red circle"], num_steps=4)
    assert img.shape == (1, 64, 64, 3)
    assert np.array_equal(base.final_teacher(state).generate(["a photo of a red circle"], num_steps=4), img)
    assert teacher.edit(img, ["make the circle blue"], num_steps=4).shape == (1, 64, 64, 3)


def test_object_heads_train_the_encoder_from_the_rows_scenes(world, tmp_path):
    """und_object_loss > 0: the understanding expert gets per-cell class and colour heads, trained from
    the scenes of the rows that have one (the others are ignored); the heads are saved and reload."""
    torch.set_num_threads(1)
    state = run_training(base, ctx(world, und_encoder="cnn", und_object_loss=1.0), LocalReporter(tmp_path / "a"))
    objects = state.data["und_objects"]
    und = state.modules["understanding"]
    assert set(objects) == {"cls", "colour"} and objects["cls"].shape == (len(state.data["und"]), 64)
    with_scene = (objects["cls"] != -100).all(1)
    assert 0 < int(with_scene.sum()) < len(with_scene)  # rows without a scene carry IGNORE only
    assert ((objects["cls"][with_scene] > 0).sum(1) == 1).all()  # one object per tiny scene, in one cell
    hist = [h for h in state.extra["history"] if "und_object_loss" in h]
    assert len(hist) == TINY["steps"] and all(np.isfinite(h["und_object_loss"]) for h in hist)
    exp = base.export(state)
    assert any(k.startswith("understanding.object_heads.cls") for k in exp.tensors)
    md5 = checkpoints.save_checkpoint(tmp_path / "ckpt", exp.tensors, exp.config,
                                     {"stage": "base", "history": state.extra["history"]}, exp.samples)
    teacher = Teacher.load(tmp_path / "ckpt", md5)
    assert teacher.understanding.cfg.encoder == "cnn" and set(teacher.understanding.object_heads) == {"cls", "colour"}
    for a, b in zip(teacher.understanding.parameters(), und.parameters()):
        assert torch.equal(a, b.detach())


def test_train_shift_sets_the_generator_training_times(world, tmp_path, monkeypatch):
    """``train_shift`` reaches the logit-normal draw of every generation step (BAGEL's 3 by default)."""
    torch.set_num_threads(1)
    seen = []
    draw = base.sampling.sample_train_t

    def spy(n, shift=base.sampling.SHIFT, generator=None):
        seen.append(shift)
        return draw(n, shift=shift, generator=generator)

    monkeypatch.setattr(base.sampling, "sample_train_t", spy)
    assert base.Params().train_shift == 3.0
    run_training(base, ctx(world, train_shift=0.5, steps=4), LocalReporter(tmp_path / "a"))
    assert seen == [0.5] * (4 - TINY["ae_steps"])


def test_edit_triplets_join_the_generator_batches_after_edit_after_steps(world, tmp_path, monkeypatch):
    """``edit_after``: the first generation steps draw T2I pairs alone, then edit triplets take their
    ``edit_fraction`` of every batch (0: from the start)."""
    from components.gen_data import GenData

    torch.set_num_threads(1)
    seen = []
    batch = GenData.batch

    def spy(self, n_t2i, n_edit, g):
        seen.append((n_t2i, n_edit))
        return batch(self, n_t2i, n_edit, g)

    monkeypatch.setattr(GenData, "batch", spy)
    gen_steps = 4 - TINY["ae_steps"] + 2
    run_training(base, ctx(world, edit_after=2, steps=TINY["ae_steps"] + gen_steps), LocalReporter(tmp_path / "a"))
    assert seen[:gen_steps] == [(4, 0)] * 2 + [(2, 2)] * (gen_steps - 2)
    seen.clear()
    run_training(base, ctx(world, steps=TINY["ae_steps"] + 2), LocalReporter(tmp_path / "b"))
    assert seen[:2] == [(2, 2)] * 2


def test_object_cells_put_each_shape_in_the_cell_of_its_centre():
    scene = {"objects": [{"cls": "star", "colour": "red", "cx": 3.0, "cy": 60.0, "size": 10},
                         {"cls": "digit", "colour": "blue", "cx": 30.0, "cy": 30.0, "size": 10, "text": "7"},
                         {"cls": "circle", "colour": "white", "cx": 63.9, "cy": 0.5, "size": 10}]}
    cells = object_cells(scene, 8, 64, ("circle", "star"), ("red", "white"))
    assert cells["cls"][7 * 8 + 0] == 2 and cells["colour"][7 * 8 + 0] == 1   # star, red: bottom-left cell
    assert cells["cls"][0 * 8 + 7] == 1 and cells["colour"][0 * 8 + 7] == 2   # circle, white: top-right cell
    assert sum(c > 0 for c in cells["cls"]) == 2  # the digit glyph is not an object class
    assert object_cells(None, 8, 64, ("circle",), ("red",)) == {"cls": [-100] * 64, "colour": [-100] * 64}


def test_an_edit_conditions_on_the_source_latents_the_training_data_had(monkeypatch):
    """``Teacher.edit`` encodes its source under the precision ``GenData`` encoded the training
    sources with (bfloat16 where it is honoured), so the generator sees the latents it was trained on."""
    from components import sampling
    from components.gen_data import images_to_unit
    from components.inference import autocast
    from components.models.tokens import Tokenizer

    torch.manual_seed(0)
    teacher = base.build_teacher(base.Params(**TINY), Tokenizer.from_texts(["make the circle blue"]))
    teacher.autoencoder.eval()
    with torch.no_grad():  # a calibrated autoencoder: normalisation in play
        teacher.autoencoder.calibrate(torch.rand(8, 3, 64, 64) * 2 - 1)
    u8 = torch.from_numpy(np.stack([render(random_scene(np.random.default_rng(i), 2)) for i in range(2)]))
    seen, real = [], sampling.sample

    def spy(velocity, noise, conds, **kw):
        seen.append(conds)
        return real(velocity, noise, conds, **kw)

    monkeypatch.setattr(sampling, "sample", spy)
    teacher.edit(u8.numpy(), ["make the circle blue"] * 2, num_steps=1)
    with torch.no_grad(), autocast(teacher.bf16):  # what GenData.build computes for a training source
        trained_on = teacher.autoencoder.encode(images_to_unit(u8.permute(0, 3, 1, 2))).float()
    assert torch.equal(seen[0].full.source, trained_on)
    assert seen[0].no_image.source is None


def test_each_autoencoder_step_makes_ae_updates_updates(world, tmp_path):
    torch.set_num_threads(1)
    state = run_training(base, ctx(world, steps=3, ae_steps=2, ae_updates=3), LocalReporter(tmp_path / "a"))
    opt = state.optimizers["ae"]
    assert {int(s["step"]) for s in opt.state.values()} == {2 * 3}  # then frozen for the generation phase
    assert "ae_l1" in state.extra["history"][1] and "gen_loss" in state.extra["history"][2]
