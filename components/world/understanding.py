"""Understanding data from the scene graph: questions with exact answers, and detailed captions.

Question kinds (:data:`QUESTION_KINDS`), worded in the world's closed English vocabulary:

- ``count``: "how many circles are there?" / "how many red shapes are there?" -> "two"
- ``colour``: "what colour is the circle?" (a class that occurs once) -> "red"
- ``shape``: "what shape is the red object?" (a colour that occurs once) -> "circle"
- ``position``: "where is the circle relative to the square?" -> "left of" (asked only when
  exactly one of GenEval's relations holds, with room to spare, between two objects its words name
  unambiguously: two red circles are never "the red circle")
- ``existence``: "is there a blue star?" -> "yes" / "no" (balanced)

Captions are several sentences: how many shapes on which background, then one sentence per
object (size, colour, class, region of the canvas), then the clear relations between neighbours.
"""

from __future__ import annotations

import re

import numpy as np

from components.evaluation.geneval import relative_position
from components.world.palette import BACKGROUND_NAME, CLASSES, COLOUR_NAMES, DIGIT
from components.world.prompts import NUMBERS, article, needs_colour, plural
from components.world.render import Obj, Scene

QUESTION_KINDS = ("count", "colour", "shape", "position", "existence")


def _name(o: Obj, scene: Scene) -> str:
    """"circle" when the class is unique in the scene, else "red circle"."""
    return f"{o.colour} {o.cls}" if needs_colour(o, scene) else o.cls


def clear_relation(a: Obj, b: Obj) -> str | None:
    """The one GenEval relation of a to b at margin 0.1 that also holds at margin 0.25, else None."""
    rels = relative_position(a.box(), b.box(), 0.1)
    if len(rels) != 1:
        return None
    rel = next(iter(rels))
    return rel if rel in relative_position(a.box(), b.box(), 0.25) else None


def _count(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    objs = scene.objects
    pick = rng.integers(3)
    if pick == 0 or not objs:
        return "how many shapes are there?", NUMBERS[len(objs)]
    if pick == 1:
        cls = CLASSES[rng.integers(len(CLASSES))] if rng.random() < 0.3 else objs[rng.integers(len(objs))].cls
        return f"how many {plural(cls)} are there?", NUMBERS[sum(o.cls == cls for o in objs)]
    colour = objs[rng.integers(len(objs))].colour
    return f"how many {colour} shapes are there?", NUMBERS[sum(o.colour == colour for o in objs)]


def _colour(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    unique = [o for o in scene.objects if not needs_colour(o, scene)]
    if not unique:
        return None
    o = unique[rng.integers(len(unique))]
    return f"what colour is the {o.cls}?", o.colour


def _shape(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    unique = [o for o in scene.objects if sum(p.colour == o.colour for p in scene.objects) == 1]
    if not unique:
        return None
    o = unique[rng.integers(len(unique))]
    return f"what shape is the {o.colour} object?", o.cls


def _position(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    names = [_name(o, scene) for o in scene.objects]
    objs = [o for o, n in zip(scene.objects, names) if names.count(n) == 1]  # "the red circle" names one object
    pairs = [(a, b, r) for i, a in enumerate(objs) for j, b in enumerate(objs)
             if i != j and (r := clear_relation(a, b)) is not None]
    if not pairs:
        return None
    a, b, rel = pairs[rng.integers(len(pairs))]
    return f"where is the {_name(a, scene)} relative to the {_name(b, scene)}?", rel


def _existence(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    present = {(o.colour, o.cls) for o in scene.objects}
    if present and rng.random() < 0.5:
        colour, cls = sorted(present)[rng.integers(len(present))]
        return f"is there {article(colour)} {colour} {cls}?", "yes"
    absent = [(c, k) for c in COLOUR_NAMES for k in CLASSES if (c, k) not in present]
    # half of the negatives are near misses: a present class in another colour
    near = [(c, k) for c, k in absent if any(o.cls == k for o in scene.objects)]
    pool = near if near and rng.random() < 0.5 else absent
    colour, cls = pool[rng.integers(len(pool))]
    return f"is there {article(colour)} {colour} {cls}?", "no"


# how each kind's question begins (the templates above); captions and other prompts have no kind
_OPENINGS = (("how many ", "count"), ("what colour is the ", "colour"), ("what shape is the ", "shape"),
             ("where is the ", "position"), ("is there ", "existence"))


def question_kind(question: str) -> str | None:
    """The kind of a question worded as :func:`ask` words it (``"where is the ..."`` -> ``"position"``),
    None for anything else (a caption prompt, a user's own question)."""
    q = question.strip().lower()
    return next((kind for opening, kind in _OPENINGS if q.startswith(opening)), None)


# the questions that name objects, and the parts of each that are names
_NAMING = (re.compile(r"(what colour is the (?P<a>[a-z ]+?))\?$"), re.compile(r"(what shape is the (?P<a>[a-z ]+?))\?$"),
           re.compile(r"(where is the (?P<a>[a-z ]+?)) relative to the (?P<b>[a-z ]+?)\?$"))


def _named(name: str, scene: Scene) -> Obj | None:
    """The one object ``name`` names: a class ("circle"), a colour with "object" ("red object"), or a
    colour and a class ("red circle"); None when no object or several fit."""
    words = name.split()
    if len(words) == 2 and words[1] == "object":
        fits = [o for o in scene.objects if o.colour == words[0]]
    elif len(words) == 2:
        fits = [o for o in scene.objects if (o.colour, o.cls) == (words[0], words[1])]
    else:
        fits = [o for o in scene.objects if o.cls == name]
    return fits[0] if len(fits) == 1 else None


def referents(question: str, scene: Scene) -> list[tuple[str, Obj]]:
    """The objects a question worded as :func:`ask` words it names, each with the question's text up
    to and including its name: "where is the circle relative to the red square?" ->
    ``[("where is the circle", circle), ("where is the circle relative to the red square", square)]``.
    Empty for questions that name no single object (count, existence, captions) or whose names the
    scene does not resolve to one object each."""
    q = question.strip().lower()
    for pattern in _NAMING:
        m = pattern.match(q)
        if m is None:
            continue
        out = []
        for group in ("a", "b"):
            if group not in pattern.groupindex:
                continue
            obj = _named(m.group(group), scene)
            if obj is None:
                return []
            out.append((q[:m.end(group)], obj))
        return out
    return []


# the questions that ask how many objects fit a description, and the part of each that is the description
_COUNTING = (re.compile(r"(how many (?P<d>[a-z ]+?)) are there\?$"), re.compile(r"(is there an? (?P<d>[a-z ]+?))\?$"))


def counted(question: str, scene: Scene) -> tuple[str, int] | None:
    """For a count or existence question worded as :func:`ask` words it, the question's text up to and
    including its description and how many of the scene's objects fit it: "how many red shapes are
    there?" -> ``("how many red shapes", 2)``, "is there a blue star?" -> ``("is there a blue star", 0)``;
    None for other questions or descriptions the world's words do not make."""
    q = question.strip().lower()
    for pattern in _COUNTING:
        m = pattern.match(q)
        if m is None:
            continue
        words = m.group("d").split()
        if words == ["shapes"]:
            fits = list(scene.objects)
        elif len(words) == 2 and words[1] == "shapes" and words[0] in COLOUR_NAMES:
            fits = [o for o in scene.objects if o.colour == words[0]]
        elif len(words) == 1 and (cls := _singular(words[0])) is not None:
            fits = [o for o in scene.objects if o.cls == cls]
        elif len(words) == 2 and words[0] in COLOUR_NAMES and words[1] in CLASSES:
            fits = [o for o in scene.objects if (o.colour, o.cls) == (words[0], words[1])]
        else:
            return None
        return q[:m.end("d")], len(fits)
    return None


def _singular(word: str) -> str | None:
    return next((c for c in CLASSES if word in (c, plural(c))), None)


_ASK = {"count": _count, "colour": _colour, "shape": _shape, "position": _position, "existence": _existence}


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of ``kind`` about the scene, or None when the kind does not apply."""
    if kind not in _ASK:
        raise ValueError(f"unknown question kind {kind!r}; kinds: {', '.join(QUESTION_KINDS)}")
    if any(o.cls == DIGIT for o in scene.objects):
        raise ValueError("questions are asked about shape scenes only (no digit glyphs)")
    return _ASK[kind](scene, rng)


def questions(scene: Scene, rng: np.random.Generator, k: int = 3) -> list[tuple[str, str, str]]:
    """Up to ``k`` (kind, question, answer) of distinct kinds, in random kind order."""
    out = []
    for i in rng.permutation(len(QUESTION_KINDS)):
        kind = QUESTION_KINDS[int(i)]
        qa = ask(scene, kind, rng)
        if qa is not None:
            out.append((kind, *qa))
        if len(out) == k:
            break
    return out


# ----------------------------------------------------------------------------- captions
def region(o: Obj, n: int) -> str:
    """Where the object's centre lies on a 3 x 3 grid of the canvas."""
    col = ("left", "", "right")[min(2, int(3 * o.cx / n))]
    row = ("top", "", "bottom")[min(2, int(3 * o.cy / n))]
    return " ".join(filter(None, [row, col])) or "centre"


def size_word(o: Obj, n: int) -> str:
    f = o.size / n
    return "small " if f < 0.2 else "large " if f > 0.26 else ""


def caption(scene: Scene) -> str:
    """Several sentences describing every object, its place and the clear relations."""
    objs, n = scene.objects, scene.size
    bg = scene.background if scene.background != BACKGROUND_NAME else "grey"
    if not objs:
        return f"there are no shapes on the {bg} background."
    k = len(objs)
    sentences = [f"there {'is' if k == 1 else 'are'} {NUMBERS[k]} {'shape' if k == 1 else 'shapes'} "
                 f"on a {bg} background."]
    for o in objs:
        det = "a" if needs_colour(o, scene) else "the"
        where = "in the centre" if region(o, n) == "centre" else f"at the {region(o, n)}"
        sentences.append(f"{det} {size_word(o, n)}{o.colour} {o.cls} is {where}.")
    for a, b in zip(objs, objs[1:]):
        rel = clear_relation(a, b)
        if rel is not None and not needs_colour(a, scene) and not needs_colour(b, scene):
            sentences.append(f"the {a.colour} {a.cls} is {rel} the {b.colour} {b.cls}.")
    return " ".join(sentences)
