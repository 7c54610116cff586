"""docs/cli.md is generated from the commands' --help (docs/make_cli_reference.py); it must name every option
each command has today (compared as names, so a newer Rich's layout does not matter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from flowtame.cli import app

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
COMMANDS = typer.main.get_command(app).commands


def _documented(command: str) -> set[str]:
    section = REFERENCE.read_text().split(f"## flowtame {command}\n", 1)[1].split("\n## flowtame ", 1)[0]
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", section))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_reference_names_every_option(command):
    options = {name for param in COMMANDS[command].params for name in param.opts if name.startswith("--")}
    missing = options - _documented(command)
    assert not missing, f"docs/cli.md is stale for {command} ({sorted(missing)}): run python docs/make_cli_reference.py"
