import json
import shutil

import numpy as np
import pytest

from components.base_data import load_world
from components.evaluation.geneval import TAGS, evaluate_image, read_metadata_file
from components.evaluation.gedit_judge import ShapesJudge
from components.world.datasets import (DatasetError, WorldDataParams, build_world_data, ingest_batch,
                                       validate_dataset, validate_world)
from components.world.defects import QUALITY, quality_defect, semantic_defect, semantic_kinds
from components.world.detector import ShapesDetector
from components.world.gedit import CATEGORIES, parse
from components.world.geneval_prompts import oracle_scene, sample
from components.world.palette import CLASSES
from components.world.prompts import NUMBERS, describe, plural
from components.world.render import Obj, Scene, render
from components.world.understanding import caption, clear_relation, question_kind, questions

SMALL = dict(n_t2i=12, n_edit=6, n_qa=12, n_captions=4, n_prefs=8, gedit_scale=0.01, geneval_n=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_world_data(root, WorldDataParams(**SMALL, seed=2))
    return root


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _rewrite(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_render_is_deterministic_and_antialiased():
    s = Scene((Obj("circle", "red", 20, 20, 14), Obj("square", "blue", 44, 44, 12)))
    a, b = render(s), render(s)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert tuple(a[20, 20]) == (220, 30, 30) and tuple(a[0, 0]) == (150, 150, 150)
    edge = a[15, 13:16, 0]  # the boundary crosses pixel 14 of row 15
    assert any(150 < v < 220 for v in edge.tolist()), "the edge pixel is blended, not binary"


def test_prompt_wording_follows_geneval():
    s = Scene((Obj("circle", "orange", 10, 10, 10), Obj("cross", "blue", 30, 30, 10), Obj("cross", "blue", 50, 50, 10)))
    assert describe(s) == "a photo of an orange circle and two blue crosses"


def test_build_is_byte_identical_and_validates(tmp_path):
    p = WorldDataParams(**SMALL, seed=3)
    build_world_data(tmp_path / "a", p)
    build_world_data(tmp_path / "b", p)
    for f in ["t2i/t2i.jsonl", "t2i/images/000005.png", "edit/edit.jsonl", "edit/images/000003_out.png",
              "qa/qa.jsonl", "captions/captions.jsonl", "prefs/prefs.jsonl", "prefs/images/000007_rejected.png",
              "benchmarks/gedit/gedit.jsonl", "benchmarks/geneval/evaluation_metadata.jsonl"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    counts = validate_world(tmp_path / "a")
    assert counts == {"t2i": 12, "edit": 12, "qa": 12, "captions": 4, "prefs": 8, "gedit": 2 * 11,
                      "geneval": len(read_metadata_file(tmp_path / "a/benchmarks/geneval/evaluation_metadata.jsonl"))}


def test_every_set_loads_through_the_base_stage_reader(world):
    w = load_world(world)
    assert w.t2i.images.shape == (12, 3, 64, 64)
    assert w.edit is not None and len(w.edit) == 12 and w.edit.targets.shape == (12, 3, 64, 64)
    und = len(w.und_train) + (len(w.und_heldout) if w.und_heldout is not None else 0)
    assert und == 12 + 4


def test_t2i_prompts_cover_genevals_templates(tmp_path):
    build_world_data(tmp_path, WorldDataParams(n_t2i=60, n_edit=0, n_qa=0, n_captions=0, n_prefs=0,
                                               gedit_scale=0.02, geneval_n=5))
    rows = _rows(tmp_path / "t2i" / "t2i.jsonl")
    assert set(TAGS) | {"scene"} == {r["tag"] for r in rows}
    assert all(r["prompt"].startswith("a photo of ") for r in rows)
    assert any(" left of " in r["prompt"] or " above " in r["prompt"] for r in rows)
    assert not (tmp_path / "edit").exists()


def test_edit_rows_have_gedit_fields_and_parse_back(world):
    rows = _rows(world / "edit" / "edit.jsonl")
    assert {r["instruction_language"] for r in rows} == {"en", "cn"}
    for r in rows:
        assert r["task_type"] in CATEGORIES and len(r["key"]) == 32
        assert parse(r["instruction"]) == r["edit"]
        assert (world / "edit" / r["input_image"]).exists() and (world / "edit" / r["output_image"]).exists()


def test_gedit_benchmark_rows(world):
    rows = _rows(world / "benchmarks" / "gedit" / "gedit.jsonl")
    assert [r["task_type"] for r in rows[::2]] == list(CATEGORIES)  # scale 0.01: one sample per category
    for r in rows:
        assert {"task_type", "key", "instruction", "instruction_language", "input_image", "input_image_raw",
                "Intersection_exist", "edit", "output_image"} <= set(r)
        assert parse(r["instruction"]) == r["edit"]


def _named(name: str, objs) -> Obj:
    """The one object a question names: "circle" (its class is unique) or "red circle"."""
    words = name.split()
    found = [o for o in objs if (o.cls == words[-1]) and (len(words) == 1 or o.colour == words[0])]
    assert len(found) == 1, name
    return found[0]


def test_questions_have_exact_answers():
    rng = np.random.default_rng(5)
    from components.world.render import random_scene

    seen = set()
    for _ in range(150):
        scene = random_scene(rng, int(rng.integers(1, 5)))
        for kind, q, a in questions(scene, rng, 5):
            seen.add(kind)
            objs = scene.objects
            if q == "how many shapes are there?":
                assert a == NUMBERS[len(objs)]
            elif kind == "count" and q.endswith(" shapes are there?"):  # "how many red shapes are there?"
                colour = q.removeprefix("how many ").removesuffix(" shapes are there?")
                assert a == NUMBERS[sum(o.colour == colour for o in objs)]
            elif kind == "count":  # "how many circles are there?"
                word = q.removeprefix("how many ").removesuffix(" are there?")
                cls = next(c for c in CLASSES if plural(c) == word)
                assert a == NUMBERS[sum(o.cls == cls for o in objs)]
            elif kind == "colour":
                cls = q.removeprefix("what colour is the ").removesuffix("?")
                assert [o.colour for o in objs if o.cls == cls] == [a]
            elif kind == "shape":
                colour = q.removeprefix("what shape is the ").removesuffix(" object?")
                assert [o.cls for o in objs if o.colour == colour] == [a]
            elif kind == "existence":
                colour, cls = q.removeprefix("is there ").removesuffix("?").split()[1:]
                assert a == ("yes" if any(o.colour == colour and o.cls == cls for o in objs) else "no")
            elif kind == "position":  # "where is the [colour] circle relative to the [colour] square?"
                first, second = q.removeprefix("where is the ").removesuffix("?").split(" relative to the ")
                subject, ref = _named(first, objs), _named(second, objs)
                assert a in ("left of", "right of", "above", "below") and clear_relation(subject, ref) == a
    assert seen == {"count", "colour", "shape", "position", "existence"}


def test_question_kind_names_the_kind_of_every_question_the_world_asks():
    from components.base_data import CAPTION_PROMPT
    from components.world.render import random_scene

    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(100):
        for kind, q, _ in questions(random_scene(rng, int(rng.integers(1, 5))), rng, 5):
            assert question_kind(q) == kind, q
            seen.add(kind)
    assert len(seen) == 5
    assert question_kind("How many circles are there?") == "count"  # case and spaces as a user types them
    for other in (CAPTION_PROMPT, "what is this?", "describe the shapes."):
        assert question_kind(other) is None


def _world_questions(seed: int, scenes: int):
    """(scene, kind, question, answer) for up to 5 of the world's questions about each of ``scenes``
    random scenes of 1-4 objects."""
    from components.world.render import random_scene

    rng = np.random.default_rng(seed)
    for _ in range(scenes):
        scene = random_scene(rng, int(rng.integers(1, 5)))
        for kind, q, a in questions(scene, rng, 5):
            yield scene, kind, q, a


def test_counted_is_how_many_objects_a_count_or_existence_question_describes():
    from components.world.understanding import counted

    s = Scene((Obj("circle", "red", 12, 12, 12), Obj("circle", "blue", 50, 12, 12), Obj("star", "red", 30, 50, 12)))
    assert counted("How many circles are there?", s) == ("how many circles", 2)
    assert counted("how many red shapes are there?", s) == ("how many red shapes", 2)
    assert counted("how many shapes are there?", s) == ("how many shapes", 3)
    assert counted("is there a blue star?", s) == ("is there a blue star", 0)
    assert counted("is there an orange circle?", s) == ("is there an orange circle", 0)
    for none in ("what colour is the star?", "how many dogs are there?", "describe the image in detail"):
        assert counted(none, s) is None, none
    # on the world's own questions: the number is the answer (count) or says it (existence)
    kinds = set()
    for scene, kind, q, a in _world_questions(seed=6, scenes=300):
        got = counted(q, scene)
        if kind not in ("count", "existence"):
            assert got is None, q
            continue
        prefix, n = got
        assert q.startswith(prefix) and q[len(prefix):] in (" are there?", "?")
        assert a == (NUMBERS[n] if kind == "count" else ("yes" if n else "no")), (q, a, n)
        kinds.add((kind, a if kind == "existence" else n > 0))
    assert kinds == {("count", True), ("count", False), ("existence", "yes"), ("existence", "no")}


def test_referents_are_the_objects_each_question_names_with_the_text_up_to_each_name():
    from components.world.understanding import referents

    s = Scene((Obj("circle", "red", 12, 12, 12), Obj("circle", "blue", 50, 12, 12), Obj("star", "red", 30, 50, 12)))
    assert referents("where is the blue circle relative to the star?", s) == [
        ("where is the blue circle", s.objects[1]), ("where is the blue circle relative to the star", s.objects[2])]
    assert referents("What colour is the star?", s) == [("what colour is the star", s.objects[2])]
    assert referents("what shape is the blue object?", s) == [("what shape is the blue object", s.objects[1])]
    for none in ("what colour is the circle?",  # two circles: the name does not pick one
                 "how many circles are there?", "is there a red star?", "describe the image in detail",
                 "where is the green square relative to the star?"):  # no such object
        assert referents(none, s) == [], none
    # on the world's own questions: every naming question resolves, to the objects its answer is about
    seen = set()
    for scene, kind, q, a in _world_questions(seed=5, scenes=200):
        refs = referents(q, scene)
        assert len(refs) == {"colour": 1, "shape": 1, "position": 2}.get(kind, 0), q
        assert all(q.startswith(prefix) for prefix, _ in refs)
        if kind == "colour":
            assert refs[0][1].colour == a
        elif kind == "shape":
            assert refs[0][1].cls == a
        elif kind == "position":
            assert clear_relation(refs[0][1], refs[1][1]) == a
        seen.add(kind)
    assert {"colour", "shape", "position"} <= seen


def test_captions_are_several_sentences_from_the_scene():
    s = Scene((Obj("circle", "red", 12, 12, 12), Obj("square", "blue", 50, 12, 12)))
    c = caption(s)
    assert c.startswith("there are two shapes on a grey background.")
    assert "the small red circle is at the top left." in c and "the red circle is left of the blue square." in c
    assert c.count(".") >= 4
    assert clear_relation(s.objects[0], s.objects[1]) == "left of"


def test_preference_pairs_have_controlled_defects():
    det, judge = ShapesDetector(), ShapesJudge()
    rng = np.random.default_rng(0)
    for i in range(30):
        meta = sample(TAGS[i % 6], rng)
        good = render(oracle_scene(meta, rng))
        assert evaluate_image(good, meta, det)["correct"]
        for kind in semantic_kinds(meta):
            scene, _ = semantic_defect(meta, kind, rng)
            if kind == "extra_object":  # GenEval lets extra objects pass; the prompt does not
                assert len(scene.objects) == sum(c["count"] for c in meta["include"]) + 1
                continue
            assert not evaluate_image(render(scene), meta, det)["correct"], (meta["prompt"], kind)
    # quality defects keep the scene but the judge's quality score drops (colour_cast excepted:
    # a uniform cast stays a clean image to a detector)
    drops = {k: 0 for k in QUALITY}
    for i in range(60):
        meta = sample(TAGS[i % 6], rng)
        scene = oracle_scene(meta, rng)
        kind = QUALITY[i % len(QUALITY)]
        bad = quality_defect(scene, kind, rng)
        assert not np.array_equal(bad, render(scene))
        drops[kind] += min(judge._quality(det.analyze(bad))) < min(judge._quality(det.analyze(render(scene))))
    assert all(drops[k] >= 8 for k in ("blur", "noise", "speckles", "partial_shape")), drops


@pytest.mark.parametrize("kind, field, value, message", [
    ("t2i", "prompt", 7, r"t2i.jsonl:2: field 'prompt' must be a str"),
    ("t2i", "image", "images/nope.png", r"t2i.jsonl:2: field 'image' images/nope.png does not exist"),
    ("edit", "output_image", None, r"edit.jsonl:2: field 'output_image' is missing"),
    ("edit", "instruction_language", "fr", r"edit.jsonl:2: field 'instruction_language' must be one of en, cn"),
    ("qa", "answer", "", r"qa.jsonl:2: field 'answer' must not be empty"),
    ("qa", "image", "../t2i/images/000000.png", r"qa.jsonl:2: field 'image' must be a path inside"),
    ("captions", "caption", ["x"], r"captions.jsonl:2: field 'caption' must be a str"),
    ("prefs", "defect_type", "ugly", r"prefs.jsonl:2: field 'defect_type' must be one of semantic, quality"),
    ("prefs", "rejected", None, r"prefs.jsonl:2: field 'rejected' is missing"),
    ("t2i", "scene", {"objects": [{"cls": "hexagon", "colour": "red", "cx": 1, "cy": 1, "size": 9}]},
     r"t2i.jsonl:2: field 'scene.objects\[0\].cls' unknown class 'hexagon'"),
])
def test_validator_names_file_line_and_field(world, tmp_path, kind, field, value, message):
    folder = tmp_path / kind
    shutil.copytree(world / kind, folder)
    rows = _rows(folder / f"{kind}.jsonl")
    if value is None:
        del rows[1][field]
    else:
        rows[1][field] = value
    _rewrite(folder / f"{kind}.jsonl", rows)
    with pytest.raises(DatasetError, match=message):
        validate_dataset(folder, kind)


def test_validator_rejects_bad_json_duplicate_ids_and_mixed_sizes(world, tmp_path):
    folder = tmp_path / "qa"
    shutil.copytree(world / "qa", folder)
    f = folder / "qa.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(DatasetError, match=r"qa.jsonl:3: not valid JSON"):
        validate_dataset(folder, "qa")
    rows = [json.loads(x) for x in lines]
    rows[3]["id"] = rows[0]["id"]
    _rewrite(f, rows)
    with pytest.raises(DatasetError, match=r"qa.jsonl:4: field 'id' 'qa-000000' is not unique"):
        validate_dataset(folder, "qa")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(folder / "small.png")
    rows = [json.loads(x) for x in lines]
    rows[2]["image"] = "small.png"
    _rewrite(f, rows)
    with pytest.raises(DatasetError, match=r"qa.jsonl:3: field 'image' small.png is 32x32; the file's images are 64x64"):
        validate_dataset(folder, "qa")


def _batch(world, tmp_path, break_captions=False):
    batch = tmp_path / "batch1"
    for kind in ("qa", "captions"):
        shutil.copytree(world / kind, batch / kind)
        rows = _rows(batch / kind / f"{kind}.jsonl")
        for r in rows:
            r["id"] = "user-" + r["id"]
        if break_captions and kind == "captions":
            rows[-1]["caption"] = 3
        _rewrite(batch / kind / f"{kind}.jsonl", rows)
    return batch


def test_ingest_adds_a_valid_batch(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    added = ingest_batch(_batch(world, tmp_path), data)
    assert added == {"qa": 12, "captions": 4}
    rows = _rows(data / "qa" / "qa.jsonl")
    assert len(rows) == 24 and rows[-1]["image"].startswith("batches/batch1/")
    assert validate_world(data)["qa"] == 24
    with pytest.raises(DatasetError, match="already ingested"):
        ingest_batch(_batch(world, tmp_path / "again"), data, name="batch1")


def test_a_bad_batch_ingests_nothing(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    with pytest.raises(DatasetError, match=r"captions.jsonl:4: field 'caption' must be a str"):
        ingest_batch(_batch(world, tmp_path, break_captions=True), data)
    after = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert after == before
    # ids that already exist are refused too
    batch = tmp_path / "dup"
    shutil.copytree(world / "qa", batch / "qa")
    with pytest.raises(DatasetError, match=r"qa.jsonl:1: field 'id' 'qa-000000' already exists"):
        ingest_batch(batch, data)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
