"""The `world_data` stage: render the shapes world's data sets and benchmark prompts.

All the work is in :mod:`components.world.datasets`; this module gives it the stage
interface (``Params`` and ``run``) that ``tasks/stage_exec.py`` calls.
"""

from __future__ import annotations

from pathlib import Path

from components.training import StageContext
from components.world.datasets import WorldDataParams as Params
from components.world.datasets import build_world_data

__all__ = ["Params", "run"]


def run(ctx: StageContext, out_dir: Path) -> dict[str, float]:
    def progress(what: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            print(f"[world_data] {what}: {done}/{total}", flush=True)

    return build_world_data(out_dir, ctx.params, progress=progress)
