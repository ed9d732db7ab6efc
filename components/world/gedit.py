"""GEdit-shapes: GEdit-Bench's 11 ``task_type`` categories mapped onto the shapes world.

Every sample is a source scene, a structured edit (a small dict, see :data:`OPS`), its instruction
in English and Chinese (templated), and the oracle result ``apply_edit(scene, edit)``. A
deterministic grammar (:func:`parse`) maps either instruction back to the same edit, which is what
the detector judge reads: it sees only the two images and the instruction, as GEdit's VLM judge.

Targets are named by class, with the colour when the class alone is ambiguous (and sometimes even
when it is not): ``{"cls": "circle", "colour": "red" | None}``; digit glyphs by their value:
``{"cls": "digit", "text": "3"}``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace

import numpy as np

from components.evaluation.geneval import relative_position
from components.world.geneval_prompts import clearly
from components.world.palette import CLASSES, CLASSES_CN, COLOUR_NAMES, COLOURS_CN, DIGIT, HOLLOW_CLASSES
from components.world.prompts import RELATIONS, article, needs_colour
from components.world.render import DIGITS, TONES, Obj, Scene, Spec, fits, place, place_all

# GEdit's GROUPS order and per-language counts (606 per language).
CATEGORIES: dict[str, int] = {
    "background_change": 40, "color_alter": 40, "material_alter": 40, "motion_change": 40, "ps_human": 70,
    "style_change": 60, "subject-add": 60, "subject-remove": 57, "subject-replace": 60, "text_change": 99,
    "tone_transfer": 40,
}
LANGUAGES = ("en", "cn")
OPS = {  # task_type -> the op of its edits
    "background_change": "background", "color_alter": "recolour", "material_alter": "hollow",
    "motion_change": "move", "ps_human": "resize", "style_change": "outline_all", "subject-add": "add",
    "subject-remove": "remove", "subject-replace": "replace", "text_change": "retext", "tone_transfer": "tone",
}
RESIZE = {"bigger": 1.4, "smaller": 0.7}
REL_EN = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
REL_CN = {"left of": "左边", "right of": "右边", "above": "上方", "below": "下方"}
TONE_CN = {"darker": "让图片变暗。", "brighter": "让图片变亮。", "warmer": "让图片的色调变暖。", "cooler": "让图片的色调变冷。"}
STYLE_EN = ("Draw everything as outlines.", "Turn every shape into an outline.")
STYLE_CN = ("把所有图形都画成轮廓。", "把每个图形都变成空心的。")


class EditError(ValueError):
    """An instruction the grammar does not know, or an edit that cannot apply to the scene."""


# ----------------------------------------------------------------------------- wording
def target_of(o: Obj, scene: Scene, rng: np.random.Generator | None = None) -> dict:
    """How an instruction names ``o``: class, plus colour when needed (or at random otherwise)."""
    if o.cls == DIGIT:
        return {"cls": DIGIT, "text": o.text}
    with_colour = needs_colour(o, scene) or (rng is not None and rng.random() < 0.5)
    return {"cls": o.cls, "colour": o.colour if with_colour else None}


def _t_en(t: dict) -> str:
    if t["cls"] == DIGIT:
        return f"number {t['text']}"
    return f"{t['colour']} {t['cls']}" if t.get("colour") else t["cls"]


def _t_cn(t: dict) -> str:
    if t["cls"] == DIGIT:
        return f"数字{t['text']}"
    return (f"{COLOURS_CN[t['colour']]}的" if t.get("colour") else "") + CLASSES_CN[t["cls"]]


def instruction(edit: dict, lang: str, variant: int = 0) -> str:
    """The edit's instruction in ``en`` or ``cn``; ``variant`` picks among a category's phrasings."""
    op = edit["op"]
    if lang == "en":
        if op == "background":
            return f"Change the background to {edit['colour']}."
        if op == "recolour":
            return f"Make the {_t_en(edit['target'])} {edit['colour']}."
        if op == "hollow":
            return f"Make the {_t_en(edit['target'])} hollow."
        if op == "move":
            return f"Move the {_t_en(edit['target'])} {REL_EN[edit['relation']]} the {_t_en(edit['reference'])}."
        if op == "resize":
            return f"Make the {_t_en(edit['target'])} {edit['direction']}."
        if op == "outline_all":
            return STYLE_EN[variant % len(STYLE_EN)]
        if op == "add":
            o = edit["object"]
            return (f"Add {article(o['colour'])} {o['colour']} {o['cls']} {REL_EN[edit['relation']]} "
                    f"the {_t_en(edit['reference'])}.")
        if op == "remove":
            return f"Remove the {_t_en(edit['target'])}."
        if op == "replace":
            return f"Replace the {_t_en(edit['target'])} with {article(edit['cls'])} {edit['cls']}."
        if op == "retext":
            return f"Change the number {edit['target']['text']} to {edit['text']}."
        if op == "tone":
            return f"Make the image {edit['tone']}."
    elif lang == "cn":
        if op == "background":
            return f"把背景改成{COLOURS_CN[edit['colour']]}。"
        if op == "recolour":
            return f"把{_t_cn(edit['target'])}变成{COLOURS_CN[edit['colour']]}。"
        if op == "hollow":
            return f"把{_t_cn(edit['target'])}变成空心的。"
        if op == "move":
            return f"把{_t_cn(edit['target'])}移到{_t_cn(edit['reference'])}的{REL_CN[edit['relation']]}。"
        if op == "resize":
            return f"把{_t_cn(edit['target'])}变{'大' if edit['direction'] == 'bigger' else '小'}。"
        if op == "outline_all":
            return STYLE_CN[variant % len(STYLE_CN)]
        if op == "add":
            o = edit["object"]
            return (f"在{_t_cn(edit['reference'])}的{REL_CN[edit['relation']]}添加一个"
                    f"{COLOURS_CN[o['colour']]}的{CLASSES_CN[o['cls']]}。")
        if op == "remove":
            return f"删除{_t_cn(edit['target'])}。"
        if op == "replace":
            return f"把{_t_cn(edit['target'])}换成{CLASSES_CN[edit['cls']]}。"
        if op == "retext":
            return f"把数字{edit['target']['text']}改成{edit['text']}。"
        if op == "tone":
            return TONE_CN[edit["tone"]]
    raise EditError(f"cannot word op {op!r} in language {lang!r}")


# ----------------------------------------------------------------------------- parsing
_C = "|".join(COLOUR_NAMES)
_K = "|".join(CLASSES)
_D = "|".join(DIGITS)
_T = rf"(?:number (?P<{{p}}d>{_D})|(?:(?P<{{p}}c>{_C}) )?(?P<{{p}}k>{_K}))"
_CC = "|".join(COLOURS_CN[c] for c in COLOUR_NAMES)
_KC = "|".join(CLASSES_CN[c] for c in CLASSES)
_TC = rf"(?:数字(?P<{{p}}d>{_D})|(?:(?P<{{p}}c>{_CC})的)?(?P<{{p}}k>{_KC}))"
_EN_COLOUR = {c: c for c in COLOUR_NAMES}
_CN_COLOUR = {COLOURS_CN[c]: c for c in COLOUR_NAMES}
_CN_CLASS = {v: k for k, v in CLASSES_CN.items()}
_REL_EN = {v: k for k, v in REL_EN.items()}
_REL_CN = {v: k for k, v in REL_CN.items()}
_TONE_CN = {v: k for k, v in TONE_CN.items()}


def _t(p: str, lang: str) -> str:
    return (_T if lang == "en" else _TC).replace("{p}", p)


_GRAMMAR = {  # (language, pattern, op); targets are named groups t*/r*
    "en": [
        (rf"change the background to (?P<colour>{_C})\.", "background"),
        (r"make the image (?P<tone>darker|brighter|warmer|cooler)\.", "tone"),
        (rf"make the {_t('t', 'en')} hollow\.", "hollow"),
        (rf"make the {_t('t', 'en')} (?P<direction>bigger|smaller)\.", "resize"),
        (rf"make the {_t('t', 'en')} (?P<colour>{_C})\.", "recolour"),
        (rf"move the {_t('t', 'en')} (?P<rel>to the left of|to the right of|above|below) the {_t('r', 'en')}\.",
         "move"),
        (r"(?:draw everything as outlines|turn every shape into an outline)\.", "outline_all"),
        (rf"add an? (?P<colour>{_C}) (?P<cls>{_K}) (?P<rel>to the left of|to the right of|above|below) "
         rf"the {_t('r', 'en')}\.", "add"),
        (rf"remove the {_t('t', 'en')}\.", "remove"),
        (rf"replace the {_t('t', 'en')} with an? (?P<cls>{_K})\.", "replace"),
        (rf"change the number (?P<td>{_D}) to (?P<text>{_D})\.", "retext"),
    ],
    "cn": [
        (rf"把背景改成(?P<colour>{_CC})。", "background"),
        (rf"(?P<tone>{'|'.join(TONE_CN.values())})", "tone"),
        (rf"把{_t('t', 'cn')}变成空心的。", "hollow"),
        (rf"把{_t('t', 'cn')}变(?P<direction>大|小)。", "resize"),
        (rf"把{_t('t', 'cn')}变成(?P<colour>{_CC})。", "recolour"),
        (rf"把{_t('t', 'cn')}移到{_t('r', 'cn')}的(?P<rel>{'|'.join(REL_CN.values())})。", "move"),
        (rf"(?:{'|'.join(STYLE_CN)})", "outline_all"),
        (rf"在{_t('r', 'cn')}的(?P<rel>{'|'.join(REL_CN.values())})添加一个(?P<colour>{_CC})的(?P<cls>{_KC})。", "add"),
        (rf"删除{_t('t', 'cn')}。", "remove"),
        (rf"把{_t('t', 'cn')}换成(?P<cls>{_KC})。", "replace"),
        (rf"把数字(?P<td>{_D})改成(?P<text>{_D})。", "retext"),
    ],
}
_COMPILED = {lang: [(re.compile(p), op) for p, op in rules] for lang, rules in _GRAMMAR.items()}


def _target(m: re.Match, p: str, lang: str) -> dict:
    if m.groupdict().get(p + "d"):
        return {"cls": DIGIT, "text": m.group(p + "d")}
    colour, cls = m.group(p + "c"), m.group(p + "k")
    if lang == "cn":
        colour, cls = (_CN_COLOUR[colour] if colour else None), _CN_CLASS[cls]
    return {"cls": cls, "colour": colour}


def parse(text: str) -> dict:
    """The structured edit of an EN or CN instruction (EditError if the grammar does not know it)."""
    s = text.strip()
    lang = "cn" if re.search(r"[\u4e00-\u9fff]", s) else "en"
    probe = s.lower() if lang == "en" else s
    for rx, op in _COMPILED[lang]:
        m = rx.fullmatch(probe)
        if not m:
            continue
        g = m.groupdict()
        colour = g.get("colour")
        if colour and lang == "cn":
            colour = _CN_COLOUR[colour]
        if op == "background":
            return {"op": op, "colour": colour}
        if op == "tone":
            return {"op": op, "tone": g["tone"] if lang == "en" else _TONE_CN[g["tone"]]}
        if op == "outline_all":
            return {"op": op}
        if op == "retext":
            return {"op": op, "target": {"cls": DIGIT, "text": g["td"]}, "text": g["text"]}
        rel = g.get("rel")
        rel = (_REL_EN if lang == "en" else _REL_CN)[rel] if rel else None
        if op == "add":
            cls = g["cls"] if lang == "en" else _CN_CLASS[g["cls"]]
            return {"op": op, "object": {"cls": cls, "colour": colour}, "relation": rel,
                    "reference": _target(m, "r", lang)}
        edit = {"op": op, "target": _target(m, "t", lang)}
        if op == "recolour":
            edit["colour"] = colour
        elif op == "resize":
            edit["direction"] = g["direction"] if lang == "en" else {"大": "bigger", "小": "smaller"}[g["direction"]]
        elif op == "move":
            edit.update(relation=rel, reference=_target(m, "r", lang))
        elif op == "replace":
            edit["cls"] = g["cls"] if lang == "en" else _CN_CLASS[g["cls"]]
        return edit
    raise EditError(f"not an instruction the shapes grammar knows: {text!r}")


# ----------------------------------------------------------------------------- applying
def matches(o, t: dict) -> bool:
    """Whether an object (Obj or Detection) fits a target description."""
    if t["cls"] != o.cls:
        return False
    if t["cls"] == DIGIT:
        return o.text == t["text"]
    return t.get("colour") is None or o.colour == t["colour"]


def resolve(scene: Scene, t: dict) -> int:
    """Index of the one object a target names (EditError if none or several)."""
    hits = [i for i, o in enumerate(scene.objects) if matches(o, t)]
    if len(hits) != 1:
        raise EditError(f"target {t} names {len(hits)} objects")
    return hits[0]


def apply_edit(scene: Scene, edit: dict, rng: np.random.Generator | None = None) -> Scene:
    """The oracle result. Moves and additions draw a position that satisfies the relation clearly
    (``rng``); EditError if the edit cannot apply."""
    rng = rng if rng is not None else np.random.default_rng(0)
    op, objs = edit["op"], list(scene.objects)
    if op == "background":
        return replace(scene, background=edit["colour"])
    if op == "tone":
        return replace(scene, tone=edit["tone"])
    if op == "outline_all":
        return scene.with_objects(replace(o, style="hollow") for o in objs)
    if op == "add":
        ref = objs[resolve(scene, edit["reference"])]
        o = place(rng, Spec(edit["object"]["cls"], edit["object"]["colour"]), objs, scene.size,
                  lambda c: clearly(c, ref, edit["relation"]))
        if o is None:
            raise EditError("no room to add the object")
        return scene.with_objects(objs + [o])
    i = resolve(scene, edit["target"])
    o, others = objs[i], objs[:i] + objs[i + 1:]
    if op == "remove":
        return scene.with_objects(others)
    if op == "recolour":
        new = replace(o, colour=edit["colour"])
    elif op == "hollow":
        new = replace(o, style="hollow")
    elif op == "replace":
        new = replace(o, cls=edit["cls"])
    elif op == "retext":
        new = replace(o, text=edit["text"])
    elif op == "resize":
        new = replace(o, size=round(o.size * RESIZE[edit["direction"]], 2))
        if not fits(new, others, scene.size):
            raise EditError("no room to resize the object")
    elif op == "move":
        ref = objs[resolve(scene, edit["reference"])]
        spec = Spec(o.cls, o.colour, o.style, o.text, (o.size / scene.size,) * 2)
        new = place(rng, spec, [p for p in others], scene.size, lambda c: clearly(c, ref, edit["relation"]))
        if new is None:
            raise EditError("no room to move the object")
    else:
        raise EditError(f"unknown op {op!r}; ops: {', '.join(OPS.values())}")
    objs[i] = new
    return scene.with_objects(objs)


# ----------------------------------------------------------------------------- sampling
def _shapes(rng, n, classes=CLASSES, size_range=(0.16, 0.30), colours=COLOUR_NAMES) -> list[Spec]:
    return [Spec(classes[rng.integers(len(classes))], colours[rng.integers(len(colours))], size_range=size_range)
            for _ in range(n)]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_edit(task: str, rng: np.random.Generator, size: int = 64) -> tuple[Scene, dict, Scene]:
    """A random (source scene, edit, oracle scene) of one category; the edit is legal and names
    its target unambiguously."""
    for _ in range(200):
        try:
            src, edit = _draw(task, rng, size)
            return src, edit, apply_edit(src, edit, rng)
        except (EditError, RuntimeError):
            continue
    raise RuntimeError(f"could not sample a {task} edit")


def _draw(task: str, rng: np.random.Generator, size: int) -> tuple[Scene, dict]:
    n = int(rng.integers(1, 4))
    if task == "background_change":
        src = place_all(rng, _shapes(rng, n), size)
        free = [c for c in COLOUR_NAMES if c not in {o.colour for o in src.objects}]
        return src, {"op": "background", "colour": _pick(rng, free)}
    if task == "tone_transfer":
        return place_all(rng, _shapes(rng, n), size), {"op": "tone", "tone": _pick(rng, tuple(TONES))}
    if task == "style_change":
        return place_all(rng, _shapes(rng, n, HOLLOW_CLASSES, (0.2, 0.3)), size), {"op": "outline_all"}
    if task == "text_change":
        digits = [str(d) for d in rng.choice(10, size=int(rng.integers(1, 3)), replace=False)]
        specs = [Spec(DIGIT, _pick(rng, COLOUR_NAMES), text=d, size_range=(0.24, 0.32)) for d in digits]
        src = place_all(rng, specs + _shapes(rng, int(rng.integers(0, 3))), size)
        new = _pick(rng, [d for d in DIGITS if d not in digits])
        return src, {"op": "retext", "target": {"cls": DIGIT, "text": digits[0]}, "text": new}
    if task == "subject-add":
        src = place_all(rng, _shapes(rng, int(rng.integers(1, 3))), size)
        ref = _pick(rng, src.objects)
        taken = {(o.cls, o.colour) for o in src.objects}
        new = _pick(rng, [(k, c) for k in CLASSES for c in COLOUR_NAMES if (k, c) not in taken])
        return src, {"op": "add", "object": {"cls": new[0], "colour": new[1]}, "relation": _pick(rng, RELATIONS),
                     "reference": target_of(ref, src, rng)}
    if task in ("subject-remove", "motion_change"):
        n = max(n, 2)
    first = _shapes(rng, 1, HOLLOW_CLASSES, (0.2, 0.3)) if task == "material_alter" else _shapes(rng, 1)
    if task == "ps_human":
        direction = _pick(rng, ("bigger", "smaller"))
        first = _shapes(rng, 1, size_range=(0.16, 0.2) if direction == "bigger" else (0.22, 0.3))
    src = place_all(rng, first + _shapes(rng, n - 1), size)
    o = src.objects[0]
    t = target_of(o, src, rng)
    if task == "color_alter":
        return src, {"op": "recolour", "target": t, "colour": _pick(rng, [c for c in COLOUR_NAMES if c != o.colour])}
    if task == "material_alter":
        return src, {"op": "hollow", "target": t}
    if task == "ps_human":
        return src, {"op": "resize", "target": t, "direction": direction}
    if task == "subject-remove":
        return src, {"op": "remove", "target": t}
    if task == "subject-replace":
        return src, {"op": "replace", "target": t, "cls": _pick(rng, [k for k in CLASSES if k != o.cls])}
    if task == "motion_change":
        ref = src.objects[1]
        rels = [r for r in RELATIONS if r not in relative_position(o.box(), ref.box(), 0.0)]  # not even loosely
        return src, {"op": "move", "target": t, "relation": _pick(rng, rels), "reference": target_of(ref, src, rng)}
    raise ValueError(f"unknown task_type {task!r}; categories: {', '.join(CATEGORIES)}")


def edit_key(seed: int, task: str, index: int) -> str:
    return hashlib.md5(f"gedit-shapes|{seed}|{task}|{index}".encode()).hexdigest()


def make_samples(seed: int = 0, scale: float = 1.0, size: int = 64) -> list[dict]:
    """The benchmark's samples in GEdit's category order: ``{task_type, key, edit, variant,
    source, target, Intersection_exist}`` with scenes; ``scale`` shrinks every category's count
    (at least one each). Each sample becomes one row per language (:func:`rows_of`)."""
    out = []
    for task, count in CATEGORIES.items():
        for i in range(max(1, round(count * scale))):
            key = edit_key(seed, task, i)
            rng = np.random.default_rng(int(key[:12], 16))
            src, edit, tgt = sample_edit(task, rng, size)
            out.append({"task_type": task, "key": key, "edit": edit, "variant": int(rng.integers(2)),
                        "source": src, "target": tgt, "Intersection_exist": int(key[-2:], 16) % 10 != 0})
    return out


def rows_of(sample: dict, image_path: str) -> list[dict]:
    """GEdit's row fields (one row per language) plus the structured edit and scenes."""
    return [{"task_type": sample["task_type"], "key": sample["key"],
             "instruction": instruction(sample["edit"], lang, sample["variant"]), "instruction_language": lang,
             "input_image": image_path, "input_image_raw": image_path,
             "Intersection_exist": sample["Intersection_exist"], "edit": sample["edit"],
             "source_scene": sample["source"].to_json(), "target_scene": sample["target"].to_json()}
            for lang in LANGUAGES]

