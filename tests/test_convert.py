"""``flowtame convert``: rosinality/glow-pytorch checkpoints -> flowtame, checked against that code's numbers.

The fixtures in tests/fixtures/rosinality-glow/ were written by rosinality/glow-pytorch itself (see the README
there): its state dicts, its inputs, and the log-likelihoods and decoded samples it computed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_assertions import assert_one_line_error
from torch import nn

from flowtame.data.quantization import discrete_nll
from flowtame.errors import CheckpointError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import load_checkpoint
from flowtame.io.convert import ConversionWarning, convert_rosinality

FIXTURES = Path(__file__).parent / "fixtures" / "rosinality-glow"
RGB = "glow-additive-lu-rgb16"
GRAY = "glow-affine-lu-gray16"
NAMES = (RGB, GRAY)
REL_TOL = 1e-4  # log-likelihoods, relative (reference in float64, weights stored in float32)
DECODE_TOL = 1e-3  # decoded images, absolute


def fixture_file(name: str, filename: str) -> Path:
    return FIXTURES / name / filename


def config(name: str) -> dict:
    return json.loads(fixture_file(name, "config.json").read_text())


def expected(name: str) -> dict:
    return json.loads(fixture_file(name, "expected.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert_args(source: Path, output: Path, *extra: str) -> list[str]:
    return ["convert", str(source), "-o", str(output), "--from", "rosinality-glow", "--image-size", "16",
            "--n-bits", "5", *extra]


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture
def converted(run_cli, converted_dir):
    """``converted(name)`` -> the safetensors written by ``flowtame convert`` for that fixture (made once)."""

    def _get(name: str) -> Path:
        output = converted_dir / f"{name}.safetensors"
        if not output.exists():
            result = run_cli(*convert_args(fixture_file(name, "model.pt"), output))
            assert result.exit_code == 0, result.stderr
        return output

    return _get


@pytest.fixture(scope="module")
def gray_state() -> dict[str, torch.Tensor]:
    """The gray fixture's state dict as rosinality saved it (``module.`` keys)."""
    return torch.load(fixture_file(GRAY, "model.pt"), map_location="cpu", weights_only=True)


# --- agreement with the reference implementation ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_prints_summary_and_writes_checkpoint(run_cli, tmp_path, name):
    output = tmp_path / "base.safetensors"
    result = run_cli(*convert_args(fixture_file(name, "model.pt"), output))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    ckpt = load_checkpoint(output)
    assert f"sha256 {sha256(output)}" in lines[0]
    assert f"{ckpt.num_parameters:,} parameters" in lines[0]
    cfg = config(name)
    assert f"glow {cfg['in_channel']}x16x16" in lines[0]
    assert ("affine" if cfg["affine"] else "additive") in lines[0]
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


@pytest.mark.parametrize("name", NAMES)
def test_inferred_structure_matches_config(converted, name):
    cfg = config(name)
    ckpt = load_checkpoint(converted(name))
    spec = ckpt.spec
    assert ckpt.architecture == "glow"
    assert (spec.channels, spec.n_flow, spec.n_block, spec.affine, spec.hidden) == (
        cfg["in_channel"], cfg["n_flow"], cfg["n_block"], cfg["affine"], 512)
    # rosinality: blocks 0..n-2 follow conv_lu, the last block is always LU
    n_flow, n_block = cfg["n_flow"], cfg["n_block"]
    assert spec.conv_lu == (cfg["conv_lu"],) * (n_block - 1) * n_flow + (True,) * n_flow
    for level in ckpt.model.levels:
        for step in level.steps[1:]:
            assert hasattr(step.invconv, "w_l")
    assert ckpt.data_spec.to_dict() == {"image_size": cfg["image_size"], "channels": cfg["in_channel"],
                                        "n_bits": cfg["n_bits"]}
    prov = ckpt.provenance
    assert prov["source_format"] == "rosinality-glow"
    assert prov["parent_sha256"] == sha256(fixture_file(name, "model.pt"))
    assert "conversion_warnings" not in prov
    shapes = [list(s)[1:] for s in expected(name)["eps_shapes"]]
    assert [list(s) for s in ckpt.model.latent_shapes] == shapes


@pytest.mark.parametrize("name", NAMES)
def test_log_likelihoods_match_reference(converted, name):
    ref = expected(name)
    model = load_checkpoint(converted(name)).model
    x = torch.from_numpy(np.load(fixture_file(name, "inputs.npy")))
    with torch.no_grad():
        _, log_det, log_prior = model.forward_with_prior(x)
        nll = discrete_nll(model.log_prob(x), model.num_dims, config(name)["n_bits"])
    for got, key in ((log_prior, "log_p"), (log_det, "logdet"), (nll, "nll_nats_discrete")):
        want = torch.tensor(ref[key], dtype=torch.float64)
        rel = ((got.double() - want).abs() / want.abs()).max().item()
        assert rel < REL_TOL, (key, rel)
    # bits per dimension follow from the same numbers
    bpd = nll.double() / (model.num_dims * math.log(2.0))
    assert torch.allclose(bpd, torch.tensor(ref["bpd"], dtype=torch.float64), rtol=REL_TOL)


@pytest.mark.parametrize("name", NAMES)
def test_decode_noise_reproduces_reference_samples(converted, name):
    model = load_checkpoint(converted(name)).model
    eps = [torch.from_numpy(np.load(fixture_file(name, f))) for f in expected(name)["eps_files"]]
    with torch.no_grad():
        decoded = model.decode_noise(eps)
    reference = torch.from_numpy(np.load(fixture_file(name, "decoded.npy")))
    assert decoded.shape == reference.shape
    assert (decoded - reference).abs().max().item() < DECODE_TOL


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_round_trip(converted, name):
    model = load_checkpoint(converted(name)).model
    x = torch.from_numpy(np.load(fixture_file(name, "inputs.npy")))
    with torch.no_grad():
        latents, _ = model.encode(x)
        back = model.decode(latents)
    assert (back - x).abs().max().item() < 1e-4


# --- flags -----------------------------------------------------------------------------------------------


def test_agreeing_flags_are_accepted(run_cli, tmp_path):
    output = tmp_path / "gray.safetensors"
    result = run_cli(*convert_args(fixture_file(GRAY, "model.pt"), output, "--channels", "1", "--n-flow", "2",
                                   "--n-block", "3", "--affine", "--lu", "--hidden", "512",
                                   "--notes", "imported for a test"))
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint(output).provenance["notes"] == "imported for a test"


@pytest.mark.parametrize(("name", "flags", "fragment"), [
    (RGB, ["--n-flow", "3"], "--n-flow 3 disagrees with the checkpoint, which has 2 flows per block"),
    (GRAY, ["--channels", "3"], "--channels 3 disagrees with the checkpoint, which has 1 input channel"),
    (RGB, ["--affine"], "--affine disagrees with the checkpoint, which has additive couplings"),
    (GRAY, ["--additive"], "--additive disagrees with the checkpoint, which has affine couplings"),
    (RGB, ["--n-block", "3"], "--n-block 3 disagrees"),
    (GRAY, ["--hidden", "256"], "--hidden 256 disagrees"),
    (GRAY, ["--no-lu"], "--no-lu disagrees"),
])
def test_disagreeing_flag_is_one_clear_error(run_cli, tmp_path, name, flags, fragment):
    source = fixture_file(name, "model.pt")
    output = tmp_path / "out.safetensors"
    result = run_cli(*convert_args(source, output, *flags))
    assert_one_line_error(result, str(source), fragment)
    assert not output.exists()


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--image-size", "12"], "--image-size 12 must be a positive multiple of 2**n_block = 8"),
    (["--n-bits", "9"], "n_bits must be between 1 and 8"),
])
def test_image_size_and_bits_are_checked(run_cli, tmp_path, flags, fragment):
    source = fixture_file(GRAY, "model.pt")
    result = run_cli(*convert_args(source, tmp_path / "out.safetensors"), *flags)  # later flags win
    assert_one_line_error(result, str(source), fragment)


def test_unknown_source_format(run_cli, tmp_path):
    result = run_cli(*convert_args(fixture_file(RGB, "model.pt"), tmp_path / "o.safetensors"), "--from", "x")
    assert_one_line_error(result, "--from x", "rosinality-glow")


def test_existing_output_needs_force(run_cli, tmp_path):
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"keep me")
    result = run_cli(*convert_args(fixture_file(RGB, "model.pt"), output))
    assert_one_line_error(result, str(output), "--force")
    assert output.read_bytes() == b"keep me"
    result = run_cli(*convert_args(fixture_file(RGB, "model.pt"), output, "--force"))
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint(output).architecture == "glow"


# --- files that are not rosinality Glow checkpoints ------------------------------------------------------


class _Payload:
    """Pickles as a call to os.mkdir: loading it with full unpickling would create the marker folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _write_bad_file(kind: str, folder: Path) -> Path:
    path = folder / "glow.pt"
    if kind == "unrelated-module":
        torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict(), path)
    elif kind == "pickled-object":
        torch.save({"weight": _Payload(folder / "pwned")}, path)
    elif kind == "whole-module":
        torch.save(nn.Linear(2, 2), path)
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = fixture_file(RGB, "model.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "optimizer-state":
        torch.save({"state": {}, "param_groups": [{"lr": 1e-4}]}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind != "missing":
        raise ValueError(kind)
    return path


@pytest.mark.parametrize(("kind", "fragment"), [
    ("unrelated-module", "unexpected key '0.weight'"),
    ("pickled-object", "refused by weights-only loading"),
    ("whole-module", "refused by weights-only loading"),
    ("random-bytes", ""),
    ("empty", "not a readable PyTorch file"),
    ("truncated", "not a readable PyTorch file"),
    ("optimizer-state", "not a state dict of tensors"),
    ("missing", "no such file"),
    ("directory", "not a file"),
])
def test_bad_file_is_one_clear_error(run_cli, tmp_path, kind, fragment):
    source = _write_bad_file(kind, tmp_path)
    output = tmp_path / "out.safetensors"
    result = run_cli(*convert_args(source, output))
    assert_one_line_error(result, str(source), fragment)
    assert not output.exists()
    assert not (tmp_path / "pwned").exists(), "an arbitrary pickled call was executed"


@pytest.mark.parametrize(("edit", "fragment"), [
    ("missing", "missing key 'blocks.1.prior.scale'"),
    ("extra", "unexpected key 'blocks.0.flows.0.actnorm.extra'"),
    ("shape", "tensor 'blocks.2.prior.conv.bias' has shape [5], expected [32]"),
    ("nan", "tensor 'blocks.1.flows.0.coupling.net.2.weight' holds NaN or infinite values"),
    ("flows", "block 2 has 1 flows but block 0 has 2"),
    ("no-invconv", "needs exactly one of 'blocks.0.flows.1.invconv.weight'"),
])
def test_corrupt_state_dict_names_the_key(run_cli, tmp_path, gray_state, edit, fragment):
    state = dict(gray_state)
    if edit == "missing":
        del state["module.blocks.1.prior.scale"]
    elif edit == "extra":
        state["module.blocks.0.flows.0.actnorm.extra"] = torch.zeros(1)
    elif edit == "shape":
        state["module.blocks.2.prior.conv.bias"] = torch.zeros(5)
    elif edit == "nan":
        weight = state["module.blocks.1.flows.0.coupling.net.2.weight"].clone()
        weight[0, 0] = float("nan")
        state["module.blocks.1.flows.0.coupling.net.2.weight"] = weight
    elif edit == "flows":
        state = {k: v for k, v in state.items() if not k.startswith("module.blocks.2.flows.1.")}
    elif edit == "no-invconv":
        state = {k: v for k, v in state.items() if not k.startswith("module.blocks.0.flows.1.invconv.")}
    source = tmp_path / "glow.pt"
    torch.save(state, source)
    result = run_cli(*convert_args(source, tmp_path / "out.safetensors"))
    assert_one_line_error(result, str(source), fragment)


def test_flowtame_checkpoint_needs_no_conversion(run_cli, tmp_path, converted):
    source = converted(RGB)
    result = run_cli(*convert_args(source, tmp_path / "again.safetensors"))
    assert_one_line_error(result, str(source), "needs no conversion")


def test_nested_state_dict_without_prefix(tmp_path, gray_state, converted):
    source = tmp_path / "nested.pt"
    torch.save({"state_dict": {k.removeprefix("module."): v for k, v in gray_state.items()}}, source)
    ckpt = convert_rosinality(source, image_size=16, n_bits=5)
    reference = load_checkpoint(converted(GRAY)).model.state_dict()
    for key, value in ckpt.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert ckpt.provenance["parent_sha256"] == sha256(source)


# --- plain 1x1 convolutions and uninitialized actnorm (no reference fixture: built here) --------------------


def _rosinality_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """flowtame Glow keys -> rosinality keys (``levels.b.steps.{f+1}`` -> ``module.blocks.b.flows.f``)."""
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[2] == "prior":
            name = ["blocks", parts[1], *parts[2:]]
        else:
            name = ["blocks", parts[1], "flows", str(int(parts[3]) - 1), *parts[4:]]
        state["module." + ".".join(name)] = value.clone()
    return state


@pytest.fixture
def plain_conv_glow() -> nn.Module:
    """A small random Glow as rosinality builds Glow(3, 2, 2, affine=True, conv_lu=False): plain, then LU."""
    spec = GlowSpec(channels=3, image_size=8, n_flow=2, n_block=2, affine=True, hidden=16,
                    conv_lu=(False, False, True, True))
    model = build_glow(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for module in model.modules():
            if hasattr(module, "initialized"):
                module.initialized.fill_(1.0)
    return model.eval()


def test_plain_convs_are_inferred_per_layer(run_cli, tmp_path, plain_conv_glow):
    source = tmp_path / "plain.pt"
    torch.save(_rosinality_state_dict(plain_conv_glow), source)
    output = tmp_path / "plain.safetensors"
    bad = run_cli("convert", source, "-o", output, "--image-size", "8", "--n-bits", "5", "--lu")
    assert_one_line_error(bad, str(source), "--lu disagrees", "blocks.0.flows.0 has a plain 1x1 convolution")
    result = run_cli("convert", source, "-o", output, "--image-size", "8", "--n-bits", "5", "--no-lu",
                     "--hidden", "16", "--channels", "3")
    assert result.exit_code == 0, result.stderr
    assert "1x1 convs PPLL" in result.stdout
    ckpt = load_checkpoint(output)
    assert ckpt.spec.conv_lu == (False, False, True, True)
    assert ckpt.spec.hidden == 16
    x = torch.rand(4, 3, 8, 8) - 0.5
    with torch.no_grad():
        assert torch.allclose(ckpt.model.log_prob(x), plain_conv_glow.log_prob(x), rtol=1e-6, atol=1e-4)


def test_uninitialized_actnorm_is_reported(run_cli, tmp_path, plain_conv_glow):
    state = _rosinality_state_dict(plain_conv_glow)
    state["module.blocks.1.flows.0.actnorm.initialized"] = torch.tensor(0.0)
    source = tmp_path / "fresh.pt"
    torch.save(state, source)
    with pytest.warns(ConversionWarning, match="blocks.1.flows.0.actnorm"):
        ckpt = convert_rosinality(source, image_size=8, n_bits=5)
    assert "blocks.1.flows.0.actnorm" in ckpt.provenance["conversion_warnings"][0]
    output = tmp_path / "fresh.safetensors"
    result = run_cli("convert", source, "-o", output, "--image-size", "8", "--n-bits", "5")
    assert result.exit_code == 0
    assert result.stderr.startswith("flowtame: warning: ")
    assert "never data-initialized" in result.stderr
    assert load_checkpoint(output).provenance["conversion_warnings"]


def test_library_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        convert_rosinality(tmp_path / "absent.pt", image_size=16, n_bits=5)
    with pytest.raises(CheckpointError, match="--n-flow 5 disagrees"):
        convert_rosinality(fixture_file(RGB, "model.pt"), image_size=16, n_bits=5, n_flow=5)
