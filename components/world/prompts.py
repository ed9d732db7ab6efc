"""English wording shared by every text of the world: GenEval's articles, plurals and number
words, and the short object descriptions ("the red circle") prompts and instructions use."""

from __future__ import annotations

from components.world.palette import CLASSES_CN, COLOURS_CN, DIGIT
from components.world.render import Obj, Scene

NUMBERS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
NUMBERS_CN = {0: "零", 1: "一", 2: "两", 3: "三", 4: "四", 5: "五"}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def plural(cls: str) -> str:
    """GenEval's rule: "es" after a final "s", "s" otherwise (cross -> crosses)."""
    return cls + ("es" if cls.endswith("s") else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def noun(o: Obj, colour: bool = True) -> str:
    """"red circle", "hollow blue square", "number 7" (digits are named by their value)."""
    if o.cls == DIGIT:
        return f"number {o.text}"
    return " ".join(filter(None, ["hollow" if o.style == "hollow" else "", o.colour if colour else "", o.cls]))


def noun_cn(o: Obj, colour: bool = True) -> str:
    if o.cls == DIGIT:
        return f"数字{o.text}"
    hollow = "空心的" if o.style == "hollow" else ""
    return (f"{COLOURS_CN[o.colour]}的" if colour else "") + hollow + CLASSES_CN[o.cls]


def needs_colour(o: Obj, scene: Scene) -> bool:
    """Whether "the <class>" is ambiguous in the scene, so the description must name the colour."""
    if o.cls == DIGIT:
        return False
    return sum(1 for p in scene.objects if p.cls == o.cls) > 1


def describe(scene: Scene) -> str:
    """"a photo of a red circle and two blue squares": groups of (colour, class) in order."""
    groups: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        groups[(o.colour, o.cls)] = groups.get((o.colour, o.cls), 0) + 1
    parts = []
    for (colour, cls), n in groups.items():
        parts.append(f"{article(colour)} {colour} {cls}" if n == 1 else f"{NUMBERS[n]} {colour} {plural(cls)}")
    return "a photo of " + " and ".join(parts)
