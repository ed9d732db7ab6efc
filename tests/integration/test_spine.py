"""The spine through the real stack on the tiny pipeline: Prefect test server, Ray Train,
a real git + DVC repository, MLflow on SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import checkpoints

pytestmark = pytest.mark.integration


def _lock_md5(proj, stage):
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"])


def _executed(result):
    return {k for k, v in result["stages"].items() if v["executed"]}


def _edit_params(proj, fn):
    doc = yaml.safe_load((proj / "params.yaml").read_text())
    fn(doc)
    (proj / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _no_cleaner_noise_in_ray_logs(expected: str) -> None:
    """The Ray session's worker logs hold the training job's lines (``expected``) and none of Ray
    Train's state-API retry warnings, which the project's worker set-up hook drops."""
    import ray

    from tasks.ray_runner import _CLEANER_NOISE

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    texts = [f.read_text(errors="replace") for f in logs.glob("worker-*") if f.is_file()]
    assert any(expected in t for t in texts), f"no worker log of {logs} holds {expected!r}"
    noisy = [t for t in texts if _CLEANER_NOISE in t]
    assert not noisy, noisy[0][-2000:]


def test_pipeline_lineage_skip_rerun_and_gate(tiny_project, prefect_server, ray_runtime):
    from flows.pipeline import pipeline
    from tasks import registry, tracking
    from tasks.project import state_dir

    proj = tiny_project
    first = pipeline(profile="default")
    assert _executed(first) == {"tiny_data", "tiny_train", "tiny_eval"}
    _no_cleaner_noise_in_ray_logs("[tiny_train] step")

    # manifests name their inputs' md5 exactly as dvc.lock records them
    train_manifest = json.loads((proj / "data/tiny_train/manifest.json").read_text())
    eval_manifest = json.loads((proj / "data/tiny_eval/manifest.json").read_text())
    assert train_manifest["data"]["md5"] == _lock_md5(proj, "tiny_data")
    assert eval_manifest["evaluates"]["md5"] == _lock_md5(proj, "tiny_train")
    assert eval_manifest["data"]["md5"] == _lock_md5(proj, "tiny_data")
    assert checkpoints.dir_md5(proj / "data/tiny_train") == _lock_md5(proj, "tiny_train")
    for key in ("params_hash", "git_sha", "mlflow_run_id", "prefect_flow_run_id", "metrics"):
        assert train_manifest[key], key
    assert train_manifest["metrics"]["loss"] < 5.0
    assert (proj / "data/tiny_train/model.safetensors").exists()

    # MLflow: one child run per executed stage, with metrics and lineage tags
    c = tracking.client(state_dir(proj))
    parent = first["mlflow_parent_run"]
    exp = c.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    children = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["tiny_data", "tiny_eval", "tiny_train"]
    for r in children:
        assert r.data.tags["dvc.md5"] == _lock_md5(proj, r.data.tags["stage"])
        assert r.data.tags["prefect.flow_run_id"] not in ("", "none")
        assert r.data.metrics
    train_run = next(r for r in children if r.data.tags["stage"] == "tiny_train")
    assert train_run.data.tags["data.md5"] == _lock_md5(proj, "tiny_data")
    assert c.get_metric_history(train_run.info.run_id, "train/loss")

    # the gate promoted the passing candidate
    v1 = c.get_model_version_by_alias("tiny-model", "champion")
    assert v1.tags["promotion.decision"] == "promoted"
    assert float(v1.tags["metric.score"]) > 0.2

    # a rerun with no change executes nothing
    second = pipeline(profile="default")
    assert _executed(second) == set()

    # one stage's parameter changed: that stage and its descendants run, nothing else;
    # this run also drills a worker failure at step 25: training resumes from step 20
    _edit_params(proj, lambda d: d["tiny_train"].update(hidden=6))
    os.environ["HYPERBAGEL_FAULT_AT_STEP"] = "25"
    try:
        third = pipeline(profile="default")
    finally:
        del os.environ["HYPERBAGEL_FAULT_AT_STEP"]
    assert _executed(third) == {"tiny_train", "tiny_eval"}
    resumed = json.loads((proj / "data/tiny_train/manifest.json").read_text())["metrics"]
    # resumed from a checkpoint reported before the failure (Ray registers reports asynchronously,
    # so the last one it had may be step 10 or 20), not from scratch, and finished all 40 steps
    assert resumed["resumed_from"] in (10.0, 20.0) and resumed["step"] == 40.0
    v2 = c.get_model_version_by_alias("tiny-model", "champion")
    assert int(v2.version) == int(v1.version) + 1
    assert c.get_model_version_by_alias("tiny-model", "previous").version == v1.version

    # a failing candidate is refused, with the reason tagged; the champion stays
    def fail_gate(d):
        d["tiny_train"]["hidden"] = 5
        d["pipeline"]["promotion"]["tiny-model"]["rules"] = [{"metric": "score", "min": 2.0}]
    _edit_params(proj, fail_gate)
    fourth = pipeline(profile="default")
    assert _executed(fourth) == {"tiny_train", "tiny_eval"}
    latest = max(c.search_model_versions("name='tiny-model'"), key=lambda v: int(v.version))
    assert latest.tags["promotion.decision"] == "rejected"
    assert "score" in latest.tags["promotion.reason"] and "< min 2" in latest.tags["promotion.reason"]
    assert c.get_model_version_by_alias("tiny-model", "champion").version == v2.version

    # lineage of the champion: the chain back to the data set
    info = registry.lineage(c, "models:/tiny-model@champion")
    stages = [e["stage"] for e in info["chain"]]
    assert stages == ["tiny_train", "tiny_data"]
    cli = subprocess.run([sys.executable, "-m", "flows.cli", "lineage", "models:/tiny-model@champion", "--json"],
                         cwd=proj, capture_output=True, text=True, env={**os.environ})
    assert cli.returncode == 0, cli.stderr
    parsed = json.loads(cli.stdout)
    assert [e["stage"] for e in parsed["chain"]] == ["tiny_train", "tiny_data"]
    assert parsed["chain"][0]["md5"] == v2.tags["dvc.md5"]

    # a parent checkpoint whose bytes no longer match dvc.lock: the stage fails, outs stay
    from tasks.stage_task import StageIntegrityError

    before = checkpoints.dir_md5(proj / "data/tiny_train")
    with open(proj / "data/tiny_data/xy.csv", "r+b") as f:  # one byte of the parent changes
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(StageIntegrityError, match="tiny_data"):
        pipeline(profile="default", stages=["tiny_train"], force=True)
    assert checkpoints.dir_md5(proj / "data/tiny_train") == before

