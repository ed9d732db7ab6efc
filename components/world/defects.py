"""Controlled defects for reward-model preference pairs: a correct render of a prompt (chosen)
against one that is wrong in a known way (rejected).

- **semantic** defects change what the image shows (:data:`SEMANTIC`): the corrupted GenEval
  metadata of :func:`components.world.geneval_prompts.corrupt_metadata` rendered by its oracle, or
  an extra object;
- **quality** defects keep the scene and damage the pixels (:data:`QUALITY`): blur, noise, a
  colour cast on the objects, pixelation, 2x2 speckles, or a shape partly erased.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from components.world.geneval_prompts import applicable, corrupt_metadata, oracle_scene
from components.world.palette import BACKGROUNDS, CLASSES, COLOUR_NAMES
from components.world.render import Scene, Spec, object_window, place, render

SEMANTIC = ("wrong_colour", "count_off", "swapped_relation", "missing_object", "wrong_shape", "extra_object")
QUALITY = ("blur", "noise", "colour_cast", "pixelate", "speckles", "partial_shape")


def semantic_kinds(meta: dict) -> list[str]:
    """The semantic defects that make an image fail ``meta``."""
    kinds = applicable(meta)
    if meta["tag"] == "counting":  # an extra object of another class leaves a counting prompt right
        return kinds
    return kinds + ["extra_object"]


def semantic_defect(meta: dict, kind: str, rng: np.random.Generator, size: int = 64) -> tuple[Scene, dict]:
    """A scene that violates ``meta`` by ``kind``, and the metadata it does satisfy."""
    if kind == "extra_object":
        used = {c["class"] for c in meta["include"]}
        scene = oracle_scene(meta, rng, size)
        spare = [c for c in CLASSES if c not in used]
        for _ in range(50):
            o = place(rng, Spec(spare[rng.integers(len(spare))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]),
                      scene.objects, size)
            if o is not None:
                return scene.with_objects(scene.objects + (o,)), meta
        raise RuntimeError("no room for an extra object")
    if kind not in SEMANTIC:
        raise ValueError(f"unknown semantic defect {kind!r}; kinds: {', '.join(SEMANTIC)}")
    bad = corrupt_metadata(meta, kind, rng)
    return oracle_scene(bad, rng, size), bad


def quality_defect(scene: Scene, kind: str, rng: np.random.Generator, jitter_seed: int | None = None) -> np.ndarray:
    """The scene rendered and then damaged by ``kind`` (uint8 HxWx3)."""
    img = render(scene, jitter_seed=jitter_seed).astype(np.float32)
    n = scene.size
    if kind == "blur":
        img = ndimage.gaussian_filter(img, (rng.uniform(0.9, 1.6),) * 2 + (0,))
    elif kind == "noise":
        img = img + rng.normal(0.0, rng.uniform(12, 28), img.shape)
    elif kind == "colour_cast":  # the objects' colours drift off their prototypes, the background stays
        bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
        on = np.abs(img - bg).max(axis=-1, keepdims=True) > 0
        img = img + on * (rng.choice([-1.0, 1.0], 3) * rng.uniform(30, 50, 3))
    elif kind == "pixelate":
        f = int(rng.choice([4, 8]))
        small = img.reshape(n // f, f, n // f, f, 3).mean(axis=(1, 3))
        img = np.repeat(np.repeat(small, f, axis=0), f, axis=1)
    elif kind == "speckles":
        for _ in range(int(rng.integers(8, 20))):  # 2x2 spots of random colour
            y, x = rng.integers(0, n - 1, 2)
            img[y:y + 2, x:x + 2] = rng.integers(0, 256, 3)
    elif kind == "partial_shape":
        if not scene.objects:
            raise ValueError("partial_shape needs an object")
        o = scene.objects[rng.integers(len(scene.objects))]
        x0, y0, w, h = object_window(o, n, pad=0)
        bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
        if rng.random() < 0.5:  # erase the left/right or top/bottom 40-60 % of its box
            cut = int(round(w * rng.uniform(0.4, 0.6)))
            sl = (slice(y0, y0 + h), slice(x0, x0 + cut) if rng.random() < 0.5 else slice(x0 + w - cut, x0 + w))
        else:
            cut = int(round(h * rng.uniform(0.4, 0.6)))
            sl = (slice(y0, y0 + cut) if rng.random() < 0.5 else slice(y0 + h - cut, y0 + h), slice(x0, x0 + w))
        img[sl] = bg
    else:
        raise ValueError(f"unknown quality defect {kind!r}; kinds: {', '.join(QUALITY)}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
