"""The generation experts' training data: the world's T2I pairs and edit triplets as latents.

Every stage that trains a generator (the teacher in ``base``, the students of ``cfg_distill``,
``tscd`` and ``dmdo``) draws its batches here: images are encoded once by the frozen
autoencoder (normalised latents), texts once by the model's tokenizer (fixed-length ids).
A batch holds ``n_t2i`` T2I rows (no source image) followed by ``n_edit`` edit rows (the
source latent as conditioning, present); the caller applies any dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from components.base_data import WorldSets
from components.inference import autocast
from components.models.autoencoder import SampleSpace
from components.models.generator import GenCondition

ENCODE_BATCH = 256


def images_to_unit(u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1]."""
    return u8.float() / 127.5 - 1.0


@dataclass
class GenData:
    t2i: torch.Tensor                  # (N, C, h, w) latents of the T2I images
    t2i_text: torch.Tensor             # (N, L) token ids
    edit_src: torch.Tensor | None      # (M, C, h, w) latents of the edit sources
    edit_tgt: torch.Tensor | None      # (M, C, h, w) latents of the edit results
    edit_text: torch.Tensor | None     # (M, L) token ids of the instructions
    pad_id: int

    @property
    def has_edits(self) -> bool:
        return self.edit_src is not None and len(self.edit_src) > 0

    @classmethod
    def build(cls, world: WorldSets, autoencoder: SampleSpace, text_ids: Callable[[list[str]], torch.Tensor],
              pad_id: int, bf16: bool = True) -> "GenData":
        autoencoder.eval()

        def enc(u8: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(bf16):
                return torch.cat([autoencoder.encode(images_to_unit(u8[i:i + ENCODE_BATCH])).float()
                                  for i in range(0, len(u8), ENCODE_BATCH)])

        edit = world.edit
        return cls(enc(world.t2i.images), text_ids(world.t2i.texts),
                   enc(edit.images) if edit is not None else None,
                   enc(edit.targets) if edit is not None else None,
                   text_ids(edit.texts) if edit is not None else None, pad_id)

    def batch(self, n_t2i: int, n_edit: int, g: torch.Generator) -> tuple[torch.Tensor, GenCondition]:
        """``x0`` latents and their conditions: ``n_t2i`` T2I rows, then ``n_edit`` edit rows."""
        if n_edit and not self.has_edits:
            raise ValueError("the data holds no edit triplets")
        i_t = torch.randint(0, len(self.t2i), (n_t2i,), generator=g)
        x0, text = self.t2i[i_t], self.t2i_text[i_t]
        src, has = torch.zeros_like(x0), torch.zeros(n_t2i)
        if n_edit:
            i_e = torch.randint(0, len(self.edit_src), (n_edit,), generator=g)
            x0 = torch.cat([x0, self.edit_tgt[i_e]])
            text = torch.cat([text, self.edit_text[i_e]])
            src = torch.cat([src, self.edit_src[i_e]])
            has = torch.cat([has, torch.ones(n_edit)])
        return x0, GenCondition(text, src, has, pad_id=self.pad_id)

    def task_batch(self, batch_size: int, edit_fraction: float, g: torch.Generator
                   ) -> tuple[torch.Tensor, GenCondition, bool]:
        """A batch of one task: edits with probability ``edit_fraction`` (when the data has edits),
        else T2I. Returns ``(x0, cond, is_edit)``; T2I conditions carry no source at all."""
        is_edit = self.has_edits and bool(torch.rand((), generator=g) < edit_fraction)
        if is_edit:
            x0, cond = self.batch(0, batch_size, g)
            return x0, cond, True
        x0, cond = self.batch(batch_size, 0, g)
        return x0, cond.without_image(), False
