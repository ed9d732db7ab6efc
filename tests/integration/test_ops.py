"""Operations on the real stack (issue 6): S3 everywhere (moto in server mode on 127.0.0.1),
retraining on a batch that lands in an S3 prefix, the lineage audit, and the Prefect
deployments with their schedules on a real `prefect server start`.

`hyperbagel serve` runs as a subprocess against that server, as an operator starts it; the
retraining test only uploads batches and waits for what the served deployments do."""

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
POLL_S = 10  # the retrain deployment polls the watch this often (pipeline.retrain.poll_interval_s)


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
    params["pipeline"]["schedule"] = {"cron": "0 3 * * *", "timezone": "UTC"}
    params["pipeline"]["retrain"] = {"watch": WATCH, "poll_interval_s": POLL_S}
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


class Served:
    """`hyperbagel serve` running in a subprocess, and the Prefect server's API it registered with."""

    def __init__(self, api: str, proc: subprocess.Popen, log: Path):
        self.api, self.proc, self.log = api, proc, log

    def get(self, path: str):
        import httpx

        r = httpx.get(f"{self.api}{path}", timeout=10)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict):
        import httpx

        r = httpx.post(f"{self.api}{path}", json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def deployment(self, name: str) -> dict | None:
        return next((d for d in self.post("/deployments/filter", {}) if d["name"] == name), None)

    def runs(self, deployment: dict, *states: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}},
                                               "flow_runs": {"state": {"type": {"any_": list(states)}}}})

    def logs(self, needle: str) -> list[dict]:
        """Flow-run log records (WARNING and above) that contain ``needle``."""
        return [g for g in self.post("/logs/filter", {"logs": {"level": {"ge_": 30}}, "limit": 200})
                if needle in g["message"]]

    def wait_for(self, what: str, check, limit_s: float = 240):
        """Poll ``check`` until it returns something truthy; a bound, so a failure names what never came."""
        deadline = time.time() + limit_s
        while True:
            got = check()
            if got:
                return got
            assert self.proc.poll() is None, f"serve exited\n{self.log.read_text()[-3000:]}"
            assert time.time() < deadline, f"{what}: not within {limit_s:.0f} s\n{self.log.read_text()[-3000:]}"
            time.sleep(2)

    def stop(self) -> None:
        _stop(self.proc)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server (`prefect server start` on SQLite): its scheduler service creates the
    scheduled runs (the test harness's server cannot schedule). Yields its API URL and home."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-server")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    log = home / "server.log"
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", port], env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 180, "prefect server did not start"
            time.sleep(1)
        print(f"prefect server up in {time.time() - t0:.1f} s")
        yield {"api": api, "home": home}
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def served(ops, prefect_api, ray_runtime, tmp_path_factory):
    """`hyperbagel serve --profile smoke` in the S3 project, as an operator starts it: the pipeline on
    params.yaml's cron, the retrain deployment polling the S3 watch every POLL_S seconds. Its flow
    runs join the session's Ray runtime."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api["api"], "RAY_ADDRESS": ray_runtime,
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--profile", PROFILE], cwd=ops["proj"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    srv = Served(prefect_api["api"], proc, log)
    yield srv
    srv.stop()


def test_serve_registers_scheduled_deployments_on_a_prefect_server(served):
    """The deployments exist with their schedules; the server's scheduler (not `serve`) creates the
    scheduled runs, and the served process runs what comes due."""
    t0 = time.time()
    # `serve` registers its deployments one after another: wait for all three, not only the first
    names = {f"pipeline-{PROFILE}", f"retrain-{PROFILE}", f"promote-{PROFILE}"}
    served.wait_for("the three deployments",
                    lambda: {d["name"] for d in served.post("/deployments/filter", {})} >= names)
    pipeline_dep = served.deployment(f"pipeline-{PROFILE}")
    runs = served.wait_for("scheduled runs of the pipeline deployment",
                           lambda: served.runs(pipeline_dep, "SCHEDULED"))
    print(f"deployments and scheduled runs after {time.time() - t0:.1f} s")
    assert [s["schedule"]["cron"] for s in pipeline_dep["schedules"]] == ["0 3 * * *"]
    assert pipeline_dep["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert pipeline_dep["parameters"] == {"profile": PROFILE}
    assert all(r["auto_scheduled"] for r in runs), runs  # created by the server's scheduler service
    assert all("T03:00:00" in r["expected_start_time"] for r in runs), runs
    retrain_dep = served.deployment(f"retrain-{PROFILE}")
    assert retrain_dep["schedules"][0]["schedule"]["interval"] == POLL_S
    assert retrain_dep["parameters"] == {"profile": PROFILE, "watch": WATCH}

    # the served process runs what the schedule made due, with no person: the first retrain poll
    [state, *_] = served.wait_for("a finished retrain poll", lambda: [
        r["state_type"] for r in served.runs(retrain_dep, "COMPLETED", "FAILED", "CRASHED")])
    print(f"first scheduled retrain poll {state} after {time.time() - t0:.1f} s")
    assert state == "COMPLETED", served.log.read_text()[-3000:]


def test_retraining_on_an_s3_batch(ops, served, tmp_path):
    """Batches land in the S3 watch and the served retrain deployment takes them on its schedule:
    after each upload the test only waits."""
    from components.checkpoints import dir_md5
    from tasks import registry, tracking
    from tasks.locking import workspace_lock
    from tasks.project import state_dir, workspace

    proj = ops["proj"]
    ws = workspace(proj, PROFILE)
    c = tracking.client(state_dir(proj))
    exp = tracking.experiment_id(c, state_dir(proj))
    v1 = c.get_model_version_by_alias(MODEL, "champion")
    lock_before = (ws.root / "dvc.lock").read_text()
    retrain_dep = served.wait_for("the retrain deployment", lambda: served.deployment(f"retrain-{PROFILE}"))

    # a malformed batch: a served poll rejects it with its reason, moves it aside whole, changes nothing else
    bad = _make_batch(tmp_path / "bad", break_row=True)
    _upload_batch(bad, "batch-bad")
    uploaded = {k.split("/", 2)[2] for k in _keys("incoming/batch-bad/")}
    t0 = time.time()
    [rejected, *_] = served.wait_for("the served poll's rejection of batch-bad", lambda: served.logs(
        "batch batch-bad rejected"))
    print(f"malformed batch rejected by a served poll after {time.time() - t0:.1f} s")
    assert "t2i/t2i.jsonl:4: field 'image'" in rejected["message"] and "missing.png" in rejected["message"]
    assert served.get(f"/flow_runs/{rejected['flow_run_id']}")["deployment_id"] == retrain_dep["id"]
    assert not _keys("incoming/batch-bad/")
    kept = {k.split("/", 3)[3] for k in _keys("incoming/_rejected/batch-bad/")}
    assert kept == uploaded | {"REJECTED.txt"}  # every object kept, the reason beside them
    reason = _s3().get_object(Bucket=BUCKET, Key="incoming/_rejected/batch-bad/REJECTED.txt")["Body"].read().decode()
    assert "t2i/t2i.jsonl:4: field 'image'" in reason
    assert (ws.root / "dvc.lock").read_text() == lock_before
    assert c.get_model_version_by_alias(MODEL, "champion").version == v1.version
    assert len(c.search_model_versions(f"name='{MODEL}'")) == 1

    # a valid batch while another run holds the workspace: the served poll stops with a clear
    # message and takes nothing; once the workspace is free, the next poll retrains on it
    good = _make_batch(tmp_path / "good")
    batch_md5 = dir_md5(good)
    with workspace_lock(ws):
        _upload_batch(good, "batch-001")
        served.wait_for("a served poll stopped by the busy workspace", lambda: [
            r for r in served.runs(retrain_dep, "FAILED") if "already running" in (r["state"]["message"] or "")])
        assert "incoming/batch-001/_READY" in _keys("incoming/batch-001/")
        assert (ws.root / "dvc.lock").read_text() == lock_before
    t0 = time.time()
    [ingest_run] = served.wait_for("batch-001 ingested by a served poll", lambda: c.search_runs(
        [exp], filter_string="tags.`batch.name` = 'batch-001' and attributes.status = 'FINISHED'"))
    retrain_run = ingest_run.data.tags["prefect.flow_run_id"]
    done = served.wait_for("the retraining run to finish", lambda: (
        lambda r: r if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None)(
        served.get(f"/flow_runs/{retrain_run}")), limit_s=900)
    print(f"served retraining on batch-001 finished after {time.time() - t0:.1f} s")
    assert done["state_type"] == "COMPLETED", served.log.read_text()[-3000:]
    assert done["deployment_id"] == retrain_dep["id"]  # started by the schedule, no person
    served.stop()  # the later tests read a settled project

    # the operator's log shows the training's progress, each line once (Ray Train's print patch would
    # send a worker's print to both its stdout and its stderr, and Ray forwards both)
    progress = [line for line in served.log.read_text().splitlines() if "[tiny_train] step " in line]
    assert progress, served.log.read_text()[-3000:]
    assert len(progress) == len(set(progress)), sorted(progress)

    # versioned with DVC: the data stage's out is the ingest, only the stages reading it reran
    assert ingest_run.data.tags["batch.md5"] == batch_md5
    data_md5 = ingest_run.data.tags["dvc.md5"]
    lock = yaml.safe_load((ws.root / "dvc.lock").read_text())
    assert lock["stages"]["tiny_data"]["outs"][0]["md5"] == data_md5 != ops["first"]["stages"]["tiny_data"]["md5"]
    assert any(d["md5"] == data_md5 for d in lock["stages"]["tiny_train"]["deps"])
    assert _keys("incoming/_accepted/batch-001/") and not _keys("incoming/batch-001/")
    train_manifest = json.loads((ws.root / "data/tiny_train/manifest.json").read_text())
    pipeline_run = served.get(f"/flow_runs/{train_manifest['prefect_flow_run_id']}")
    assert served.get(f"/task_runs/{pipeline_run['parent_task_run_id']}")["flow_run_id"] == retrain_run
    [parent] = c.search_runs([exp], filter_string=f"tags.kind = 'pipeline' and "
                                                  f"tags.`prefect.flow_run_id` = '{pipeline_run['id']}'")
    stages = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.data.tags["stage"] for r in stages} == {"tiny_train", "tiny_eval"}  # tiny_data not regenerated

    # manifests: the data lists the batch, the candidate names that data
    data_manifest = json.loads((ws.root / "data/tiny_data/manifest.json").read_text())
    assert [x["md5"] for x in data_manifest["batches"]] == [batch_md5]
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
    assert [d.dataset.digest for d in ingest_run.inputs.dataset_inputs] == [batch_md5[:36]]
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
    """`aws s3 ls --recursive` against the endpoint shows the DVC, MLflow and Ray objects."""
    ls = subprocess.run([str(Path(sys.executable).with_name("aws")), "s3", "ls", "--recursive", f"s3://{BUCKET}",
                         "--endpoint-url", ops["endpoint"]], capture_output=True, text=True, env=os.environ)
    assert ls.returncode == 0, ls.stderr[-2000:]
    keys = [line.split(maxsplit=3)[3] for line in ls.stdout.splitlines() if line.strip()]
    assert sorted(keys) == sorted(_keys())  # the CLI sees what the clients wrote
    by_prefix = {}
    for k in keys:
        by_prefix.setdefault(k.split("/", 1)[0], []).append(k)
    print({p: len(v) for p, v in sorted(by_prefix.items())})
    assert any(k.startswith("dvc/files/md5/") and k.endswith(".dir") for k in keys)  # DVC remote
    assert any(k.startswith("mlflow/hyperbagel/") and "/artifacts/checkpoint/model.safetensors" in k for k in keys)
    assert any(k.startswith(f"ray/{PROFILE}-tiny_train-") and "/final/" in k for k in keys)  # Ray Train storage
    # nothing else in the bucket but the watched prefix
    assert set(by_prefix) <= {"dvc", "mlflow", "ray", "incoming"}


def test_credentials_are_never_recorded(ops, prefect_api, served):
    """The secret key reaches clients only: not the MLflow store, manifests, DVC config, S3 objects,
    the Prefect server's database or the served runs' logs."""
    proj = ops["proj"]
    needle = SECRET.encode()
    local = [p for root in (proj / ".state", prefect_api["home"], served.log.parent) for p in root.rglob("*")
             if p.is_file() and "dvc-cache" not in p.parts and p.stat().st_size < 50_000_000]
    assert any(p.suffix == ".db" for p in prefect_api["home"].rglob("*"))
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
