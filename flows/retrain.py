"""The Prefect flow `retrain`: poll the watch for new batches, add the valid ones to the data,
run the pipeline (only the stages that read the data rerun), gate the candidates.

`hyperbagel serve` runs it on an interval, so a batch that lands is trained on with no
person involved. A malformed batch is moved to ``_rejected/`` with the reason beside it;
nothing else changes (no commit, no run, the champion stays).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from components import checkpoints
from components import config as cfg
from tasks import batches, dvc_ops, ingest
from tasks.locking import workspace_lock
from tasks.project import Workspace, find_project, workspace
from tasks.settings import pipeline_params


@task(name="ingest", task_run_name="ingest-{name}", cache_policy=NO_CACHE)
def ingest_one(ws: Workspace, stage: str, watch: str, name: str) -> dict[str, Any]:
    """Fetch one batch, validate and version it; accept or reject it at the source."""
    from components.world.datasets import DatasetError

    log = get_run_logger()
    src = batches.open_source(watch)
    uri = src.uri(name)
    tmp = Path(tempfile.mkdtemp(prefix="batch-", dir=ws.state))
    try:
        local = src.fetch(name, tmp / name)
        try:
            res = ingest.ingest(ws, stage, local, name, uri, str(flow_run.get_id() or ""))
        except (DatasetError, batches.BatchSourceError) as e:
            reason = ingest.relative_reason(str(e), local)
            moved = src.reject(name, f"batch {name!r} from {uri} rejected: {reason}")
            log.warning("batch %s rejected (%s); moved to %s", name, reason, moved)
            return {"name": name, "status": "rejected", "reason": reason, "moved_to": moved}
        moved = src.accept(name)
        log.info("batch %s (md5 %s, rows %s) added to %s: data md5 %s; kept at %s",
                 name, res["md5"], res["rows"], stage, res["data_md5"], moved)
        return {**res, "status": "accepted", "moved_to": moved}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@flow(name="retrain", log_prints=True)
def retrain(profile: str = cfg.DEFAULT_PROFILE, watch: str | None = None,
            data_stage: str | None = None) -> dict[str, Any]:
    """One poll: ingest every complete batch under the watch, then run the pipeline if any was added."""
    from flows.pipeline import pipeline

    log = get_run_logger()
    ws = workspace(find_project(), profile)
    ws.validate()
    settings = pipeline_params(ws).retrain
    watch = watch or settings.watch
    if not watch:
        raise cfg.ConfigError("no watched location: set pipeline.retrain.watch in params.yaml or pass --watch")
    stage = ingest.data_stage(ws, data_stage or settings.data_stage)
    pending = batches.open_source(watch).pending()
    if not pending:
        log.info("no new batch under %s", watch)
        return {"profile": profile, "watch": watch, "batches": [], "pipeline": None}
    log.info("new batches under %s: %s", watch, ", ".join(pending))
    if ws.out_md5(stage) is None or stage in dvc_ops.changed_stages(ws, [stage]):
        pipeline(profile=profile, stages=[stage])  # the data the batches are added to must exist first
    with workspace_lock(ws):
        dvc_ops.prepare(ws)
        results = [ingest_one(ws, stage, watch, name) for name in pending]
    accepted = [r for r in results if r["status"] == "accepted"]
    run = None
    if accepted:
        run = pipeline(profile=profile)
        data_md5 = ws.out_md5(stage)
        manifest = checkpoints.read_json(ws.out_path(stage) / checkpoints.MANIFEST)
        versions = ingest.annotate_consumers(ws, data_md5, manifest.get("batches") or [])
        log.info("retrained on %s: model versions %s", ", ".join(r["name"] for r in accepted),
                 ", ".join(versions) or "none")
    return {"profile": profile, "watch": watch, "batches": results, "pipeline": run}
