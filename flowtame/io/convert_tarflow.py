"""Import TarFlow checkpoints written by apple/ml-tarflow into flowtame, exactly.

That project saves ``torch.save(model.state_dict())`` of ``Model(in_channels, img_size, patch_size, channels,
num_blocks, layers_per_block, nvp, num_classes)``: keys ``blocks.{k}.{proj_in, pos_embed, class_embed,
attn_blocks.{j}.*, proj_out, attn_mask}`` and ``var``, and no hyperparameters: its ``train.py`` writes them in
the file name, ``{dataset}_model_{patch_size}_{channels}_{num_blocks}_{layers_per_block}_{noise_std}.pth``.
flowtame's TarFlow (:mod:`flowtame.flows.tarflow`) uses the same names under ``levels.0.steps.{k + 2}`` (steps 0
and 1 are the data scaling and the patching) and ``levels.0.prior.var``; ``attn_mask`` must be the causal
lower-triangular mask (flowtame builds its own).

The hyperparameters come from flags or, failing those, the file name; each is checked against the weights, which
also give the image size and input channels (``pos_embed`` holds T = (size/p)² rows and ``proj_in`` reads
C·p·p values), the number of classes and whether the flow is affine (``nvp``). The number of heads is not
in the weights: that code uses 64 channels per head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flowtame.data.quantization import DataSpec
from flowtame.errors import CheckpointError, InputError
from flowtame.flows.tarflow import TarFlowSpec, build_tarflow
from flowtame.io.checkpoint import Checkpoint, make_provenance
from flowtame.io.convert import _load_state_dict, check_family
from flowtame.io.fileio import sha256_file

FILE_NAME = re.compile(r"(?P<dataset>.+)_model_(?P<patch_size>\d+)_(?P<width>\d+)_(?P<n_block>\d+)_"
                       r"(?P<layers_per_block>\d+)_(?P<noise_std>\d*\.?\d+(?:[eE][-+]?\d+)?)\.pth")
FILE_NAME_CONVENTION = "{dataset}_model_{patch_size}_{channels}_{num_blocks}_{layers_per_block}_{noise_std}.pth"
#: Channels per attention head in apple/ml-tarflow (its MetaBlock's head_dim).
HEAD_DIM = 64
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_LAYER = re.compile(r"attn_blocks\.(\d+)\..+")


@dataclass(frozen=True)
class TarFlowNameInfo:
    """What a checkpoint file name following that project's convention says."""

    dataset: str
    patch_size: int
    width: int
    n_block: int
    layers_per_block: int
    noise_std: float


def parse_file_name(path: str | Path) -> TarFlowNameInfo | None:
    """The hyperparameters in a file name following :data:`FILE_NAME_CONVENTION`, or None."""
    match = FILE_NAME.fullmatch(Path(path).name)
    if match is None:
        return None
    return TarFlowNameInfo(dataset=match["dataset"], patch_size=int(match["patch_size"]),
                           width=int(match["width"]), n_block=int(match["n_block"]),
                           layers_per_block=int(match["layers_per_block"]), noise_std=float(match["noise_std"]))


@dataclass(frozen=True)
class TarFlowStructure:
    """What the keys and shapes of an ml-tarflow state dict say."""

    n_block: int
    layers_per_block: int
    width: int
    dim: int
    num_patches: int
    nvp: bool
    num_classes: int
    expansion: int


def infer_tarflow_structure(path: Path, state: dict[str, Tensor]) -> TarFlowStructure:
    """The structure of an ml-tarflow state dict; CheckpointError (one line) when it is not one."""
    check_family(path, state, "tarflow")
    blocks: dict[int, set[int]] = {}
    for key in state:
        match = _BLOCK.fullmatch(key)
        if match is None and key != "var":
            raise CheckpointError(f"{path}: unexpected key {key!r}; not an apple/ml-tarflow state dict (expected "
                                  f"keys like 'blocks.0.proj_in.weight' and 'var')")
        if match is not None:
            layer = _LAYER.fullmatch(match[2])
            blocks.setdefault(int(match[1]), set()).update({int(layer[1])} if layer else set())
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"{path}: blocks {sorted(blocks)} are not numbered 0..N-1")
    layers = {len(v) for v in blocks.values()}
    if len(layers) != 1 or not all(sorted(v) == list(range(len(v))) for v in blocks.values()):
        raise CheckpointError(f"{path}: the blocks do not all have attention layers 0..L-1 (found "
                              f"{[len(v) for v in blocks.values()]})")

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r}")
        if state[key].dim() != ndim:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(state[key].shape)}, expected {ndim} "
                                  f"dimensions")
        return tuple(state[key].shape)

    width, dim = shape("blocks.0.proj_in.weight", 2)
    num_patches = shape("blocks.0.pos_embed", 2)[0]
    out = shape("blocks.0.proj_out.weight", 2)[0]
    if out not in (dim, 2 * dim):
        raise CheckpointError(f"{path}: 'blocks.0.proj_out.weight' has {out} outputs, expected {2 * dim} (affine) "
                              f"or {dim} (volume-preserving)")
    classes = shape("blocks.0.class_embed", 3)[0] if "blocks.0.class_embed" in state else 0
    hidden = shape("blocks.0.attn_blocks.0.mlp.main.0.weight", 2)[0]
    if hidden % width:
        raise CheckpointError(f"{path}: MLP width {hidden} is not a multiple of the width {width}")
    return TarFlowStructure(n_block=len(blocks), layers_per_block=layers.pop(), width=width, dim=dim,
                            num_patches=num_patches, nvp=out == 2 * dim, num_classes=classes,
                            expansion=hidden // width)


def _image_geometry(path: Path, found: TarFlowStructure, patch_size: int) -> tuple[int, int]:
    """(channels, image_size) implied by the weights for ``patch_size``; CheckpointError if none."""
    side = math.isqrt(found.num_patches)
    channels, remainder = divmod(found.dim, patch_size ** 2)
    if remainder or channels not in (1, 3) or side * side != found.num_patches:
        raise CheckpointError(f"{path}: patch size {patch_size} disagrees with the weights ({found.num_patches} "
                              f"patches of {found.dim} values: not 1 or 3 channels of {patch_size}x{patch_size} "
                              f"patches on a square image)")
    return channels, side * patch_size


def convert_tarflow(pth_path: str | Path, *, patch_size: int | None = None, width: int | None = None,
                    n_block: int | None = None, layers_per_block: int | None = None, heads: int | None = None,
                    image_size: int | None = None, channels: int | None = None, n_bits: int = 8,
                    class_label: int | None = None, notes: str | None = None,
                    command: str | None = None) -> Checkpoint:
    """Convert an apple/ml-tarflow state dict (``.pth``) into a flowtame TarFlow :class:`Checkpoint`.

    Hyperparameters: the flags given, the rest from the file name (:func:`parse_file_name`); with neither, an
    InputError. All are checked against the weights (CheckpointError on a disagreement). ``heads`` defaults to
    width / 64 (that code's head size); ``n_bits`` is the data's (that code's evaluation uses 8);
    ``class_label`` (class-conditional models only) stores the class to evaluate for, None = unconditional.
    """
    path = Path(pth_path)
    state = _load_state_dict(path)
    found = infer_tarflow_structure(path, state)
    named = parse_file_name(path)
    given = {"patch_size": patch_size, "width": width, "n_block": n_block, "layers_per_block": layers_per_block}
    if named is None and None in given.values():
        missing = ", ".join("--" + k.replace("_", "-") for k, v in given.items() if v is None)
        raise InputError(f"{path}: file name does not follow ml-tarflow's {FILE_NAME_CONVENTION}; give the "
                         f"hyperparameters with {missing}")
    values = {k: v if v is not None else getattr(named, k) for k, v in given.items()}
    where = {k: "--" + k.replace("_", "-") if given[k] is not None else "the file name" for k in given}
    for key, actual, what in (("width", found.width, "width"), ("n_block", found.n_block, "blocks"),
                              ("layers_per_block", found.layers_per_block, "attention layers per block")):
        if values[key] != actual:
            raise CheckpointError(f"{path}: {key.replace('_', ' ')} {values[key]} (from {where[key]}) disagrees "
                                  f"with the weights, which have {actual} {what}")
    try:
        in_channels, size = _image_geometry(path, found, values["patch_size"])
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (patch size from {where['patch_size']})") from None
    for flag, value, actual in (("--image-size", image_size, size), ("--channels", channels, in_channels)):
        if value is not None and value != actual:
            raise CheckpointError(f"{path}: {flag} {value} disagrees with the weights, which are for "
                                  f"{in_channels}x{size}x{size} images")
    heads = heads if heads is not None else max(1, found.width // HEAD_DIM)
    try:
        spec = TarFlowSpec(channels=in_channels, image_size=size, patch_size=values["patch_size"],
                           width=found.width, n_block=found.n_block, layers_per_block=found.layers_per_block,
                           heads=heads, expansion=found.expansion, nvp=found.nvp, num_classes=found.num_classes,
                           class_label=class_label)
        data_spec = DataSpec(image_size=size, channels=in_channels, n_bits=n_bits)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    model = build_tarflow(spec)
    model.load_state_dict(_map_tensors(path, state, model.state_dict(), found), strict=True)
    model.eval()
    extra = {"tarflow_file_name": {"dataset": named.dataset, "noise_std": named.noise_std}} if named else {}
    provenance = make_provenance(parent_sha256=sha256_file(path), command=command, notes=notes,
                                 source_format="tarflow", **extra)
    return Checkpoint(model=model, architecture="tarflow", spec=spec, data_spec=data_spec, provenance=provenance)


def _map_tensors(path: Path, state: dict[str, Tensor], expected: dict[str, Tensor],
                 found: TarFlowStructure) -> dict[str, Tensor]:
    """flowtame state dict from ml-tarflow tensors (popped from ``state``), shapes and values checked."""
    causal = torch.ones(found.num_patches, found.num_patches).tril()
    for block in range(found.n_block):
        mask = state.pop(f"blocks.{block}.attn_mask", None)
        if mask is not None and (tuple(mask.shape) != tuple(causal.shape) or not torch.equal(mask.float(), causal)):
            raise CheckpointError(f"{path}: 'blocks.{block}.attn_mask' is not the causal lower-triangular mask")
    mapped = {}
    for key, target in expected.items():
        if key == "levels.0.prior.var":
            source = "var"
        else:
            step, name = key.removeprefix("levels.0.steps.").split(".", 1)
            source = f"blocks.{int(step) - 2}.{name}"
        if source not in state:
            raise CheckpointError(f"{path}: missing key {source!r}")
        tensor = state.pop(source)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {source!r} has shape {list(tensor.shape)}, expected "
                                  f"{list(target.shape)}")
        if not tensor.dtype.is_floating_point or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {source!r} is not finite floating point")
        if source == "var" and not (tensor > 0).all():
            raise CheckpointError(f"{path}: tensor 'var' (the prior's variances) has values <= 0")
        mapped[key] = tensor.to(target.dtype)
    if state:
        raise CheckpointError(f"{path}: unexpected key {sorted(state)[0]!r} ({len(state)} key(s) with no place in "
                              f"a TarFlow of this structure)")
    return mapped
