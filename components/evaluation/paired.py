"""How sure a benchmark drop is: a paired bootstrap over the items two models were scored on.

GenEval's overall and GEdit's O are macro averages: per group (GenEval's task tag, GEdit's
category) the mean of the items' scores, then the unweighted mean over the groups. When a teacher
and its student are scored on the same items (same prompts, same edits, same sampling seeds), the
drop ``teacher - student`` of that macro average has sampling noise from the finite item set; this
module gives the drop and a percentile interval of it by resampling the items within each group,
with replacement, keeping each item's two scores together (the pairing removes the noise both
models share, e.g. an edit both fail).

Readers: ``hyperbagel bench --section distill6`` (the gate's drops with their 95 % intervals) and
:func:`geneval_scores` / :func:`gedit_scores` which read the evaluation stages' per-item files.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

Scores = dict[str, tuple[str, float]]  # item key -> (group, score)


def macro_mean(scores: Scores) -> float:
    """Mean per group, then the unweighted mean over the groups (GenEval overall, GEdit O)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for group, value in scores.values():
        groups[group].append(value)
    return float(np.mean([np.mean(v) for v in groups.values()])) if groups else math.nan


def paired_drop(teacher: Scores, student: Scores, n_boot: int = 2000, level: float = 0.95, seed: int = 0
                ) -> dict[str, float]:
    """``{"drop", "lo", "hi", "n"}``: ``macro_mean(teacher) - macro_mean(student)`` and its
    ``level`` percentile interval over ``n_boot`` paired resamples of the items within each group.

    Both must hold the same item keys with the same groups (the same benchmark run twice)."""
    if set(teacher) != set(student):
        only_t, only_s = sorted(set(teacher) - set(student)), sorted(set(student) - set(teacher))
        raise ValueError(f"the two score sets hold different items ({len(only_t)} only in the teacher's, "
                         f"{len(only_s)} only in the student's; e.g. {(only_t or only_s)[:3]}): "
                         "compare runs of the same benchmark settings")
    if not teacher:
        raise ValueError("no items to compare")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    by_group: dict[str, list[float]] = defaultdict(list)
    for key, (group, t) in teacher.items():
        g2, s = student[key]
        if g2 != group:
            raise ValueError(f"item {key!r} is in group {group!r} for the teacher and {g2!r} for the student")
        by_group[group].append(t - s)
    diffs = [np.asarray(v, dtype=np.float64) for v in by_group.values()]
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for d in diffs:  # the macro mean of the differences = the difference of the macro means
        boot += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    boot /= len(diffs)
    a = (1 - level) / 2
    return {"drop": float(np.mean([d.mean() for d in diffs])), "lo": float(np.quantile(boot, a)),
            "hi": float(np.quantile(boot, 1 - a)), "n": float(sum(len(d) for d in diffs))}


def geneval_scores(results_jsonl: Path) -> Scores:
    """Per image of a GenEval folder's ``results.jsonl``: (task tag, 1.0 if correct else 0.0), keyed
    by the image's file name (prompt index and sample index)."""
    out: Scores = {}
    with open(results_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["filename"]] = (r["tag"], 1.0 if r["correct"] else 0.0)
    return out


def gedit_scores(gedit_csv: Path, language: str, metric: str = "O") -> Scores:
    """Per edit of an evaluation's ``gedit.csv`` in ``language``: (category, ``metric``), keyed by the
    edit's key."""
    out: Scores = {}
    with open(gedit_csv, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["instruction_language"] == language:
                out[r["key"]] = (r["task_type"], float(r[metric]))
    return out
