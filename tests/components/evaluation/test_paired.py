"""The paired bootstrap of a benchmark drop (components/evaluation/paired.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.evaluation import gedit_judge, paired


def _scores(rng, sizes: dict[str, int], scale: float = 10.0):
    return {f"{g}-{i}": (g, float(rng.integers(0, int(scale) + 1))) for g, n in sizes.items() for i in range(n)}


def test_macro_mean_is_gedits_average_of_category_means():
    rng = np.random.default_rng(0)
    rows, scores = [], {}
    for g, n in {"subject-add": 7, "tone_transfer": 3, "text_change": 12}.items():
        for i in range(n):
            sc, pq = int(rng.integers(0, 11)), int(rng.integers(0, 11))
            rows.append({"task_type": g, "instruction_language": "en", "intersection_exist": True,
                         "sementics_score": sc, "quality_score": pq})
            scores[f"{g}{i}"] = (g, float(np.sqrt(sc * pq)))
    assert paired.macro_mean(scores) == pytest.approx(gedit_judge.statistics(rows, "en")["O"])


def test_identical_runs_drop_nothing_with_no_spread():
    t = _scores(np.random.default_rng(1), {"a": 20, "b": 5})
    r = paired.paired_drop(t, dict(t))
    assert r == {"drop": 0.0, "lo": 0.0, "hi": 0.0, "n": 25.0}


def test_a_uniform_shift_is_the_drop_exactly():
    t = _scores(np.random.default_rng(2), {"a": 9, "b": 30, "c": 4})
    s = {k: (g, v - 0.25) for k, (g, v) in t.items()}
    r = paired.paired_drop(t, s)
    assert r["drop"] == pytest.approx(0.25) and r["lo"] == pytest.approx(0.25) and r["hi"] == pytest.approx(0.25)


def test_drop_is_the_difference_of_macro_means_and_the_interval_shrinks_with_more_items():
    rng = np.random.default_rng(3)
    widths = []
    for n in (8, 800):
        t = _scores(rng, {"a": n, "b": 3 * n})
        s = {k: (g, float(np.clip(v + rng.normal(-0.5, 2.0), 0, 10))) for k, (g, v) in t.items()}
        r = paired.paired_drop(t, s, n_boot=1000)
        assert r["drop"] == pytest.approx(paired.macro_mean(t) - paired.macro_mean(s))
        assert r["lo"] < r["drop"] < r["hi"]
        widths.append(r["hi"] - r["lo"])
    assert widths[1] < widths[0] / 4  # ~sqrt(100) = 10x narrower, allowing for bootstrap noise


def test_pairing_removes_what_both_models_share():
    """Items that differ a lot from each other but equally for both models: the paired interval is
    that of the small per-item differences, far narrower than the spread of the scores."""
    rng = np.random.default_rng(4)
    t = {f"k{i}": ("g", float(rng.uniform(0, 10))) for i in range(200)}
    s = {k: (g, v - 0.1 + float(rng.normal(0, 0.05))) for k, (g, v) in t.items()}
    r = paired.paired_drop(t, s)
    assert 0.08 < r["lo"] < r["hi"] < 0.12


def test_different_item_sets_or_groups_are_refused():
    t = {"a": ("g", 1.0), "b": ("g", 2.0)}
    with pytest.raises(ValueError, match="1 only in the teacher's"):
        paired.paired_drop(t, {"a": ("g", 1.0)})
    with pytest.raises(ValueError, match="group 'g' for the teacher and 'h'"):
        paired.paired_drop(t, {"a": ("g", 1.0), "b": ("h", 2.0)})
    with pytest.raises(ValueError, match="no items"):
        paired.paired_drop({}, {})


def test_readers_of_the_evaluation_files(tmp_path):
    lines = [{"filename": "00000/samples/0000.png", "tag": "colors", "correct": True},
             {"filename": "00000/samples/0001.png", "tag": "colors", "correct": False},
             {"filename": "00001/samples/0000.png", "tag": "counting", "correct": True}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    g = paired.geneval_scores(tmp_path / "results.jsonl")
    assert g == {"00000/samples/0000.png": ("colors", 1.0), "00000/samples/0001.png": ("colors", 0.0),
                 "00001/samples/0000.png": ("counting", 1.0)}
    assert paired.macro_mean(g) == pytest.approx(0.75)
    (tmp_path / "gedit.csv").write_text(
        "task_type,key,instruction_language,instruction,SC,PQ,O\n"
        'tone_transfer,k1,en,"Make it darker, please.",4,9,6.0000\n'
        'tone_transfer,k1,cn,"调暗",1,4,2.0000\n'
        'subject-add,k2,en,"Add a red circle.",0,7,0.0000\n', encoding="utf-8")
    assert paired.gedit_scores(tmp_path / "gedit.csv", "en") == {"k1": ("tone_transfer", 6.0),
                                                                 "k2": ("subject-add", 0.0)}
    assert paired.gedit_scores(tmp_path / "gedit.csv", "cn", "SC") == {"k1": ("tone_transfer", 1.0)}
