"""GenEval-shapes: the anchor's rules pinned on hand-made inputs, then the acceptance numbers of
the shapes_cv detector (oracle renders, controlled corruptions, noisy renders)."""

import json
import re

import numpy as np
import pytest

from components.evaluation.geneval import (GenEvalInputError, Options, evaluate, evaluate_folder, keep_detections,
                                           read_folder, relative_position, samples_per_prompt, summarize,
                                           write_folder)
from components.world.bench import REASONS, detector_accuracy, geneval_corruptions, geneval_oracle, oracle_images
from components.world.detector import ShapesDetector
from components.world.geneval_prompts import make_prompts, write_prompt_files
from components.world.palette import CLASSES


def box(cx, cy, w, h=None, score=1.0):
    h = w if h is None else h
    return (np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score]), None)


# ----------------------------------------------------------------------------- relative_position
@pytest.mark.parametrize("a, b, expected", [
    (box(10, 30, 10), box(40, 30, 10), {"left of"}),
    (box(40, 30, 10), box(10, 30, 10), {"right of"}),
    (box(30, 5, 10), box(30, 40, 10), {"above"}),          # image y grows downward
    (box(30, 40, 10), box(30, 5, 10), {"below"}),
    (box(30, 30, 10), box(32, 30, 10), set()),              # offset 2 <= margin 0.1 * (10 + 10)
    (box(30, 30, 10), box(32.5, 30, 10), set()),            # revised 0.5 / 2.5 = 0.2: too weak
    (box(30, 30, 10), box(30, 30, 20), set()),              # same centre: no relation
    (box(10, 10, 10), box(40, 40, 10), {"left of", "above"}),   # clear diagonal: both
    (box(10, 20, 10), box(40, 36, 10), {"left of"}),        # mostly horizontal: dy = 14/34 < 0.5
])
def test_relative_position_edge_cases(a, b, expected):
    assert relative_position(a, b) == expected


def test_relative_position_margin_scales_with_box_sizes():
    a, b = box(10, 30, 4), box(16, 30, 4)  # offset 6, margin 0.1 * 8 = 0.8 -> revised 5.2 / 6
    assert relative_position(a, b) == {"left of"}
    assert relative_position(a, b, threshold=0.7) == set()  # margin 5.6: revised 0.4 / 6 < 0.5
    big_a, big_b = box(10, 30, 30), box(16, 30, 30)  # same offset, margin 6: nothing left
    assert relative_position(big_a, big_b) == set()


# ----------------------------------------------------------------------------- evaluate() and reasons
def colours_of(mapping):
    return lambda image, objs, cls: [mapping[(cls, i)] for i in range(len(objs))]


def test_evaluate_reasons_match_genevals_wording():
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    assert evaluate(None, {"circle": [box(10, 10, 8)]}, meta, None) == (False, "expected circle>=2, found 1")
    three = {"circle": [box(10, 10, 8), box(30, 10, 8), box(50, 10, 8)]}
    assert evaluate(None, three, meta, None) == (False, "expected circle<3, found 3")
    assert evaluate(None, {"circle": three["circle"][:2]}, meta, None) == (True, "")

    meta = {"tag": "colors", "include": [{"class": "star", "count": 1, "color": "red"}]}
    ok, reason = evaluate(None, {"star": [box(10, 10, 8)]}, meta, colours_of({("star", 0): "blue"}))
    assert not ok and reason == "expected red star>=1, found 0 red; and 1 blue"

    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "star", "count": 1, "position": ["left of", 0]}]}
    objs = {"square": [box(10, 30, 8)], "star": [box(40, 30, 8)]}
    assert evaluate(None, objs, meta, None) == (False, "expected star left of target, found right of target")
    assert evaluate(None, {"star": [box(40, 30, 8)]}, meta, None) == (
        False, "expected square>=1, found 0\nno target for star to be left of")
    objs = {"square": [box(40, 30, 8)], "star": [box(10, 30, 8)]}
    assert evaluate(None, objs, meta, None) == (True, "")


def test_colour_and_position_look_only_at_the_top_count_objects():
    meta = {"tag": "colors", "include": [{"class": "star", "count": 1, "color": "red"}]}
    objs = {"star": [box(10, 10, 8, score=0.9), box(40, 40, 8, score=0.8)]}
    colours = colours_of({("star", 0): "red", ("star", 1): "blue"})
    assert evaluate(None, objs, meta, colours) == (True, "")
    by_score = lambda image, found, cls: ["red" if o[0][4] > 0.85 else "blue" for o in found]  # noqa: E731
    assert evaluate(None, objs, meta, by_score) == (True, "")
    assert evaluate(None, {"star": objs["star"][::-1]}, meta, by_score)[0] is False  # the blue one ranks first
    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "star", "count": 1, "position": ["left of", 0]}]}
    square = [box(30, 30, 8, score=0.9), box(2, 30, 8, score=0.5)]  # a weaker square left of every star
    stars = [box(5, 30, 8, score=0.9), box(55, 30, 8, score=0.8)]  # only the first is left of the top square
    assert evaluate(None, {"square": square, "star": stars}, meta, None) == (True, "")
    assert evaluate(None, {"square": square, "star": stars[::-1]}, meta, None) == (
        False, "expected star left of target, found right of target")


def test_thresholds_strictly_above_and_counting_uses_0_9():
    raw = {"circle": [box(10, 10, 8, score=0.85), box(30, 10, 8, score=0.3), box(50, 10, 8, score=0.95)]}
    kept = keep_detections(raw, "two_object")
    assert [float(o[0][4]) for o in kept["circle"]] == [0.95, 0.85]  # 0.3 is not above 0.3
    assert [float(o[0][4]) for o in keep_detections(raw, "counting")["circle"]] == [0.95]
    many = {"circle": [box(i, 10, 2, score=0.5 + i / 100) for i in range(20)]}
    assert len(keep_detections(many, "single_object")["circle"]) == Options.max_objects == 16


# ----------------------------------------------------------------------------- aggregation
def test_summary_is_image_level_per_task_and_macro_over_tasks():
    rows = []
    for i, ok in enumerate([True, False, False, False]):  # one prompt, 4 images: 0.25
        rows.append({"tag": "counting", "correct": ok, "metadata": json.dumps({"p": 0})})
    for p in range(3):  # three prompts, 1 image each: 1.0
        rows.append({"tag": "colors", "correct": True, "metadata": json.dumps({"p": 10 + p})})
    for p, ok in enumerate([False, False, True, True, False, False]):  # 3 prompts x 2 images: 1/3
        rows.append({"tag": "position", "correct": ok, "metadata": json.dumps({"p": 20 + p // 2})})
    s = summarize(rows)
    assert s["tags"] == {"counting": 0.25, "colors": 1.0, "position": pytest.approx(1 / 3)}
    assert s["overall"] == pytest.approx((0.25 + 1.0 + 1 / 3) / 3)  # not the image mean 6/13
    assert s["correct_images"] == pytest.approx(6 / 13)
    assert s["n_prompts"] == 7 and s["correct_prompts"] == pytest.approx(5 / 7)  # any correct image
    assert s["detector"] == "shapes_cv"


# ----------------------------------------------------------------------------- prompt files
def test_prompts_follow_genevals_schema_and_wording(tmp_path):
    rows = make_prompts()
    tags = [r["tag"] for r in rows]
    assert tags == sorted(tags, key=["single_object", "two_object", "counting", "colors", "position",
                                     "color_attr"].index)
    assert [r["prompt"] for r in rows if r["tag"] == "single_object"] == [f"a photo of a {c}" for c in CLASSES]
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)  # de-duplicated
    for r in rows:
        assert set(r) <= {"tag", "include", "exclude", "prompt"} and r["prompt"].startswith("a photo of ")
        if r["tag"] == "counting":
            (inc,), (exc,) = r["include"], r["exclude"]
            assert 2 <= inc["count"] <= 4 and exc == {"class": inc["class"], "count": inc["count"] + 1}
        if r["tag"] == "position":
            b, a = r["include"]
            assert a["position"][1] == 0 and r["prompt"] == f"a photo of a {a['class']} {a['position'][0]} a {b['class']}"
    for r in rows:
        if r["tag"] == "counting":
            cls = r["include"][0]["class"]
            assert r["prompt"].endswith(" " + (cls + "es" if cls.endswith("s") else cls + "s"))
    assert any(r["prompt"].endswith(" crosses") for r in rows)
    assert any(re.search(r"\ban orange\b", r["prompt"]) for r in rows)
    assert make_prompts(seed=1) != rows and make_prompts() == rows
    write_prompt_files(rows, tmp_path)
    assert (tmp_path / "generation_prompts.txt").read_text().splitlines() == [r["prompt"] for r in rows]
    assert [json.loads(x) for x in (tmp_path / "evaluation_metadata.jsonl").read_text().splitlines()] == rows


# ----------------------------------------------------------------------------- acceptance
def test_oracle_renders_score_at_least_0_99_on_every_task():
    s = geneval_oracle(n_samples=4)  # every prompt, 4 samples each, as GenEval
    assert set(s["tags"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert all(acc >= 0.99 for acc in s["tags"].values()), s["tags"]
    assert s["n_images"] == 4 * len(make_prompts())


def test_controlled_corruptions_fail_the_intended_task_with_genevals_reason():
    out = geneval_corruptions(n_samples=1)
    for kind, r in out.items():
        assert r["n"] >= 18, kind
        assert r["fail_rate"] >= 0.95 and r["reason_rate"] >= 0.95, (kind, r)
    assert REASONS["wrong_colour"].fullmatch("expected red star>=1, found 0 red; and 1 blue")


def test_detector_accuracy_on_noisy_blurred_renders():
    r = detector_accuracy(n_scenes=200, seed=3)  # σ 8/255 noise, σ 0.7 px blur
    assert r["shape_acc"] >= 0.97 and r["colour_acc"] >= 0.97 and r["count_acc"] >= 0.97, r


def test_detector_returns_genevals_structure_and_rejects_noise():
    rows = make_prompts()[:3]
    img = oracle_images(rows, 1)[0][0]
    out = ShapesDetector().detect(img)
    (cls, objs), = out.items()
    assert cls == rows[0]["include"][0]["class"]
    bbox, mask = objs[0]
    assert bbox.shape == (5,) and 0.9 < bbox[4] <= 1.0 and mask.shape == (64, 64) and mask.dtype == bool
    rng = np.random.default_rng(0)
    noise = np.clip(150 + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert all(float(b[4]) <= 0.3 for objs in ShapesDetector().detect(noise).values() for b, _ in objs)


# ----------------------------------------------------------------------------- folder layout
def test_folder_layout_round_trip(tmp_path):
    rows = make_prompts()[::40]
    imgs = oracle_images(rows, 2)
    imgs[1][1] = np.full((64, 64, 3), 150, dtype=np.uint8)  # a blank sample fails
    write_folder(rows, imgs, tmp_path / "imgs")
    assert (tmp_path / "imgs" / "00001" / "samples" / "0001.png").exists()
    s = evaluate_folder(tmp_path / "imgs", tmp_path / "out")
    results = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 * len(rows)
    assert set(results[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert isinstance(results[0]["metadata"], str) and json.loads(results[0]["metadata"]) == rows[0]
    assert [r["correct"] for r in results].count(False) == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["detector"] == "shapes_cv"
    assert s["n_images"] == len(results)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(GenEvalInputError, match="no such directory"):
        read_folder(tmp_path / "missing")
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    with pytest.raises(GenEvalInputError, match=r"00000/metadata.jsonl: missing"):
        read_folder(tmp_path)
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"tag": "colors", "prompt": "x", "include": [{"class": 3}]}')
    with pytest.raises(GenEvalInputError, match=r"metadata.jsonl: field 'include\[0\].class' must be a str"):
        read_folder(tmp_path)


# ----------------------------------------------------------------------------- images per prompt
def test_a_task_with_few_prompts_samples_each_of_them_more():
    rows = [{"tag": "single_object"}] * 6 + [{"tag": "counting"}] * 18 + [{"tag": "color_attr"}] * 99
    counts = samples_per_prompt(rows, 4, 200)
    assert counts[:6] == [34] * 6 and counts[6:24] == [12] * 18 and counts[24:] == [4] * 99
    per_task = {tag: sum(n for r, n in zip(rows, counts) if r["tag"] == tag) for tag in ("single_object", "counting")}
    assert per_task == {"single_object": 204, "counting": 216}  # at least 200, the fewest whole samples
    assert samples_per_prompt(rows, 4) == [4] * len(rows)  # 0: GenEval's own protocol
    assert samples_per_prompt(rows, 1, 3)[:6] == [1] * 6 and samples_per_prompt(rows, 5, 3)[0] == 5
    with pytest.raises(ValueError, match="min_task_images"):
        samples_per_prompt(rows, 4, -1)
