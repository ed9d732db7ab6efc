"""A lean KV-cached forward of Qwen2 decoder layers, for decoding at small batch on a CPU.

At the understanding expert's size (width 128) a decoding step does almost no arithmetic:
``transformers``' Qwen2 forward spends it in Python and small-op dispatch (cache objects, mask
construction, rotary tables recomputed per call, separate q/k/v and gate/up projections), about
twice what the arithmetic needs. :class:`LayerStack` runs the same layers, reading the same
weights, with the same operations in the same order, and less around them:

- q/k/v and gate/up projections as one matrix each (every output element is the same dot product);
- RMSNorm through ``torch.nn.functional.rms_norm``, rotary cos/sin tabulated once;
- a preallocated cache per layer, written in place; cropping is a length;
- no mask for a single new token without padding, a boolean one otherwise.

It is an inference path only: the projections are concatenated copies, made when a stack is
first built over a layer and remade when its parameters change (in-place version counters), so
``Understanding.generate`` and speculative decoding build a stack per call at little cost.
Logits and hidden states agree with ``transformers``' to float32 rounding
(tests/components/test_models.py); training keeps ``transformers``' modules.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from components.models.state_key import weights_key


_FUSED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fused(layer: Qwen2DecoderLayer) -> tuple:
    """The layer's weights as the stack reads them (q/k/v and gate/up concatenated), built once
    and reused while the parameters are unchanged (the key holds their storage and in-place
    version counters, which optimiser steps and ``load_state_dict`` advance)."""
    key = weights_key(layer, buffers=False)[1]
    hit = _FUSED.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    a, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        qkv_bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        weights = (layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon,
                   torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), qkv_bias,
                   a.o_proj.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                   layer.post_attention_layernorm.variance_epsilon,
                   torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight.detach())
    _FUSED[layer] = (key, weights)
    return weights


def causal_allowed(q_len: int, past: int) -> torch.Tensor:
    """New queries ``past .. past+q_len-1`` over keys ``0 .. past+q_len-1``."""
    return torch.arange(past + q_len)[None, :] <= (past + torch.arange(q_len))[:, None]


class LayerStack:
    """Qwen2 decoder layers with a static KV cache of ``batch`` rows and ``max_len`` slots.

    ``forward(h, positions, key_valid)`` appends ``q`` new slots: ``h`` is ``(B, q, D)``,
    ``positions`` the rotary positions ``(B, q)`` (they differ from slots under left padding),
    ``key_valid`` ``(B, slots)`` marks padding slots that no query may attend (None: none);
    ``attend`` ``(q, slots)`` booleans replaces the causal mask (True: may attend), for a token
    tree whose slots read their ancestors' and not their siblings'."""

    def __init__(self, layers: Sequence[Qwen2DecoderLayer], rotary: Qwen2RotaryEmbedding, batch: int, max_len: int):
        if not layers:
            raise ValueError("a layer stack needs at least one layer")
        attn = layers[0].self_attn
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.max_len = max_len
        self.weights = [_fused(layer) for layer in layers]
        dtype = self.weights[0][2].dtype
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * rotary.attention_scaling).to(dtype)
        self.sin = (emb.sin() * rotary.attention_scaling).to(dtype)
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in layers]
        self.v = [torch.empty(shape, dtype=dtype) for _ in layers]
        self.length = 0

    def crop(self, length: int) -> None:
        """Keep the first ``length`` slots."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} slots to {length}")
        self.length = length

    def keep(self, start: int, slots: list[int]) -> None:
        """Move the cached ``slots`` (ascending, each >= ``start``) to ``start, start+1, ...`` and
        crop after them: the accepted path of a token tree becomes a contiguous prefix."""
        if (any(b <= a for a, b in zip(slots, slots[1:])) or start > self.length
                or (slots and (slots[0] < start or slots[-1] >= self.length))):
            raise ValueError(f"slots {slots} are not ascending within [{start}, {self.length})")
        if slots != list(range(start, start + len(slots))):
            idx = torch.tensor(slots)
            for cache in (*self.k, *self.v):
                cache[:, :, start:start + len(slots)] = cache[:, :, idx]
        self.length = start + len(slots)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, h: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                hidden: bool = False, attend: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last layer's output and, with ``hidden``, every layer's output (in order)."""
        b, q, d = h.shape
        s, e = self.length, self.length + q
        if e > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} slots; {e} needed")
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]   # (B, 1, q, hd)
        mask = None
        if attend is not None:
            if attend.shape != (q, e) or attend.dtype != torch.bool or key_valid is not None:
                raise ValueError(f"attend is ({q}, {e}) booleans over the slots, without key_valid")
            mask = attend[None, None]
        elif q > 1 or key_valid is not None:
            mask = causal_allowed(q, s)[None, None]  # causal over slots
            if key_valid is not None:  # padding slots are never read; a padding query reads itself (no NaN)
                mask = (mask & key_valid[:, None, None, :e]) | (torch.arange(e)[None] == torch.arange(s, e)[:, None])
        nq, nk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        outs = []
        for i, (n1, eps1, qkv_w, qkv_b, o_w, n2, eps2, gu_w, down_w) in enumerate(self.weights):
            x = F.rms_norm(h, (d,), n1, eps1)
            qq, kk, vv = F.linear(x, qkv_w, qkv_b).split([nq, nk, nk], dim=-1)
            qq = self._rotate(qq.view(b, q, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            self.k[i][:, :, s:e] = self._rotate(kk.view(b, q, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            self.v[i][:, :, s:e] = vv.view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
            att = F.scaled_dot_product_attention(qq, self.k[i][:, :, :e], self.v[i][:, :, :e], attn_mask=mask,
                                                 enable_gqa=self.heads != self.kv_heads)
            h = h + F.linear(att.transpose(1, 2).reshape(b, q, d), o_w)
            gate, up = F.linear(F.rms_norm(h, (d,), n2, eps2), gu_w).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, down_w)
            if hidden:
                outs.append(h)
        self.length = e
        return h, outs


class LeanLM:
    """A ``Qwen2ForCausalLM`` for decoding: embedding, :class:`LayerStack`, final norm, LM head.

    :meth:`forward` returns the logits of the new positions (``last_only``: of the last one) and,
    with ``hidden``, ``transformers``' ``hidden_states`` convention: the input embeddings, every
    layer's output but the last, and the normed last one (``L + 1`` tensors)."""

    def __init__(self, lm: nn.Module, batch: int, max_len: int):
        m = lm.model
        self.embed_tokens = m.embed_tokens
        self.norm_w, self.norm_eps = m.norm.weight.detach(), m.norm.variance_epsilon
        self.head_w = lm.lm_head.weight.detach()
        self.stack = LayerStack(m.layers, m.rotary_emb, batch, max_len)

    def crop(self, length: int) -> None:
        self.stack.crop(length)

    def keep(self, start: int, slots: list[int]) -> None:
        self.stack.keep(start, slots)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                hidden: bool = False, last_only: bool = False,
                attend: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, outs = self.stack.forward(embeds, positions, key_valid, hidden, attend)
        if last_only and not hidden:
            h = h[:, -1:]
        normed = F.rms_norm(h, (h.shape[-1],), self.norm_w, self.norm_eps)
        states = [embeds] + outs[:-1] + [normed] if hidden else []
        return F.linear(normed[:, -1:] if last_only else normed, self.head_w), states
