"""Operations on the real stack (issue 6): S3 everywhere (moto in server mode on 127.0.0.1),
retraining on a batch that lands in an S3 prefix, the lineage audit, and the Prefect
deployments with their schedules on a real `prefect server start`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_DVC, TINY_PARAMS, git_commit_all

pytestmark = pytest.mark.integration

BUCKET = "hb-ops"
WATCH = f"s3://{BUCKET}/incoming"
PROFILE = "smoke"
MODEL = "tiny-model-smoke"  # the smoke profile registers NAME-PROFILE
SECRET = "hb-secret-7f3c9e1d"  # a credential that must never be recorded anywhere


def _s3():
    from tasks import s3

    return s3.client()


def _keys(prefix: str = "") -> dict[str, int]:
    from tasks import s3

    return dict(s3.list_keys(f"s3://{BUCKET}/{prefix}"))


def _upload_batch(local: Path, name: str) -> None:
    s3c = _s3()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3c.upload_file(str(p), BUCKET, f"incoming/{name}/{p.relative_to(local).as_posix()}")
    s3c.put_object(Bucket=BUCKET, Key=f"incoming/{name}/_READY", Body=b"")  # written last


def _make_batch(root: Path, n: int = 4, break_row: bool = False) -> Path:
    """A batch of text-to-image pairs in the world's documented format."""
    from components.world.datasets import WorldDataParams, _write_jsonl, build_t2i

    rows = build_t2i(root / "t2i", WorldDataParams(seed=7), n)
    for r in rows:
        r["id"] = "user-" + r["id"]
    if break_row:
        rows[-1]["image"] = "images/missing.png"
    _write_jsonl(root / "t2i" / "t2i.jsonl", rows)
    return root


def _executed(result):
    return {k for k, v in result["stages"].items() if v["executed"]}


@pytest.fixture(scope="module")
def ops(tmp_path_factory, moto_s3, prefect_server, ray_runtime):
    """The tiny project with every artifact store on S3, after one pipeline run (champion v1)."""
    from flows.pipeline import pipeline

    proj = tmp_path_factory.mktemp("ops") / "proj"
    proj.mkdir()
    (proj / "dvc.yaml").write_text(TINY_DVC.format(spine=REPO / "tests" / "spine", repo=REPO))
    params = yaml.safe_load(TINY_PARAMS)
    params["pipeline"]["schedule"] = {"cron": "0 3 * * *"}
    params["pipeline"]["retrain"] = {"watch": WATCH, "poll_interval_s": 60}
    # 20 smoke steps reach a score of about 0.1: a floor the first candidate passes, so a champion exists
    params["profiles"]["smoke"]["pipeline"] = {"promotion": {"tiny-model": {"rules": [{"metric": "score", "min": 0.02}]}}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text(".state/\n")
    (proj / ".dvc").mkdir()  # the project's DVC remote: S3 (endpoint and credentials from the AWS config)
    (proj / ".dvc" / "config").write_text(f"[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://{BUCKET}/dvc\n")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    git_commit_all(proj, "tiny project on S3")
    (proj / ".state").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"HYPERBAGEL_PROJECT": str(proj), "MLFLOW_TRACKING_URI": f"sqlite:///{proj / '.state' / 'mlflow.db'}",
                     "AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                     "AWS_DEFAULT_REGION": "us-east-1",
                     "HYPERBAGEL_MLFLOW_ARTIFACTS": f"s3://{BUCKET}/mlflow",
                     "HYPERBAGEL_RAY_STORAGE": f"s3://{BUCKET}/ray"}.items():
            mp.setenv(k, v)
        _s3().create_bucket(Bucket=BUCKET)
        t0 = time.time()
        first = pipeline(profile=PROFILE)
        print(f"first pipeline run on S3: {time.time() - t0:.1f} s; {first['promotions']}")
        assert _executed(first) == {"tiny_data", "tiny_train", "tiny_eval"}
        yield {"proj": proj, "first": first, "endpoint": moto_s3}


def test_retraining_on_an_s3_batch(ops, tmp_path):
    from flows.retrain import retrain
    from tasks import registry, tracking
    from tasks.project import state_dir, workspace

    proj = ops["proj"]
    ws = workspace(proj, PROFILE)
    c = tracking.client(state_dir(proj))
    v1 = c.get_model_version_by_alias(MODEL, "champion")
    lock_before = (ws.root / "dvc.lock").read_text()

    # a malformed batch: rejected with its reason, moved aside whole, nothing else changes
    bad = _make_batch(tmp_path / "bad", break_row=True)
    _upload_batch(bad, "batch-bad")
    uploaded = {k.split("/", 2)[2] for k in _keys("incoming/batch-bad/")}
    t0 = time.time()
    res = retrain(profile=PROFILE)  # one poll, as the retrain deployment's schedule runs it
    print(f"poll with a malformed batch: {time.time() - t0:.1f} s")
    [b] = res["batches"]
    assert b["status"] == "rejected" and res["pipeline"] is None
    assert "t2i/t2i.jsonl:4: field 'image'" in b["reason"] and "missing.png" in b["reason"], b["reason"]
    assert not _keys("incoming/batch-bad/")
    kept = {k.split("/", 3)[3] for k in _keys("incoming/_rejected/batch-bad/")}
    assert kept == uploaded | {"REJECTED.txt"}  # every object kept, the reason beside them
    reason = _s3().get_object(Bucket=BUCKET, Key="incoming/_rejected/batch-bad/REJECTED.txt")["Body"].read().decode()
    assert "field 'image'" in reason
    assert (ws.root / "dvc.lock").read_text() == lock_before
    assert c.get_model_version_by_alias(MODEL, "champion").version == v1.version
    assert len(c.search_model_versions(f"name='{MODEL}'")) == 1

    # a valid batch: versioned with DVC, only the stages that read the data rerun, gated
    good = _make_batch(tmp_path / "good")
    from components.checkpoints import dir_md5
    batch_md5 = dir_md5(good)
    _upload_batch(good, "batch-001")
    # while another run holds the workspace, a poll stops with a clear message and takes nothing
    from tasks.locking import WorkspaceBusy, workspace_lock
    with workspace_lock(ws):
        with pytest.raises(WorkspaceBusy, match="already running"):
            retrain(profile=PROFILE)
    assert "incoming/batch-001/_READY" in _keys("incoming/batch-001/")
    assert (ws.root / "dvc.lock").read_text() == lock_before
    t0 = time.time()
    res = retrain(profile=PROFILE)
    print(f"poll with a valid batch (ingest + retrain): {time.time() - t0:.1f} s")
    [b] = res["batches"]
    assert b["status"] == "accepted" and b["md5"] == batch_md5
    assert _executed(res["pipeline"]) == {"tiny_train", "tiny_eval"}  # tiny_data is not regenerated
    lock = yaml.safe_load((ws.root / "dvc.lock").read_text())
    data_md5 = lock["stages"]["tiny_data"]["outs"][0]["md5"]
    assert data_md5 == b["data_md5"] != ops["first"]["stages"]["tiny_data"]["md5"]
    assert any(d["md5"] == data_md5 for d in lock["stages"]["tiny_train"]["deps"])
    assert _keys("incoming/_accepted/batch-001/") and not _keys("incoming/batch-001/")

    # manifests: the data lists the batch, the candidate names that data
    data_manifest = json.loads((ws.root / "data/tiny_data/manifest.json").read_text())
    assert [x["md5"] for x in data_manifest["batches"]] == [batch_md5]
    train_manifest = json.loads((ws.root / "data/tiny_train/manifest.json").read_text())
    assert train_manifest["data"]["md5"] == data_md5

    # the registry: a new version, champion only if its gate passed
    versions = sorted(c.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    v2 = versions[-1]
    assert int(v2.version) == int(v1.version) + 1
    assert v2.tags["data.batches"] == f"batch-001:{batch_md5}"
    champion = c.get_model_version_by_alias(MODEL, "champion")
    if v2.tags["promotion.decision"] == "promoted":
        assert champion.version == v2.version
    else:
        assert champion.version == v1.version

    # lineage: model -> training data (the ingest of batch-001) -> the generated data
    info = registry.lineage(c, f"models:/{MODEL}/{v2.version}")
    assert [e["stage"] for e in info["chain"]] == ["tiny_train", "tiny_data", "tiny_data"]
    assert info["chain"][1]["batch"]["md5"] == batch_md5 and info["batches"][0]["md5"] == batch_md5
    cli = subprocess.run([sys.executable, "-m", "flows.cli", "lineage", f"models:/{MODEL}/{v2.version}"],
                         cwd=proj, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert cli.returncode == 0 and "+ batch batch-001" in cli.stdout and batch_md5 in cli.stdout, cli.stdout
    # MLflow dataset inputs: on the ingest run and on the training run
    train_run = c.get_run(v2.run_id)
    digests = [d.dataset.digest for d in train_run.inputs.dataset_inputs]
    assert batch_md5[:36] in digests
    assert json.loads(train_run.inputs.dataset_inputs[0].dataset.profile)["md5"] == batch_md5


def test_audit_passes_then_names_a_flipped_remote_object(ops):
    from tasks import tracking
    from tasks.project import state_dir

    proj = ops["proj"]
    uri = f"models:/{MODEL}@champion"

    def audit(*extra):
        return subprocess.run([sys.executable, "-m", "flows.cli", "audit", uri, *extra], cwd=proj,
                              capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})

    t0 = time.time()
    r = audit()
    print(f"audit (CLI): {time.time() - t0:.1f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAIL" not in r.stdout and f"audit of {MODEL} v" in r.stdout and r.stdout.rstrip().endswith("checks)")
    for needle in ("fetched from the DVC remote", "md5 in dvc.lock", "manifest names MLflow run",
                   "metrics recorded", "promotion decision recorded", "MLflow artifact checkpoint md5"):
        assert needle in r.stdout, needle
    c = tracking.client(state_dir(proj))
    if "data.batches" in c.get_model_version_by_alias(MODEL, "champion").tags:  # the retrained version won
        assert "manifest lists batch batch-001" in r.stdout

    # flip one byte of the champion's weights as stored in the DVC remote
    md5 = c.get_model_version_by_alias(MODEL, "champion").tags["dvc.md5"]
    s3c = _s3()
    listing = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"dvc/files/md5/{md5[:2]}/{md5[2:]}")["Body"].read())
    weights = next(e["md5"] for e in listing if e["relpath"] == "model.safetensors")
    key = f"dvc/files/md5/{weights[:2]}/{weights[2:]}"
    body = bytearray(s3c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3c.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))

    r = audit("--json")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert not report["ok"]
    assert any(f["object"] == f"s3://{BUCKET}/{key}" and "model.safetensors" in f["check"] for f in report["failed"])
    assert f"s3://{BUCKET}/{key}" in r.stderr


def test_s3_objects_under_their_prefixes(ops):
    keys = _keys()
    by_prefix = {}
    for k in keys:
        by_prefix.setdefault(k.split("/", 1)[0], []).append(k)
    print({p: len(v) for p, v in sorted(by_prefix.items())})
    assert any(k.startswith("dvc/files/md5/") and k.endswith(".dir") for k in keys)  # DVC remote
    assert any(k.startswith("mlflow/hyperbagel/") and "/artifacts/checkpoint/model.safetensors" in k for k in keys)
    assert any(k.startswith(f"ray/{PROFILE}-tiny_train-") and "/final/" in k for k in keys)  # Ray Train storage
    # nothing else in the bucket but the watched prefix
    assert set(by_prefix) <= {"dvc", "mlflow", "ray", "incoming"}


def test_credentials_are_never_recorded(ops):
    """The secret key reaches clients only: not the MLflow store, manifests, DVC config or S3 objects."""
    proj = ops["proj"]
    needle = SECRET.encode()
    local = [p for p in (proj / ".state").rglob("*") if p.is_file() and "dvc-cache" not in p.parts
             and p.stat().st_size < 50_000_000]
    assert local
    leaks = [str(p) for p in local if needle in p.read_bytes()]
    s3c = _s3()
    leaks += [k for k in _keys() if needle in s3c.get_object(Bucket=BUCKET, Key=k)["Body"].read()]
    assert not leaks


def test_a_local_watch_takes_only_complete_batches_and_keeps_everything(tmp_path):
    from tasks import batches

    root = tmp_path / "incoming"
    for name in ("b1", "b2", "half"):
        _make_batch(root / name, n=2)
    (root / "b1" / batches.READY).touch()
    (root / "b2" / batches.READY).touch()  # "half" has no _READY yet: still being written
    src = batches.open_source(str(root))
    assert src.pending() == ["b1", "b2"]
    got = src.fetch("b1", tmp_path / "fetched")
    assert (got / "t2i" / "t2i.jsonl").exists() and not (got / batches.READY).exists()
    files = sorted(p.relative_to(root / "b2").as_posix() for p in (root / "b2").rglob("*") if p.is_file())
    src.accept("b1")
    src.reject("b2", "t2i/t2i.jsonl:1: field 'prompt' must be a str")
    assert src.pending() == [] and (root / "_accepted" / "b1" / "t2i" / "t2i.jsonl").exists()
    kept = sorted(p.relative_to(root / "_rejected" / "b2").as_posix()
                  for p in (root / "_rejected" / "b2").rglob("*") if p.is_file())
    assert kept == sorted([*files, batches.REASON])
    assert "field 'prompt'" in (root / "_rejected" / "b2" / batches.REASON).read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_registers_scheduled_deployments_on_a_prefect_server(tiny_project, tmp_path):
    import httpx

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-server"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    log = open(tmp_path / "server.log", "w")
    t0 = time.time()
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    serve = None
    try:
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() - t0 < 180, "prefect server did not start"
            time.sleep(1)
        print(f"prefect server up in {time.time() - t0:.1f} s")
        serve_log = open(tmp_path / "serve.log", "w")
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--profile", PROFILE,
                                  "--cron", "0 3 * * *", "--timezone", "UTC",
                                  "--watch", str(tmp_path / "incoming"), "--poll-interval", "3600"],
                                 cwd=tiny_project, env=env, stdout=serve_log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 180
        deployment, runs = None, []
        while time.time() < deadline:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            found = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
            deployment = next((d for d in found if d["name"] == f"pipeline-{PROFILE}"), None)
            if deployment:
                runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                    "deployments": {"id": {"any_": [deployment["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
                if runs:
                    break
            time.sleep(2)
        print(f"deployments and scheduled runs after {time.time() - t0:.1f} s")
        assert deployment, (tmp_path / "serve.log").read_text()[-3000:]
        names = {d["name"] for d in found}
        assert {f"pipeline-{PROFILE}", f"retrain-{PROFILE}", f"promote-{PROFILE}"} <= names
        schedules = deployment["schedules"]
        assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * *"]
        assert schedules[0]["schedule"]["timezone"] == "UTC"
        assert deployment["parameters"] == {"profile": PROFILE}
        assert runs, "no scheduled flow run was created"
        start = runs[0]["expected_start_time"]
        assert "T03:00:00" in start, start
        retrain_dep = next(d for d in found if d["name"] == f"retrain-{PROFILE}")
        assert retrain_dep["schedules"][0]["schedule"]["interval"] == 3600.0

        # the served process runs what the schedule made due, with no person: the first retrain poll
        state = None
        while time.time() < deadline + 60:
            polls = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                "deployments": {"id": {"any_": [retrain_dep["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}}).json()
            if polls:
                state = polls[0]["state_type"]
                break
            time.sleep(3)
        print(f"first scheduled retrain poll {state} after {time.time() - t0:.1f} s")
        assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
