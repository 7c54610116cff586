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
    assert [(s["name"], s["n"]) for s in stats["sources"]] == [("embedded:digits:train", 1497),
                                                                ("embedded:digits:test", 300)]
    # the same report `flowtame stats --json` writes: same keys at every level, same values
    by_hand = run_cli("stats", "embedded:glow-digits", "embedded:digits:train", "embedded:digits:test",
                      "--device", "cpu", "--json", "-")
    assert by_hand.exit_code == 0, by_hand.stderr
    assert _shape(json.loads(by_hand.stdout)) == _shape(stats)
    assert [s["nats"] for s in json.loads(by_hand.stdout)["sources"]] == [s["nats"] for s in stats["sources"]]

    # every check is listed with its value; the table and the repeatable commands are printed
    assert "check forget.forgotten_fraction: 1 >= 1  pass" in result.stdout
    assert "flowtame tame embedded:glow-digits --forget" in result.stdout

    tamed = load_checkpoint(out / "tamed.safetensors")
    assert tamed.provenance["parent_sha256"] == base_sha
    assert sha256_file(base_path) == base_sha  # the shipped model is untouched
    grid = np.asarray(Image.open(out / "samples.png"))
    top, bottom = np.array_split(grid, 2, axis=0)
    assert top.shape == bottom.shape and not np.array_equal(top, bottom)


def _shape(value):
    """The key structure of a JSON value (dict keys recursively, list items' shapes), values left out."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return type(value).__name__
