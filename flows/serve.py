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


def schedule_upcoming(names: list[str], n: int = 3) -> int:
    """Make sure the next ``n`` runs of each scheduled deployment exist as Scheduled flow runs.

    Workaround: with the pinned SQLAlchemy 2.1, the scheduler service of Prefect 3.8's server
    fails on its bulk insert ("Can't evaluate bulk DML statement"), so no scheduled run is ever
    created. The runs are created here through the API instead, with the server scheduler's
    own dates and idempotency keys (``scheduled <deployment> <schedule> <date>``): where the
    server's scheduler works, nothing is created twice. Returns the number of upcoming runs."""
    from pydantic import TypeAdapter
    from prefect import get_client
    from prefect.server.schemas.schedules import SCHEDULE_TYPES
    from prefect.states import Scheduled

    adapter = TypeAdapter(SCHEDULE_TYPES)
    upcoming = 0
    with get_client(sync_client=True) as client:
        for name in names:
            dep = client.read_deployment_by_name(name)
            for ds in dep.schedules or []:
                if not ds.active:
                    continue
                schedule = adapter.validate_python(ds.schedule.model_dump())
                for date in schedule._get_dates_generator(n=n, start=datetime.now(tz.utc), end=None):
                    client.create_flow_run_from_deployment(
                        dep.id, state=Scheduled(scheduled_time=date, message="Flow run scheduled"),
                        idempotency_key=f"scheduled {dep.id} {ds.id} {date}", tags=["auto-scheduled", *dep.tags])
                    upcoming += 1
    return upcoming


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


def serve_all(items: list, top_up_every_s: float = 60.0) -> None:
    """Serve the deployments (blocking); keep their next scheduled runs created meanwhile."""
    import threading

    from prefect import serve

    names = [f"{d.flow_name}/{d.name}" for d in items if d.schedules]
    clear_scheduled(names)
    for d in items:
        d.apply()
    stop = threading.Event()

    def top_up() -> None:
        log = get_logger()
        while not stop.is_set():
            try:
                schedule_upcoming(names)
            except Exception as e:  # noqa: BLE001 - the server may be restarting; try again later
                log.warning("could not create the upcoming scheduled runs: %s", e)
            stop.wait(top_up_every_s)

    thread = threading.Thread(target=top_up, name="schedule-top-up", daemon=True)
    thread.start()
    try:
        serve(*items, print_starting_message=True)
    finally:
        stop.set()


def get_logger():
    import logging

    return logging.getLogger("hyperbagel.serve")
