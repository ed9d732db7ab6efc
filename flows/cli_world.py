"""`hyperbagel eval geneval|gedit DIR` and `hyperbagel world render OUT` (mounted by flows/cli.py).

Thin wrappers: the scoring and rendering live in components/evaluation and components/world.
Bad input prints one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import typer

from flows.console import console, err, fail as _fail

eval_app = typer.Typer(no_args_is_help=True, help="Score generated images with GenEval-/GEdit-shapes.")
world_app = typer.Typer(no_args_is_help=True, help="Look at the shapes world.")


@world_app.callback()
def _world() -> None:
    """Look at the shapes world."""


def _options(pairs: list[str]):
    from components.evaluation.geneval import Options

    fields = {f.name: f.type for f in dataclasses.fields(Options)}
    kw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad option {pair!r}; use key=value with key one of {', '.join(fields)}")
        try:
            kw[key] = int(value) if fields[key] in (int, "int") else float(value)
        except ValueError:
            raise ValueError(f"option {key} needs a number, got {value!r}") from None
    return Options(**kw)


@eval_app.command("geneval")
def geneval_cmd(images_dir: Path = typer.Argument(..., help="GenEval's layout: NNNNN/metadata.jsonl, NNNNN/samples/NNNN.png"),
                out: Optional[Path] = typer.Option(None, help="where results.jsonl and summary.json go (default: DIR)"),
                detector: str = typer.Option("shapes_cv", help="detector back end"),
                options: List[str] = typer.Option([], "--options", help="GenEval option key=value, e.g. threshold=0.3")):
    """Score a folder of generated images with GenEval's rules; writes results.jsonl and summary.json."""
    from components.evaluation.geneval import GenEvalInputError, evaluate_folder, format_summary

    try:
        summary = evaluate_folder(images_dir, out, detector, _options(options))
    except (GenEvalInputError, ValueError, OSError) as e:
        _fail(e)
    console.print(format_summary(summary), highlight=False)
    console.print(f"detector: {summary['detector']}; results in {out or images_dir}/results.jsonl", highlight=False)


@eval_app.command("gedit")
def gedit_cmd(model_dir: Path = typer.Argument(..., help="GEdit's layout: DIR/fullset/<task_type>/<lang>/<key>.png "
                                                         "with <key>_SRCIMG.png"),
              bench: Optional[Path] = typer.Option(None, help="GEdit-shapes rows (benchmarks/gedit/gedit.jsonl); "
                                                              "default: generated from seed 0"),
              judge: str = typer.Option("shapes_cv", help="judge back end"),
              language: str = typer.Option("both", help="en, cn (or zh) or both"),
              out: Optional[Path] = typer.Option(None, help="CSV folder (default: DIR/<judge>/eval_results_new)")):
    """Score edited images with GEdit's rules; writes GEdit's CSVs and summary.json, prints the statistics."""
    from components.evaluation.gedit_judge import GEditInputError, evaluate_folder, format_statistics, read_benchmark

    langs = {"both": ("en", "cn"), "en": ("en",), "cn": ("cn",), "zh": ("cn",)}
    try:
        if language not in langs:
            raise ValueError(f"unknown language {language!r}; choose en, cn or both")
        rows = read_benchmark(bench) if bench is not None else None
        summary = evaluate_folder(model_dir, rows, judge, out, langs[language])
    except (GEditInputError, ValueError, OSError) as e:
        _fail(e)
    for lang in langs[language]:
        if lang in summary:
            console.print(format_statistics(summary[lang], f"[{lang}] full set (SC, PQ, O)"), highlight=False)
            i = summary[lang]["intersection"]
            console.print(f"[{lang}] intersection: {i['SC']:.3f}, {i['PQ']:.3f}, {i['O']:.3f}", highlight=False)
    console.print(f"judge: {summary['judge']}; scored {summary['n']}, missing {summary['missing']}", highlight=False)


@world_app.command("render")
def render_cmd(out: Path = typer.Argument(..., help="folder for the PNGs and index.md"),
               n: int = typer.Option(4, min=1, max=50, help="scenes, and prompts per GenEval tag"),
               seed: int = typer.Option(0, min=0)):
    """Render a few scenes, GenEval-shapes prompts and GEdit-shapes edits to PNG (4x upscaled)."""
    from components.world.preview import render_preview

    try:
        paths = render_preview(out, n, seed)
    except OSError as e:
        _fail(e)
    console.print(f"wrote {len(paths)} images; see {out / 'index.md'}", highlight=False)
