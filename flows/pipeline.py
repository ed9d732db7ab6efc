"""The Prefect flow `pipeline`: every stage in DAG order, then the promotion gates."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from components import config as cfg
from tasks import dvc_ops, registry, tracking
from tasks.locking import workspace_lock
from tasks.ray_runner import shutdown_ray
from tasks.project import Workspace, descendants, find_project, git_sha, workspace
from tasks.settings import PipelineParams
from tasks.stage_task import run_stage


def select_stages(ws: Workspace, only: list[str] | None, downstream: bool) -> list[str]:
    order = ws.order()
    if not only:
        return order
    for s in only:
        ws.stage(s)  # clear error for an unknown stage name
    chosen = descendants(ws.stages, set(only)) if downstream else set(only)
    return [s for s in order if s in chosen]


@task(name="promote", task_run_name="promote-{gate}", cache_policy=NO_CACHE)
def promote_task(ws: Workspace, gate: str, eval_stage: str) -> dict[str, Any]:
    log = get_run_logger()
    c = tracking.client(ws.state)
    model = tracking.registered_name(gate, ws.profile)
    sd = ws.stage(eval_stage)
    scored = sd.evaluates or sd.name  # a stage that evaluates its own model (draft) gates itself
    md5 = ws.out_md5(scored)
    versions = [mv for mv in c.search_model_versions(f"name='{model}'") if mv.tags.get("dvc.md5") == md5]
    if not versions:
        log.warning("no registered %s version has md5 %s; nothing to promote", model, md5)
        return {"model": model, "promoted": False, "reason": "no version"}
    mv = max(versions, key=lambda v: int(v.version))
    pipeline = PipelineParams.model_validate(ws.resolved_params().get("pipeline") or {})
    rules = registry.gate_for(pipeline, gate)
    if rules.teacher:  # the same profile's teacher version it was distilled from is the reference
        rules = rules.model_copy(update={"teacher": tracking.registered_name(rules.teacher, ws.profile)})
    res = registry.promote(c, model, str(mv.version), rules,
                           local=ws.out_path(scored))
    log.info("%s v%s: %s (%s); champion is v%s", model, mv.version,
             "PROMOTED" if res.decision.passed else "rejected", res.decision.reason, res.champion)
    return {"model": model, "version": res.version, "promoted": res.decision.passed,
            "reason": res.decision.reason, "champion": res.champion}


@flow(name="pipeline", log_prints=True)
def pipeline(profile: str = cfg.DEFAULT_PROFILE, stages: list[str] | None = None, downstream: bool = False,
             force: bool = False) -> dict[str, Any]:
    """Bring every stage (or the named ones) up to date, then gate the evaluated models.

    A stage runs only when DVC says one of its deps, params or outs changed.
    """
    t0 = time.time()
    ws = workspace(find_project(), profile)
    ws.validate()  # every parameter, before any compute
    selected = select_stages(ws, stages, downstream)
    with workspace_lock(ws):
        dvc_ops.prepare(ws)
        c = tracking.client(ws.state)
        parent = tracking.start_run(c, ws.state, f"pipeline-{profile}", {
            "kind": "pipeline", "profile": profile, "git.sha": git_sha(ws.project),
            "prefect.flow_run_id": str(flow_run.get_id() or "none"), "stages": ",".join(selected)})
        results: dict[str, dict[str, Any]] = {}
        ok = False
        try:
            for name in selected:
                results[name] = run_stage(ws, name, parent, force=force)
            promotions = []
            for name in selected:
                sd = ws.stage(name)
                if sd.gate and results[name]["executed"]:
                    promotions.append(promote_task(ws, sd.gate, name))
            total = time.time() - t0
            tracking.log_metrics(c, parent, {"total_s": total, **{f"stage_s/{k}": v["seconds"] for k, v in results.items()},
                                             "stages_executed": sum(r["executed"] for r in results.values())})
            ok = True
        finally:
            tracking.end_run(c, parent, ok)
            shutdown_ray()
    return {"profile": profile, "workspace": str(ws.root), "mlflow_parent_run": parent,
            "stages": results, "promotions": promotions, "total_s": time.time() - t0}
