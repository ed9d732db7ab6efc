"""The speculative-decoding draft: Hyper-Bagel's intermediate layer on top of an EAGLE-3 draft.

Per target position ``s`` the draft reads the hidden states of **all** target layers at ``s``
(``transformers``' ``hidden_states``: the embedding, every layer's output, the normed last
one; ``L + 1`` vectors) and the input embedding of the next position ``e_{s+1}`` (a token
embedding, or a patch embedding inside the image prefix), and predicts the target's
distribution at ``s + 1``:

``meta`` fusion (Hyper-Bagel, §3.1.1-3.1.2, Fig. 3)::

    f_c  = Flatten(CA(meta queries f_q, keys/values f_s) + [low; mid; high])   (S, 3D)
    F_in = Dec(fc1(f_c))                                                         (S, D)
    h    = fc2([F_in ; e_{s+1}])  ->  N = 2 draft layers (copies of the target's last 2)
    p    = softmax(lm_head(norm(h)))                  (the target's norm and head, frozen)

``fc`` fusion (vanilla EAGLE-3): ``F_in = fc([low; mid; high])`` and one freshly initialised
draft layer. ``low/mid/high`` are EAGLE-3's levels, the inputs of layers 2, L/2 and L-3.
With ``zero_init`` the output projections of CA and Dec and the weights of fc1 and fc2 start
at zero: CA's output is then exactly the skip, so fc1 reads EAGLE-3's three-level features,
Dec is the identity, and the draft layers start from a zero input.

Attention in Dec and in the draft layers is causal over positions with an explicit additive
mask, and uses ``transformers``' ``DynamicCache`` so training-time test attends to earlier
unrolled steps; decoding (``components/speculative.py``) runs the same layers through
:class:`DraftDecoder` on static KV caches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import DynamicCache, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from components.models.kv_decoder import LayerStack, causal_allowed
from components.models.understanding import Understanding


class DraftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fusion: Literal["meta", "fc"] = Field("meta", description="meta: Hyper-Bagel's layer; fc: EAGLE-3's FC")
    draft_layers: int = Field(2, ge=1)
    init_from_target: bool = Field(True, description="draft layers start as the target's last layers")
    zero_init: bool = True
    meta_queries: int = Field(3, ge=3, le=3, description="Q; query i takes level i as its skip")
    # the target's shapes
    vocab_size: int = Field(ge=2)
    hidden: int = Field(ge=16)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    intermediate: int = Field(ge=16)
    target_layers: int = Field(ge=1)
    max_positions: int = Field(256, ge=16)
    rms_norm_eps: float = 1e-6

    @classmethod
    def for_target(cls, target: Understanding, **kw) -> "DraftConfig":
        c = target.cfg
        return cls(vocab_size=c.vocab_size, hidden=c.hidden, heads=c.heads, kv_heads=c.kv_heads,
                   intermediate=c.intermediate, target_layers=c.layers, max_positions=c.max_positions,
                   rms_norm_eps=target.lm.config.rms_norm_eps, **kw)

    def layer_config(self, layers: int) -> Qwen2Config:
        return Qwen2Config(vocab_size=self.vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_positions,
                           rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=False, use_sliding_window=False,
                           attn_implementation="sdpa")

    @property
    def levels(self) -> tuple[int, int, int]:
        """Indices in ``hidden_states`` (``L + 1`` entries) of EAGLE-3's low, mid, high features:
        the inputs of layers 2, L/2 and L-3 (clamped for shallow targets)."""
        n = self.target_layers
        return min(2, n), n // 2, max(n - 3, 0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q, k)`` or ``(B, q, k)`` booleans (True: may attend) -> ``(B|1, 1, q, k)`` additive mask."""
    m = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return m[None, None] if m.dim() == 2 else m[:, None]


class MetaQueryFusion(nn.Module):
    """Learnable queries cross-attend over one token's ``L + 1`` target states (Eq. 1), plus the skip."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        d, self.heads, self.levels = cfg.hidden, cfg.heads, cfg.levels
        self.queries = nn.Parameter(torch.randn(cfg.meta_queries, d) * 0.02)
        self.norm = Qwen2RMSNorm(d, eps=cfg.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``(B, S, L+1, D)`` -> ``(B, S, Q*D)``."""
        b, s, k, d = states.shape
        h, q_n = self.heads, self.queries.shape[0]
        kv = self.norm(states)
        q = self.q_proj(self.queries).view(q_n, h, d // h).transpose(0, 1)            # (H, Q, d)
        key = self.k_proj(kv).view(b, s, k, h, d // h).transpose(2, 3)                 # (B, S, H, K, d)
        val = self.v_proj(kv).view(b, s, k, h, d // h).transpose(2, 3)
        att = F.scaled_dot_product_attention(q.expand(b, s, h, q_n, d // h), key, val)  # (B, S, H, Q, d)
        out = self.o_proj(att.transpose(2, 3).reshape(b, s, q_n, d))
        skip = states[:, :, list(self.levels)]                                         # low, mid, high
        return (out + skip).flatten(2)


class Draft(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        if cfg.fusion == "meta":
            self.ca = MetaQueryFusion(cfg)
            self.fc1 = nn.Linear(3 * d, d, bias=False)
            self.dec = Qwen2DecoderLayer(cfg.layer_config(1), 0)
        else:
            self.fc = nn.Linear(3 * d, d, bias=False)
        self.fc2 = nn.Linear(2 * d, d, bias=False)
        lc = cfg.layer_config(cfg.draft_layers)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(lc, i) for i in range(cfg.draft_layers))
        self.rotary = Qwen2RotaryEmbedding(lc)
        # the target's token embedding, final norm and LM head: frozen copies
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.norm = Qwen2RMSNorm(d, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.zero_init:
            zero = [self.fc2]
            if cfg.fusion == "meta":
                zero += [self.fc1, self.ca.o_proj, self.dec.self_attn.o_proj, self.dec.mlp.down_proj]
            for m in zero:
                nn.init.zeros_(m.weight)

    @classmethod
    def from_target(cls, target: Understanding, cfg: DraftConfig) -> "Draft":
        """A fresh draft: frozen embedding, norm and head from ``target``; draft layers copied
        from its last layers when ``cfg.init_from_target``."""
        draft = cls(cfg)
        lm = target.lm
        draft.embed.load_state_dict(lm.model.embed_tokens.state_dict())
        draft.norm.load_state_dict(lm.model.norm.state_dict())
        draft.lm_head.load_state_dict(lm.lm_head.state_dict())
        if cfg.init_from_target:
            src = lm.model.layers[len(lm.model.layers) - cfg.draft_layers:]
            for mine, theirs in zip(draft.layers, src):
                mine.load_state_dict(theirs.state_dict())
        for m in (draft.embed, draft.norm, draft.lm_head):
            m.requires_grad_(False)
        return draft

    def forward(self, fn, *args, **kwargs):
        """``fn(self, *args)``: lets a training loss run through a data-parallel wrapper's forward."""
        return fn(self, *args, **kwargs)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------ the intermediate layer

    def fusion_input(self, states: torch.Tensor) -> torch.Tensor:
        """What fc1 (or EAGLE-3's fc) reads: ``(B, S, 3D)``."""
        if self.cfg.fusion == "meta":
            return self.ca(states)
        return states[:, :, list(self.cfg.levels)].flatten(2)

    def fuse(self, states: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """``F_in`` for new target positions ``positions`` (``(S,)``, contiguous after ``cache``)."""
        x = self.fusion_input(states)
        if self.cfg.fusion == "fc":
            return self.fc(x)
        x = self.fc1(x)
        past = cache.get_seq_length() if cache is not None else 0
        mask = additive_mask(causal_allowed(x.shape[1], past), x.dtype)
        return self.dec(x, attention_mask=mask, position_embeddings=self.rotary(x, positions[None]),
                        past_key_values=cache, use_cache=cache is not None)

    # ------------------------------------------------------------ drafting

    def step(self, feat: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """``fc2([feat ; emb])`` through the draft layers: the pre-norm hidden ``(B, S, D)``.

        ``mask`` defaults to causal over the new positions after the cache."""
        h = self.fc2(torch.cat([feat, emb], dim=-1))
        if mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            mask = additive_mask(causal_allowed(h.shape[1], past), h.dtype)
        pe = self.rotary(h, positions[None] if positions.dim() == 1 else positions)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, past_key_values=cache,
                      use_cache=cache is not None)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


class DraftDecoder:
    """The draft at decoding time (batch 1): its Dec and draft layers on static KV caches
    (:class:`~components.models.kv_decoder.LayerStack`), the same arithmetic as :meth:`Draft.fuse`
    and :meth:`Draft.step`."""

    def __init__(self, draft: Draft, max_len: int):
        self.draft = draft
        self.dec = LayerStack([draft.dec], draft.rotary, 1, max_len) if draft.cfg.fusion == "meta" else None
        self.layers = LayerStack(draft.layers, draft.rotary, 1, max_len)
        # the frozen embedding, norm and head read directly: a module call costs more than the arithmetic
        self.embed_w, self.head_w = draft.embed.weight.detach(), draft.lm_head.weight.detach()
        self.norm_w, self.norm_eps = draft.norm.weight.detach(), draft.norm.variance_epsilon

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``draft.embed(ids)``."""
        return self.embed_w[ids]

    def fuse(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``F_in`` for the next target positions ``positions`` ``(S,)``, after those in the Dec cache."""
        d = self.draft
        x = d.fusion_input(states)
        if self.dec is None:
            return d.fc(x)
        return self.dec.forward(d.fc1(x), positions[None])[0]

    def step(self, feat: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor,
             attend: torch.Tensor | None = None) -> torch.Tensor:
        """``fc2([feat ; emb])`` through the draft layers, appended to their cache: ``(1, S, D)``
        (``attend``: the slots each new row reads, for a token tree; default causal)."""
        return self.layers.forward(self.draft.fc2(torch.cat([feat, emb], dim=-1)), positions[None],
                                   attend=attend)[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``draft.logits(h)``: the target's final norm and LM head."""
        return F.linear(F.rms_norm(h, (h.shape[-1],), self.norm_w, self.norm_eps), self.head_w)


def target_states(out) -> torch.Tensor:
    """``(B, S, L+1, D)`` from a ``transformers`` output with ``output_hidden_states=True``."""
    return torch.stack(out.hidden_states, dim=2)
