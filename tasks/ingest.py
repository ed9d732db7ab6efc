"""Add a validated batch to a data stage's out and version it with DVC.

The batch is validated and merged into a copy of the data stage's out
(:func:`components.world.datasets.ingest_batch`: one bad row anywhere and nothing is
written); the copy replaces the out atomically, its ``manifest.json`` lists the batch
(name, md5, source, rows), ``dvc commit`` records the new md5 in ``dvc.lock`` and
``dvc push`` sends it to the remote. Stages that read the data are then out of date
and rerun; the data stage itself is not. An MLflow run (``kind=ingest``) records the
batch as a dataset input and links the new data md5 to the previous one, so lineage
walks from a model through the batch back to the generated data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components import checkpoints
from tasks import dvc_ops, tracking
from tasks.project import Workspace, git_sha


def data_stage(ws: Workspace, name: str | None) -> str:
    if name:
        if ws.stage(name).kind != "data":
            raise ValueError(f"stage {name!r} is not a data stage")
        return name
    for s in ws.order():
        if ws.stage(s).kind == "data":
            return s
    raise ValueError("the pipeline has no data stage to add batches to")


def dataset_input(name: str, md5: str, source: str, rows: dict[str, int], context: str):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=name, digest=md5[:36], source_type="s3" if source.startswith("s3://") else "local",
                 source=json.dumps({"uri": source}), profile=json.dumps({"rows": rows, "md5": md5}))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def ingest(ws: Workspace, stage: str, batch_dir: Path, name: str, source: str,
           flow_run_id: str | None = None) -> dict[str, Any]:
    """The caller holds the workspace lock. Raises ``DatasetError`` (nothing changed) on a bad batch."""
    from components.world.datasets import ingest_batch

    sd = ws.stage(stage)
    out, old_md5 = ws.out_path(stage), ws.out_md5(stage)
    if old_md5 is None:
        raise ValueError(f"stage {stage!r} has not run in profile {ws.profile!r}; run the pipeline first")
    checkpoints.verify_md5(out, old_md5, what=f"out of data stage {stage!r}")
    batch_md5 = checkpoints.dir_md5(batch_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.ingest-", dir=out.parent))
    try:
        new = staging / "new"
        shutil.copytree(out, new)
        rows = ingest_batch(batch_dir, new, name=name)  # validates everything before writing
        c = tracking.client(ws.state)
        tags = {"kind": "ingest", "stage": stage, "profile": ws.profile, "dvc.out": sd.out,
                "previous.stage": stage, "previous.md5": old_md5, "previous.path": sd.out,
                "batch.name": name, "batch.md5": batch_md5, "batch.source": source,
                "git.sha": git_sha(ws.project), "prefect.flow_run_id": flow_run_id or "none"}
        run_id = tracking.start_run(c, ws.state, f"ingest-{name}", tags)
        ok = False
        try:
            c.log_inputs(run_id, datasets=[dataset_input(name, batch_md5, source, rows, "ingest")])
            tracking.log_metrics(c, run_id, {f"rows/{k}": v for k, v in rows.items()})
            manifest_path = new / checkpoints.MANIFEST
            manifest = checkpoints.read_json(manifest_path) if manifest_path.exists() else {"stage": stage}
            manifest.setdefault("batches", []).append({
                "name": name, "md5": batch_md5, "source": source, "rows": rows,
                "previous_md5": old_md5, "mlflow_run_id": run_id})
            checkpoints.write_json(manifest_path, manifest)
            checkpoints.replace_dir(new, out)
            dvc_ops.run_dvc(ws, "--wait-for-lock", "commit", "--force", "-q", stage)
            dvc_ops.push(ws, stage)
            new_md5 = ws.out_md5(stage)
            checkpoints.verify_md5(out, new_md5, what=f"out of data stage {stage!r}")
            c.set_tag(run_id, "dvc.md5", new_md5)
            ok = True
        finally:
            tracking.end_run(c, run_id, ok)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"name": name, "md5": batch_md5, "source": source, "rows": rows, "stage": stage,
            "previous_md5": old_md5, "data_md5": new_md5, "mlflow_run_id": run_id}


def annotate_consumers(ws: Workspace, data_md5: str, batches: list[dict[str, Any]]) -> list[str]:
    """Record the batches on every run that read ``data_md5`` (dataset inputs + a tag) and on
    the model versions those runs registered. Returns the model versions annotated."""
    c = tracking.client(ws.state)
    exp = tracking.experiment_id(c, ws.state)
    runs = c.search_runs([exp], filter_string=f"tags.`data.md5` = '{data_md5}'")
    label = ",".join(f"{b['name']}:{b['md5']}" for b in batches)
    versions = []
    for r in runs:
        context = "evaluation" if r.data.tags.get("evaluates.md5") else "training"
        c.log_inputs(r.info.run_id, datasets=[dataset_input(b["name"], b["md5"], b["source"], b["rows"], context)
                                               for b in batches])
        c.set_tag(r.info.run_id, "data.batches", label)
        mv = r.data.tags.get("model.version")
        if mv:
            name, _, version = mv.rpartition("/")
            c.set_model_version_tag(name, version, "data.batches", label)
            versions.append(mv)
    return versions


def relative_reason(message: str, root: Path) -> str:
    """A validation message with the temporary download folder taken out of its paths."""
    return message.replace(str(root) + os.sep, "").replace(str(root), ".")
