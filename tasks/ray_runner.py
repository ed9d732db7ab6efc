"""Run a trainable stage as a Ray Train ``TorchTrainer`` job.

One Ray runtime serves a whole flow run: the flow starts it (or joins ``RAY_ADDRESS``)
and the stage commands that ``dvc repro`` launches join it through ``RAY_ADDRESS``.
Workers run :func:`components.training.run_training`; rank 0 reports a resumable
training state every ``checkpoint_every`` steps, and after a worker failure Ray
restarts the workers, which continue from the last reported state
(``FailureConfig(max_failures)``). Run state lives in Ray's storage
(``<state>/ray`` or S3), outside the DVC outs that ``dvc repro`` deletes, under a
run name derived from the stage's inputs, so rerunning the same inputs after a
crash resumes too.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ComputeParams(BaseModel):
    """Ray Train resources for one stage (``pipeline.compute`` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = Field(1, gt=0, le=256)
    use_gpu: bool = False
    max_failures: int = Field(2, ge=-1, description="worker failures to recover from (-1: unlimited)")
    torch_threads: int = Field(2, ge=1, le=256, description="torch intra-op threads per worker")


_OWNED = False

# Ray Train's placement-group cleaner polls the controller through Ray's state API, which needs the
# dashboard this project's runtime does not start: it then logs this line every few seconds of every
# training job (hundreds per stage) and keeps going. Workers drop that one record; nothing else.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_CLEANER_NOISE = "Failed to query Ray Train Controller actor state"


class _DropCleanerNoise:
    def filter(self, record) -> bool:
        return _CLEANER_NOISE not in record.getMessage()


def quiet_worker_logs() -> None:
    """Ray's ``worker_process_setup_hook`` for this project's runtime (see ``_CLEANER_NOISE``)."""
    import logging

    logging.getLogger(_CLEANER_LOGGER).addFilter(_DropCleanerNoise())


def init_ray(attempts: int = 3, **kwargs: Any) -> None:
    """``ray.init`` with retries: on a busy machine the raylet may miss Ray's fixed 30 s
    start-up window ("The current node timed out during startup")."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            ray.shutdown()
            time.sleep(2.0)


def ensure_ray(project: Path, num_cpus: int | None = None) -> str:
    """Start a local Ray runtime, or join ``RAY_ADDRESS``; returns the address to share.

    A runtime already initialised in this process (a test session's) is reused as is."""
    import ray

    global _OWNED
    if not ray.is_initialized():
        _OWNED = True
        env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")])),
                    "HYPERBAGEL_PROJECT": str(project),
                    # Ray Train's print patch logs a worker's print() to stderr and also tees it to stdout
                    # (Ray wraps stdout): Ray forwards both, so every progress line reached the console twice
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
        # no credentials here: a runtime_env can end up in Ray's logs. A local runtime inherits this
        # process's environment; S3 storage gets its credentials through its filesystem object.
        for key in ("MLFLOW_TRACKING_URI", "HYPERBAGEL_STATE", "HYPERBAGEL_FAULT_AT_STEP",
                    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
            if os.environ.get(key):
                env_vars[key] = os.environ[key]
        kwargs: dict[str, Any] = dict(runtime_env={"env_vars": env_vars,
                                                   "worker_process_setup_hook": "tasks.ray_runner.quiet_worker_logs"},
                                      log_to_driver=True, logging_level="WARNING")
        address = os.environ.get("RAY_ADDRESS")
        if address:
            init_ray(address=address, **kwargs)
        else:
            init_ray(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    return ray.get_runtime_context().gcs_address


def shutdown_ray() -> None:
    """Stop the Ray runtime if this process started it."""
    import sys

    global _OWNED
    if _OWNED and "ray" in sys.modules:
        import ray

        ray.shutdown()
        _OWNED = False


class _RayReporter:
    def resume_dir(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        local = Path(ckpt.to_directory()) / "state"
        return local if local.exists() else None

    def report(self, step: int, metrics: dict[str, float], state_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(state_dir.parent)) if state_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}")


def _fault_hook(marker_dir: str):
    """Fault injection for drills and tests: ``HYPERBAGEL_FAULT_AT_STEP=N`` kills the rank-0
    worker process once when it reaches step N (a marker file makes it happen only once)."""
    at = os.environ.get("HYPERBAGEL_FAULT_AT_STEP")
    if not at:
        return None
    marker = Path(marker_dir) / "fault-injected"

    def hook(step: int) -> None:
        import ray.train

        if step == int(at) and ray.train.get_context().get_world_rank() == 0 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(step))
            os._exit(17)
    return hook


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from components import checkpoints
    from components.training import StageContext, run_training

    torch.set_num_threads(int(config["torch_threads"]))
    rctx = ray.train.get_context()
    rank, world = rctx.get_world_rank(), rctx.get_world_size()
    module = importlib.import_module(config["module"])
    params = module.Params.model_validate(config["params"])
    wrap = (lambda m: m)
    if world > 1:
        import ray.train.torch as rtt
        wrap = rtt.prepare_model
    ctx = StageContext(params=params, data_dir=Path(config["data_dir"]) if config["data_dir"] else None,
                       parent_dir=Path(config["parent_dir"]) if config["parent_dir"] else None,
                       rank=rank, world_size=world, wrap_module=wrap,
                       extra={k: Path(v) for k, v in config.get("extra", {}).items()})

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if rank == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            print(f"[{config['stage']}] step {step}/{total} {shown}", flush=True)

    state = run_training(module, ctx, _RayReporter(), progress=progress,
                         fault_hook=_fault_hook(config["marker_dir"]))
    with tempfile.TemporaryDirectory(prefix="final-") as tmp:
        ckpt = None
        metrics: dict[str, float] = dict(state.extra["history"][-1]) if state.extra.get("history") else {}
        metrics["resumed_from"] = float(state.extra.get("resumed_from", 0))
        metrics["loop_s"] = float(state.extra.get("loop_s", 0.0))
        if rank == 0:
            exp = module.export(state)
            if hasattr(module, "evaluate"):
                t_eval = time.perf_counter()
                metrics.update({k: float(v) for k, v in module.evaluate(state).items()})
                metrics["loop_s"] += time.perf_counter() - t_eval
            checkpoints.save_checkpoint(Path(tmp) / "export", exp.tensors, exp.config,
                                        {"history": state.extra.get("history", [])}, exp.samples)
            checkpoints.save_train_state(Path(tmp) / "state", state.modules, state.optimizers,
                                         params.steps, {"history": state.extra.get("history", [])})
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"final": 1.0, **metrics}, checkpoint=ckpt, checkpoint_dir_name="final")


@dataclass
class TrainResult:
    export_dir: Path  # model.safetensors + config.json + samples/ (+ manifest with history)
    metrics: dict[str, float]
    history: list[dict[str, float]]
    ray_run: str


def storage_path(state: Path) -> str:
    return os.environ.get("HYPERBAGEL_RAY_STORAGE") or str(state / "ray")


def storage_target(state: Path) -> tuple[str, Any]:
    """Ray Train's ``(storage_path, storage_filesystem)``: a local folder, or for ``s3://`` a
    pyarrow S3 filesystem configured from the standard AWS settings (endpoint included)."""
    storage = storage_path(state)
    if storage.startswith("s3://"):
        from tasks import s3

        bucket, prefix = s3.split(storage)
        return f"{bucket}/{prefix}".rstrip("/"), s3.pyarrow_fs()
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    return storage, None


def run_train_stage(*, stage: str, module: str, params: dict[str, Any], data_dir: Path | None,
                    parent_dir: Path | None, compute: ComputeParams, run_name: str, state: Path,
                    workdir: Path, extra: dict[str, Path] | None = None) -> TrainResult:
    """Fit the stage with a TorchTrainer and bring its final export to ``workdir``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = storage_path(state)
    path, filesystem = storage_target(state)
    marker_dir = state / "faults" / run_name
    config = {"stage": stage, "module": module, "params": params,
              "data_dir": str(data_dir) if data_dir else None,
              "parent_dir": str(parent_dir) if parent_dir else None,
              "extra": {k: str(v) for k, v in (extra or {}).items()},
              "torch_threads": compute.torch_threads, "marker_dir": str(marker_dir)}
    resources = {"CPU": compute.cpus_per_worker}
    if compute.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=compute.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage}: the Ray Train job reported no final checkpoint")
    local = Path(workdir) / "final"
    shutil.rmtree(local, ignore_errors=True)
    result.checkpoint.to_directory(str(local))
    from components.checkpoints import read_json
    history = read_json(local / "export" / "manifest.json").get("history", [])
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics.pop("final", None)
    return TrainResult(local / "export", metrics, history, f"{storage}/{run_name}")
