"""Assertions shared by the CLI tests (imported by test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 2, exactly one stderr line that contains every fragment, no traceback anywhere."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flowtame: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stdout + result.stderr
