"""GenEval-shapes prompts in GenEval's exact schema, their oracle scenes and controlled corruptions.

The sampling follows GenEval's ``prompts/create_prompts.py`` (re-implemented; seed 43 and 100 draws
per task by default): ``single_object`` names every class once; ``two_object`` two distinct
classes; ``counting`` n in 2..4 with an exclude clause at n+1; ``colors`` a class and a colour;
``position`` "A <rel> B" with B first in ``include``; ``color_attr`` two distinct classes with two
distinct colours. Wording "a photo of ...", GenEval's articles and plurals; duplicates dropped.
Unlike GenEval, any class may be coloured (the shapes world has no "person").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.evaluation.geneval import TAGS, relative_position
from components.world.palette import CLASSES, COLOUR_NAMES
from components.world.prompts import NUMBERS, OPPOSITE, RELATIONS, article, plural
from components.world.render import Obj, Scene, Spec, place

CORRUPTIONS = ("wrong_colour", "count_off", "swapped_relation", "missing_object", "wrong_shape")


def _a(word: str) -> str:
    return f"{article(word)} {word}"


def _pick(rng: np.random.Generator, items, k: int) -> list:
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def sample(tag: str, rng: np.random.Generator, classes=CLASSES, colours=COLOUR_NAMES, max_count: int = 4) -> dict:
    """One metadata object of ``tag`` (``single_object`` is drawn at random here; the benchmark
    file lists every class instead)."""
    if tag == "single_object":
        c = classes[rng.integers(len(classes))]
        return {"tag": tag, "include": [{"class": c, "count": 1}], "prompt": f"a photo of {_a(c)}"}
    if tag == "two_object":
        a, b = _pick(rng, classes, 2)
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {_a(a)} and {_a(b)}"}
    if tag == "counting":
        c = classes[rng.integers(len(classes))]
        n = int(rng.integers(2, max_count + 1))
        return {"tag": tag, "include": [{"class": c, "count": n}], "exclude": [{"class": c, "count": n + 1}],
                "prompt": f"a photo of {NUMBERS[n]} {plural(c)}"}
    if tag == "colors":
        c = classes[rng.integers(len(classes))]
        col = colours[rng.integers(len(colours))]
        return {"tag": tag, "include": [{"class": c, "count": 1, "color": col}], "prompt": f"a photo of {_a(col)} {c}"}
    if tag == "position":
        a, b = _pick(rng, classes, 2)
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        return {"tag": tag, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {_a(a)} {rel} {_a(b)}"}
    if tag == "color_attr":
        a, b = _pick(rng, classes, 2)
        ca, cb = _pick(rng, colours, 2)
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                "prompt": f"a photo of {_a(ca)} {a} and {_a(cb)} {b}"}
    raise ValueError(f"unknown GenEval tag {tag!r}; tags: {', '.join(TAGS)}")


def make_prompts(classes: tuple[str, ...] = CLASSES, seed: int = 43, n: int = 100, max_count: int = 4,
                 colours: tuple[str, ...] = COLOUR_NAMES) -> list[dict]:
    """The metadata rows of every tag, de-duplicated, in GenEval's tag order."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    for tag in TAGS:
        if tag == "single_object":
            draws = [{"tag": tag, "include": [{"class": c, "count": 1}], "prompt": f"a photo of {_a(c)}"}
                     for c in classes]
        else:
            draws = [sample(tag, rng, classes, colours, max_count) for _ in range(n)]
        for d in draws:
            key = json.dumps(d, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(d)
    return rows


def write_prompt_files(rows: list[dict], out_dir: Path, classes: tuple[str, ...] = CLASSES) -> None:
    """``evaluation_metadata.jsonl``, ``generation_prompts.txt`` and ``object_names.txt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / "generation_prompts.txt").write_text("".join(r["prompt"] + "\n" for r in rows))
    (out_dir / "object_names.txt").write_text("".join(c + "\n" for c in classes))


# ----------------------------------------------------------------------------- oracle scenes
def clearly(a: Obj, b: Obj, rel: str) -> bool:
    """``rel`` holds between a and b by GenEval's rule with room to spare (margin 0.25 instead of
    0.1, and no second relation at 0.1), so a detector's box error cannot flip it."""
    return rel in relative_position(a.box(), b.box(), 0.25) and relative_position(a.box(), b.box(), 0.1) == {rel}


def oracle_scene(meta: dict, rng: np.random.Generator, size: int = 64, attempts: int = 100) -> Scene:
    """A scene that satisfies every include clause exactly (counts exact, so excludes hold too);
    unconstrained colours are random."""
    for _ in range(attempts):
        objs: list[Obj] = []
        groups: list[list[Obj]] = []
        ok = True
        for clause in meta.get("include", []):
            rel, target = clause.get("position", (None, None))
            group = []
            for _k in range(int(clause["count"])):
                colour = clause.get("color") or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
                accept = None
                if rel is not None:
                    refs = groups[target]
                    accept = lambda o, refs=refs, rel=rel: all(clearly(o, t, rel) for t in refs)  # noqa: E731
                o = place(rng, Spec(clause["class"], colour), objs, size, accept)
                if o is None:
                    ok = False
                    break
                objs.append(o)
                group.append(o)
            if not ok:
                break
            groups.append(group)
        if ok:
            return Scene(tuple(objs), size)
    raise RuntimeError(f"could not lay out {meta['prompt']!r}")


def applicable(meta: dict) -> list[str]:
    """The corruptions that can make this prompt fail."""
    inc = meta.get("include", [])
    kinds = []
    if any("color" in c for c in inc):
        kinds.append("wrong_colour")
    if meta["tag"] == "counting":
        kinds.append("count_off")
    if any("position" in c for c in inc):
        kinds.append("swapped_relation")
    kinds += ["missing_object", "wrong_shape"]
    return kinds


def corrupt_metadata(meta: dict, kind: str, rng: np.random.Generator, classes=CLASSES) -> dict:
    """The metadata of a scene that violates ``meta`` in one controlled way; rendering its oracle
    gives the corrupted image. Colour, relation and shape changes hit one random clause."""
    m = json.loads(json.dumps(meta))
    inc = m["include"]
    if kind == "wrong_colour":
        c = [c for c in inc if "color" in c][rng.integers(sum("color" in c for c in inc))]
        c["color"] = [x for x in COLOUR_NAMES if x != c["color"]][rng.integers(len(COLOUR_NAMES) - 1)]
    elif kind == "count_off":
        c = inc[0]
        c["count"] = c["count"] - 1 if (c["count"] > 1 and rng.random() < 0.5) else c["count"] + 1
    elif kind == "swapped_relation":
        c = [c for c in inc if "position" in c][0]
        c["position"] = [OPPOSITE[c["position"][0]], c["position"][1]]
    elif kind == "missing_object":
        j = int(rng.integers(len(inc)))
        del inc[j]
        for c in inc:  # a relation to the dropped clause has nothing left to hold against
            if "position" in c and c["position"][1] >= j:
                del c["position"]
    elif kind == "wrong_shape":
        c = inc[rng.integers(len(inc))]
        used = {x["class"] for x in inc}
        c["class"] = [x for x in classes if x not in used][rng.integers(len(classes) - len(used))]
    else:
        raise ValueError(f"unknown corruption {kind!r}; kinds: {', '.join(CORRUPTIONS)}")
    m["corruption"] = kind
    return m
