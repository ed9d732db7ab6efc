"""Tiny test pipeline, stage 2: a trainable stage (Ray Train job)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from components.training import Export, StageContext, TrainParams, TrainState


class Params(TrainParams):
    hidden: int = Field(8, ge=1, le=1024)


def setup(ctx: StageContext) -> TrainState:
    xy = np.loadtxt(ctx.data_dir / "xy.csv", delimiter=",", dtype=np.float32)
    model = torch.nn.Sequential(torch.nn.Linear(4, ctx.params.hidden), torch.nn.Linear(ctx.params.hidden, 1))
    model = ctx.wrap_module(model)
    opt = torch.optim.Adam(model.parameters(), lr=ctx.params.lr)
    return TrainState({"model": model}, {"opt": opt}, data=torch.from_numpy(xy))


def train_step(state: TrainState, step: int) -> dict[str, float]:
    xy = state.data
    idx = torch.randint(0, len(xy), (32,))
    pred = state.modules["model"](xy[idx, :4]).squeeze(-1)
    loss = torch.mean((pred - xy[idx, 4]) ** 2)
    state.optimizers["opt"].zero_grad()
    loss.backward()
    state.optimizers["opt"].step()
    return {"loss": loss.item()}


def export(state: TrainState) -> Export:
    m = getattr(state.modules["model"], "module", state.modules["model"])
    grid = np.full((8, 8, 3), 128, dtype=np.uint8)
    return Export({k: v for k, v in m.state_dict().items()}, {"hidden": m[0].out_features}, {"grid": grid})
