"""The Prefect task that brings one stage up to date through DVC and pushes its outs."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import checkpoints
from tasks import dvc_ops
from tasks.project import Workspace
from tasks.stage_exec import ENV_FLOW_RUN, ENV_PARENT_RUN


class StageIntegrityError(RuntimeError):
    """A stage's recorded inputs or outputs no longer match their bytes."""


def check_integrity(ws: Workspace, stage: str) -> None:
    """Before DVC touches anything: every input produced by another stage, and the stage's own
    existing out, must match the md5 in dvc.lock. A mismatch means someone changed a checkpoint
    in place; the stage fails and every out stays as it is."""
    sd = ws.stage(stage)
    producers = {o: s.name for s in ws.stages.values() for o in s.outs}
    checks = [(producers[d], "input") for d in sd.deps if d in producers] + [(stage, "output")]
    for src, role in checks:
        md5, path = ws.out_md5(src), ws.out_path(src)
        if md5 is None or (role == "output" and not path.exists()):
            continue
        try:
            checkpoints.verify_md5(path, md5, what=f"{role} of stage {src!r}")
        except checkpoints.ChecksumMismatch as e:
            raise StageIntegrityError(f"stage {stage!r} refused to run: {e}") from None


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def run_stage(ws: Workspace, stage: str, parent_run_id: str | None, force: bool = False) -> dict[str, Any]:
    """Run ``stage`` when DVC says something it depends on changed; skip it otherwise."""
    log = get_run_logger()
    check_integrity(ws, stage)
    if not force and stage not in dvc_ops.changed_stages(ws, [stage]):
        log.info("stage %s is up to date (dvc status): skipped", stage)
        return {"stage": stage, "executed": False, "md5": ws.out_md5(stage), "seconds": 0.0}
    from prefect.runtime import flow_run

    env = {ENV_PARENT_RUN: parent_run_id or "", ENV_FLOW_RUN: str(flow_run.get_id() or ""),
           "HYPERBAGEL_PROJECT": str(ws.project)}
    if ws.stage(stage).kind == "train":
        from tasks.ray_runner import ensure_ray
        from tasks.settings import PipelineParams

        pipeline = PipelineParams.model_validate(ws.resolved_params().get("pipeline") or {})
        env["RAY_ADDRESS"] = ensure_ray(ws.project, pipeline.ray_num_cpus)  # one runtime per flow run
    t0 = time.time()
    log.info("stage %s: running (dvc repro)", stage)
    dvc_ops.repro(ws, stage, env, force=force)
    seconds = time.time() - t0
    dvc_ops.push(ws, stage)
    md5 = ws.out_md5(stage)
    log.info("stage %s: done in %.1f s, out %s md5 %s pushed", stage, seconds, ws.stage(stage).out, md5)
    return {"stage": stage, "executed": True, "md5": md5, "seconds": seconds}
