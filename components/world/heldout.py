"""Fresh held-out understanding prompts: new scenes from the world's own generator.

The ``world_data`` stage's held-out split is a few percent of its Q&A and captions; an
evaluation that needs more prompts (the draft's: >= 500) draws **new** scenes here, with the
very generator the data sets use (:func:`~components.world.render.random_scene`,
:func:`~components.world.render.render`, :func:`~components.world.understanding.questions`
and :func:`~components.world.understanding.caption`), on a random stream and colour jitter of
their own namespace, so they are never the training scenes. ``exclude`` makes that a
guarantee rather than a likelihood: a render whose pixels equal any excluded image (e.g. every
image of the world data) is skipped.

Four prompts in five are Q&A (one question per scene, of a random applicable kind), the fifth
a detailed caption: the data sets' proportion (``n_qa = n_t2i``, ``n_captions = n_t2i // 4``).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from components.world.render import Scene, random_scene, render
from components.world.understanding import caption, questions

NAMESPACE = "heldout-understanding"
CAPTION_EVERY = 5  # prompt i is a caption when i % 5 == 4


@dataclass(frozen=True)
class FreshPrompt:
    image: np.ndarray       # HxWx3 uint8
    kind: str               # a question kind, or "caption"
    question: str | None    # None for a caption (the reader supplies its caption prompt)
    answer: str             # the exact answer / caption from the scene graph
    scene: Scene


def image_key(img: np.ndarray) -> str:
    """Identity of an image's pixels (HxWx3 uint8)."""
    a = np.ascontiguousarray(img, dtype=np.uint8)
    return hashlib.md5(a.tobytes() + str(a.shape).encode()).hexdigest()


def fresh_prompts(n: int, seed: int = 0, namespace: str = NAMESPACE, image_size: int = 64,
                  exclude: Iterable[str] = (), keep: Callable[[FreshPrompt], bool] | None = None
                  ) -> list[FreshPrompt]:
    """``n`` prompts about new scenes (deterministic in ``seed`` and ``namespace``); scenes whose
    render matches a key in ``exclude`` (:func:`image_key`) or an earlier fresh scene are skipped,
    and so are prompts ``keep`` refuses (e.g. words a model's tokenizer does not know)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    seen = set(exclude)
    rng = np.random.default_rng([seed, zlib.crc32(namespace.encode())])
    out: list[FreshPrompt] = []
    i = 0
    while len(out) < n:
        if i > 100 * n + 1000:
            raise ValueError(f"only {len(out)} of {n} fresh prompts after {i} scenes: the filter refuses almost "
                             f"every prompt")
        scene = random_scene(rng, int(rng.integers(1, 5)), image_size)
        img = render(scene, jitter_seed=zlib.crc32(f"{namespace}|{seed}|{i}".encode()))
        i += 1
        key = image_key(img)
        if key in seen:
            continue
        if len(out) % CAPTION_EVERY == CAPTION_EVERY - 1:
            item = FreshPrompt(img, "caption", None, caption(scene), scene)
        else:
            asked = questions(scene, rng, 1)
            if not asked:
                continue
            kind, q, a = asked[0]
            item = FreshPrompt(img, kind, q, a, scene)
        if keep is not None and not keep(item):
            continue
        seen.add(key)
        out.append(item)
    return out
