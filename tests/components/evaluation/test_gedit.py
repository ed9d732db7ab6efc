"""GEdit-shapes: GEdit's aggregation pinned on a hand-made CSV, the grammar, and the judge's
acceptance numbers (oracle, no-op, noise) per category and language."""

import csv
import math

import numpy as np
import pytest

from components.evaluation.gedit_judge import (CSV_COLUMNS, GEditInputError, ShapesJudge, evaluate_folder,
                                               format_statistics, read_csv, score_gedit, statistics, write_folder)
from components.world.bench import degrade
from components.world.gedit import CATEGORIES, EditError, instruction, make_samples, parse, rows_of
from components.world.render import Obj, Scene, render


# ----------------------------------------------------------------------------- aggregation
def _csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _row(task, lang, key, sc, pq, inter=True):
    return {"source_image": f"m/fullset/{task}/{lang}/{key}_SRCIMG.png",
            "edited_image": f"m/fullset/{task}/{lang}/{key}.png", "instruction": "x",
            "sementics_score": sc, "quality_score": pq, "intersection_exist": inter, "instruction_language": lang}


def test_statistics_min_sqrt_and_macro_average_on_a_hand_made_csv(tmp_path):
    p = tmp_path / "m_combined_gpt_score.csv"
    _csv(p, [_row("color_alter", "en", "a", 9, 4), _row("color_alter", "en", "b", 1, 9, inter=False),
             _row("subject-remove", "en", "c", 8, 8), _row("color_alter", "cn", "a", 4, 4)])
    rows = read_csv(p)
    s = statistics(rows, "en")
    ca = s["categories"]["color_alter"]
    assert ca["SC"] == 5.0 and ca["PQ"] == 6.5
    assert ca["O"] == pytest.approx((math.sqrt(36) + math.sqrt(9)) / 2)  # mean of per-sample O, not sqrt of means
    assert s["categories"]["subject-remove"]["O"] == pytest.approx(8.0)
    assert s["O"] == pytest.approx((4.5 + 8.0) / 2)  # unweighted over categories, not over rows (3 rows)
    assert s["SC"] == pytest.approx((5.0 + 8.0) / 2)
    inter = statistics(rows, "en", intersection_only=True)
    assert inter["categories"]["color_alter"]["O"] == pytest.approx(6.0)
    assert statistics(rows, "zh")["O"] == statistics(rows, "cn")["O"] == pytest.approx(4.0)
    assert format_statistics(s).splitlines()[-1] == "Average: 6.500, 7.250, 6.250"


def test_judge_combines_sub_scores_as_viescore():
    s = make_samples(seed=1, scale=0.01)[1]  # color_alter
    src, tgt = render(s["source"]), render(s["target"])
    v = ShapesJudge().judge(src, tgt, instruction(s["edit"], "en"))
    assert v.SC == min(v.edit_success, v.over_editing) and v.PQ == min(v.naturalness, v.artifacts)
    assert v.O == pytest.approx(math.sqrt(v.SC * v.PQ))
    assert ShapesJudge().evaluate([src, tgt], instruction(s["edit"], "cn")) == [v.SC, v.PQ, v.O]


def test_csv_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("source_image,edited_image,sementics_score\nx,y,3\n")
    with pytest.raises(GEditInputError, match=r"bad.csv:2: missing column\(s\) quality_score, instruction_language"):
        read_csv(p)


# ----------------------------------------------------------------------------- grammar
def test_every_instruction_parses_back_to_its_edit():
    samples = make_samples(seed=0)
    assert [s["task_type"] for s in samples].count("text_change") == 99 and len(samples) == 606
    for s in samples:
        for lang in ("en", "cn"):
            for variant in (0, 1):
                assert parse(instruction(s["edit"], lang, variant)) == s["edit"]
    with pytest.raises(EditError):
        parse("Paint a moustache on the circle.")


# ----------------------------------------------------------------------------- acceptance
@pytest.fixture(scope="module")
def scored():
    """Oracle, no-op and noisy edits of a quarter of GEdit-shapes (every category), both languages."""
    samples = make_samples(seed=5, scale=0.25)
    rows, srcs, tgts = [], [], []
    for k, s in enumerate(samples):
        src, tgt = render(s["source"], jitter_seed=k), render(s["target"], jitter_seed=k)
        for r in rows_of(s, "x.png"):
            rows += [r]
            srcs += [src]
            tgts += [tgt]
    rng = np.random.default_rng(0)
    judge = ShapesJudge()
    return {name: score_gedit(rows, srcs, edited, judge, return_results=True)
            for name, edited in [("oracle", tgts), ("noop", srcs),
                                 ("noise", [degrade(t, rng, 12.0, 0.0) for t in tgts])]}


def test_oracle_edits_score_at_least_9_in_every_category_and_language(scored):
    for lang in ("en", "cn"):
        cats = scored["oracle"][lang]["categories"]
        assert list(cats) == list(CATEGORIES)
        for task, c in cats.items():
            assert c["SC"] >= 9 and c["PQ"] >= 9, (lang, task, c)


def test_a_no_op_edit_scores_sc_at_most_1(scored):
    assert max(r["sementics_score"] for r in scored["noop"]["results"]) <= 1
    for lang in ("en", "cn"):
        assert scored["noop"][lang]["PQ"] >= 9  # the source is a clean image


def test_noise_lowers_pq_but_not_sc(scored):
    for lang in ("en", "cn"):
        for task in CATEGORIES:
            clean, noisy = scored["oracle"][lang]["categories"][task], scored["noise"][lang]["categories"][task]
            assert noisy["PQ"] <= clean["PQ"] - 3, (lang, task)
            assert noisy["SC"] >= clean["SC"] - 0.5, (lang, task)


def test_editing_the_wrong_object_lowers_sc():
    src_scene = Scene((Obj("circle", "red", 16, 16, 14), Obj("square", "blue", 46, 46, 14)))
    wrong = Scene((Obj("circle", "red", 16, 16, 14), Obj("square", "yellow", 46, 46, 14)))
    right = Scene((Obj("circle", "yellow", 16, 16, 14), Obj("square", "blue", 46, 46, 14)))
    j = ShapesJudge()
    good = j.judge(render(src_scene), render(right), "Make the circle yellow.")
    bad = j.judge(render(src_scene), render(wrong), "把圆形变成黄色。")
    assert good.SC == 10 and bad.edit_success == 0 and bad.over_editing < 10 and bad.SC == 0


# ----------------------------------------------------------------------------- folder layout
def test_folder_layout_and_csvs(tmp_path):
    samples = make_samples(seed=2, scale=0.01)
    rows, srcs, tgts = [], [], []
    for s in samples:
        for r in rows_of(s, "x.png"):
            rows.append(r)
            srcs.append(render(s["source"]))
            tgts.append(render(s["target"]))
    write_folder(rows[:-2], srcs[:-2], tgts[:-2], tmp_path / "mymodel")  # the last sample left out
    s = evaluate_folder(tmp_path / "mymodel", rows)
    out = tmp_path / "mymodel" / "shapes_cv" / "eval_results_new"
    combined = read_csv(out / "mymodel_combined_gpt_score.csv")
    assert list(combined[0])[:len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    assert len(combined) == len(rows) - 2 and s["missing"] == 2 and s["judge"] == "shapes_cv"
    assert (out / "mymodel_color_alter_gpt_score.csv").exists()
    assert s["en"]["SC"] >= 9 and s["cn"]["PQ"] >= 9
    with pytest.raises(GEditInputError, match="no fullset/ folder"):
        evaluate_folder(tmp_path, rows)
