"""Property-based fuzzing of the loaders with mutated real files: whatever the bytes, the checkpoint loader and
the image loader either succeed or raise the project's own errors (:mod:`flowtame.errors`), never anything else.

Derandomized and bounded (a few seconds in the fast tier); the same examples run every time. For a deeper,
random search: ``FLOWTAME_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py`` (under ``ulimit -v`` if you
are trying changes to the loaders: a header asking for a giant model once took 15 GB before it was refused).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flowtame.data.embedded import asset_path
from flowtame.data.images import open_images
from flowtame.data.quantization import DataSpec
from flowtame.errors import FlowtameError
from flowtame.io.checkpoint import load_checkpoint

_DEEP = int(os.environ.get("FLOWTAME_FUZZ_EXAMPLES", "0"))  # e.g. 500: a longer, random search (run it locally)
FUZZ = settings(max_examples=_DEEP or 40, deadline=None, derandomize=not _DEEP, database=None,
                suppress_health_check=[HealthCheck.too_slow])

CHECKPOINT = asset_path("glow-digits.safetensors").read_bytes()
HEADER_END = 8 + struct.unpack("<Q", CHECKPOINT[:8])[0]


def _real_image(fmt: str) -> bytes:
    """A 24x24 digit written by Pillow's PNG / JPEG encoder (libpng / libjpeg output, not hand-made bytes)."""
    with np.load(asset_path("digits.npz")) as arrays:
        digit = arrays["images"][7]
    buffer = io.BytesIO()
    Image.fromarray(digit).resize((24, 24), Image.Resampling.BICUBIC).convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = {"png": _real_image("PNG"), "jpg": _real_image("JPEG")}


def _mutations(size: int, hot_end: int):
    """Lists of bit flips, truncations and byte insertions; half the positions fall in [0, hot_end) (the
    header, where a change means most)."""
    position = st.one_of(st.integers(0, hot_end - 1), st.integers(0, size - 1))
    one = st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("truncate"), position, st.just(0)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=12)),
    )
    return st.lists(one, min_size=1, max_size=3)


def _mutate(data: bytes, mutations) -> bytes:
    buffer = bytearray(data)
    for kind, at, arg in mutations:
        at = min(at, max(len(buffer) - 1, 0))
        if kind == "flip" and buffer:
            buffer[at] ^= 1 << arg
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = arg
    return bytes(buffer)


def _loads_or_own_error(load, data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(data)
        try:
            load(path)
        except FlowtameError:
            pass


def _load_image(path: Path) -> None:
    images, _ = open_images(path, DataSpec(image_size=16, channels=1, n_bits=5)).load_tensor()
    assert images.shape[1:] == (1, 16, 16)


@FUZZ
@given(mutations=_mutations(len(CHECKPOINT), HEADER_END))
def test_mutated_embedded_checkpoint_loads_or_raises_a_checkpoint_error(mutations):
    _loads_or_own_error(load_checkpoint, _mutate(CHECKPOINT, mutations), ".safetensors")


_HEADER = json.loads(CHECKPOINT[8:HEADER_END])
_TENSORS = sorted(k for k in _HEADER if k != "__metadata__")
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=4), max_leaves=8)


def _header_edit():
    tensor_edit = st.tuples(st.sampled_from(_TENSORS), st.sampled_from(["dtype", "shape", "data_offsets"]),
                            st.one_of(_JSON, st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3"]),
                                      st.lists(st.integers(0, 2**40), max_size=4)))
    meta_edit = st.tuples(st.just("__metadata__"), st.sampled_from(sorted(_HEADER["__metadata__"])),
                          st.one_of(_JSON.map(json.dumps), _JSON))
    return st.lists(st.one_of(tensor_edit, meta_edit), min_size=1, max_size=3)


@FUZZ
@given(edits=_header_edit())
def test_checkpoint_with_an_edited_safetensors_header_loads_or_raises_a_checkpoint_error(edits):
    header = json.loads(CHECKPOINT[8:HEADER_END])
    for entry, field, value in edits:
        header[entry][field] = value
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + CHECKPOINT[HEADER_END:]
    _loads_or_own_error(load_checkpoint, data, ".safetensors")


@FUZZ
@pytest.mark.parametrize("fmt", sorted(IMAGES))
@given(data=st.data())
def test_mutated_real_image_loads_or_raises_a_data_error(fmt, data):
    original = IMAGES[fmt]
    mutations = data.draw(_mutations(len(original), min(len(original), 64)))
    _loads_or_own_error(_load_image, _mutate(original, mutations), f".{fmt}")


_SPEC_FIELDS = [("hyperparameters", k) for k in json.loads(_HEADER["__metadata__"]["hyperparameters"])] + [
    ("data", k) for k in json.loads(_HEADER["__metadata__"]["data"])]
_ODD_VALUES = st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**63, 2**64, -2**63 - 1, 10**30]),
                        st.floats(), st.booleans(), st.none(), st.text(max_size=4),
                        st.lists(st.one_of(st.booleans(), st.integers(-2, 3)), max_size=20))


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(_SPEC_FIELDS), _ODD_VALUES), min_size=1, max_size=3))
def test_checkpoint_with_odd_hyperparameters_loads_or_raises_a_checkpoint_error(edits):
    header = json.loads(CHECKPOINT[8:HEADER_END])
    meta = header["__metadata__"]
    for (entry, key), value in edits:
        block = json.loads(meta[entry])
        block[key] = value
        meta[entry] = json.dumps(block)
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + CHECKPOINT[HEADER_END:]
    _loads_or_own_error(load_checkpoint, data, ".safetensors")


def _giant_header_file(tmp_path: Path) -> Path:
    """The embedded checkpoint with ``hidden`` = 3000 in its header (~0.6 GB of weights it does not hold)."""
    header = json.loads(CHECKPOINT[8:HEADER_END])
    hyperparameters = json.loads(header["__metadata__"]["hyperparameters"])
    header["__metadata__"]["hyperparameters"] = json.dumps({**hyperparameters, "hidden": 3000})
    text = json.dumps(header).encode()
    path = tmp_path / "giant.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + CHECKPOINT[HEADER_END:])
    return path


def test_a_header_asking_for_a_giant_model_is_refused_before_it_is_built(tmp_path):
    """Found by the fuzzer above: ``hidden`` = 3000 made the loader allocate and initialize ~0.6 GB (40000:
    15 GB) before noticing that the tensors do not fit; now the build stops at the first oversized tensor."""
    path = _giant_header_file(tmp_path)
    with pytest.raises(FlowtameError, match="far larger than the"):
        load_checkpoint(path)


def test_a_giant_header_is_refused_before_anything_is_built_on_a_real_device(tmp_path, monkeypatch):
    """The size check runs on the meta device: a module's ``__init__`` temporaries (e.g. the QR of a random
    rotation, made before any tensor is registered) are never allocated for a model that does not fit."""
    import flowtame.io.checkpoint as checkpoint_module
    path = _giant_header_file(tmp_path)
    devices = []
    real_build = checkpoint_module.build_model

    def recording_build(architecture, spec):
        devices.append(torch.empty(0).device.type)
        return real_build(architecture, spec)

    monkeypatch.setattr(checkpoint_module, "build_model", recording_build)
    with pytest.raises(FlowtameError, match="far larger than the"):
        load_checkpoint(path)
    assert devices == ["meta"]
    (tmp_path / "fine.safetensors").write_bytes(CHECKPOINT)
    devices.clear()
    assert load_checkpoint(tmp_path / "fine.safetensors").model is not None
    assert devices == ["meta", "cpu"]
