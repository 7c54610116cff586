"""The installed ``flowtame`` console script, run as a user runs it (a subprocess, not CliRunner).

Usage errors must be one line on stderr and exit 2 with whatever Typer is installed (Typer 0.2x dropped its
click dependency, and an import of click in the error path turned every usage error into a traceback).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

CONSOLE = shutil.which("flowtame") or ""
pytestmark = pytest.mark.skipif(not CONSOLE, reason="the flowtame console script is not installed")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CONSOLE, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("tame", "--bogus"), "No such option: --bogus"),
        (("stats", "M", "D", "--batch-size", "abc"), "--batch-size"),
        (("nosuchcommand",), "nosuchcommand"),
        (("tame",), "model"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: tuple[str, ...], fragment: str) -> None:
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flowtame: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_a_non_finite_learning_rate_is_a_usage_error(tmp_path) -> None:
    result = _run("tame", "embedded:glow-digits", "--forget", str(tmp_path), "--remember",
                  "embedded:digits:train", "--lr", "nan", "-o", str(tmp_path / "out.safetensors"))
    assert result.returncode == 2, result.stderr
    assert "lr must be a finite number" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_version_runs_without_click() -> None:
    """The script works in an environment where click is not importable (as with Typer >= 0.22)."""
    code = ("import sys; sys.modules['click'] = None; sys.argv = ['flowtame', 'tame', '--bogus'];"
            "from flowtame.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
