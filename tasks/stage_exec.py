"""The command every dvc.yaml stage runs: ``hyperbagel stage exec NAME``.

It checks the stage's inputs against ``dvc.lock`` (md5 of the parent checkpoint and
of the data) before reading them, opens the stage's MLflow child run, runs the
stage (a Ray Train job for trainable stages, in process for data and evaluation
stages), writes the out atomically with its manifest, logs params, metrics, sample
grids and lineage tags, and registers a model version for model-producing stages.

It works under the Prefect flow (which passes the parent MLflow run, the Prefect
flow-run id and the shared Ray address through the environment) and under a plain
``dvc repro`` (then it opens a top-level MLflow run and starts its own Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from components import checkpoints
from components import config as cfg
from components.training import StageContext
from tasks import tracking
from tasks.project import Workspace, git_sha, workspace
from tasks.settings import PipelineParams

ENV_PARENT_RUN = "HYPERBAGEL_MLFLOW_PARENT_RUN"
ENV_FLOW_RUN = "HYPERBAGEL_PREFECT_FLOW_RUN"
WS_MARKER = ".hyperbagel-workspace.json"


def current_workspace(cwd: Path | None = None) -> Workspace:
    cwd = Path(cwd or Path.cwd()).resolve()
    marker = cwd / WS_MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        return workspace(Path(info["project"]), info["profile"])
    return workspace(cwd, cfg.DEFAULT_PROFILE)


def stage_params(ws: Workspace) -> dict[str, Any]:
    """The stage sections as the workspace's own params.yaml holds them (what DVC tracked)."""
    raw = cfg.load_yaml(ws.root / "params.yaml")
    return cfg.resolve_profile(raw, cfg.DEFAULT_PROFILE)


def input_lineage(ws: Workspace, stage: str) -> dict[str, dict[str, str] | None]:
    """Path and md5 (as dvc.lock records them) of the stage's parent checkpoint, data and
    evaluated model; every one is verified against its bytes before use."""
    sd = ws.stage(stage)
    out: dict[str, dict[str, str] | None] = {}
    for role, src in sd.inputs():
        if not src:
            out[role] = None
            continue
        md5 = ws.out_md5(src)
        path = ws.out_path(src)
        if md5 is None:
            raise checkpoints.ChecksumMismatch(
                f"stage {stage!r} needs {src!r} ({path}), which dvc.lock does not record; run {src!r} first")
        checkpoints.verify_md5(path, md5, what=f"{role} {src!r}")
        manifest = path / checkpoints.MANIFEST
        info = {"stage": src, "path": ws.stage(src).out, "md5": md5}
        if manifest.exists():
            m = checkpoints.read_json(manifest)
            for key in ("mlflow_run_id",):
                if m.get(key):
                    info[key] = str(m[key])
        out[role] = info
    return out


def execute(stage: str, cwd: Path | None = None) -> dict[str, Any]:
    ws = current_workspace(cwd)
    sd = ws.stage(stage)
    all_params = stage_params(ws)
    params_model = cfg.validate_section(stage, sd.module, all_params.get(stage), ws.profile)
    pipeline = PipelineParams.model_validate(all_params.get("pipeline") or {})
    params = params_model.model_dump(mode="json")
    lineage = input_lineage(ws, stage)
    phash = checkpoints.params_hash(params)
    c = tracking.client(ws.state)
    flow_run = os.environ.get(ENV_FLOW_RUN)
    tags = {"stage": stage, "profile": ws.profile, "params.hash": phash, "git.sha": git_sha(ws.project),
            "prefect.flow_run_id": flow_run or "none", "dvc.out": sd.out}
    for role, info in lineage.items():
        if info:
            tags[f"{role}.stage"], tags[f"{role}.md5"], tags[f"{role}.path"] = info["stage"], info["md5"], info["path"]
    run_id = tracking.start_run(c, ws.state, f"{stage}", tags, os.environ.get(ENV_PARENT_RUN))
    t0 = time.time()
    ok = False
    try:
        tracking.log_params(c, run_id, params)
        out_dir = ws.out_path(stage)
        manifest: dict[str, Any] = {
            "stage": stage, "profile": ws.profile, "module": sd.module,
            **lineage,
            "params": params, "params_hash": phash, "git_sha": tags["git.sha"],
            "mlflow_run_id": run_id, "prefect_flow_run_id": flow_run,
        }
        if sd.kind == "train":
            metrics = _run_train(ws, sd, params, lineage, pipeline, c, run_id, manifest, out_dir, phash)
        else:
            metrics = _run_inline(ws, sd, params_model, lineage, out_dir, manifest)
        metrics["stage_s"] = time.time() - t0
        tracking.log_metrics(c, run_id, metrics)
        _record_timing(out_dir, metrics)
        md5 = checkpoints.dir_md5(out_dir)
        c.set_tag(run_id, "dvc.md5", md5)
        samples = out_dir / "samples"
        if samples.exists():
            c.log_artifacts(run_id, str(samples), "samples")
        if sd.model:
            c.log_artifacts(run_id, str(out_dir), "checkpoint")
            run = c.get_run(run_id)
            vtags = {**{k: v for k, v in tags.items() if k != "dvc.out"}, "dvc.md5": md5, "dvc.path": sd.out,
                     "mlflow.run_id": run_id}
            name = tracking.registered_name(sd.model, ws.profile)
            version = tracking.register(c, name, run_id, f"{run.info.artifact_uri}/checkpoint", vtags)
            c.set_tag(run_id, "model.version", f"{name}/{version}")
        if sd.gate:  # an evaluation scores the model it evaluates; a self-evaluating stage (draft) its own
            scored = lineage["evaluates"] if sd.evaluates else {"md5": md5}
            _tag_evaluated_version(c, scored, tracking.registered_name(sd.gate, ws.profile), metrics, run_id)
        ok = True
        return {"run_id": run_id, "metrics": metrics, "md5": md5}
    finally:
        tracking.end_run(c, run_id, ok)


def _record_timing(out_dir: Path, metrics: dict[str, float]) -> None:
    """stage_s is known only once the out is written: it goes to the manifest's `timing`."""
    path = out_dir / checkpoints.MANIFEST
    manifest = checkpoints.read_json(path)
    manifest["timing"] = {"stage_s": metrics["stage_s"], "loop_s": metrics.get("loop_s", 0.0)}
    checkpoints.write_json(path, manifest)


def _tag_evaluated_version(c, evaluated: dict[str, str] | None, model: str, metrics: dict[str, float],
                           run_id: str) -> None:
    if not evaluated:
        return
    for mv in c.search_model_versions(f"name='{model}'"):
        if mv.tags.get("dvc.md5") == evaluated["md5"]:
            for k, v in metrics.items():
                c.set_model_version_tag(model, mv.version, f"metric.{k}", str(v))
            c.set_model_version_tag(model, mv.version, "eval.run_id", run_id)


def _run_train(ws, sd, params, lineage, pipeline, c, run_id, manifest, out_dir, phash) -> dict[str, float]:
    from tasks.ray_runner import ensure_ray, run_train_stage

    ensure_ray(ws.project, pipeline.ray_num_cpus)
    inputs = "-".join((lineage[r] or {}).get("md5", "none")[:8] for r in ("parent", "teacher", "data"))
    run_name = f"{ws.profile}-{sd.name}-{phash[:8]}-{inputs}"
    with tempfile.TemporaryDirectory(prefix=f"{sd.name}-", dir=ws.state) as work:
        extra = {"teacher": ws.out_path(sd.teacher)} if sd.teacher else {}
        if params.get("source") in ("import", "finetune") and params.get("import_path"):
            extra["import"] = fetch_import(ws, c, str(params["import_path"]), Path(work) / "import")
        res = run_train_stage(
            stage=sd.name, module=sd.module, params=params,
            data_dir=ws.out_path(sd.data) if sd.data else None,
            parent_dir=ws.out_path(sd.parent) if sd.parent else None,
            compute=pipeline.compute_for(sd.name), run_name=run_name, state=ws.state, workdir=Path(work),
            extra=extra or None)
        tracking.log_history(c, run_id, res.history)
        manifest.update({"metrics": res.metrics, "ray_run": res.ray_run, "history": res.history})
        exp = checkpoints.load_checkpoint(res.export_dir)
        samples = {}
        sdir = res.export_dir / "samples"
        if sdir.exists():
            import numpy as np
            from PIL import Image
            samples = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(sdir.glob("*.png"))}
        checkpoints.save_checkpoint(out_dir, exp.tensors, exp.config, manifest, samples)
    return res.metrics


def fetch_import(ws, c, source: str, dest: Path) -> Path:
    """The local folder of a stage's ``import_path``: a folder (relative paths are read from the
    project, so every profile's workspace finds it), ``s3://bucket/prefix`` (downloaded with
    boto3) or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (the registered version's
    checkpoint, from MLflow). The stage checks it against ``import_md5`` before reading it."""
    if source.startswith("models:/"):
        from tasks import registry

        return registry.download_checkpoint(c, registry.resolve(c, source), dest)
    if source.startswith("s3://"):
        from tasks.batches import S3Source

        parent, _, name = source.rstrip("/").rpartition("/")
        if not name or parent in ("s3:/", "s3:"):
            raise ValueError(f"import_path {source!r}: give s3://bucket/prefix/of/the/checkpoint")
        out = S3Source(parent).fetch(name, dest)
        if not any(out.iterdir()):
            raise FileNotFoundError(f"import_path {source!r}: no objects under that prefix")
        return out
    path = Path(source).expanduser()
    path = path if path.is_absolute() else ws.project / path
    if not path.is_dir():
        raise FileNotFoundError(f"import_path {source!r}: no checkpoint folder at {path}")
    return path


def _run_inline(ws, sd, params_model, lineage, out_dir: Path, manifest: dict[str, Any]) -> dict[str, float]:
    import importlib

    module = importlib.import_module(sd.module)
    ctx = StageContext(params=params_model, data_dir=ws.out_path(sd.data) if sd.data else None,
                       parent_dir=ws.out_path(sd.parent) if sd.parent else None,
                       extra={role: ws.out_path(src) for role, src in sd.inputs()
                              if src and role in ("evaluates", "teacher")}, stage=sd.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        t_loop = time.perf_counter()
        metrics = {k: float(v) for k, v in (module.run(ctx, tmp) or {}).items()}
        metrics["loop_s"] = time.perf_counter() - t_loop
        manifest["metrics"] = metrics
        checkpoints.write_json(tmp / checkpoints.MANIFEST, manifest)
        checkpoints.replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics
