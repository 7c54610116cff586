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


def _help_texts():
    """(where, text) of every command's and option's help text."""
    for name, command in sorted(COMMANDS.items()):
        yield name, command.help or ""
        for param in command.params:
            yield f"{name} {param.name}", getattr(param, "help", None) or ""


def test_no_help_text_loses_words_to_rich_markup():
    """Rich reads ``[word ...]`` (a lower-case letter, #, / or @ after the bracket) as a style tag and drops it:
    every help text must render to itself (an escaped ``\\[`` shows as ``[``)."""
    from rich.errors import MarkupError
    from rich.markup import render

    def eaten(text: str) -> bool:
        try:
            return render(text).plain != text.replace("\\[", "[")
        except MarkupError:
            return True

    assert [where for where, text in _help_texts() if eaten(text)] == []


def test_debias_help_shows_what_happens_without_other(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    result = run_cli("debias", "--help")
    assert result.exit_code == 0
    text = re.sub(r"[│\s]+", " ", result.stdout)  # the help column's lines, joined
    assert "relative among the groups (without --other every sample is assigned to a group)." in text
    assert "must stay as it was (default: all the groups' images)." in text
    assert "cannot be reached within --max-iters [on]." in text
