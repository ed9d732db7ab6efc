"""Which words of a T2I prompt does a generator read? A loss-based diagnostic of the teacher.

On fixed (image, prompt) pairs, noised at a fixed level ``t`` with fixed noise, the flow-matching
loss ``|v(x_t, t, c) - (eps - x0)|^2`` is computed with the right prompt ``c`` and with a changed one:

* ``shape``: every shape word swapped for another class (colours, counts and relations kept);
* ``colour``: every colour word swapped for another colour (shapes kept);
* ``prompt``: another row's prompt.

The *gain* against a change is ``1 - loss(right) / loss(changed)``: how much of the loss the
words in question remove. A generator that draws what its prompt asks for has a clear gain on
every kind where the image cannot tell the answer yet (high ``t``, where the layout is decided);
a gain near 0 says that kind of word is ignored there, whatever the sampler or the CFG scale does
later (CFG can only amplify a difference the model makes). On the default teacher (reports/NOTES.md,
tenth session) colour words gave ~0.3 at t = 0.85 and shape words ~0.02: the shapes, not the prompt
pathway, are what it had not learned.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from components.sampling import interpolate, velocity_target
from components.world.palette import CLASSES, COLOUR_NAMES
from components.world.prompts import article, plural

WORD_KINDS: dict[str, tuple[str, ...]] = {"shape": CLASSES, "colour": COLOUR_NAMES}
LAYOUT_T = 0.85  # where the objects' layout is decided (reports/NOTES.md, eighth session)
DEFAULT_T = (0.95, LAYOUT_T, 0.7, 0.5)


def swap_words(text: str, words: Sequence[str], rng: random.Random, known: set[str] | None = None,
               tries: int = 20) -> str | None:
    """``text`` with every occurrence of each of ``words`` it holds replaced by another of ``words``
    (one replacement per word, so "a red square and a red circle" keeps both objects the same
    colour), in the world's wording: a plural stays a plural ("crosses"), an article before the word
    follows it ("an orange"). None when ``text`` holds none of ``words``, or when ``known`` is given
    and no draw of ``tries`` gives a text made of ``known`` words only (a model's vocabulary)."""
    forms = {plural(w): (w, True) for w in words} | {w: (w, False) for w in words}
    tokens = text.split()
    found = sorted({forms[t][0] for t in tokens if t in forms})
    if not found:
        return None
    for _ in range(tries):
        mapping = {w: rng.choice([o for o in words if o != w]) for w in found}
        out: list[str] = []
        for tok in tokens:
            if tok in forms:
                word, many = forms[tok]
                new = mapping[word]
                if out and out[-1] in ("a", "an"):
                    out[-1] = article(new)
                tok = plural(new) if many else new
            out.append(tok)
        if known is None or all(tok in known for tok in out):
            return " ".join(out)
    return None


@torch.no_grad()
def text_gains(velocity, context, x0: torch.Tensor, texts: list[str], t_values: Sequence[float] = DEFAULT_T,
               seed: int = 0, known: set[str] | None = None) -> dict[float, dict[str, float]]:
    """``{t: {kind: gain}}`` for ``kind`` in ``shape``, ``colour`` (rows holding such words) and
    ``prompt`` (all rows).

    ``velocity(x_t, t, ctx) -> v`` is the generator's pass, ``context(texts) -> ctx`` its condition
    for a list of prompts, ``x0`` ``(N, C, h, w)`` the clean samples of ``texts``. Every
    comparison uses the same noise, so the gains differ only by the prompt. ``known``: the words
    the model reads (a swap only makes texts of those; rows without one are left out of that kind)."""
    if len(texts) != len(x0):
        raise ValueError(f"{len(texts)} texts for {len(x0)} samples")
    if len(texts) < 2:
        raise ValueError("text_gains needs at least 2 rows (the prompt comparison uses another row's)")
    rng = random.Random(seed)
    changed: dict[str, tuple[list[int], list[str]]] = {}
    for kind, words in WORD_KINDS.items():
        swapped = [swap_words(t, words, rng, known) for t in texts]
        rows = [i for i, s in enumerate(swapped) if s is not None]
        if rows:
            changed[kind] = (rows, [swapped[i] for i in rows])
    changed["prompt"] = (list(range(len(texts))), texts[1:] + texts[:1])
    right = context(texts)
    others = {kind: context(tx) for kind, (_, tx) in changed.items()}
    g = torch.Generator().manual_seed(seed)
    out: dict[float, dict[str, float]] = {}
    for t in t_values:
        eps = torch.randn(x0.shape, generator=g)
        tt = torch.full((len(x0),), float(t))
        x_t, target = interpolate(x0, eps, tt), velocity_target(x0, eps)
        err_right = (velocity(x_t, tt, right).float() - target).pow(2).flatten(1).mean(1)
        out[float(t)] = {}
        for kind, (rows, _) in changed.items():
            idx = torch.tensor(rows)
            err = (velocity(x_t[idx], tt[idx], others[kind]).float() - target[idx]).pow(2).flatten(1).mean(1)
            out[float(t)][kind] = float(1 - err_right[idx].mean() / err.mean())
    return out
