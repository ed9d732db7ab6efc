"""The base stage's import sources (issue 7): a folder, an S3 prefix (moto in server mode on
127.0.0.1) and a registered MLflow version (SQLite), each fetched to a local folder whose
bytes hash to the md5 the checkpoint was written with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components import checkpoints
from tasks import tracking
from tasks.stage_exec import fetch_import

pytestmark = pytest.mark.integration

BUCKET = "hb-import"


@pytest.fixture
def ckpt(tmp_path) -> tuple[Path, str]:
    folder = tmp_path / "project" / "teachers" / "base-x"
    md5 = checkpoints.save_checkpoint(folder, {"generator.w": torch.arange(6.0).reshape(2, 3)},
                                      {"format": "test"}, {"stage": "base", "profile": "full"})
    return folder, md5


def test_a_folder_is_read_from_the_project_and_a_missing_one_is_named(ckpt, tmp_path):
    folder, md5 = ckpt
    ws = SimpleNamespace(project=tmp_path / "project")
    got = fetch_import(ws, None, "teachers/base-x", tmp_path / "dest")
    assert got == folder and checkpoints.dir_md5(got) == md5
    assert fetch_import(ws, None, str(folder), tmp_path / "dest") == folder  # absolute paths as given
    with pytest.raises(FileNotFoundError, match="teachers/nothing"):
        fetch_import(ws, None, "teachers/nothing", tmp_path / "dest")


def test_an_s3_prefix_is_downloaded_and_hashes_to_the_checkpoint_md5(ckpt, tmp_path, moto_s3, monkeypatch):
    folder, md5 = ckpt
    for k, v in {"AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    from tasks import s3

    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), BUCKET, f"teachers/base-x/{p.relative_to(folder).as_posix()}")
    ws = SimpleNamespace(project=tmp_path / "project")
    got = fetch_import(ws, None, f"s3://{BUCKET}/teachers/base-x", tmp_path / "dest")
    assert checkpoints.dir_md5(got) == md5
    checkpoints.load_checkpoint(got, md5)  # what the stage does with it
    with pytest.raises(FileNotFoundError, match="no objects"):
        fetch_import(ws, None, f"s3://{BUCKET}/teachers/none", tmp_path / "dest2")


def test_a_registered_version_is_downloaded_from_mlflow(ckpt, tmp_path, monkeypatch):
    folder, md5 = ckpt
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{state / 'mlflow.db'}")
    c = tracking.client(state)
    run_id = tracking.start_run(c, state, "base", {})
    c.log_artifacts(run_id, str(folder), "checkpoint")
    run = c.get_run(run_id)
    version = tracking.register(c, "hyperbagel-base-full", run_id, f"{run.info.artifact_uri}/checkpoint",
                                {"dvc.md5": md5})
    c.set_registered_model_alias("hyperbagel-base-full", "champion", version)
    ws = SimpleNamespace(project=tmp_path / "project")
    for uri in ("models:/hyperbagel-base-full@champion", f"models:/hyperbagel-base-full/{version}"):
        got = fetch_import(ws, c, uri, tmp_path / f"dest-{uri[-1]}")
        assert checkpoints.dir_md5(got) == md5
    from tasks.registry import ModelNotFound

    with pytest.raises(ModelNotFound, match="aliases: champion"):
        fetch_import(ws, c, "models:/hyperbagel-base-full@nope", tmp_path / "dest3")

    # models:/NAME/latest: the newest version, whatever its aliases (the one a rejected gate leaves unaliased)
    from tasks.registry import resolve

    newer = tracking.register(c, "hyperbagel-base-full", run_id, f"{run.info.artifact_uri}/checkpoint",
                              {"dvc.md5": md5})
    assert int(newer) == int(version) + 1
    assert str(resolve(c, "models:/hyperbagel-base-full/latest").version) == str(newer)
    assert str(resolve(c, "models:/hyperbagel-base-full@champion").version) == str(version)
    with pytest.raises(ModelNotFound, match="registered: hyperbagel-base-full"):
        resolve(c, "models:/hyperbagel-draft/latest")
