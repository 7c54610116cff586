"""Atomic outputs: all or nothing, and normal permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from flowtame.io.fileio import atomic_path, write_json_atomic


def test_atomic_write_leaves_nothing_on_failure_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_outputs_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": float("nan")})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None}
