"""The text-reading diagnostic: word swaps, and gains that show which words a generator uses."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from components import base
from components.base_data import Rows
from components.base_eval import text_reading
from components.evaluation.text_reading import WORD_KINDS, swap_words, text_gains
from components.models.tokens import Tokenizer
from components.world.palette import CLASSES, COLOUR_NAMES
from components.world.prompts import plural

TEXTS = ["a photo of a red square", "a photo of two blue circles", "a photo of a green star and a red triangle",
         "a photo of a white diamond", "a photo of a purple cross", "a photo of three yellow squares"]


def test_swapping_shape_words_keeps_the_colours_and_the_plurals():
    rng = random.Random(0)
    out = swap_words("a photo of two red squares and a red circle", CLASSES, rng)
    words = out.split()
    assert words[:5] == ["a", "photo", "of", "two", "red"] and words[7:9] == ["a", "red"]
    assert words[5].endswith("s") and words[5][:-1] in CLASSES and words[5][:-1] != "square"
    assert words[9] in CLASSES and words[9] != "circle"
    assert swap_words("a photo of a red square", COLOUR_NAMES, rng).split()[-1] == "square"
    assert swap_words("a photo of nothing", CLASSES, rng) is None
    # the world's plural of a cross and its articles
    for _ in range(20):
        words = swap_words("a photo of two crosses and a red square", CLASSES, rng).split()
        assert words[4] in {plural(c) for c in CLASSES if c != "cross"}
        assert swap_words("a photo of an orange circle", ["orange", "red"], rng) == "a photo of a red circle"
        assert swap_words("a photo of a red circle", ["orange", "red"], rng) == "a photo of an orange circle"


def _colour_only_model():
    """A 'generator' whose clean prediction is the prompt's colour (index / 10, everywhere) and
    that ignores every other word; it is off by 0.1 in velocity so no loss is exactly 0."""
    def colour(text):
        return next(i for i, c in enumerate(COLOUR_NAMES) if f" {c} " in f" {text} ") / 10

    def context(texts):
        return torch.tensor([colour(t) for t in texts])

    def velocity(x_t, t, ctx):
        return (x_t - ctx[:, None, None, None]) / t[:, None, None, None] + 0.1

    x0 = torch.stack([torch.full((2, 4, 4), colour(t)) for t in TEXTS])
    return velocity, context, x0


def test_a_model_that_reads_only_colours_gains_from_colour_words_and_not_from_shape_words():
    velocity, context, x0 = _colour_only_model()
    gains = text_gains(velocity, context, x0, TEXTS, t_values=(0.9, 0.5))
    for t in (0.9, 0.5):
        assert set(gains[t]) == {"shape", "colour", "prompt"}
        assert gains[t]["shape"] == pytest.approx(0.0, abs=1e-6)
        assert gains[t]["colour"] > 0.5
        assert gains[t]["prompt"] > 0.3


def test_a_model_that_ignores_its_text_gains_nothing():
    _, context, x0 = _colour_only_model()
    gains = text_gains(lambda x, t, c: x * 0.5, context, x0, TEXTS, t_values=(0.85,))
    assert all(g == pytest.approx(0.0, abs=1e-6) for g in gains[0.85].values())


def test_text_reading_of_a_teacher_swaps_only_words_its_tokenizer_knows():
    tok = Tokenizer.from_texts(TEXTS)  # no orange, pink, brown, black; every class but none missing
    teacher = base.build_teacher(base.Params(gen_width=32, gen_depth=2, gen_heads=2, gen_text_layers=1,
                                             und_hidden=32, und_layers=2, und_heads=2, und_kv_heads=1,
                                             und_intermediate=64, ae_channels=[8, 16]), tok)
    for part in (teacher.autoencoder, teacher.generator):
        part.eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (len(TEXTS), 3, 64, 64), dtype=np.uint8))
    gains = text_reading(teacher, Rows(images, TEXTS), t_values=(0.85,))  # an unknown word would raise
    assert set(gains[0.85]) == set(WORD_KINDS) | {"prompt"}
    assert swap_words("a photo of a purple cross", CLASSES, random.Random(0), set(tok.tokens())) is not None
    assert swap_words("a photo of two blue circles", CLASSES, random.Random(0), set(tok.tokens())) == \
        "a photo of two blue squares"  # the only other plural the tokenizer knows
    assert all(math.isfinite(g) for g in gains[0.85].values())
