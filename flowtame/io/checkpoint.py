"""flowtame checkpoints: safetensors weights plus JSON metadata that rebuilds the model from the file alone.

Metadata keys (all strings, JSON-encoded where structured):
``format`` = "flowtame", ``schema_version``, ``architecture``, ``hyperparameters``, ``data`` (image size,
channels, n_bits; ``null`` for vector flows) and ``provenance`` (flowtame version, creation time, parent
checkpoint sha256, command, notes, and whatever the method that wrote it adds: digests of forgotten images,
never their paths or pixels). Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from flowtame import __version__
from flowtame.data.quantization import DataSpec
from flowtame.errors import CheckpointError, InputError
from flowtame.flows import ARCHITECTURES, MultiScaleFlow, build_model, make_spec
from flowtame.io.fileio import check_output_path, save_safetensors_atomic, sha256_file

SCHEMA_VERSION = 1
FORMAT_NAME = "flowtame"


@dataclass
class Checkpoint:
    """A loaded (or about to be saved) flow with everything needed to use and describe it."""

    model: MultiScaleFlow
    architecture: str
    spec: Any
    data_spec: DataSpec | None
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    def image_data(self, use: str) -> DataSpec:
        """The data spec (image size, channels, n_bits) of an image model; InputError "PATH: ``use`` needs an
        image model" for a model without one (a vector flow)."""
        if self.data_spec is None:
            raise InputError(f"{self.path or self.architecture}: {use} needs an image model (no data spec)")
        return self.data_spec

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def info(self) -> dict:
        """A JSON-ready description (what ``flowtame info`` prints)."""
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "parameters": self.num_parameters,
            "hyperparameters": self.spec.to_dict(),
            "data": self.data_spec.to_dict() if self.data_spec else None,
            "latent_shapes": [list(s) for s in self.model.latent_shapes],
            "provenance": self.provenance,
        }


def make_provenance(parent_sha256: str | None = None, command: str | None = None, notes: str | None = None,
                    **extra: Any) -> dict:
    """Standard provenance block; ``command`` is the command line the caller passes in (None: not recorded)."""
    return {
        "flowtame_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parent_sha256": parent_sha256,
        "command": command,
        "notes": notes,
        **extra,
    }


def report_header(schema_version: int, job: dict[str, Any], config: Any, device: Any,
                  base: Checkpoint) -> dict[str, Any]:
    """The first keys of a job's JSON report: versions, ``job`` (what the job is, e.g. ``{"kind": "tame"}``),
    its settings (a dataclass), the device and the base checkpoint it started from (path, sha256, data)."""
    return {"schema_version": schema_version, "flowtame_version": __version__, **job,
            "config": asdict(config), "device": str(device),
            "base": {"path": str(base.path) if base.path else None, "sha256": base.sha256},
            "data": base.data_spec.to_dict() if base.data_spec is not None else None}


def save_checkpoint(path: str | Path, checkpoint: Checkpoint, force: bool = False) -> str:
    """Write ``checkpoint`` atomically to ``path``; returns the file's sha256."""
    path = check_output_path(path, force)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in checkpoint.model.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "schema_version": str(SCHEMA_VERSION),
        "architecture": checkpoint.architecture,
        "hyperparameters": json.dumps(checkpoint.spec.to_dict()),
        "data": json.dumps(checkpoint.data_spec.to_dict() if checkpoint.data_spec else None),
        "provenance": json.dumps(checkpoint.provenance),
    }
    save_safetensors_atomic(path, tensors, metadata)
    return sha256_file(path)


def _json_field(path: Path, metadata: dict, key: str):
    if key not in metadata:
        raise CheckpointError(f"{path}: metadata has no {key!r} entry (not a flowtame checkpoint?)")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata entry {key!r} is not valid JSON") from None


def read_metadata(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Open a safetensors file: (metadata, tensors). Raises CheckpointError for any unreadable file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    return metadata, tensors


@contextlib.contextmanager
def _size_limit(path: Path, limit: int):
    """Stop building a model as soon as its parameters and buffers hold more than ``limit`` values.

    A file's hyperparameters cannot honestly describe a model much larger than the tensors the file holds, so
    a damaged or crafted header (say ``hidden`` = 40000) fails at once instead of allocating and initializing
    gigabytes. Each tensor is counted when it is registered, before its module initializes it; the loader
    builds on the meta device under this limit first, so temporaries an ``__init__`` makes before registering
    (a random rotation's QR, say) are never allocated for a model that does not fit either.
    """
    count = 0

    def count_values(module, name, tensor):  # noqa: ANN001 - torch's registration-hook signature
        nonlocal count
        count += tensor.numel() if tensor is not None else 0
        if count > limit:
            raise CheckpointError(f"{path}: its hyperparameters describe a model far larger than the "
                                  f"{limit:,} values the file can account for (damaged or edited header?)")

    handles = [register_module_parameter_registration_hook(count_values),
               register_module_buffer_registration_hook(count_values)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a flowtame checkpoint; the model is returned in eval mode on ``device``."""
    path = Path(path)
    metadata, tensors = read_metadata(path)
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a flowtame checkpoint (metadata format is "
                              f"{metadata.get('format')!r}; import other checkpoints with 'flowtame convert')")
    try:
        version = int(metadata.get("schema_version", ""))
    except ValueError:
        raise CheckpointError(f"{path}: missing or malformed schema_version") from None
    if version > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: written with checkpoint schema {version}, newer than this flowtame "
                              f"({__version__}) reads (schema {SCHEMA_VERSION}); upgrade flowtame")
    architecture = metadata.get("architecture")
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {architecture!r}")
    hyperparameters = _json_field(path, metadata, "hyperparameters")
    data = _json_field(path, metadata, "data")
    provenance = _json_field(path, metadata, "provenance")
    if not isinstance(hyperparameters, dict) or not isinstance(provenance, dict):
        raise CheckpointError(f"{path}: hyperparameters and provenance must be JSON objects")
    try:
        spec = make_spec(architecture, hyperparameters)
        data_spec = DataSpec(**data) if data is not None else None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if ARCHITECTURES[architecture].kind == "image":
        if data_spec is None:
            raise CheckpointError(f"{path}: an image model needs a data spec (image size, channels, n_bits)")
        if (data_spec.channels, data_spec.image_size) != (spec.channels, spec.image_size):
            raise CheckpointError(f"{path}: data spec ({data_spec.channels}x{data_spec.image_size}) disagrees with "
                                  f"the model ({spec.channels}x{spec.image_size})")
    try:
        with _size_limit(path, 4 * sum(t.numel() for t in tensors.values()) + 2**20), torch.device("meta"):
            build_model(architecture, spec)  # shapes only: nothing allocated, not even an init's temporaries
        model = build_model(architecture, spec)
    except (TypeError, ValueError, RuntimeError, ArithmeticError, MemoryError) as exc:
        raise CheckpointError(f"{path}: cannot build {architecture} from its hyperparameters ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(tensors[key].shape)}, "
                                  f"expected {list(value.shape)}")
        if not tensors[key].dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensors[key].dtype}, expected floating point")
        if not torch.isfinite(tensors[key]).all():
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    model.eval()
    return Checkpoint(model=model.to(device), architecture=architecture, spec=spec, data_spec=data_spec,
                      provenance=provenance, path=path, sha256=sha256_file(path))
