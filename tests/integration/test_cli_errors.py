"""Bad input gets a clear one-line error, exit code 2, and nothing runs or changes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # the CLI in a subprocess on a real DVC project


def _cli(proj, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=proj, capture_output=True, text=True,
                          env={**os.environ, "HYPERBAGEL_PROJECT": str(proj)}, timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["run", "--profile", "fast"], "unknown profile 'fast'; choose one of: default, smoke"),
    (["run", "--stage", "tiny_trian"], "unknown stage 'tiny_trian'"),
    (["params", "--profile", "nope"], "unknown profile 'nope'"),
])
def test_unknown_names(tiny_project, args, expected):
    r = _cli(tiny_project, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    assert not (tiny_project / "data").exists() and not (tiny_project / "dvc.lock").exists()


def test_invalid_param_value_fails_before_anything_runs(tiny_project):
    p = tiny_project / "params.yaml"
    p.write_text(p.read_text().replace("lr: 0.01", "lr: -3"))
    r = _cli(tiny_project, "run", "--profile", "smoke")
    assert r.returncode == 2
    msg = " ".join(r.stderr.split())
    assert "tiny_train.lr" in msg and "greater than 0" in msg and "got -3" in msg
    assert "Traceback" not in r.stderr
    assert not (tiny_project / "data").exists() and not (tiny_project / ".state" / "workspaces").exists()


def test_a_bench_section_that_cannot_be_measured_is_reported_and_exits_1(tiny_project, tmp_path):
    """A section whose inputs are missing (here: no base checkpoint) records its error in the report,
    names it on stderr with what to run, and the command exits 1; nothing else is lost."""
    import json

    out = tmp_path / "rep"
    r = _cli(tiny_project, "bench", "--profile", "smoke", "--section", "speculative_bound", "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    msg = " ".join(r.stderr.split())
    assert "section speculative_bound:" in msg and "hyperbagel run --profile smoke" in msg
    assert "Traceback" not in r.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert "error" in report["speculative_bound"] and report["profile"] == "smoke"
    assert (out / "BENCHMARK.md").exists()
