"""The `world_data` stage's data sets, in a documented JSONL + PNG format (docs/data-formats.md).

``t2i/t2i.jsonl``: one row per image: ``{"id", "prompt", "image", "scene"}`` where
``image`` is a path relative to ``t2i/`` and ``scene`` the scene graph the image was
rendered from. Output is byte-identical for the same parameters (DVC hashes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from components.world.palette import CLASSES, COLOURS
from components.world.prompts import describe
from components.world.render import random_scene, render


class WorldDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of every scene")
    n_t2i: int = Field(2000, ge=1, le=1_000_000, description="text-to-image pairs")
    max_objects: int = Field(3, ge=1, le=5, description="objects per scene, 1..max")
    image_size: int = Field(64, ge=64, le=64, description="canvas side in pixels (64)")


class DatasetError(ValueError):
    """A data file is malformed; the message names the file, the line and the field."""


def _save_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="PNG", optimize=False, compress_level=6)


def build_world_data(out_dir: Path, params: WorldDataParams,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    out_dir = Path(out_dir)
    t2i = out_dir / "t2i"
    (t2i / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(params.seed)
    rows = []
    for i in range(params.n_t2i):
        scene = random_scene(rng, int(rng.integers(1, params.max_objects + 1)), params.image_size)
        name = f"images/{i:06d}.png"
        _save_png(render(scene, jitter_seed=params.seed * 1_000_003 + i), t2i / name)
        rows.append({"id": f"t2i-{i:06d}", "prompt": describe(scene), "image": name, "scene": scene.to_json()})
        if progress is not None:
            progress("t2i", i + 1, params.n_t2i)
    with open(t2i / "t2i.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    validate_dataset(t2i, "t2i")
    return {"t2i_pairs": float(len(rows))}


_REQUIRED = {"t2i": {"id": str, "prompt": str, "image": str, "scene": dict}}


def validate_dataset(path: Path, kind: str | None = "t2i") -> dict[str, int]:
    """Check every row of ``<path>/<kind>.jsonl``; raise DatasetError naming file, line, field."""
    kind = kind or "t2i"
    if kind not in _REQUIRED:
        raise DatasetError(f"unknown data set kind {kind!r}; kinds: {', '.join(_REQUIRED)}")
    f = Path(path) / f"{kind}.jsonl"
    if not f.exists():
        raise DatasetError(f"{f}: missing")
    n = 0
    for lineno, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
        for field, typ in _REQUIRED[kind].items():
            if not isinstance(row.get(field), typ):
                raise DatasetError(f"{f}:{lineno}: field {field!r} must be a {typ.__name__}")
        img = Path(path) / row["image"]
        if not img.exists():
            raise DatasetError(f"{f}:{lineno}: field 'image': {row['image']} does not exist")
        for j, o in enumerate(row["scene"].get("objects", [])):
            if o.get("cls") not in CLASSES or o.get("colour") not in COLOURS:
                raise DatasetError(f"{f}:{lineno}: field 'scene.objects[{j}]': unknown class or colour")
        n += 1
    return {"rows": n}
