"""Pictures of the shapes world for a person to look at: random scenes, GenEval-shapes prompts
with their oracle renders, and GEdit-shapes edits (source | result), upscaled, with an index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.world.gedit import CATEGORIES, instruction, sample_edit
from components.world.geneval_prompts import make_prompts, oracle_scene
from components.world.prompts import describe
from components.world.render import random_scene, render


def _save(img: np.ndarray, path: Path, scale: int) -> None:
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


def render_preview(out_dir: Path, n: int = 4, seed: int = 0, scale: int = 4) -> list[Path]:
    """``n`` scenes, ``n`` prompts per GenEval tag and one edit per GEdit category (both
    languages in the index); returns the PNGs written. ``index.md`` says what each shows."""
    out = Path(out_dir)
    for sub in ("scenes", "prompts", "edits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written, index = [], ["# Shapes world preview", "", "## Scenes", ""]
    for i in range(n):
        scene = random_scene(rng, int(rng.integers(1, 5)))
        p = out / "scenes" / f"{i:02d}.png"
        _save(render(scene, jitter_seed=seed + i), p, scale)
        written.append(p)
        index.append(f"- `scenes/{p.name}`: {describe(scene)}")
    index += ["", "## GenEval-shapes prompts (oracle renders)", ""]
    by_tag: dict[str, list[dict]] = {}
    for m in make_prompts():
        by_tag.setdefault(m["tag"], []).append(m)
    for tag, metas in by_tag.items():
        for j, m in enumerate(metas[:n]):
            p = out / "prompts" / f"{tag}_{j:02d}.png"
            _save(render(oracle_scene(m, rng), jitter_seed=seed + j), p, scale)
            written.append(p)
            index.append(f"- `prompts/{p.name}`: {m['prompt']}")
    index += ["", "## GEdit-shapes edits (source | result)", ""]
    for task in CATEGORIES:
        src, edit, tgt = sample_edit(task, rng)
        pair = np.concatenate([render(src, jitter_seed=seed), np.full((64, 2, 3), 255, np.uint8),
                               render(tgt, jitter_seed=seed)], axis=1)
        p = out / "edits" / f"{task}.png"
        _save(pair, p, scale)
        written.append(p)
        index.append(f"- `edits/{p.name}`: {instruction(edit, 'en')} / {instruction(edit, 'cn')}")
    (out / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    return written
