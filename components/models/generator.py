"""The generation expert: a compact DiT velocity model for text-to-image and editing.

One token sequence, as in BAGEL: the text tokens (from a small text encoder) followed by
the image tokens (2-D patches of ``x`` with fixed sin-cos positions), through adaLN-Zero
transformer blocks conditioned on the timestep embedding. Inputs:

- ``x``: the noisy sample ``x_t`` (latent or pixels), ``(B, C, H, W)``;
- ``t``: flow time in [0, 1] (1 = noise), embedded like a diffusion timestep (``t * 1000``);
- :class:`GenCondition`: text token ids (a fixed length, padded with ``pad_id``; all padding
  is the text-free condition), an optional source sample for editing, concatenated to ``x``
  as channels with a presence channel (absent = the image-free condition), and optional
  extra scalars (see below).

diffusers supplies the timestep embedding (``Timesteps``, ``TimestepEmbedding``), the 2-D
position table and the output norm; the block is written out here because diffusers'
MM-DiT block (two weight streams, tanh-GELU) costs about twice as much per sample on a
CPU for nothing this world needs.

``prediction``: the network's last layer predicts either the velocity directly, or the clean
sample ``x0`` which :meth:`Generator.forward` turns into the velocity the flow needs,
``v = (x_t - x0_hat) / t`` (t clamped at ``x0_t_min``), so every sampler, loss and later stage
sees a velocity model either way. Predicting the clean image is what makes pixel-space
models with large patches work (Li & He, "Back to Basics: Let Denoising Generative Models
Denoise", 2025): a clean 8x8 patch lies on a low-dimensional manifold, a noisy velocity does not.

``text_mask``: the text is right-padded to a fixed length (all padding is the text-free
condition), but BAGEL's context holds no padding. Masked, the padding is cut after the batch's
last word (a batch of one, or of equal lengths, holds none; the text-free condition holds no text
token), and what remains of it in a batch of mixed lengths is masked out of attention and of the
pooled text. Unmasked, every padding token takes part as a key and in the mean (26 of 32 tokens
of a short prompt). See reports/NOTES.md for what it changes in training.

``head_channels > 0`` replaces the linear un-patchify by a small convolutional head: the last
layer writes ``head_channels`` features per pixel, and three 3x3 convolutions over them and
``x`` draw the output, so neighbouring patches agree at their borders (shape edges cross
patches of 8x8 pixels; a linear un-patchify draws each patch on its own).

Hooks for later stages:

- ``add_extra_embeddings(["text_scale", "image_scale"])`` adds timestep-style embeddings
  (sinusoidal -> MLP, last layer zero-initialised) summed into the timestep embedding,
  as CFG distillation needs; the output is unchanged until they are trained;
- ``forward(..., return_features=True)`` also returns the image-token hidden states after
  every block, for a multi-head discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.normalization import AdaLayerNormContinuous
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from components.models.state_key import weights_key

SCALE_EMBEDDINGS = ["text_scale", "image_scale"]  # CFG distillation's two extra embeddings
TIME_SCALE = 1000.0  # t in [0, 1] and CFG scales are embedded like diffusion timesteps
FREQ_DIM = 256
MAX_CONSTANT_EMBEDDINGS = 64  # cached (name, value) scale embeddings; the cache is emptied when full


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(ge=2)
    pad_id: int = Field(0, ge=0)
    max_text_len: int = Field(32, ge=1)
    in_channels: int = Field(4, ge=1, description="channels of x (latent or RGB)")
    sample_size: int = Field(16, ge=2, description="side of x")
    patch_size: int = Field(2, ge=1)
    width: int = Field(128, ge=16)
    depth: int = Field(6, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    text_layers: int = Field(2, ge=0)
    extra_embeddings: list[str] = Field(default_factory=list)
    prediction: Literal["velocity", "x0"] = Field("velocity", description="what the last layer predicts")
    head_channels: int = Field(0, ge=0, description="0: linear un-patchify; >0: features of this many channels "
                                                    "per pixel, refined with x by a 3-layer conv head")
    x0_t_min: float = Field(0.05, gt=0, le=1, description="t clamp of v = (x_t - x0_hat) / t")
    text_mask: bool = Field(False, description="padding tokens are masked out of attention and of the pooled text "
                                               "(as BAGEL, whose context holds no padding); False: they take part")


@dataclass
class GenCondition:
    """What the velocity model is conditioned on; see :meth:`without_text` / :meth:`without_image`."""

    text: torch.Tensor                       # (B, L) token ids, padded with pad_id
    source: torch.Tensor | None = None       # (B, C, H, W) source sample for editing
    has_source: torch.Tensor | None = None   # (B,) 1 where the source is present (default: all)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) or () scalars
    pad_id: int = 0
    # (B, L, width): the text encoder's output for ``text``, computed once per sampling call
    # (:meth:`Generator.with_context`) as BAGEL prefills its context once; None: every pass encodes it
    context: torch.Tensor | None = None

    def without_text(self) -> "GenCondition":
        return replace(self, text=torch.full_like(self.text, self.pad_id), context=None)

    def without_image(self) -> "GenCondition":
        return replace(self, source=None, has_source=None)

    def with_scales(self, text_scale: float | torch.Tensor, image_scale: float | torch.Tensor) -> "GenCondition":
        """The CFG scales a CFG-distilled model reads through its scale embeddings."""
        return replace(self, extra={**self.extra, "text_scale": text_scale, "image_scale": image_scale})


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation (DiT), SiLU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, modulated: bool = True):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not modulated, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not modulated, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.SiLU(), nn.Linear(mlp_ratio * width, width))
        self.ada = None
        if modulated:
            self.ada = nn.Linear(width, 6 * width)
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: None, or booleans broadcastable to ``(B, heads, N, N)``, True where a query may attend."""
        b, n, w = h.shape
        if self.ada is None:
            x = self.norm1(h)
        else:
            s1, m1, g1, s2, m2, g2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
            x = self.norm1(h) * (1 + m1) + s1
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, w)
        if self.ada is None:
            h = h + self.proj(a)
            return h + self.mlp(self.norm2(h))
        h = h + g1 * self.proj(a)
        return h + g2 * self.mlp(self.norm2(h) * (1 + m2) + s2)


class TextEncoder(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_text_len, cfg.width) * 0.02)
        self.layers = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, modulated=False)
                                    for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.masked, self.pad_id = cfg.text_mask, cfg.pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        mask = None
        if self.masked and bool((ids == self.pad_id).any()):
            # a token reads the words and itself (a padding token, or an all-padding text, reads no word)
            own = torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
            mask = ((ids != self.pad_id)[:, None, :] | own)[:, None]
        for layer in self.layers:
            h = layer(h, mask=mask)
        return self.norm(h)


def scalar_embedder(width: int, zero_init: bool) -> TimestepEmbedding:
    emb = TimestepEmbedding(FREQ_DIM, width)
    if zero_init:
        nn.init.zeros_(emb.linear_2.weight)
        nn.init.zeros_(emb.linear_2.bias)
    return emb


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        if cfg.sample_size % cfg.patch_size or cfg.width % cfg.heads:
            raise ValueError("sample_size must be a multiple of patch_size and width of heads")
        self.cfg = cfg
        w, c, p = cfg.width, cfg.in_channels, cfg.patch_size
        self.freqs = Timesteps(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = scalar_embedder(w, zero_init=False)
        self.extra_embed = nn.ModuleDict({n: scalar_embedder(w, zero_init=True) for n in cfg.extra_embeddings})
        self._constant_embeddings: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self.text = TextEncoder(cfg)
        self.pool_proj = nn.Linear(w, w)
        # x, the source sample and its presence channel enter as one stack of channels
        self.patch_in = nn.Conv2d(2 * c + 1, w, kernel_size=p, stride=p)
        grid = cfg.sample_size // p
        self.register_buffer("pos", get_2d_sincos_pos_embed(w, grid, output_type="pt").float()[None],
                             persistent=False)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = AdaLayerNormContinuous(w, w, elementwise_affine=False, eps=1e-6)
        self.head = None
        if cfg.head_channels:
            f = cfg.head_channels
            self.proj_out = nn.Linear(w, p * p * f)
            self.head = nn.Sequential(nn.Conv2d(f + c, 2 * f, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(2 * f, 2 * f, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(2 * f, c, 3, padding=1))
            last = self.head[-1]
        else:
            last = self.proj_out = nn.Linear(w, p * p * c)
        nn.init.zeros_(last.weight)  # the last layer starts at zero (velocity output: v = 0)
        nn.init.zeros_(last.bias)

    def add_extra_embeddings(self, names: list[str]) -> None:
        """Add timestep-style scalar embeddings (zero-initialised: the output does not change)."""
        for name in names:
            if name in self.extra_embed:
                raise ValueError(f"extra embedding {name!r} exists already")
            self.extra_embed[name] = scalar_embedder(self.cfg.width, zero_init=True).to(self.proj_out.weight)
        self.cfg = self.cfg.model_copy(update={"extra_embeddings": list(self.extra_embed.keys())})

    def with_context(self, cond: GenCondition) -> GenCondition:
        """``cond`` carrying its text encoding, which does not depend on ``x`` or ``t``: a sampler
        computes it once per condition instead of in every pass (the passes compute the same numbers)."""
        cond = self.trim_text(cond)
        return replace(cond, context=self.text(cond.text))

    def trim_text(self, cond: GenCondition) -> GenCondition:
        """With ``text_mask``, ``cond`` with its text (and context) cut after the batch's last word:
        the padding takes no part, so the velocity is the same and the passes are shorter (a batch
        of one holds no padding at all; the text-free condition holds no text token)."""
        if not self.cfg.text_mask:
            return cond
        present = (cond.text != self.cfg.pad_id).any(0).nonzero()
        n = int(present[-1]) + 1 if len(present) else 0
        if n == cond.text.shape[1]:
            return cond
        return replace(cond, text=cond.text[:, :n], context=None if cond.context is None else cond.context[:, :n])

    def _embed(self, emb: nn.Module, v: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1).expand(batch)
        return emb(self.freqs(v * TIME_SCALE).to(like.dtype))

    def _extra(self, name: str, v: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
        """An extra embedding; a constant one (a Python number, as a sampler passes the CFG scales)
        is computed once per value and reused while no gradient is taken and its weights are unchanged
        (the key holds the weights' in-place version counters, which optimiser steps, EMA updates and
        ``load_state_dict`` all advance). One entry per value: an edit's scales switch at the CFG
        interval's edge (4 / 1.5 above t = 0.4, 1 / 1 below) in every call."""
        emb = self.extra_embed[name]
        if torch.is_grad_enabled() or not isinstance(v, (int, float)):
            return self._embed(emb, v, batch, like)
        slot = (name, float(v), like.dtype, like.device, torch.is_autocast_enabled(like.device.type))
        key = weights_key(emb, buffers=False)[1]
        hit = self._constant_embeddings.get(slot)
        if hit is None or hit[0] != key:
            if len(self._constant_embeddings) >= MAX_CONSTANT_EMBEDDINGS:
                self._constant_embeddings.clear()
            hit = self._constant_embeddings[slot] = (key, self._embed(emb, v, 1, like))
        return hit[1].expand(batch, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: GenCondition,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, hgt, wid = x.shape
        p = self.cfg.patch_size
        if cond.text.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"text of {cond.text.shape[1]} tokens; the model takes at most {self.cfg.max_text_len}")
        cond = self.trim_text(cond)
        if cond.context is None:
            ctx = self.text(cond.text)
        elif cond.context.shape != (*cond.text.shape, self.cfg.width):
            raise ValueError(f"a context of shape {tuple(cond.context.shape)} for text of shape {tuple(cond.text.shape)}")
        else:
            ctx = cond.context
        words = None
        if self.cfg.text_mask:
            words = cond.text != self.cfg.pad_id  # (B, L)
            pooled = (ctx * words[..., None]).sum(1) / words.sum(1, keepdim=True).clamp_min(1)
            if bool(words.all()):
                words = None  # nothing to mask
        else:
            pooled = ctx.mean(1)
        temb = self._embed(self.time_embed, t, b, x) + self.pool_proj(pooled)
        for name in self.extra_embed:
            if name not in cond.extra:
                raise ValueError(f"this model needs the extra condition {name!r}")
            temb = temb + self._extra(name, cond.extra[name], b, x)
        if cond.source is None:
            src, present = torch.zeros_like(x), x.new_zeros(b)
        else:
            src = cond.source.to(x)
            present = x.new_ones(b) if cond.has_source is None else cond.has_source.to(x)
        pb = present.view(b, 1, 1, 1)
        img = self.patch_in(torch.cat([x, src * pb, pb.expand(b, 1, hgt, wid)], dim=1))
        img = img.flatten(2).transpose(1, 2) + self.pos
        n_text = ctx.shape[1]
        h = torch.cat([ctx, img], dim=1)
        mask = None
        if words is not None:  # every query reads the words and the image tokens, never the padding
            mask = torch.cat([words, words.new_ones(b, img.shape[1])], dim=1)[:, None, None, :]
        mod = F.silu(temb)
        features = []
        for blk in self.blocks:
            h = blk(h, mod, mask)
            if return_features:
                features.append(h[:, n_text:])
        out = self.proj_out(self.norm_out(h[:, n_text:], temb))
        oc = self.cfg.head_channels or c
        out = out.view(b, hgt // p, wid // p, p, p, oc).permute(0, 5, 1, 3, 2, 4).reshape(b, oc, hgt, wid)
        if self.head is not None:
            out = self.head(torch.cat([out, x.to(out.dtype)], dim=1))
        if self.cfg.prediction == "x0":
            tb = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
            out = (x.float() - out.float()) / tb.clamp_min(self.cfg.x0_t_min).view(b, 1, 1, 1)
        return (out, features) if return_features else out
