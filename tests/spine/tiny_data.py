"""Tiny test pipeline, stage 1: a regression data set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from components.training import Export, StageContext, TrainParams, TrainState


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0)
    n: int = Field(256, ge=8, le=100_000)


def run(ctx: StageContext, out_dir: Path) -> dict[str, float]:
    rng = np.random.default_rng(ctx.params.seed)
    x = rng.normal(size=(ctx.params.n, 4)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32) + 0.01 * rng.normal(size=ctx.params.n)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savetxt(out_dir / "xy.csv", np.c_[x, y], fmt="%.6f", delimiter=",")
    return {"rows": float(ctx.params.n)}
