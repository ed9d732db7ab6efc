"""Dense object heads: per token of a grid, the class and colour of the object centred in its cell.

The world's scenes give every training image these labels; heads on an expert's image tokens
trained with them supply the supervision a pretrained vision encoder brings to BAGEL (SigLIP
for understanding; for generation, the representation alignment of REPA, Yu et al. 2024,
with the scene's labels standing in for a pretrained encoder's features).

Targets are ``(B, grid*grid)`` long tensors: the class (or colour) index + 1 of the object whose
centre lies in the cell, 0 where none does, ``IGNORE`` where the row has no scene
(``components.base_data.object_cells`` builds them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def make_object_heads(width: int, classes: int, colours: int) -> nn.ModuleDict:
    """Linear heads over ``width``-wide tokens: ``cls`` (``classes`` + none), ``colour`` likewise;
    a head is left out when its count is 0."""
    heads = nn.ModuleDict()
    if classes:
        heads["cls"] = nn.Linear(width, classes + 1)
    if colours:
        heads["colour"] = nn.Linear(width, colours + 1)
    return heads


def object_loss(heads: nn.ModuleDict, tokens: torch.Tensor, objects: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the heads of the mean cross-entropy over labelled cells; ``tokens`` ``(B, grid*grid, width)``.
    A batch without any scene adds 0, not NaN."""
    if not heads:
        raise ValueError("this model has no object heads (object_classes / object_colours are 0)")
    loss = tokens.new_zeros((), dtype=torch.float32)
    for name, head in heads.items():
        logits, target = head(tokens).float(), objects[name].reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=IGNORE, reduction="sum")
        loss = loss + total / (target != IGNORE).sum().clamp_min(1)
    return loss
