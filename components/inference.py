"""The base model (teacher) as one object: load a checkpoint, then generate, edit, ask.

``Teacher.load(path, md5)`` reads a ``base`` checkpoint (safetensors + JSON, md5-verified
when given). ``generate`` runs BAGEL's T2I CFG (text 4, 50 steps, 100 NFE), ``edit`` its
editing CFG (4 / 1.5, interval [0.4, 1], 132 NFE), ``ask`` greedy KV-cache decoding.
The distilled models (``cfg_distill``, ``tscd``, ``dmdo``) are checkpoints of the same format
whose generator has the CFG scale embeddings: they sample with the scales given to the model,
one pass per step, and their config's ``sampler`` names their default number of steps (6 for
the 6-NFE model: 6 NFE per image and per edit).
Bad input raises a :class:`InputError` (a ``ValueError``) that says what is wrong: words
the model does not know (named, from the world vocabulary), a text that is too long, an
image that is not 64x64 RGB.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components import checkpoints, sampling
from components.models.autoencoder import AutoencoderConfig, SampleSpace, make_autoencoder
from components.models.generator import SCALE_EMBEDDINGS, GenCondition, Generator, GeneratorConfig
from components.models.state_key import weights_key
from components.models.understanding import Understanding, UnderstandingConfig
from components.models.tokens import Tokenizer, UnknownWordError

FORMAT = "hyperbagel-base/1"
PARTS = ("autoencoder", "generator", "understanding")
TEACHER_SAMPLER = {"num_steps": 50}  # a checkpoint without a ``sampler`` is a teacher: BAGEL's 50 steps


class InputError(ValueError):
    """Input the model cannot take; the message says what and why."""


class TextTooLongError(InputError):
    pass


class ImageSizeError(InputError):
    pass


def to_tensor(images: np.ndarray | list[np.ndarray], size: int = 64) -> torch.Tensor:
    """HxWx3 uint8 image(s) -> (B, 3, H, W) float in [-1, 1]; anything else is an ImageSizeError."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        raise ImageSizeError(f"images must be {size}x{size} RGB; got an array of shape {tuple(arr.shape)}")
    return torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@functools.cache
def bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX). Where it does not, oneDNN
    emulates it and a bfloat16 autocast step runs ~20x slower than float32 (measured on an AVX2-only
    EPYC: a 128x384 linear forward+backward 381 ms vs 17 ms), so bf16 falls back to float32 there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_bf16(enabled: bool) -> bool:
    """Whether ``enabled`` bfloat16 is honoured here: asked for, and the CPU computes it natively."""
    return enabled and bf16_native()


def autocast(enabled: bool):
    """bfloat16 autocast on CPU when asked and the CPU has native bfloat16; float32 otherwise."""
    if uses_bf16(enabled):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_BF16_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def bf16_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose linear and convolution layers hold bfloat16 weights, for inference
    under bfloat16 autocast; it computes exactly what ``module`` computes there.

    Autocast casts every float32 weight to bfloat16 on first use in a region and drops those casts
    when the outermost region exits, so each sampling call cast the generator's and the decoder's
    weights again (measured on the 6-NFE edit at batch 1: ~1.2 ms of the generator's first pass,
    ~0.4 ms of the decoder's). The copy holds the same bfloat16 values autocast would have made, so
    the result is unchanged. It is kept while ``module``'s parameters and buffers are: the key holds
    their storage and in-place version counters, which optimiser steps, EMA updates and
    ``load_state_dict`` all advance (:func:`components.models.state_key.weights_key`).

    Its convolution weights are stored channels-last, oneDNN's own layout, so a bfloat16 convolution
    does not reorder its weights in every call: the same numbers (bit for bit, measured), and the
    decoder's call at batch 1 1.4 -> 0.9 ms, at batch 16 4.9 -> 2.7 ms, the encoder's 1.2 -> 0.8 ms
    and 2.8 -> 2.0 ms (native-bf16 Xeon, 2 threads)."""
    key = weights_key(module)
    hit = _BF16_COPIES.get(module)
    if hit is None or hit[0] != key:
        fast = copy.deepcopy(module).requires_grad_(False)
        for param in fast.parameters():
            param.grad = None
        for layer in fast.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                layer.to(torch.bfloat16)
            if isinstance(layer, torch.nn.Conv2d):
                layer.to(memory_format=torch.channels_last)
        hit = _BF16_COPIES[module] = (key, fast)
    return hit[1]


def velocity_fn(gen: Generator, bf16: bool):
    """``(x, t, cond) -> v`` in float32, under bf16 autocast when asked."""
    def v(x: torch.Tensor, t: torch.Tensor, cond: GenCondition) -> torch.Tensor:
        with autocast(bf16):
            return gen(x, t, cond).float()
    return v


@dataclass
class Teacher:
    autoencoder: SampleSpace
    generator: Generator
    understanding: Understanding
    tokenizer: Tokenizer
    bf16: bool = True
    last_nfe: int = 0
    last_pass_s: float = 0.0  # wall time of the last sampling call's generator passes (the rest is per-call work)
    sampler: dict[str, Any] = field(default_factory=lambda: dict(TEACHER_SAMPLER))
    sampling_only: bool = False  # see :meth:`frozen`

    @property
    def embedded_cfg(self) -> bool:
        """True for a CFG-distilled generator: the scales are inputs, one pass per step."""
        return all(n in self.generator.extra_embed for n in SCALE_EMBEDDINGS)

    @property
    def default_steps(self) -> int:
        return int(self.sampler["num_steps"])

    # ------------------------------------------------------------ persistence

    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "vocab": self.tokenizer.tokens(),
                "autoencoder": self.autoencoder.cfg.model_dump(mode="json"),
                "generator": self.generator.cfg.model_dump(mode="json"),
                "understanding": self.understanding.cfg.model_dump(mode="json"), "sampler": dict(self.sampler)}

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.sampling_only:
            raise RuntimeError("this model was frozen for sampling (its generator and autoencoder may hold bfloat16 "
                               "copies); save or train the model it was frozen from")
        out: dict[str, torch.Tensor] = {}
        for name in PARTS:
            out.update(checkpoints.module_tensors(name, getattr(self, name)))
        return out

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> "Teacher":
        if config.get("format") != FORMAT:
            raise InputError(f"not a base-model checkpoint (format {config.get('format')!r}, expected {FORMAT!r})")
        tok = Tokenizer.from_tokens(config["vocab"])
        t = cls(make_autoencoder(AutoencoderConfig(**config["autoencoder"])),
                Generator(GeneratorConfig(**config["generator"])),
                Understanding(UnderstandingConfig(**config["understanding"])), tok,
                sampler=dict(config.get("sampler") or TEACHER_SAMPLER))
        if tensors is not None:
            for name in PARTS:
                getattr(t, name).load_state_dict(checkpoints.sub_state(tensors, name))
        for name in PARTS:
            getattr(t, name).eval()
        return t

    @classmethod
    def load(cls, path: Path, expected_md5: str | None = None) -> "Teacher":
        ckpt = checkpoints.load_checkpoint(Path(path), expected_md5)
        return cls.from_parts(ckpt.config, ckpt.tensors)

    # ------------------------------------------------------------ text

    def text_ids(self, texts: list[str]) -> torch.Tensor:
        """Fixed-length, padded ids for the generator; unknown words or too long: InputError."""
        n = self.generator.cfg.max_text_len
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > n:
                raise TextTooLongError(f"{text!r} has {len(ids)} tokens; the model reads at most {n}")
            rows.append(ids + [self.tokenizer.pad_id] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except UnknownWordError as e:
            raise InputError(str(e)) from None

    # ------------------------------------------------------------ generation

    def inference_parts(self) -> tuple[Generator, SampleSpace]:
        """The generator and the autoencoder as sampling runs them: under bfloat16, the stored
        bfloat16 copies (:func:`bf16_weights`), else the modules themselves (and those of a model
        :meth:`frozen` for sampling, which are the copies already)."""
        if uses_bf16(self.bf16) and not self.sampling_only:
            return bf16_weights(self.generator), bf16_weights(self.autoencoder)
        return self.generator, self.autoencoder

    def frozen(self) -> "Teacher":
        """This model for sampling only, as an inference server loads one: its generator and autoencoder
        are the ones sampling runs (:meth:`inference_parts`: under bfloat16 the stored bfloat16 copies),
        and no call checks again whether the weights they were copied from changed (two fingerprints
        of ~140 tensors, 0.2-0.5 ms of a 6-NFE call of ~30 ms). The same images; it cannot be saved
        (:meth:`tensors`): keep ``self`` to save or train the model."""
        generator, space = self.inference_parts()
        return replace(self, generator=generator, autoencoder=space, sampling_only=True)

    def _sample(self, ids: torch.Tensor, seed: int, num_steps: int | None, cfg: sampling.CFG,
                source: torch.Tensor | None = None) -> np.ndarray:
        """Images for the text ``ids`` and, for an edit, the ``source`` images ((B, 3, 64, 64) in
        [-1, 1]), encoded here under the precision the training data's latents had (``GenData.build``)."""
        g = self.generator.cfg
        shape = (ids.shape[0], g.in_channels, g.sample_size, g.sample_size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        # under bfloat16 the generator and the autoencoder run from stored bfloat16 weights (bf16_weights:
        # the same numbers, without casting every weight again in each call); the decoder's image is
        # within 2 uint8 levels of a float32 decoder's
        generator, space = self.inference_parts()
        counter = sampling.NFECounter(velocity_fn(generator, self.bf16))
        with torch.no_grad(), autocast(self.bf16):
            z_src = None if source is None else space.encode(source).float()
            cond = GenCondition(ids, z_src, pad_id=self.tokenizer.pad_id)
            # each condition's text is encoded once per call, not in every pass (BAGEL prefills it once);
            # a CFG-distilled model runs the full condition only
            full = generator.with_context(cond)
            no_text = cond.without_text() if self.embedded_cfg else generator.with_context(cond.without_text())
            conds = sampling.Conditions(full, no_text, full.without_image())
            z = sampling.sample(counter, noise, conds, num_steps=num_steps or self.default_steps, cfg=cfg,
                                shift=float(self.sampler.get("shift", sampling.SHIFT)), token_patch=g.patch_size,
                                embedded=self.embedded_cfg)
            images = space.decode(z)
        self.last_nfe, self.last_pass_s = counter.nfe, counter.seconds
        return to_uint8(images)

    def generate(self, prompts: list[str], seed: int = 0, num_steps: int | None = None,
                 cfg: sampling.CFG = sampling.T2I_CFG) -> np.ndarray:
        """(B, 64, 64, 3) uint8 images for ``prompts`` (``num_steps``: the model's default, 50 or 6)."""
        return self._sample(self.text_ids(prompts), seed, num_steps, cfg)

    def edit(self, images: np.ndarray, instructions: list[str], seed: int = 0, num_steps: int | None = None,
             cfg: sampling.CFG = sampling.EDIT_CFG) -> np.ndarray:
        """Edited (B, 64, 64, 3) uint8 images; ``images`` is (B, 64, 64, 3) uint8."""
        src = to_tensor(images, self.autoencoder.cfg.image_size)
        if src.shape[0] != len(instructions):
            raise InputError(f"{src.shape[0]} images but {len(instructions)} instructions")
        return self._sample(self.text_ids(instructions), seed, num_steps, cfg, source=src)

    # ------------------------------------------------------------ understanding

    def prompt_ids(self, question: str) -> list[int]:
        return self.encode(question) + [self.tokenizer.sep_id]

    def ask(self, images: np.ndarray, questions: list[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy answers to ``questions`` about ``images`` ((B, 64, 64, 3) uint8)."""
        x = to_tensor(images, self.understanding.cfg.image_size)
        if x.shape[0] != len(questions):
            raise InputError(f"{x.shape[0]} images but {len(questions)} questions")
        prompts = [self.prompt_ids(q) for q in questions]
        with autocast(self.bf16):
            answers = self.understanding.generate(x, prompts, max_new_tokens)
        return [self.tokenizer.decode(a) for a in answers]
