"""MLflow: one parent run per pipeline run, one child run per executed stage, the registry.

Embedded default: SQLite in the state folder, artifacts beside it. ``MLFLOW_TRACKING_URI``
(and ``HYPERBAGEL_MLFLOW_ARTIFACTS`` for a new experiment's artifact root, e.g. S3)
switch to a server with no code change. Every call goes through ``MlflowClient`` with
explicit run ids (the fluent API is not thread-safe).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

EXPERIMENT = "hyperbagel"
SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)


def tracking_uri(state: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state / 'mlflow.db'}"


def client(state: Path):
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(state)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c, state: Path, name: str = EXPERIMENT) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = os.environ.get("HYPERBAGEL_MLFLOW_ARTIFACTS") or (state / "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=f"{root.rstrip('/')}/{name}")
    except Exception:  # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Flatten nested params to dotted keys and hide anything that looks like a secret."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = "***" if SECRET.search(prefix) else obj
    walk("", params)
    return flat


def start_run(c, state: Path, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(c, state), run_name=name, tags=tags)
    return run.info.run_id


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in redact(params).items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(_key(k), float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


def log_history(c, run_id: str, history: list[dict[str, float]]) -> None:
    for row in history:
        step = int(row.get("step", 0))
        log_metrics(c, run_id, {f"train/{k}": v for k, v in row.items() if k != "step"}, step)


def _key(k: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", k)


def end_run(c, run_id: str, ok: bool = True) -> None:
    c.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def registered_name(model: str, profile: str) -> str:
    """The registry name of a stage's model: the name itself for the default profile, and
    ``NAME-PROFILE`` for the others, so a smoke run never becomes the production champion."""
    return model if profile == "default" else f"{model}-{profile}"


def register(c, name: str, run_id: str, source: str, tags: dict[str, str], description: str = "") -> str:
    """Create a model version (and the registered model if new); returns the version number."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name, description="Hyper-Bagel pipeline model")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
    mv = c.create_model_version(name, source=source, run_id=run_id,
                                tags={k: str(v) for k, v in tags.items()}, description=description)
    return str(mv.version)
