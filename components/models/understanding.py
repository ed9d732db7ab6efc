"""The understanding expert: a deep, narrow Qwen2 causal LM reading image patches as a prefix.

Sequence: ``[image tokens] [question ids] [sep] [answer ids] [eos]``. A small conv encoder
(``encoder``: ``patch``, or ``cnn`` with max-pooling) turns the 64x64 image into ``grid x grid``
patch embeddings (with learned positions) that
enter the LM as ``inputs_embeds``; the loss is next-token cross-entropy on the answer and
``eos`` only. Greedy decoding runs a prefill and then one token at a time on a static KV cache
(``components/models/kv_decoder.py``), with left padding so questions of different lengths batch.
Deep (16 layers by default) so that a 2-layer speculative draft is cheap next to it.

Optional object heads (``object_classes``, ``object_colours``) read each image token and predict
the object centred in its cell; ``forward(..., objects=...)`` adds their loss, with targets from
the scenes the world data carries, so the encoder learns to see shapes before the language model
has learned to ask about them.

An optional locate head (``locate_bins``) reads the hidden state after layer ``locate_layer`` at the
last token of each object a question names ("the red circle" in "where is the red circle relative
to the square?") and predicts where that object's centre lies (``locate_bins`` columns and rows):
it teaches the language model to carry each named object's place into the question, which a
relation between two objects needs (reports/NOTES.md, twenty-ninth session). With ``locate_colours``
it also predicts that object's colour there, so the object found is also read ("what colour is the
circle?"; thirtieth session). A count head (``count_classes``) reads the same layer at the last token of
the description a count or existence question asks about ("how many red **shapes**", "is there a blue
**star**") and predicts how many objects fit it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from components.models.kv_decoder import LeanLM

IGNORE = -100


class UnderstandingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(ge=2)
    pad_id: int = Field(0, ge=0)
    sep_id: int = Field(ge=0, description="ends the question, starts the answer")
    eos_id: int = Field(ge=0)
    hidden: int = Field(128, ge=16)
    layers: int = Field(16, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    intermediate: int = Field(384, ge=16)
    max_positions: int = Field(256, ge=16)
    image_size: int = Field(64, ge=16)
    grid: int = Field(8, ge=1, description="image tokens per side")
    encoder_channels: tuple[int, int] = (32, 64)
    encoder: Literal["patch", "cnn"] = Field(
        "patch", description="patch: strided convs and one conv per patch; cnn: conv + ReLU + max-pool stages")
    object_classes: int = Field(0, ge=0, description="> 0: a per-token head predicting the class of the object "
                                                     "centred in each grid cell (0 = none)")
    object_colours: int = Field(0, ge=0, description="> 0: the same for its colour")
    locate_bins: int = Field(0, ge=0, description="> 0: a head predicting, at the last token of each object a "
                                                  "question names, the column and row (of this many) of its centre")
    locate_layer: int = Field(0, ge=0, description="the layer whose output the locate head reads (0: half the depth)")
    locate_colours: int = Field(0, ge=0, description="> 0: the locate head also predicts the named object's colour "
                                                     "(of this many); needs locate_bins")
    count_classes: int = Field(0, ge=0, description="> 0: a head predicting, at the last token of the description a "
                                                    "count or existence question asks about, how many objects fit "
                                                    "it (0 .. count_classes - 1), read at locate_layer")

    @model_validator(mode="after")
    def _check_locate(self) -> "UnderstandingConfig":
        if self.locate_layer > self.layers:
            raise ValueError(f"locate_layer {self.locate_layer} is deeper than the model's {self.layers} layers")
        if self.locate_colours and not self.locate_bins:
            raise ValueError("locate_colours needs a locate head (locate_bins > 0)")
        return self

    @property
    def locate_at(self) -> int:
        """The layer the locate head reads (1-based: the output of that decoder layer)."""
        return self.locate_layer or max(1, self.layers // 2)

    def lm_config(self) -> Qwen2Config:
        return Qwen2Config(vocab_size=self.vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_positions,
                           tie_word_embeddings=False, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                           bos_token_id=None, use_sliding_window=False)


def _grid_step(cfg: UnderstandingConfig, reduced: int, what: str) -> int:
    """The stride from a ``reduced``-pixel feature map to the token grid."""
    if reduced % cfg.grid:
        raise ValueError(f"grid {cfg.grid} must divide image_size / {what} = {reduced}")
    return reduced // cfg.grid


class _TokenEncoder(nn.Module):
    """``net`` (images -> (B, hidden, grid, grid)), flattened to tokens, optionally layer-normed,
    plus learned positions."""

    def __init__(self, cfg: UnderstandingConfig, net: nn.Module, norm: bool):
        super().__init__()
        self.net = net
        self.norm = nn.LayerNorm(cfg.hidden) if norm else nn.Identity()
        self.pos = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, cfg.hidden) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(images).flatten(2).transpose(1, 2)) + self.pos


class PatchEncoder(_TokenEncoder):
    """64x64 RGB -> (B, grid*grid, hidden): two strided convs, then one conv per patch."""

    def __init__(self, cfg: UnderstandingConfig):
        c1, c2 = cfg.encoder_channels
        k = _grid_step(cfg, cfg.image_size // 4, "4")
        super().__init__(cfg, nn.Sequential(nn.Conv2d(3, c1, 4, stride=2, padding=1), nn.SiLU(),
                                            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.SiLU(),
                                            nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(),
                                            nn.Conv2d(c2, cfg.hidden, k, stride=k)), norm=False)


class CNNEncoder(_TokenEncoder):
    """64x64 RGB -> (B, grid*grid, hidden): 3x3 conv + ReLU + 2x2 max-pool, three times (to 8x8, then
    max-pooled to the grid), a 1x1 projection and a LayerNorm on each token.

    On single-shape world images a linear read-out of this encoder's mean token learns the 6 classes
    (0.67 held-out after 300 steps) where the patch encoder, or this one with SiLU or average pooling,
    stays at 0.31 (reports/NOTES.md "Third round"): rectified responses, max-pooled, carry corners."""

    def __init__(self, cfg: UnderstandingConfig):
        c1, c2 = cfg.encoder_channels
        k = _grid_step(cfg, cfg.image_size // 8, "8")
        super().__init__(cfg, nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2 * k),
                                            nn.Conv2d(c2, cfg.hidden, 1)), norm=True)


class Understanding(nn.Module):
    def __init__(self, cfg: UnderstandingConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = CNNEncoder(cfg) if cfg.encoder == "cnn" else PatchEncoder(cfg)
        self.lm = Qwen2ForCausalLM(cfg.lm_config())
        self.object_heads = nn.ModuleDict()
        if cfg.object_classes:
            self.object_heads["cls"] = nn.Linear(cfg.hidden, cfg.object_classes + 1)
        if cfg.object_colours:
            self.object_heads["colour"] = nn.Linear(cfg.hidden, cfg.object_colours + 1)
        self.locate_head = nn.Linear(cfg.hidden, 2 * cfg.locate_bins) if cfg.locate_bins else None
        self.locate_colour_head = nn.Linear(cfg.hidden, cfg.locate_colours) if cfg.locate_colours else None
        self.count_head = nn.Linear(cfg.hidden, cfg.count_classes) if cfg.count_classes else None

    def add_locate_head(self, bins: int, layer: int = 0) -> None:
        """Give a trained model a (fresh) locate head, e.g. before fine-tuning it with the locate loss."""
        self._add_head("locate_head", "this model already has a locate head", 2 * bins,
                       locate_bins=bins, locate_layer=layer)

    def add_locate_colours(self, colours: int) -> None:
        """Give a model with a locate head a (fresh) colour output beside it (``locate_colours``)."""
        self._add_head("locate_colour_head", "this model's locate head already predicts colours", colours,
                       locate_colours=colours)

    def add_count_head(self, classes: int) -> None:
        """Give a trained model a (fresh) count head (``count_classes``)."""
        self._add_head("count_head", "this model already has a count head", classes, count_classes=classes)

    def _add_head(self, attr: str, exists: str, outputs: int, **fields) -> None:
        """A fresh linear head ``attr`` on the hidden state, with ``fields`` set in the config (validated
        first, so a bad value changes nothing), on the model's device and dtype."""
        if getattr(self, attr) is not None:
            raise ValueError(exists)
        cfg = UnderstandingConfig.model_validate({**self.cfg.model_dump(), **fields})
        ref = next(self.lm.parameters())
        self.cfg = cfg
        setattr(self, attr, nn.Linear(cfg.hidden, outputs).to(device=ref.device, dtype=ref.dtype))

    @property
    def n_image_tokens(self) -> int:
        return self.cfg.grid * self.cfg.grid

    def check_image(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        self.check_image(images)
        return self.encoder(images)

    def _embed(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self._join(self._tokens(images), ids)

    def _join(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens.to(self.lm.dtype), self.lm.get_input_embeddings()(ids)], dim=1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                objects: dict[str, torch.Tensor] | None = None, locate: torch.Tensor | None = None,
                count: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Cross-entropy of next-token prediction; ``labels`` is ``ids`` with IGNORE off the answer.

        ``ids``/``labels`` are right-padded ``(B, T)``; the image prefix is never a target. With
        ``objects`` (see :meth:`_object_loss`), ``locate`` (see :meth:`_locate_loss`) or ``count`` (see
        :meth:`_count_loss`), returns ``{"lm": ..., "object": ..., "locate": ..., "count": ...}`` (the
        losses asked for) from one pass.
        """
        tokens = self._tokens(images)
        read = locate is not None or count is not None
        out = self.lm(inputs_embeds=self._join(tokens, ids), output_hidden_states=read)
        logits = out.logits[:, self.n_image_tokens - 1:-1]
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                  ignore_index=IGNORE)
        if objects is None and not read:
            return lm_loss
        losses = {"lm": lm_loss}
        if objects is not None:
            losses["object"] = self._object_loss(tokens, objects)
        if locate is not None:
            losses["locate"] = self._locate_loss(out.hidden_states[self.cfg.locate_at], locate)
        if count is not None:
            losses["count"] = self._count_loss(out.hidden_states[self.cfg.locate_at], count)
        return losses

    def _count_loss(self, hidden: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the count head: ``count`` is ``(K, 3)`` rows of (batch row, index of a
        description's last token in ``ids``, how many objects fit it); a mean over the K (0 when K is 0)."""
        if self.count_head is None:
            raise ValueError("this model has no count head (count_classes is 0)")
        if count.dim() != 2 or count.shape[1] != 3:
            raise ValueError(f"count targets are (K, 3), got {tuple(count.shape)}")
        if count.numel() == 0:  # still touches the head, so a data-parallel step sees every parameter used
            return 0.0 * self.count_head.weight.float().sum()
        out = self.count_head(hidden[count[:, 0], self.n_image_tokens + count[:, 1]]).float()
        return F.cross_entropy(out, count[:, 2])

    def _locate_loss(self, hidden: torch.Tensor, locate: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the locate head: ``locate`` is ``(K, 4)`` rows of (batch row, index of a
        name's last token in ``ids``, column, row of that object's centre among ``locate_bins``), or
        ``(K, 5)`` with that object's colour index last when the head predicts colours
        (``locate_colours``); the column's plus the row's (plus the colour's) loss, each a mean over
        the K names (0 when K is 0)."""
        if self.locate_head is None:
            raise ValueError("this model has no locate head (locate_bins is 0)")
        heads = [h for h in (self.locate_head, self.locate_colour_head) if h is not None]
        if locate.dim() != 2 or locate.shape[1] != 3 + len(heads):
            raise ValueError(f"locate targets are (K, {3 + len(heads)}) for this head, got {tuple(locate.shape)}")
        if locate.numel() == 0:  # still touches the heads, so a data-parallel step sees every parameter used
            return sum(0.0 * h.weight.float().sum() for h in heads)
        h = hidden[locate[:, 0], self.n_image_tokens + locate[:, 1]]
        out = self.locate_head(h).float()
        bins = self.cfg.locate_bins
        loss = F.cross_entropy(out[:, :bins], locate[:, 2]) + F.cross_entropy(out[:, bins:], locate[:, 3])
        if self.locate_colour_head is not None:
            loss = loss + F.cross_entropy(self.locate_colour_head(h).float(), locate[:, 4])
        return loss

    def _object_loss(self, tokens: torch.Tensor, objects: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the object heads on the image tokens: ``objects[name]`` is ``(B, grid*grid)``,
        the class (or colour) index + 1 of the object centred in each cell, 0 for none, IGNORE where the
        row has no scene. The dense supervision a pretrained vision encoder (BAGEL's SigLIP) brings."""
        if not self.object_heads:
            raise ValueError("this model has no object heads (object_classes / object_colours are 0)")
        loss = tokens.new_zeros((), dtype=torch.float32)
        for name, head in self.object_heads.items():
            logits, target = head(tokens).float(), objects[name].reshape(-1)
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=IGNORE,
                                    reduction="sum")
            loss = loss + total / (target != IGNORE).sum().clamp_min(1)  # a batch without scenes adds 0, not NaN
        return loss

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int = 48) -> list[list[int]]:
        """Greedy answers (without ``eos``) to ``prompts`` (question ids ending in ``sep``).

        Rows are left-padded, ``[pad][image][prompt]``, with positions counted from the image; the
        LM runs on a static KV cache (:class:`~components.models.kv_decoder.LeanLM`).
        """
        self.check_image(images)
        b, n_img = len(prompts), self.n_image_tokens
        width = max(len(p) for p in prompts)
        img = self.encoder(images).to(self.lm.dtype)
        lean = LeanLM(self.lm, b, width + n_img + max_new_tokens)
        embeds = img.new_zeros(b, width + n_img, img.shape[-1])
        valid = torch.ones(b, width + n_img + max_new_tokens, dtype=torch.bool)
        for i, p in enumerate(prompts):
            pad = width - len(p)
            embeds[i, pad:pad + n_img] = img[i]
            embeds[i, pad + n_img:] = lean.embed(torch.tensor(p, dtype=torch.long))
            valid[i, :pad] = False
        key_valid = None if bool(valid.all()) else valid
        pos = (valid[:, :width + n_img].long().cumsum(1) - 1).clamp_min(0)
        logits, _ = lean.forward(embeds, pos, key_valid, last_only=True)
        nxt, last = logits[:, -1].argmax(-1), pos[:, -1:]
        answers: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        for _ in range(max_new_tokens):
            done |= nxt == self.cfg.eos_id
            for i in torch.nonzero(~done).flatten().tolist():
                answers[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            last = last + 1
            logits, _ = lean.forward(lean.embed(nxt[:, None]), last, key_valid)
            nxt = logits[:, -1].argmax(-1)
        return answers
