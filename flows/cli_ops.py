"""CLI commands for operations: `serve`, `retrain`, `audit` (mounted by flows/cli.py)."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from flows.cli import _fail, _known_errors, console, err, setup_environment

    @app.command()
    def serve(profile: str = typer.Option("default", "--profile", "-p"),
              cron: Optional[str] = typer.Option(None, help="cron of the pipeline deployment "
                                                              "(default: pipeline.schedule.cron)"),
              timezone: Optional[str] = typer.Option(None, help="IANA time zone of the cron"),
              watch: Optional[str] = typer.Option(None, help="folder or s3://bucket/prefix to poll for new "
                                                               "batches (default: pipeline.retrain.watch)"),
              poll_interval: Optional[int] = typer.Option(None, help="seconds between polls of the watch")):
        """Register the Prefect deployments (pipeline on its cron, retraining, promotion) and serve them."""
        try:
            setup_environment()
            if not os.environ.get("PREFECT_API_URL"):
                raise ValueError("schedules need a Prefect server: run `prefect server start` and "
                                 "export PREFECT_API_URL=http://127.0.0.1:4200/api")
            from flows.serve import deployments, serve_all

            items = deployments(profile, cron=cron, watch=watch, poll_interval_s=poll_interval, timezone=timezone)
        except (*_known_errors(), ValueError) as e:
            _fail(e)
        for d in items:
            when = ", ".join(str(getattr(s.schedule, "cron", None) or getattr(s.schedule, "interval", ""))
                             for s in d.schedules or []) or "on demand"
            console.print(f"deployment {d.flow_name}/{d.name}: {when}", markup=False)
        serve_all(items)

    @app.command()
    def retrain(profile: str = typer.Option("default", "--profile", "-p"),
                watch: Optional[str] = typer.Option(None, help="folder or s3://bucket/prefix "
                                                                 "(default: pipeline.retrain.watch)"),
                data_stage: Optional[str] = typer.Option(None, help="data stage the batches are added to")):
        """Poll once: ingest the complete batches under the watch and retrain on them."""
        try:
            setup_environment()
            from flows.retrain import retrain as retrain_flow

            result = retrain_flow(profile=profile, watch=watch, data_stage=data_stage)
        except (*_known_errors(), ValueError) as e:
            _fail(e)
        for b in result["batches"]:
            if b["status"] == "accepted":
                console.print(f"batch {b['name']}: accepted (md5 {b['md5']}), data md5 {b['data_md5']}", markup=False)
            else:
                console.print(f"batch {b['name']}: REJECTED: {b['reason']} (moved to {b['moved_to']})", markup=False)
        if not result["batches"]:
            console.print(f"no new batch under {result['watch']}", markup=False)
        for p in (result["pipeline"] or {}).get("promotions", []):
            console.print(f"{p['model']} v{p.get('version')}: {'promoted' if p['promoted'] else 'not promoted'} "
                          f"({p['reason']})", markup=False)

    @app.command()
    def audit(model_uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION"),
              as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """Check a model's whole lineage: remote objects, md5s, manifests, dvc.lock, MLflow, gates."""
        try:
            project = setup_environment()
            from tasks import tracking
            from tasks.audit import audit as run_audit
            from tasks.project import state_dir

            report = run_audit(tracking.client(state_dir(project)), model_uri, project)
        except _known_errors() as e:
            _fail(e)
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            for ch in report["checks"]:
                mark = "PASS" if ch["ok"] else "FAIL"
                detail = f" ({ch['detail']})" if ch["detail"] else ""
                console.print(f"{mark}  {ch['check']}: {ch['object']}{detail}", markup=False, highlight=False,
                              soft_wrap=True)
            console.print(f"audit of {report['model']} v{report['version']}: "
                          f"{'PASS' if report['ok'] else 'FAIL'} ({len(report['checks'])} checks)", markup=False)
        if not report["ok"]:
            for ch in report["failed"]:
                err.print(f"mismatch: {ch['object']}: {ch['check']}: {ch['detail']}", markup=False, highlight=False)
            raise typer.Exit(1)
