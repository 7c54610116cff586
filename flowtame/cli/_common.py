"""Helpers shared by the command modules: consoles, JSON output, option types."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from flowtame.io.fileio import write_json_atomic

console = Console(stderr=False)
err_console = Console(stderr=True)


def is_interactive(quiet: bool = False) -> bool:
    """True when progress should be drawn live (a terminal on stdout and not --quiet)."""
    return not quiet and sys.stdout.isatty()


def emit_json(path: str | None, obj) -> None:
    """Write ``obj`` as JSON to ``path`` (``-`` = stdout); no-op when path is None."""
    if path is not None:
        write_json_atomic(path, obj)


def state_path_for(output: Path) -> Path:
    """Where an interrupted run keeps its resumable state: beside the output."""
    return output.with_name(output.name + ".resume.safetensors")
