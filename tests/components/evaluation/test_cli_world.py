"""`hyperbagel eval geneval|gedit` and `hyperbagel world render` through their typer apps."""

from typer.testing import CliRunner

from components.evaluation.gedit_judge import write_folder as write_gedit
from components.evaluation.geneval import write_folder as write_geneval
from components.world.bench import oracle_images
from components.world.gedit import make_samples, rows_of
from components.world.geneval_prompts import make_prompts
from components.world.render import render
from flows.cli_world import eval_app, world_app

runner = CliRunner()


def test_eval_geneval_scores_a_folder(tmp_path):
    rows = make_prompts()[::50]
    write_geneval(rows, oracle_images(rows, 1), tmp_path / "imgs")
    r = runner.invoke(eval_app, ["geneval", str(tmp_path / "imgs"), "--options", "threshold=0.3"])
    assert r.exit_code == 0, r.output
    assert "Overall score (avg. over tasks): 1.00000" in r.output and "shapes_cv" in r.output
    assert (tmp_path / "imgs" / "results.jsonl").exists()


def test_eval_gedit_scores_a_folder(tmp_path):
    s = make_samples(seed=0, scale=0.01)[3]  # motion_change
    rows = rows_of(s, "x.png")
    write_gedit(rows, [render(s["source"])] * 2, [render(s["target"])] * 2, tmp_path / "model")
    bench = [r for r in rows]
    import json

    (tmp_path / "bench").mkdir()
    from PIL import Image

    Image.fromarray(render(s["source"])).save(tmp_path / "bench" / "x.png")
    (tmp_path / "bench" / "gedit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench))
    r = runner.invoke(eval_app, ["gedit", str(tmp_path / "model"), "--bench", str(tmp_path / "bench" / "gedit.jsonl")])
    assert r.exit_code == 0, r.output
    assert "motion_change: 10.000" in r.output and "scored 2, missing 0" in r.output
    assert (tmp_path / "model" / "shapes_cv" / "eval_results_new" / "model_combined_gpt_score.csv").exists()


def test_bad_input_exits_2_without_traceback(tmp_path):
    for args in (["geneval", str(tmp_path / "none")], ["gedit", str(tmp_path)],
                 ["geneval", str(tmp_path), "--options", "nope=1"], ["gedit", str(tmp_path), "--language", "fr"]):
        r = runner.invoke(eval_app, args)
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output, args
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_world_render_writes_pngs(tmp_path):
    r = runner.invoke(world_app, ["render", str(tmp_path / "prev"), "--n", "1"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "prev").rglob("*.png"))) == 1 + 6 + 11
    assert "Make the" in (tmp_path / "prev" / "index.md").read_text() or "Move the" in (tmp_path / "prev" / "index.md").read_text()
