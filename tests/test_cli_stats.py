"""``flowtame stats`` end to end on a tiny checkpoint built here (the embedded model may not exist yet)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtame.data.quantization import DataSpec
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, make_provenance, save_checkpoint

QUANTILE_KEYS = ["1", "5", "25", "50", "75", "95", "99"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = GlowSpec(channels=1, image_size=16, n_flow=1, n_block=2, hidden=8, affine=True)
    model = build_glow(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(path, Checkpoint(model=model, architecture="glow", spec=spec,
                                     data_spec=DataSpec(16, 1, 5), provenance=make_provenance(command="test")))
    return path


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def _bad_files(folder: Path) -> list[str]:
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a JPEG")
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:300])
    return ["cut.png", "text.jpg", "zero.png"]


def test_stats_json_csv_plot_and_table(run_cli, model_path, tmp_path):
    folder = _images(tmp_path / "faces", 12)
    out = tmp_path / "out"
    result = run_cli("stats", model_path, folder, "embedded:digits:test:3", "--json", out / "stats.json",
                     "--per-image", out / "nll.csv", "--plot", out / "nll.png", "--batch-size", "5")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "stats.json").read_text())
    assert report["schema_version"] == 1 and report["command"] == "stats"
    assert report["num_dims"] == 256 and report["seed"] == 0
    assert report["data"] == {"image_size": 16, "channels": 1, "n_bits": 5}
    first, second = report["sources"]
    assert first["name"] == str(folder) and first["n"] == 12 and first["skipped"] == 0
    assert second["name"] == "embedded:digits:test:3" and second["n"] == 31
    for block in (first["nats"], first["bpd"]):
        assert list(block["quantiles"]) == QUANTILE_KEYS
        assert block["min"] <= block["quantiles"]["50"] <= block["max"]
    assert first["bpd"]["mean"] == pytest.approx(first["nats"]["mean"] / (256 * math.log(2)))
    assert 0 <= first["ks_normality"]["pvalue"] <= 1 and 0 <= second["dagostino"]["pvalue"] <= 1

    with open(out / "nll.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 + 31
    assert [r["source"] for r in rows] == [str(folder)] * 12 + ["embedded:digits:test:3"] * 31
    assert np.mean([float(r["nll_nats"]) for r in rows[:12]]) == pytest.approx(first["nats"]["mean"])
    with Image.open(out / "nll.png") as plot:
        assert plot.format == "PNG" and plot.width > 300

    assert "per-image NLL" in result.stdout and "BPD 5% / 50% / 95%" in result.stdout
    assert f"{second['bpd']['mean']:.4f}" in result.stdout
    assert f"{folder}: 12 image(s), 0 skipped" in result.stderr


def test_json_to_stdout_is_pure_json(run_cli, model_path):
    result = run_cli("stats", model_path, "embedded:digits:test:0", "--json", "-", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["seed"] == 3 and report["sources"][0]["n"] == 30


def test_same_seed_same_figures(run_cli, model_path):
    runs = [json.loads(run_cli("stats", model_path, "embedded:digits:test:1", "--json", "-",
                               "--seed", seed).stdout)["sources"][0]["nats"]["mean"] for seed in ("0", "0", "1")]
    assert runs[0] == runs[1] != runs[2]


def test_bad_files_are_warned_and_counted(run_cli, model_path, tmp_path):
    folder = _images(tmp_path / "mixed", 4)
    bad = _bad_files(folder)
    result = run_cli("stats", model_path, folder, "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.stderr
    source = json.loads((tmp_path / "s.json").read_text())["sources"][0]
    assert source["n"] == 4 and source["skipped"] == 3
    assert sorted(Path(f["path"]).name for f in source["skipped_files"]) == bad
    warnings = [line for line in result.stderr.splitlines() if line.startswith("flowtame: warning: ")]
    assert len(warnings) == 3
    for name in bad:
        assert any(f"{folder / name}: skipped: " in line for line in warnings)
    assert "empty file (0 bytes)" in result.stderr and "not an image" in result.stderr
    assert "truncated or corrupt" in result.stderr
    assert "4 image(s), 3 skipped" in result.stderr


@pytest.mark.parametrize("name", ["zero.png", "text.jpg", "cut.png"])
def test_strict_exits_2_with_one_line(run_cli, model_path, tmp_path, name):
    folder = _images(tmp_path / "strict", 2)
    _bad_files(tmp_path / "strict")
    for other in {"zero.png", "text.jpg", "cut.png"} - {name}:
        (folder / other).unlink()
    result = run_cli("stats", model_path, folder, "--strict", "--json", tmp_path / "s.json")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"flowtame: error: {folder / name}: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "missing", "no such file or directory"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no images found"),
    (lambda tmp: "embedded:digits:val", "expected embedded:digits"),
])
def test_bad_sources_exit_2_with_one_line(run_cli, model_path, tmp_path, make, message):
    source = make(tmp_path)
    result = run_cli("stats", model_path, "embedded:digits:test:0", source)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flowtame: error: {source}: ") and message in lines[0]
    assert result.stdout == ""  # sources are opened before any computation


def test_every_file_bad_exits_2(run_cli, model_path, tmp_path):
    folder = tmp_path / "allbad"
    folder.mkdir()
    _bad_files(folder)
    result = run_cli("stats", model_path, folder, "--quiet")
    assert result.exit_code == 2
    assert "flowtame: error: " in result.stderr and "none of its 3 files could be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_outputs_are_not_overwritten_without_force(run_cli, model_path, tmp_path):
    target = tmp_path / "stats.json"
    target.write_text("{}")
    result = run_cli("stats", model_path, "embedded:digits:test:0", "--json", target)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert target.read_text() == "{}"
    result = run_cli("stats", model_path, "embedded:digits:test:0", "--json", target, "--force", "--quiet")
    assert result.exit_code == 0 and json.loads(target.read_text())["sources"][0]["n"] == 30
    assert result.stdout == "" and result.stderr == ""


def test_bad_model_device_and_precision_exit_2(run_cli, model_path, tmp_path):
    result = run_cli("stats", tmp_path / "nope.safetensors", "embedded:digits:test:0")
    assert result.exit_code == 2 and "no such file" in result.stderr
    result = run_cli("stats", model_path, "embedded:digits:test:0", "--device", "cpu", "--precision", "bf16")
    assert result.exit_code == 2 and "only supported on CUDA" in result.stderr
    result = run_cli("stats", model_path, "embedded:digits:test:0", "--device", "tpu")
    assert result.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in result.stderr
