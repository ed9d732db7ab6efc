"""The product's own pipeline (dvc.yaml at the project root) on the smoke profile, end to end
through Prefect, Ray Train, DVC and MLflow; state in a temporary folder."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_smoke_profile_runs_every_stage_then_nothing(tmp_path, monkeypatch, prefect_server, ray_runtime):
    from flows.pipeline import pipeline
    from tasks.project import read_stages

    monkeypatch.setenv("HYPERBAGEL_PROJECT", str(REPO))
    monkeypatch.setenv("HYPERBAGEL_STATE", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stages = list(read_stages(REPO / "dvc.yaml"))

    first = pipeline(profile="smoke")
    assert [s for s, r in first["stages"].items() if r["executed"]] == stages
    ws = tmp_path / "state" / "workspaces" / "smoke"
    for s in stages:
        manifest = json.loads((ws / "data" / s / "manifest.json").read_text())
        assert manifest["stage"] == s and manifest["profile"] == "smoke"

    # the teacher's held-out answers are scored per question kind too (where understanding goes wrong)
    from components.world.understanding import QUESTION_KINDS

    ev = json.loads((ws / "data" / "base_eval" / "results.json").read_text())["metrics"]
    kinds = [k for k in QUESTION_KINDS if f"understanding_{k}" in ev]
    assert kinds and all(0.0 <= ev[f"understanding_{k}"] <= 1.0 for k in kinds), ev

    again = pipeline(profile="smoke")
    assert not any(r["executed"] for r in again["stages"].values())

    # inference on the registered teacher: generate -> edit -> ask, and clear errors
    import os
    import subprocess
    import sys

    from PIL import Image

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                              env={**os.environ}, cwd=REPO)

    model = "models:/hyperbagel-base-smoke@champion"  # other profiles register NAME-PROFILE
    img, edited = tmp_path / "gen.png", tmp_path / "edit.png"
    r = cli("generate", "-m", model, "--prompt", "a photo of a red circle", "-o", str(img), "--steps", "50")
    assert r.returncode == 0, r.stderr
    assert Image.open(img).size == (64, 64) and "100 NFE" in r.stderr
    Image.open(img).resize((96, 96)).save(tmp_path / "big.png")
    r = cli("edit", "-m", model, "-i", str(tmp_path / "big.png"), "--instruction", "Remove the red circle.",
            "-o", str(edited), "--steps", "50")
    assert r.returncode == 0, r.stderr
    assert "resized to 64x64" in r.stderr and "132 NFE" in r.stderr and Image.open(edited).size == (64, 64)
    r = cli("ask", "-m", model, "-i", str(img), "-q", "how many circles are there?")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # the draft gates itself (lossless on its held-out prompts), so its champion decodes the same answer
    promo = [p for p in first["promotions"] if p["model"] == "hyperbagel-draft-smoke"]
    assert promo and promo[0]["promoted"], first["promotions"]
    spec = cli("ask", "-m", model, "-i", str(img), "-q", "how many circles are there?", "--speculative",
               "--draft", "models:/hyperbagel-draft-smoke@champion", "--verbose")
    assert spec.returncode == 0, spec.stderr
    # (float32 both ways; the plain `ask` above may run in bfloat16)
    assert spec.stdout.strip() and "identical to the target's answer: yes" in spec.stderr, spec.stderr
    for args, message in [(("generate", "-m", model, "--prompt", "a photo of a red hexagon", "-o", str(img)),
                           "unknown word(s): 'hexagon'"),
                          (("ask", "-m", "models:/hyperbagel-base-smoke@gold", "-i", str(img), "-q", "x"),
                           "aliases: champion"),
                          (("ask", "-m", model, "-i", str(tmp_path / "missing.png"), "-q", "x"), "no such file")]:
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)

    # the 6-NFE model: gated against the teacher it was distilled from, samples with one pass per step
    six = "models:/hyperbagel-6nfe-smoke@champion"
    promo = [p for p in first["promotions"] if p["model"] == "hyperbagel-6nfe-smoke"]
    assert promo and promo[0]["promoted"], first["promotions"]
    from tasks import registry, tracking

    c = tracking.client(tmp_path / "state")
    mv = registry.resolve(c, six)
    assert "teacher" in mv.tags["promotion.reason"], mv.tags["promotion.reason"]
    base_mv = registry.resolve(c, model)
    assert registry.teacher_reference(c, mv, "hyperbagel-base-smoke") == registry.metrics_of(base_mv)
    chain = registry.lineage(c, six)["chain"]
    assert [e["stage"] for e in chain][:2] == ["dmdo", "tscd"]
    assert {"cfg_distill", "base", "world_data"} <= {e["stage"] for e in chain}
    assert chain[0]["teacher"]["stage"] == "cfg_distill"
    r = cli("generate", "-m", six, "--prompt", "a photo of a red circle", "-o", str(img))
    assert r.returncode == 0 and "3 NFE" in r.stderr, r.stderr
    r = cli("edit", "-m", six, "-i", str(tmp_path / "big.png"), "--instruction", "Remove the red circle.",
            "-o", str(edited))
    assert r.returncode == 0 and "3 NFE" in r.stderr, r.stderr
