"""The CLI's tables keep each row on one line when stdout is not a terminal (a file, grep, less)."""

from __future__ import annotations

import os
import subprocess
import sys

MD5 = "aec6c14e72a7f8a17afd4f62206297f8.dir"
RUN = "246ab8f9ca7c4e9b8c12e1d47a799b73"
FLOW = "acc47072-b09b-40d9-96e2-546401b0e08c"

PRINT_TABLE = f"""
from rich.table import Table
from flows.console import console
t = Table()
for col in ("stage", "checkpoint md5 / DVC path", "MLflow run", "Prefect flow run", "key metrics"):
    t.add_column(col, overflow="fold")
t.add_row("base", "{MD5} data/base", "{RUN}", "{FLOW}", "gen_loss=0.334, step=1.2e+04, train_s=1.855e+04")
console.print(t)
"""


def _print_table(columns: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    # the project is on PYTHONPATH (tests/conftest.py), so the child imports flows.console from anywhere
    r = subprocess.run([sys.executable, "-c", PRINT_TABLE], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_piped_tables_keep_each_row_on_one_line():
    row = [line for line in _print_table(None).splitlines() if "base" in line and MD5 in line]
    assert len(row) == 1, "the row was folded"
    assert RUN in row[0] and FLOW in row[0] and "train_s=1.855e+04" in row[0]


def test_columns_still_sets_the_width():
    out = _print_table("80")
    assert max(len(line) for line in out.splitlines()) <= 80
    assert not any(MD5 in line for line in out.splitlines())  # folded at 80 columns, as rich does by default
