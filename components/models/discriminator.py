"""The multi-head discriminator of TSCD (Hyper-Bagel §3.2.2, after DMDX's ADM, reference §2.3).

The backbone is a *trainable* copy of a generation model (Hyper-Bagel trains it, unlike
DMDX's frozen teacher backbone). Small heads (LayerNorm -> Linear -> SiLU -> Linear) read the
image-token hidden states after several intermediate blocks; each head's per-token logits are
averaged over the tokens, and the heads' logits averaged into one logit per sample. It sees a
noisy sample at time ``t`` with its condition, as the generator does.
"""

from __future__ import annotations

import torch
from torch import nn

from components.models.generator import GenCondition, Generator


def default_blocks(depth: int, heads: int = 3) -> list[int]:
    """``heads`` block indices spread evenly over ``depth`` blocks, the last one included."""
    return sorted({max(0, round((i + 1) * depth / heads) - 1) for i in range(heads)})


class MultiHeadDiscriminator(nn.Module):
    def __init__(self, backbone: Generator, blocks: list[int] | None = None):
        super().__init__()
        depth = len(backbone.blocks)
        self.block_ids = list(blocks) if blocks else default_blocks(depth)
        if any(not 0 <= b < depth for b in self.block_ids):
            raise ValueError(f"discriminator blocks {self.block_ids} outside the backbone's 0..{depth - 1}")
        self.backbone = backbone
        w = backbone.cfg.width
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w // 2), nn.SiLU(), nn.Linear(w // 2, 1))
                                   for _ in self.block_ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: GenCondition) -> torch.Tensor:
        """One logit per sample, ``(B,)``."""
        _, features = self.backbone(x, t, cond, return_features=True)
        logits = [head(features[b]).mean(dim=(1, 2)) for head, b in zip(self.heads, self.block_ids)]
        return torch.stack(logits).mean(0)
