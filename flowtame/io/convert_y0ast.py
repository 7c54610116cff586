"""Import Glow checkpoints written by y0ast/Glow-PyTorch into flowtame, exactly.

That project saves ``torch.save(model.state_dict())`` of ``Glow(image_shape, hidden_channels, K, L, ...)``: keys
``flow.layers.{i}.*`` where, per level b, layer ``b*(K+2)`` is a squeeze, layers ``b*(K+2)+1 ... b*(K+2)+K`` are
flow steps (``actnorm.{bias,logs}``, ``invconv.{p,sign_s,lower,log_s,upper}`` or ``invconv.weight``, nothing for
a reverse/shuffle permutation, ``block.{0,2}.conv.weight`` + ``block.{0,2}.actnorm.{bias,logs}``,
``block.4.conv.{weight,bias}`` + ``block.4.logs``) and layer ``b*(K+2)+K+1`` is a split
(``conv.conv.{weight,bias}``, ``conv.logs``); then ``learn_top_fn.*`` (when ``learn_top``) and the buffer
``prior_h``. Its layout is a set of options of flowtame's Glow (:class:`~flowtame.flows.glow.GlowSpec`:
``log_actnorm``, ``net_actnorm``, ``interleaved``, ``zero_pad``, ``top_prior``, ``permutation``), so the
conversion renames tensors (and drops singleton dimensions) without changing a value.

Structure (levels, steps, channels, width, coupling, 1x1 convolution kind, learned top prior, image size) is
read from the keys and shapes; the ``hparams.json`` that project's ``train.py`` writes, and any flag, is
checked against it. ActNorm layers are marked initialized (that project does not save its ``inited`` flag).
A shuffle permutation is drawn at random and not saved by that code: its channel orders must be given.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from flowtame.data.quantization import DataSpec
from flowtame.errors import CheckpointError, InputError
from flowtame.flows.glow import ChannelPermutation, FlowStep, GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, make_provenance
from flowtame.io.convert import _load_state_dict, check_family
from flowtame.io.fileio import sha256_file

_STEP = re.compile(r"flow\.layers\.(\d+)\.actnorm\.bias")
_SPLIT = re.compile(r"flow\.layers\.(\d+)\.conv\.conv\.weight")
#: flowtame name -> y0ast name, inside a flow step (None: not in y0ast's state dict, the built value is kept).
_STEP_NAMES = {
    "actnorm.loc": "actnorm.bias", "actnorm.log_scale": "actnorm.logs", "actnorm.initialized": None,
    "invconv.w_p": "invconv.p", "invconv.w_l": "invconv.lower", "invconv.w_s": "invconv.log_s",
    "invconv.w_u": "invconv.upper", "invconv.s_sign": "invconv.sign_s", "invconv.u_mask": None,
    "invconv.l_mask": None, "invconv.l_eye": None, "invconv.weight": "invconv.weight", "invconv.order": None,
    "coupling.net.4.conv.weight": "block.4.conv.weight", "coupling.net.4.conv.bias": "block.4.conv.bias",
    "coupling.net.4.scale": "block.4.logs",
    **{f"coupling.net.{i}.{a}": b and f"block.{i}.{b}" for i in (0, 2) for a, b in (
        ("conv.weight", "conv.weight"), ("actnorm.loc", "actnorm.bias"), ("actnorm.log_scale", "actnorm.logs"),
        ("actnorm.initialized", None))},
}
_PRIOR_NAMES = {"conv.weight": "conv.conv.weight", "conv.bias": "conv.conv.bias", "scale": "conv.logs"}
_TOP_NAMES = {"h": "prior_h", "conv.conv.weight": "learn_top_fn.conv.weight",
              "conv.conv.bias": "learn_top_fn.conv.bias", "conv.scale": "learn_top_fn.logs"}


@dataclass(frozen=True)
class Y0astStructure:
    """What a y0ast Glow state dict's keys and shapes say. ``conv_lu`` is None for a fixed permutation."""

    n_block: int
    n_flow: int
    channels: int
    hidden: int
    affine: bool
    conv_lu: bool | None
    learn_top: bool
    image_size: int


def _shape(path: Path, state: dict[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: missing key {key!r}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: tensor {key!r} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def infer_y0ast_structure(path: Path, state: dict[str, Tensor]) -> Y0astStructure:
    """The structure of a y0ast Glow state dict; CheckpointError (one line) when it is not one."""
    check_family(path, state, "y0ast-glow")
    if any(key.startswith(("project_ycond.", "project_class.")) for key in state):
        raise CheckpointError(f"{path}: a class-conditional y0ast Glow (y_condition, 'project_ycond' keys); "
                              f"flowtame converts unconditional ones only")
    steps = sorted(int(m[1]) for m in map(_STEP.fullmatch, state) if m)
    splits = sorted(int(m[1]) for m in map(_SPLIT.fullmatch, state) if m)
    if not steps or "prior_h" not in state:
        raise CheckpointError(f"{path}: not a y0ast/Glow-PyTorch Glow state dict (expected keys like "
                              f"'flow.layers.1.actnorm.bias' and 'prior_h')")
    n_block = len(splits) + 1
    n_flow, remainder = divmod(len(steps), n_block)
    expected_steps = [b * (n_flow + 2) + 1 + f for b in range(n_block) for f in range(n_flow)]
    expected_splits = [b * (n_flow + 2) + n_flow + 1 for b in range(n_block - 1)]
    if remainder or steps != expected_steps or splits != expected_splits:
        raise CheckpointError(f"{path}: flow steps at layers {steps} and splits at {splits} do not form L levels "
                              f"of K steps each (squeeze, K steps, split)")
    squeezed = _shape(path, state, f"flow.layers.{steps[0]}.actnorm.bias", 4)[1]
    if squeezed % 4:
        raise CheckpointError(f"{path}: the first actnorm has {squeezed} channels, expected 4 x the input channels")
    first = f"flow.layers.{steps[0]}."
    hidden = _shape(path, state, first + "block.0.conv.weight", 4)[0]
    coupling_out = _shape(path, state, first + "block.4.conv.weight", 4)[0]
    if coupling_out not in (squeezed, squeezed // 2):
        raise CheckpointError(f"{path}: tensor {first + 'block.4.conv.weight'!r} has {coupling_out} output "
                              f"channels, expected {squeezed} (affine) or {squeezed // 2} (additive)")
    kinds = {"lu" if f"flow.layers.{i}.invconv.lower" in state else
             "plain" if f"flow.layers.{i}.invconv.weight" in state else "none" for i in steps}
    if len(kinds) != 1:
        raise CheckpointError(f"{path}: flow steps mix LU, plain and no 1x1 convolutions; that code uses one kind")
    kind = kinds.pop()
    top = _shape(path, state, "prior_h", 4)
    return Y0astStructure(n_block=n_block, n_flow=n_flow, channels=squeezed // 4, hidden=hidden,
                          affine=coupling_out == squeezed,
                          conv_lu=None if kind == "none" else kind == "lu",
                          learn_top="learn_top_fn.conv.weight" in state, image_size=top[2] * 2 ** n_block)


JSONContainer = TypeVar("JSONContainer", dict, list)


def read_json(path: Path, kind: type[JSONContainer], what: str) -> JSONContainer:
    """The JSON value of ``path``, which must be a ``kind`` (dict or list); InputError (one line) otherwise."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, kind):
        raise InputError(f"{path}: expected {what}")
    return value


def _check_hparams(path: Path, hparams_path: Path | None, hparams: dict, found: Y0astStructure) -> str:
    """Check hparams (read from ``hparams_path``; empty when that is None) against the weights; returns the
    permutation ("invconv", "reverse" or "shuffle")."""
    permutation = hparams.get("flow_permutation", "invconv" if found.conv_lu is not None else None)
    if permutation not in ("invconv", "reverse", "shuffle", None):
        raise InputError(f"{hparams_path}: flow_permutation {permutation!r} is not invconv, shuffle or reverse")
    checks = [
        ("K", found.n_flow, "flow steps per level"), ("L", found.n_block, "levels"),
        ("hidden_channels", found.hidden, "hidden channels in its coupling networks"),
        ("flow_coupling", "affine" if found.affine else "additive", "coupling"),
        ("flow_permutation", "invconv" if found.conv_lu is not None else permutation, "channel permutation"),
        ("learn_top", found.learn_top, "learned top prior"), ("y_condition", False, "class conditioning"),
    ]
    if found.conv_lu is not None:
        checks.append(("LU_decomposed", found.conv_lu, "LU-decomposed 1x1 convolutions"))
    for key, actual, what in checks:
        if key in hparams and hparams[key] != actual:
            raise CheckpointError(f"{hparams_path}: {key} = {json.dumps(hparams[key])} disagrees with {path}, "
                                  f"whose weights say {what} = {json.dumps(actual)}")
    if permutation is None:
        raise CheckpointError(f"{path}: its flow steps have no 1x1 convolutions and nothing tells a reverse from "
                              f"a shuffle permutation; give --hparams with flow_permutation")
    return permutation


def _shuffle_orders(path: Path, permutations: Path | None, n_steps: int, channels: list[int]) -> list[Tensor]:
    """The channel order of every flow step, from a JSON list of ``n_steps`` index lists (level-major)."""
    if permutations is None:
        raise InputError(f"{path}: a shuffle-permutation Glow; that code draws its channel orders at random and "
                         f"does not save them, so give them with --permutations (a JSON list of {n_steps} index "
                         f"lists, one per flow step, level by level)")
    orders = read_json(permutations, list, "a JSON list of channel orders")
    if len(orders) != n_steps:
        raise InputError(f"{permutations}: holds {len(orders)} permutations, the model has {n_steps} flow steps")
    result = []
    for index, (order, size) in enumerate(zip(orders, channels, strict=True)):
        if not isinstance(order, list) or sorted(order) != list(range(size)):
            raise InputError(f"{permutations}: entry {index} is not a permutation of 0..{size - 1}")
        result.append(torch.tensor(order, dtype=torch.float32))
    return result


def _source_key(key: str, n_flow: int, n_block: int) -> str | None:
    """y0ast name of a flowtame Glow key (None: a buffer that y0ast does not save)."""
    _, level, rest = key.split(".", 2)
    block = int(level)
    if rest.startswith("prior."):
        name = rest.removeprefix("prior.")
        if block == n_block - 1:
            return _TOP_NAMES[name]
        return f"flow.layers.{block * (n_flow + 2) + n_flow + 1}.{_PRIOR_NAMES[name]}"
    step, name = rest.removeprefix("steps.").split(".", 1)
    source = _STEP_NAMES[name]
    return None if source is None else f"flow.layers.{block * (n_flow + 2) + int(step)}.{source}"


def convert_y0ast(pt_path: str | Path, *, hparams: str | Path | None = None, image_size: int | None = None,
                  channels: int | None = None, n_bits: int = 8, permutations: str | Path | None = None,
                  notes: str | None = None, command: str | None = None) -> Checkpoint:
    """Convert a y0ast/Glow-PyTorch Glow state dict into a flowtame Glow :class:`Checkpoint`.

    Args:
        pt_path: ``torch.save(model.state_dict())`` of that project's ``Glow`` (read weights-only).
        hparams: its ``hparams.json`` (K, L, hidden_channels, flow_coupling, flow_permutation, LU_decomposed,
            learn_top, y_condition are checked against the weights; other keys are ignored).
        image_size, channels: optional, read from the weights (``prior_h`` and the first actnorm); checked.
        n_bits: bits per value of the training data (that code uses 8).
        permutations: for a shuffle-permutation model, a JSON list of channel orders, one per flow step.

    Raises:
        CheckpointError: not a y0ast Glow, or hyperparameters that disagree with the weights.
        InputError: unreadable hparams or permutations, bad flags.
    """
    path = Path(pt_path)
    state = _load_state_dict(path)
    found = infer_y0ast_structure(path, state)
    hparams_path = Path(hparams) if hparams is not None else None
    values = read_json(hparams_path, dict, "a JSON object of hyperparameters") if hparams_path else {}
    permutation = _check_hparams(path, hparams_path, values, found)
    for flag, given, actual in (("--image-size", image_size, found.image_size),
                                ("--channels", channels, found.channels)):
        if given is not None and given != actual:
            raise CheckpointError(f"{path}: {flag} {given} disagrees with the checkpoint, which is for "
                                  f"{found.channels}x{found.image_size}x{found.image_size} images")
    try:
        data_spec = DataSpec(image_size=found.image_size, channels=found.channels, n_bits=n_bits)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    spec = GlowSpec(channels=found.channels, image_size=found.image_size, n_flow=found.n_flow,
                    n_block=found.n_block, affine=found.affine, hidden=found.hidden,
                    conv_lu=(found.conv_lu is not False,) * (found.n_flow * found.n_block),
                    permutation=permutation,
                    log_actnorm=True, net_actnorm=True, interleaved=True, zero_pad=True,
                    top_prior="buffer" if found.learn_top else "standard")
    model = build_glow(spec)
    mapped = _map_tensors(path, state, model.state_dict(), found)
    if not found.learn_top:
        prior_h = state.pop("prior_h")
        if prior_h.abs().max() != 0:
            raise CheckpointError(f"{path}: 'prior_h' is not zero; without learn_top that code's top prior is "
                                  f"N(prior_h halves), which flowtame's standard-normal top prior is not")
    if permutation == "shuffle":
        sizes = []
        for level in model.levels:
            step = level.steps[1]  # steps[0] is the squeeze; every flow step of a level permutes alike
            assert isinstance(step, FlowStep) and isinstance(step.invconv, ChannelPermutation)
            sizes += [step.invconv.order.numel()] * found.n_flow
        orders = _shuffle_orders(path, Path(permutations) if permutations else None, len(sizes), sizes)
        for index, order in enumerate(orders):
            block, flow = divmod(index, found.n_flow)
            mapped[f"levels.{block}.steps.{flow + 1}.invconv.order"] = order
    if state:
        raise CheckpointError(f"{path}: unexpected key {sorted(state)[0]!r} ({len(state)} key(s) with no place in "
                              f"a y0ast Glow of this structure)")
    model.load_state_dict(mapped, strict=True)
    model.eval()
    provenance = make_provenance(parent_sha256=sha256_file(path), command=command, notes=notes,
                                 source_format="y0ast-glow")
    return Checkpoint(model=model, architecture="glow", spec=spec, data_spec=data_spec, provenance=provenance)


def _source_shape(source: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of y0ast's tensor for a flowtame one: zero-conv scales are [C, 1, 1] there (flowtame: [1, C, 1, 1])
    and plain 1x1 convolution weights [C, C] (flowtame: [C, C, 1, 1]); same values, fewer dimensions."""
    if source.endswith("logs") and "actnorm" not in source:
        return shape[1:]
    if source.endswith("invconv.weight"):
        return shape[:2]
    return shape


def _map_tensors(path: Path, state: dict[str, Tensor], expected: dict[str, Tensor],
                 found: Y0astStructure) -> dict[str, Tensor]:
    """flowtame state dict from y0ast tensors (popped from ``state``), shapes and values checked."""
    mapped = {}
    for key, target in expected.items():
        source = _source_key(key, found.n_flow, found.n_block)
        if source is None:
            mapped[key] = torch.ones_like(target) if key.endswith(".initialized") else target
            continue
        if source not in state:
            raise CheckpointError(f"{path}: missing key {source!r}")
        tensor = state.pop(source)
        expected_shape = _source_shape(source, tuple(target.shape))
        if tuple(tensor.shape) != expected_shape:
            raise CheckpointError(f"{path}: tensor {source!r} has shape {list(tensor.shape)}, expected "
                                  f"{list(expected_shape)}")
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {source!r} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {source!r} holds NaN or infinite values")
        mapped[key] = tensor.to(target.dtype).reshape(target.shape)
    return mapped
