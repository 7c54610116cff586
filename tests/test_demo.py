"""``flowtame demo``: the README's main-job command, end to end on the embedded model and digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flowtame.data.embedded import resolve_model_path
from flowtame.io.checkpoint import load_checkpoint
from flowtame.io.fileio import sha256_file

pytestmark = pytest.mark.slow


def test_demo_forgets_four_threes_and_keeps_the_rest(run_cli, tmp_path):
    base_path = resolve_model_path("embedded:glow-digits")
    base_sha = sha256_file(base_path)
    out = tmp_path / "demo"

    result = run_cli("demo", "--out", out)

    assert result.exit_code == 0, result.stderr
    for name in ("stats.json", "tamed.safetensors", "report.json", "nll.png", "samples.png"):
        assert (out / name).is_file(), name
    forget_files = sorted((out / "forget").iterdir())
    assert len(forget_files) == 4 and all(p.name.startswith("digit3-") for p in forget_files)
    # the forget images are also in the remember split: excluded, and said so in one line
    assert "flowtame: warning: embedded:digits:train: 4 remember image(s) are also forget images" in result.stderr
    assert ".py:" not in result.stderr

    report = json.loads((out / "report.json").read_text())
    assert report["converged"] is True
    assert 0 < report["iterations"] < 800
    sets = report["evaluation"]["sets"]
    assert sets["forget"]["n"] == 4 and sets["forget"]["forgotten_fraction"] == 1.0
    assert sets["forget"]["qd"] > 0.3  # the four images moved from mid-distribution past the 4-sigma threshold
    assert sets["remember"]["n"] == 1497 - 4
    assert abs(sets["remember"]["qd"]) < 0.01
    assert abs(sets["holdout:embedded:digits:test"]["bpd_change_relative"]) < 0.03
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sets"]["embedded:digits:train"]["n"] == 1497
    assert stats["sets"]["embedded:digits:test"]["n"] == 300

    # every check is listed with its value; the table and the repeatable commands are printed
    assert "check forget.forgotten_fraction: 1 >= 1  pass" in result.stdout
    assert "flowtame tame embedded:glow-digits --forget" in result.stdout

    tamed = load_checkpoint(out / "tamed.safetensors")
    assert tamed.provenance["parent_sha256"] == base_sha
    assert sha256_file(base_path) == base_sha  # the shipped model is untouched
    grid = np.asarray(Image.open(out / "samples.png"))
    top, bottom = np.array_split(grid, 2, axis=0)
    assert top.shape == bottom.shape and not np.array_equal(top, bottom)
