"""``flowtame info``: describes good checkpoints, and turns every bad file into one line and exit code 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flowtame.data.quantization import DataSpec
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import SCHEMA_VERSION, Checkpoint, make_provenance, save_checkpoint


@pytest.fixture
def good(tmp_path) -> Path:
    """A small valid flowtame checkpoint on disk."""
    spec = GlowSpec(channels=3, image_size=8, n_flow=1, n_block=2, affine=False, hidden=8)
    model = build_glow(spec)
    for module in model.modules():
        if hasattr(module, "initialized"):
            module.initialized.fill_(1.0)
    checkpoint = Checkpoint(model=model.eval(), architecture="glow", spec=spec,
                            data_spec=DataSpec(image_size=8, channels=3, n_bits=5),
                            provenance=make_provenance(parent_sha256="ef" * 32, notes="info test"))
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, checkpoint)
    return path


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}


def test_info_json_to_stdout(run_cli, good):
    result = run_cli("info", good, "--json", "-")
    assert result.exit_code == 0, result.stderr
    description = json.loads(result.stdout)
    assert description["architecture"] == "glow"
    assert description["parameters"] > 0
    assert description["data"] == {"image_size": 8, "channels": 3, "n_bits": 5}
    assert description["hyperparameters"]["n_block"] == 2
    assert description["provenance"]["parent_sha256"] == "ef" * 32
    assert description["provenance"]["notes"] == "info test"
    assert description["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert description["latent_shapes"] == [[6, 4, 4], [24, 2, 2]]


def test_info_table_and_file_untouched(run_cli, good):
    before = (good.read_bytes(), good.stat().st_mtime_ns)
    result = run_cli("info", good)
    assert result.exit_code == 0, result.stderr
    assert "glow" in result.stdout and "3x8x8, 5 bits" in result.stdout
    assert (good.read_bytes(), good.stat().st_mtime_ns) == before


def _make_bad(kind: str, good: Path) -> Path:
    """Write a broken variant of ``good`` next to it; returns its path."""
    bad = good.with_name(f"{kind}.safetensors")
    metadata, tensors = _read(good)
    if kind == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        bad.write_bytes(np.random.default_rng(1).bytes(2048))
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "missing-tensor":
        del tensors["levels.0.steps.1.actnorm.loc"]
        save_file(tensors, str(bad), metadata=metadata)
    elif kind == "extra-tensor":
        tensors["levels.0.steps.1.extra"] = torch.zeros(3)
        save_file(tensors, str(bad), metadata=metadata)
    elif kind == "wrong-shape":
        tensors["levels.1.prior.conv.bias"] = torch.zeros(7)
        save_file(tensors, str(bad), metadata=metadata)
    elif kind == "nan-tensor":
        weight = tensors["levels.0.steps.1.coupling.net.0.weight"].clone()
        weight.view(-1)[3] = float("nan")
        tensors["levels.0.steps.1.coupling.net.0.weight"] = weight
        save_file(tensors, str(bad), metadata=metadata)
    elif kind == "no-metadata":
        save_file(tensors, str(bad))
    elif kind == "newer-schema":
        save_file(tensors, str(bad), metadata={**metadata, "schema_version": str(SCHEMA_VERSION + 1)})
    elif kind == "bad-json":
        save_file(tensors, str(bad), metadata={**metadata, "provenance": "{not json"})
    elif kind == "directory":
        bad.mkdir()
    elif kind != "absent":
        raise ValueError(kind)
    return bad


@pytest.mark.parametrize(("kind", "problem"), [
    ("truncated", "not a readable safetensors file"),
    ("random-bytes", "not a readable safetensors file"),
    ("empty", "not a readable safetensors file"),
    ("missing-tensor", "1 tensor(s) missing, e.g. 'levels.0.steps.1.actnorm.loc'"),
    ("extra-tensor", "1 unexpected tensor(s), e.g. 'levels.0.steps.1.extra'"),
    ("wrong-shape", "tensor 'levels.1.prior.conv.bias' has shape [7], expected [48]"),
    ("nan-tensor", "tensor 'levels.0.steps.1.coupling.net.0.weight' holds NaN or infinite values"),
    ("no-metadata", "not a flowtame checkpoint"),
    ("newer-schema", f"checkpoint schema {SCHEMA_VERSION + 1}, newer than this flowtame"),
    ("bad-json", "metadata entry 'provenance' is not valid JSON"),
    ("absent", "no such file"),
    ("directory", "not a file"),
])
def test_bad_checkpoint_is_one_line_exit_2(run_cli, good, kind, problem):
    bad = _make_bad(kind, good)
    before = (bad.read_bytes(), bad.stat().st_mtime_ns) if bad.is_file() else None
    result = run_cli("info", bad)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"flowtame: error: {bad}: ")
    assert problem in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    if before is not None:
        assert (bad.read_bytes(), bad.stat().st_mtime_ns) == before


@pytest.mark.parametrize("hyperparameter", [{"hidden": 8.5}, {"channels": 3.0}])
def test_non_integer_hyperparameters_are_one_line(run_cli, good, hyperparameter):
    metadata, tensors = _read(good)
    hyper = {**json.loads(metadata["hyperparameters"]), **hyperparameter}
    bad = good.with_name("float-hyper.safetensors")
    save_file(tensors, str(bad), metadata={**metadata, "hyperparameters": json.dumps(hyper)})
    result = run_cli("info", bad)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"flowtame: error: {bad}: ")


def test_info_json_file_refuses_to_overwrite_without_force(run_cli, good, tmp_path):
    target = tmp_path / "info.json"
    target.write_text("keep me")
    refused = run_cli("info", good, "--json", target)
    assert refused.exit_code == 2
    assert target.read_text() == "keep me"
    assert "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    forced = run_cli("info", good, "--json", target, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(target.read_text())["architecture"] == "glow"
