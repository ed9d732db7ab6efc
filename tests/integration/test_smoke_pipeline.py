"""The product's own pipeline (dvc.yaml at the project root) on the smoke profile, end to end
through Prefect, Ray Train, DVC and MLflow; state in a temporary folder."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_smoke_profile_runs_every_stage_then_nothing(tmp_path, monkeypatch, prefect_server, ray_runtime):
    from flows.pipeline import pipeline
    from tasks.project import read_stages

    monkeypatch.setenv("HYPERBAGEL_PROJECT", str(REPO))
    monkeypatch.setenv("HYPERBAGEL_STATE", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stages = list(read_stages(REPO / "dvc.yaml"))

    first = pipeline(profile="smoke")
    assert [s for s, r in first["stages"].items() if r["executed"]] == stages
    ws = tmp_path / "state" / "workspaces" / "smoke"
    for s in stages:
        manifest = json.loads((ws / "data" / s / "manifest.json").read_text())
        assert manifest["stage"] == s and manifest["profile"] == "smoke"

    again = pipeline(profile="smoke")
    assert not any(r["executed"] for r in again["stages"].values())
