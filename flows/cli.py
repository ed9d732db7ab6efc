"""`hyperbagel`: the command-line entry of the pipeline.

Imports are lazy so `hyperbagel stage exec` (what dvc.yaml runs) and `--help` stay quick.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from flows.console import console, err, fail as _fail

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hyper-Bagel distillation pipeline: Prefect flows running Ray Train stages over "
                       "DVC-versioned checkpoints, tracked in MLflow.")
stage_app = typer.Typer(no_args_is_help=True, help="Run or inspect single stages (dvc.yaml calls `stage exec`).")
app.add_typer(stage_app, name="stage")


def _known_errors() -> tuple[type[BaseException], ...]:
    from components.checkpoints import ChecksumMismatch
    from components.config import ConfigError
    from tasks.dvc_ops import DvcError
    from tasks.locking import WorkspaceBusy
    from tasks.registry import ModelNotFound
    from tasks.stage_task import StageIntegrityError

    errors: list[type[BaseException]] = [ConfigError, ChecksumMismatch, DvcError, WorkspaceBusy, ModelNotFound,
                                         StageIntegrityError, FileNotFoundError]
    try:
        from components.world.text import UnknownWordError
        errors.append(UnknownWordError)
    except ImportError:
        pass
    return tuple(errors)


def setup_environment(project: Path | None = None) -> Path:
    """Embedded defaults: every piece of state in the project's state folder unless configured."""
    from tasks.project import find_project, state_dir
    from tasks.tracking import tracking_uri

    project = project or find_project()
    state = state_dir(project)
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HYPERBAGEL_PROJECT", str(project))
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(state))
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
        # a cold first start on a fresh 2-core machine (bytecode compiled, SQLite migrated) can take
        # longer than Prefect's 20 s default
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")  # tolerate busy machines at start-up
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry writes to its SQLite
    return project


@app.command()
def run(profile: str = typer.Option("default", "--profile", "-p", help="params.yaml profile: default, smoke, ..."),
        stage: Optional[List[str]] = typer.Option(None, "--stage", "-s", help="only these stages (repeatable)"),
        downstream: bool = typer.Option(False, help="with --stage: also every stage that depends on them"),
        force: bool = typer.Option(False, help="run the selected stages even if DVC says they are up to date")):
    """Run the pipeline (Prefect flow): each stage that changed runs as a DVC stage / Ray Train job."""
    try:
        setup_environment()
        from tasks.project import find_project, workspace

        ws = workspace(find_project(), profile)
        ws.validate()  # fail in well under 5 s on a bad value, before Prefect or Ray start
        for name in stage or []:
            ws.stage(name)  # an unknown stage name fails here too
        from flows.pipeline import pipeline

        result = pipeline(profile=profile, stages=stage or None, downstream=downstream, force=force)
    except _known_errors() as e:
        _fail(e)
    table = Table(title=f"pipeline ({profile}) in {result['total_s']:.1f} s")
    for col in ("stage", "ran", "seconds", "out md5"):
        table.add_column(col)
    for name, r in result["stages"].items():
        table.add_row(name, "yes" if r["executed"] else "skipped", f"{r['seconds']:.1f}", str(r["md5"]))
    console.print(table)
    for p in result["promotions"]:
        console.print(f"{p['model']} v{p.get('version')}: {'promoted' if p['promoted'] else 'not promoted'} "
                      f"({p['reason']})")


@app.command()
def params(profile: str = typer.Option("default", "--profile", "-p"),
           show: bool = typer.Option(False, help="print the resolved parameters")):
    """Validate params.yaml for a profile (no compute); print the resolved values with --show."""
    try:
        from tasks.project import find_project, workspace

        ws = workspace(find_project(), profile)
        ws.validate()
    except _known_errors() as e:
        _fail(e)
    if show:
        import yaml
        console.print(yaml.safe_dump(ws.resolved_params(), sort_keys=False))
    console.print(f"params.yaml is valid for profile {profile!r}")


@app.command()
def stages(profile: str = typer.Option("default", "--profile", "-p")):
    """List the stages in DAG order with their state (DVC status) in the profile's workspace."""
    try:
        from tasks import dvc_ops
        from tasks.project import find_project, workspace

        ws = workspace(find_project(), profile)
        changed = dvc_ops.changed_stages(ws, ws.order()) if (ws.root / ".dvc").exists() else set(ws.order())
    except _known_errors() as e:
        _fail(e)
    table = Table(title=f"stages ({profile}) in {ws.root}")
    for col in ("stage", "kind", "module", "out", "md5 (dvc.lock)", "status"):
        table.add_column(col)
    for name in ws.order():
        sd = ws.stage(name)
        table.add_row(name, sd.kind, sd.module, sd.out, str(ws.out_md5(name)),
                      "changed" if name in changed else "up to date")
    console.print(table)


@stage_app.command("exec")
def stage_exec(name: str):
    """Run one stage in the current DVC workspace (the command dvc.yaml declares)."""
    try:
        setup_environment()
        from tasks.stage_exec import execute

        res = execute(name)
    except _known_errors() as e:
        _fail(e)
    console.print(f"[{name}] done: md5 {res['md5']}, MLflow run {res['run_id']}", markup=False)


@app.command()
def lineage(model_uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION"),
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Print a model version's chain, stage by stage, back to its data sets."""
    try:
        setup_environment()
        from tasks import registry, tracking
        from tasks.project import find_project, state_dir

        c = tracking.client(state_dir(find_project()))
        info = registry.lineage(c, model_uri)
    except _known_errors() as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    console.print(f"[bold]{info['model']} v{info['version']}[/] aliases: {', '.join(info['aliases']) or '-'}; "
                  f"promotion: {info['promotion']['decision'] or '-'} ({info['promotion']['reason'] or '-'})")
    table = Table()
    for col in ("stage", "checkpoint md5 / DVC path", "params hash", "git sha", "MLflow run", "Prefect flow run",
                "key metrics"):
        table.add_column(col, overflow="fold")
    for e in info["chain"]:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in list((e.get("metrics") or {}).items())[:6])
        stage = str(e.get("stage")) + (f"\n+ batch {e['batch']['name']}\n{e['batch']['md5']}" if e.get("batch") else "")
        table.add_row(stage, f"{e.get('md5')}\n{e.get('dvc_path')}", str(e.get("params_hash", "")),
                      str(e.get("git_sha", ""))[:12], str(e.get("mlflow_run_id", "missing")),
                      str(e.get("prefect_flow_run_id", "")), metrics)
    console.print(table)


@app.command()
def bench(profile: str = typer.Option("default", "--profile", "-p"),
          section: Optional[List[str]] = typer.Option(None, "--section", help="only these report sections"),
          out: Path = typer.Option(Path("reports"), help="folder for benchmark.json and BENCHMARK.md")):
    """Run the profile (or reuse its finished outputs), measure, and write the benchmark report."""
    try:
        project = setup_environment()
        from flows.bench import SECTIONS, run_bench
        from tasks.project import workspace

        for name in section or []:
            if name not in SECTIONS:
                raise ValueError(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")
        workspace(project, profile).validate()
        report = run_bench(profile, section or None, out if out.is_absolute() else project / out)
    except (*_known_errors(), ValueError) as e:
        _fail(e)
    console.print(f"wrote {out / 'benchmark.json'} and {out / 'BENCHMARK.md'}")
    failed = [name for name in section or report if isinstance(report.get(name), dict) and "error" in report[name]]
    for name in failed:
        err.print(f"section {name}: {report[name]['error']}", markup=False)
    if failed:  # the report keeps every section that was measured; the exit code says some were not
        err.print(f"{len(failed)} section(s) not measured (their error is in the report); the sections that read "
                  f"the pipeline's outputs need a finished run: `hyperbagel run --profile {profile}`", markup=False)
        raise typer.Exit(1)


@app.command()
def ui(which: str = typer.Argument("mlflow", help="mlflow or prefect"),
       port: int = typer.Option(0, help="port (default 5000 for MLflow, 4200 for Prefect)")):
    """Open the MLflow or Prefect UI on the project's state (serves on 127.0.0.1)."""
    import subprocess

    project = setup_environment()
    from tasks.project import state_dir

    state = state_dir(project)
    if which == "mlflow":
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(port or 5000), "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
               "--default-artifact-root", (state / "mlartifacts").as_uri()]
    elif which == "prefect":
        cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
               "--port", str(port or 4200)]
    else:
        _fail(ValueError(f"unknown UI {which!r}; choose mlflow or prefect"))
    console.print(f"serving {which} UI: {' '.join(cmd)}")
    raise typer.Exit(subprocess.call(cmd))


def _mount_groups() -> None:
    """Command groups that live in their own modules (flows/cli_*.py)."""
    from flows import cli_infer, cli_ops, cli_world

    app.add_typer(cli_world.eval_app, name="eval", help="Score generated images (GenEval-, GEdit-shapes).")
    app.add_typer(cli_world.world_app, name="world", help="Look at the shapes world.")
    cli_infer.register(app)
    cli_ops.register(app)  # serve, retrain, audit


_mount_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
