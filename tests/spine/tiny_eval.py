"""Tiny test pipeline, stage 3: evaluation of the trained model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from components.training import Export, StageContext, TrainParams, TrainState


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(64, ge=1)


def run(ctx: StageContext, out_dir: Path) -> dict[str, float]:
    from components.checkpoints import load_checkpoint

    ck = load_checkpoint(ctx.extra["evaluates"])
    model = torch.nn.Sequential(torch.nn.Linear(4, ck.config["hidden"]), torch.nn.Linear(ck.config["hidden"], 1))
    model.load_state_dict(ck.tensors)
    xy = torch.from_numpy(np.loadtxt(ctx.data_dir / "xy.csv", delimiter=",", dtype=np.float32))[: ctx.params.n]
    with torch.no_grad():
        mse = float(torch.mean((model(xy[:, :4]).squeeze(-1) - xy[:, 4]) ** 2))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({"mse": mse}))
    return {"mse": mse, "score": 1.0 / (1.0 + mse)}
