"""Shared fixtures: real components, started once per session.

- a Prefect test server (``prefect_test_harness``) with an isolated PREFECT_HOME;
- one local Ray runtime (2 CPUs) that every flow run in the session reuses;
- projects in temporary folders: real git + DVC repositories, MLflow on SQLite in
  their state folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="hyperbagel-tests-"))

# Before Prefect, Ray or MLflow are imported anywhere: isolate their homes.
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect-home")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_TMP / "prefect-results")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
os.environ["RAY_DEDUP_LOGS"] = "0"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry writes to its SQLite
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")  # slow, busy CI machines
os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
# a hung stage fails its test with the stage's output shown, long before pytest-timeout
os.environ.setdefault("HYPERBAGEL_STAGE_TIMEOUT_S", "900")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
for _k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL", "HYPERBAGEL_STATE", "HYPERBAGEL_PROJECT"):
    os.environ.pop(_k, None)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield os.environ.get("PREFECT_API_URL")


@pytest.fixture(scope="session")
def ray_runtime():
    import ray

    from tasks.ray_runner import init_ray

    init_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def git_commit_all(path: Path, message: str = "snapshot") -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=path, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", message, "--allow-empty"], cwd=path, check=True, env=env)


TINY_DVC = """\
stages:
  tiny_data:
    cmd: hyperbagel stage exec tiny_data
    deps: [{spine}/tiny_data.py]
    params: [tiny_data]
    outs: [data/tiny_data]
    meta: {{module: tests.spine.tiny_data, kind: data}}
  tiny_train:
    cmd: hyperbagel stage exec tiny_train
    deps: [{spine}/tiny_train.py, {repo}/components/training.py, data/tiny_data]
    params: [tiny_train]
    outs: [data/tiny_train]
    meta: {{module: tests.spine.tiny_train, kind: train, data: tiny_data, model: tiny-model}}
  tiny_eval:
    cmd: hyperbagel stage exec tiny_eval
    deps: [{spine}/tiny_eval.py, data/tiny_train, data/tiny_data]
    params: [tiny_eval]
    outs: [data/tiny_eval]
    meta: {{module: tests.spine.tiny_eval, kind: eval, data: tiny_data, evaluates: tiny_train, gate: tiny-model}}
"""

TINY_PARAMS = """\
pipeline:
  ray_num_cpus: 2
  compute: {num_workers: 1, cpus_per_worker: 1, max_failures: 2, torch_threads: 1}
  promotion:
    tiny-model:
      rules: [{metric: score, min: 0.2}]
tiny_data: {n: 256}
tiny_train: {steps: 40, checkpoint_every: 10, log_every: 5, lr: 0.01, hidden: 8}
tiny_eval: {n: 64}
profiles:
  smoke:
    tiny_train: {steps: 20}
"""


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A real git + DVC project with the three-stage tiny pipeline; state in its .state folder."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "dvc.yaml").write_text(TINY_DVC.format(spine=REPO / "tests" / "spine", repo=REPO))
    (proj / "params.yaml").write_text(TINY_PARAMS)
    (proj / ".gitignore").write_text(".state/\n")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    git_commit_all(proj, "tiny project")
    monkeypatch.setenv("HYPERBAGEL_PROJECT", str(proj))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / '.state' / 'mlflow.db'}")
    (proj / ".state").mkdir()
    return proj


def set_params(proj: Path, text: str) -> None:
    (proj / "params.yaml").write_text(textwrap.dedent(text))


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 endpoint: moto in server mode on 127.0.0.1 (a free port), fake credentials.

    Yields the endpoint URL; tests point the standard AWS variables at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
