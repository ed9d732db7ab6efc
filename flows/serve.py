"""`hyperbagel serve`: the project's Prefect deployments, served from one process.

- ``pipeline-<profile>``: the pipeline on the cron of ``pipeline.schedule`` (or ``--cron``);
- ``retrain-<profile>``: the retraining poll every ``pipeline.retrain.poll_interval_s`` when a
  watch is configured (``pipeline.retrain.watch`` or ``--watch``);
- ``promote-<profile>``: re-gate a registered version on demand (no schedule).

Every deployment has a concurrency limit of 1, and each run also takes the profile's
workspace lock, so a scheduled run and a retraining run never overlap. Schedules need a
Prefect server (``prefect server start`` + ``PREFECT_API_URL``); the temporary local
server cannot schedule.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as tz
from typing import Any

from prefect import flow, get_run_logger

from components import config as cfg


@flow(name="promote", log_prints=True)
def promote(profile: str = cfg.DEFAULT_PROFILE, model: str = "", version: str | None = None) -> dict[str, Any]:
    """Gate ``model`` (the stage's model name, e.g. hyperbagel-base) version ``version`` (default:
    the latest) with the rules in params.yaml; on pass it becomes ``champion``."""
    from tasks import registry, tracking
    from tasks.project import find_project, workspace
    from tasks.settings import pipeline_params

    ws = workspace(find_project(), profile)
    name = tracking.registered_name(model, profile)
    c = tracking.client(ws.state)
    if version is None:
        version = str(max(int(v.version) for v in c.search_model_versions(f"name='{name}'")))
    rules = registry.gate_for(pipeline_params(ws), model)
    if rules.teacher:
        rules = rules.model_copy(update={"teacher": tracking.registered_name(rules.teacher, profile)})
    res = registry.promote(c, name, str(version), rules)
    get_run_logger().info("%s v%s: %s (%s); champion is v%s", name, version,
                          "PROMOTED" if res.decision.passed else "rejected", res.decision.reason, res.champion)
    return {"model": name, "version": res.version, "promoted": res.decision.passed,
            "reason": res.decision.reason, "champion": res.champion}


def deployments(profile: str, cron: str | None = None, watch: str | None = None,
                poll_interval_s: int | None = None, timezone: str | None = None) -> list:
    """The RunnerDeployments to serve; schedule values default to params.yaml's ``pipeline``."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from flows.pipeline import pipeline
    from flows.retrain import retrain
    from tasks.project import find_project, workspace
    from tasks.settings import ScheduleParams, pipeline_params

    ws = workspace(find_project(), profile)
    ws.validate()
    settings = pipeline_params(ws)
    sched = ScheduleParams(cron=cron or settings.schedule.cron, timezone=timezone or settings.schedule.timezone)
    watch = watch or settings.retrain.watch
    interval = poll_interval_s or settings.retrain.poll_interval_s
    common: dict[str, Any] = dict(tags=["hyperbagel", profile], concurrency_limit=1,
                                  entrypoint_type=EntrypointType.MODULE_PATH)
    out = [pipeline.to_deployment(
        f"pipeline-{profile}", schedules=[Cron(sched.cron, timezone=sched.timezone)] if sched.cron else None,
        parameters={"profile": profile}, description="the Hyper-Bagel pipeline; DVC decides which stages run",
        **common)]
    if watch:
        out.append(retrain.to_deployment(
            # anchored just after start-up: the first poll runs at once, then every `interval` seconds
            f"retrain-{profile}", schedules=[Interval(timedelta(seconds=interval),
                                                      anchor_date=datetime.now(tz.utc) + timedelta(seconds=5))],
            parameters={"profile": profile, "watch": watch},
            description=f"poll {watch} for new batches; retrain on the valid ones", **common))
    out.append(promote.to_deployment(f"promote-{profile}", parameters={"profile": profile},
                                     description="gate a registered version on demand", **common))
    return out


def clear_scheduled(names: list[str]) -> int:
    """Delete the not-yet-started scheduled runs of these deployments (left by a previous
    ``serve`` whose schedule may differ), so a restart does not run a backlog of late runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    removed = 0
    with get_client(sync_client=True) as client:
        ids = []
        for name in names:
            try:
                ids.append(client.read_deployment_by_name(name).id)
            except Exception:  # noqa: BLE001 - not registered yet: nothing to clear
                continue
        if not ids:
            return 0
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED]))))
        for run in runs:
            client.delete_flow_run(run.id)
            removed += 1
    return removed


def serve_all(items: list) -> None:
    """Serve the deployments (blocking). The server's scheduler creates their scheduled runs."""
    from prefect import serve

    clear_scheduled([f"{d.flow_name}/{d.name}" for d in items if d.schedules])
    serve(*items, print_starting_message=True)
