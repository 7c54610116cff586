"""flowtame checkpoints: save/load round trips keep the model, its metadata and its likelihoods."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flowtame import __version__
from flowtame.data.quantization import DataSpec
from flowtame.errors import CheckpointError, OutputExistsError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import SCHEMA_VERSION, Checkpoint, load_checkpoint, make_provenance, save_checkpoint


@pytest.fixture
def checkpoint() -> Checkpoint:
    """A small random Glow (1x8x8, mixed plain/LU 1x1 convs) with a full provenance block."""
    spec = GlowSpec(channels=1, image_size=8, n_flow=2, n_block=2, affine=True, hidden=8,
                    conv_lu=(False, True, True, True))
    model = build_glow(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for module in model.modules():
            if hasattr(module, "initialized"):
                module.initialized.fill_(1.0)
    provenance = make_provenance(parent_sha256="ab" * 32, command="flowtame tame base --forget x",
                                 notes="unit test", method="taming", forget_digests=["0" * 64, "1" * 64])
    return Checkpoint(model=model.eval(), architecture="glow", spec=spec,
                      data_spec=DataSpec(image_size=8, channels=1, n_bits=5), provenance=provenance)


def test_round_trip_keeps_metadata_and_log_prob(tmp_path, checkpoint):
    path = tmp_path / "model.safetensors"
    digest = save_checkpoint(path, checkpoint)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint(path)
    assert loaded.architecture == "glow"
    assert loaded.spec == checkpoint.spec
    assert loaded.spec.conv_lu == (False, True, True, True)
    assert loaded.data_spec == checkpoint.data_spec
    assert loaded.provenance == checkpoint.provenance
    assert loaded.path == path and loaded.sha256 == digest
    assert not loaded.model.training
    assert loaded.num_parameters == checkpoint.num_parameters
    reference = checkpoint.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    x = torch.rand(5, 1, 8, 8) - 0.5
    with torch.no_grad():
        assert torch.equal(loaded.model.log_prob(x), checkpoint.model.log_prob(x))
    info = loaded.info()
    assert info["sha256"] == digest and info["parameters"] == checkpoint.num_parameters
    assert info["data"] == {"image_size": 8, "channels": 1, "n_bits": 5}


def test_metadata_is_plain_json_strings(tmp_path, checkpoint):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, checkpoint)
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    assert metadata["format"] == "flowtame"
    assert metadata["schema_version"] == str(SCHEMA_VERSION)
    assert json.loads(metadata["hyperparameters"]) == checkpoint.spec.to_dict()
    assert json.loads(metadata["provenance"])["forget_digests"] == ["0" * 64, "1" * 64]


def test_make_provenance_fields():
    prov = make_provenance(parent_sha256="cd" * 32, command="flowtame x", notes="n", extra_field=3)
    assert prov["flowtame_version"] == __version__
    assert dt.datetime.fromisoformat(prov["created"]).tzinfo is not None
    assert (prov["parent_sha256"], prov["command"], prov["notes"], prov["extra_field"]) == (
        "cd" * 32, "flowtame x", "n", 3)
    assert make_provenance()["command"] is None  # the library never reads sys.argv; callers pass the command


def test_loading_never_modifies_the_file(tmp_path, checkpoint):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, checkpoint)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    loaded = load_checkpoint(path)
    loaded.model.train()
    with torch.no_grad():
        loaded.model.log_prob(torch.rand(2, 1, 8, 8) - 0.5)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_loaded_actnorm_is_not_reinitialized_in_training_mode(tmp_path, checkpoint):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, checkpoint)
    model = load_checkpoint(path).model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.log_prob(torch.rand(4, 1, 8, 8) - 0.5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_save_refuses_to_overwrite_without_force(tmp_path, checkpoint):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_checkpoint(path, checkpoint)
    assert path.read_bytes() == b"precious"
    save_checkpoint(path, checkpoint, force=True)
    assert load_checkpoint(path).spec == checkpoint.spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_half_precision_tensors_load_as_float32(tmp_path, checkpoint):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_checkpoint(path, checkpoint)
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k).half() for k in fh.keys()}
    half = tmp_path / "half.safetensors"
    save_file(tensors, str(half), metadata=metadata)
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(missing))}: no such file$"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(Path(tmp_path))


def test_channels_last_placement_keeps_likelihoods_and_saves_contiguous(tmp_path, checkpoint):
    """place_model's NHWC weights on the CPU change log p only by float rounding, and save/load still works."""
    from flowtame.engine.devices import place_model

    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        before = checkpoint.model.log_prob(x)
        place_model(checkpoint.model, torch.device("cpu"))
        assert any(p.dim() == 4 and not p.is_contiguous() for p in checkpoint.model.parameters())
        after = checkpoint.model.log_prob(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-3)
    save_checkpoint(tmp_path / "nhwc.safetensors", checkpoint)
    with torch.no_grad():
        reloaded = load_checkpoint(tmp_path / "nhwc.safetensors").model.eval().log_prob(x)
    torch.testing.assert_close(reloaded, before, rtol=1e-5, atol=1e-3)
