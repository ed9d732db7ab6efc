"""The base stage's view of the world data: every set validated, then held in memory as tensors.

Reads ``t2i/``, ``edit/``, ``qa/`` and ``captions/`` (docs/data-formats.md) into uint8 image
tensors and strings. Understanding rows are split by image into training and held-out
rows, so the held-out accuracy is measured on scenes the expert never saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.models.understanding import IGNORE
from components.world.datasets import validate_dataset

CAPTION_PROMPT = "describe the image in detail"


@dataclass
class Rows:
    images: torch.Tensor                    # (N, 3, H, W) uint8
    texts: list[str]                        # prompt / instruction / question
    targets: torch.Tensor | None = None     # edit results (N, 3, H, W) uint8
    answers: list[str] = field(default_factory=list)
    scenes: list[dict | None] = field(default_factory=list)  # the scene graph of each row's image, if given

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> "Rows":
        pick = torch.tensor(idx, dtype=torch.long)
        return Rows(self.images[pick], [self.texts[i] for i in idx],
                    None if self.targets is None else self.targets[pick],
                    [self.answers[i] for i in idx] if self.answers else [],
                    [self.scenes[i] for i in idx] if self.scenes else [])


@dataclass
class WorldSets:
    t2i: Rows
    edit: Rows | None
    und_train: Rows | None
    und_heldout: Rows | None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _load(folder: Path, kind: str, image_keys: tuple[str, ...], limit: int | None
          ) -> tuple[list[dict], list[list[np.ndarray]]]:
    validate_dataset(folder, kind)  # a malformed row stops here, named by file, line and field
    rows = _read_jsonl(folder / f"{kind}.jsonl")[:limit]
    return rows, [[_image(folder / r[k]) for k in image_keys] for r in rows]


def _heldout(image_name: str, fraction: float) -> bool:
    h = int(hashlib.md5(image_name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def load_world(data_dir: Path, limit: int | None = None, heldout_fraction: float = 0.05) -> WorldSets:
    data_dir = Path(data_dir)
    rows, imgs = _load(data_dir / "t2i", "t2i", ("image",), limit)
    t2i = Rows(_stack([i[0] for i in imgs]), [r["prompt"] for r in rows])
    edit = None
    if (data_dir / "edit").exists():
        rows, imgs = _load(data_dir / "edit", "edit", ("input_image", "output_image"), limit)
        edit = Rows(_stack([i[0] for i in imgs]), [r["instruction"] for r in rows], _stack([i[1] for i in imgs]))
    und: list[tuple[str, np.ndarray, str, str, dict | None]] = []
    if (data_dir / "qa").exists():
        rows, imgs = _load(data_dir / "qa", "qa", ("image",), limit)
        und += [(r["image"], i[0], r["question"], r["answer"], r.get("scene")) for r, i in zip(rows, imgs)]
    if (data_dir / "captions").exists():
        rows, imgs = _load(data_dir / "captions", "captions", ("image",), limit)
        und += [(r["image"], i[0], CAPTION_PROMPT, r["caption"], r.get("scene")) for r, i in zip(rows, imgs)]
    if not und:
        return WorldSets(t2i, edit, None, None)
    every = Rows(_stack([u[1] for u in und]), [u[2] for u in und], answers=[u[3] for u in und],
                 scenes=[u[4] for u in und])
    held = [i for i, u in enumerate(und) if _heldout(u[0], heldout_fraction)]
    train = sorted(set(range(len(und))) - set(held))
    return WorldSets(t2i, edit, every.subset(train), every.subset(held) if held else None)


def object_cells(scene: dict | None, grid: int, size: int, classes: tuple[str, ...], colours: tuple[str, ...]
                 ) -> dict[str, list[int]]:
    """Per cell of a ``grid x grid`` partition of a ``size``-pixel image (row-major): the class and
    colour index + 1 of the object whose centre lies in it, 0 where none does; IGNORE everywhere
    when the row has no scene (the object heads then learn nothing from it)."""
    n = grid * grid
    if scene is None:
        return {"cls": [IGNORE] * n, "colour": [IGNORE] * n}
    cls, col = [0] * n, [0] * n
    step = size / grid
    for o in scene.get("objects", []):
        if o.get("cls") not in classes:  # digit glyphs are not GenEval classes
            continue
        cell = min(grid - 1, int(o["cy"] // step)) * grid + min(grid - 1, int(o["cx"] // step))
        cls[cell] = classes.index(o["cls"]) + 1
        col[cell] = colours.index(o["colour"]) + 1 if o.get("colour") in colours else IGNORE
    return {"cls": cls, "colour": col}
