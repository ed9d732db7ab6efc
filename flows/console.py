"""The CLI's two consoles, shared by every command module.

``console`` prints tables and reports on stdout. In a terminal rich fits them to its width; piped
into a file, ``grep`` or ``less`` (no terminal, no ``COLUMNS``) rich would assume 80 columns and
fold every md5 and run id of a lineage or stages table over several lines, so there the width is
``PIPED_WIDTH`` and each row stays on one line. ``err`` prints progress notes and the one-line
``error:`` messages on stderr, never wrapped (greppable). :func:`fail` ends a command on bad input
with exit code 2 and no traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

PIPED_WIDTH = 240  # columns for stdout with no terminal and no COLUMNS


def stdout_width() -> int | None:
    """None (rich decides: the terminal's width, or ``COLUMNS``) or :data:`PIPED_WIDTH`."""
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return None
    return PIPED_WIDTH


console = Console(width=stdout_width())
err = Console(stderr=True, soft_wrap=True)


def fail(problem: BaseException | str) -> None:
    """Print ``error: <problem>`` on stderr and exit with code 2."""
    err.print(f"[bold red]error:[/] {problem}", markup=True, highlight=False)
    raise typer.Exit(2)
