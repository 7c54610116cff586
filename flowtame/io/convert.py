"""Import Glow checkpoints written by rosinality/glow-pytorch into flowtame.

That project's ``train.py`` saves ``torch.save(DataParallel(model).state_dict())``: a flat dict of float32
tensors whose keys look like ``module.blocks.{b}.flows.{f}.{actnorm|invconv|coupling}.*`` and
``module.blocks.{b}.prior.*``. flowtame's Glow uses the same parameter names under a different path:

- ``blocks.{b}.flows.{f}.X`` -> ``levels.{b}.steps.{f + 1}.X`` (``steps[0]`` is the parameter-free squeeze),
- ``blocks.{b}.prior.X``     -> ``levels.{b}.prior.X``.

The file is read with weights-only loading (nothing but tensors and plain containers is ever unpickled).
Everything the weights determine is inferred from keys and shapes (number of blocks and flows, input channels,
coupling width, affine vs additive coupling, and the 1x1 convolution type of every flow step: in
rosinality's Glow the last block always uses LU convolutions whatever its ``conv_lu`` argument says). What the
weights do not determine (image size, n_bits) comes from the caller. Any flag the caller gives is checked
against what was inferred; every problem is a :class:`~flowtame.errors.CheckpointError` (or, for a bad image
size or n_bits, an :class:`~flowtame.errors.InputError`) with one line naming the file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flowtame.data.quantization import DataSpec
from flowtame.errors import CheckpointError, InputError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, make_provenance
from flowtame.io.fileio import sha256_file

SOURCE_FORMATS = ("rosinality-glow", "y0ast-glow", "tarflow")

_KEY = re.compile(r"blocks\.(\d+)\.(?:flows\.(\d+)|prior)\.(.+)")


class ConversionWarning(UserWarning):
    """Something in a converted checkpoint deserves attention but does not stop the conversion."""


@dataclass(frozen=True)
class RosinalityStructure:
    """What a rosinality Glow state dict's keys and shapes say about the model.

    ``conv_lu`` holds one flag per flow step, block-major (True: LU-parameterized 1x1 convolution).
    """

    n_block: int
    n_flow: int
    channels: int
    hidden: int
    affine: bool
    conv_lu: tuple[bool, ...]


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first line of an exception message, cut after its first sentence and at ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unpickling_reason(message: str) -> str:
    """The informative sentence of torch's weights-only refusal (it wraps it in generic advice)."""
    generic = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")
    for line in message.split("WeightsUnpickler error:", 1)[-1].splitlines():
        if line.strip() and not line.strip().startswith(generic):
            return _first_sentence(line)
    return "it holds objects other than tensors"


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    """Read ``path`` weights-only: the flat ``{key: tensor}`` dict it holds, ``module.`` prefixes stripped."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it did not write itself
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused by weights-only loading ({_unpickling_reason(str(exc))}); flowtame reads only "
            f"files holding tensors, e.g. torch.save(model.state_dict())") from None
    except Exception as exc:  # RuntimeError, EOFError, ValueError...: corrupt, truncated or foreign files
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file ({reason})") from None

    def is_state_dict(value: object) -> bool:
        return isinstance(value, dict) and bool(value) and all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())

    if not is_state_dict(obj):
        nested = [obj[k] for k in ("state_dict", "model")
                  if isinstance(obj, dict) and is_state_dict(obj.get(k))]
        if not nested:
            what = (f"a dict with keys {', '.join(map(repr, list(obj)[:4]))}" if isinstance(obj, dict) and obj
                    else f"a {type(obj).__name__}")
            raise CheckpointError(f"{path}: not a state dict of tensors (it holds {what})")
        obj = nested[0]
    state = dict(obj)
    while all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_family(path: Path, state: dict[str, Tensor], expected: str) -> None:
    """Raise CheckpointError (one line naming ``path`` and the family) when ``state``'s keys are those of another
    family than ``expected`` (a source format or "flowtame"): a flowtame checkpoint, a rosinality or y0ast Glow,
    a TarFlow."""
    families = (
        ("flowtame", ("levels.",), "holds flowtame-style keys ('levels...'); a flowtame checkpoint needs no "
                                   "conversion"),
        ("tarflow", ("blocks.0.attn_blocks.", "blocks.0.proj_in."), "is a TarFlow state dict ('blocks.N."
                                                                    "attn_blocks' keys); use --from tarflow"),
        ("y0ast-glow", ("flow.layers.", "prior_h"), "is a y0ast/Glow-PyTorch state dict ('flow.layers' keys); "
                                                    "use --from y0ast-glow"),
        ("rosinality-glow", ("blocks.0.flows.",), "is a rosinality/glow-pytorch Glow state dict ('blocks.N.flows' "
                                                  "keys); use --from rosinality-glow"),
    )
    for name, prefixes, reason in families:
        if name != expected and any(key.startswith(prefixes) for key in state):
            raise CheckpointError(f"{path}: {reason}")


def infer_structure(path: Path, state: dict[str, Tensor]) -> RosinalityStructure:
    """Infer the Glow hyperparameters from a (prefix-stripped) rosinality state dict.

    Raises CheckpointError naming the first key that does not belong to a rosinality Glow, and when the
    blocks do not all have the same number of flows.
    """
    check_family(path, state, "rosinality-glow")
    flows: dict[int, set[int]] = {}
    for key in state:
        match = _KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(f"{path}: unexpected key {key!r}; not a rosinality/glow-pytorch Glow state "
                                  f"dict (expected keys like 'blocks.0.flows.0.actnorm.loc')")
        flows.setdefault(int(match[1]), set())
        if match[2] is not None:
            flows[int(match[1])].add(int(match[2]))
    n_block = len(flows)
    if sorted(flows) != list(range(n_block)):
        missing = min(set(range(max(flows) + 1)) - set(flows))
        raise CheckpointError(f"{path}: has keys for block {max(flows)} but none for block {missing}")
    for block, indices in flows.items():
        if indices and sorted(indices) != list(range(len(indices))):
            missing = min(set(range(max(indices) + 1)) - indices)
            raise CheckpointError(f"{path}: block {block} has no keys for flow {missing}")
    n_flow = len(flows[0])
    if n_flow == 0:
        raise CheckpointError(f"{path}: block 0 has no flow steps (no 'blocks.0.flows.0.*' keys)")
    for block in range(1, n_block):
        if len(flows[block]) != n_flow:
            raise CheckpointError(f"{path}: block {block} has {len(flows[block])} flows but block 0 has "
                                  f"{n_flow}; flowtame's Glow needs the same number of flows in every block")

    def shape_of(key: str, ndim: int) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r}")
        shape = tuple(state[key].shape)
        if len(shape) != ndim:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(shape)}, "
                                  f"expected {ndim} dimensions")
        return shape

    squeezed = shape_of("blocks.0.flows.0.actnorm.loc", 4)[1]
    if squeezed % 4:
        raise CheckpointError(f"{path}: tensor 'blocks.0.flows.0.actnorm.loc' has {squeezed} channels, "
                              f"expected 4 x the input channels")
    hidden = shape_of("blocks.0.flows.0.coupling.net.0.weight", 4)[0]
    coupling_out = shape_of("blocks.0.flows.0.coupling.net.4.conv.weight", 4)[0]
    if coupling_out not in (squeezed, squeezed // 2):
        raise CheckpointError(f"{path}: tensor 'blocks.0.flows.0.coupling.net.4.conv.weight' has "
                              f"{coupling_out} output channels, expected {squeezed} (affine) or "
                              f"{squeezed // 2} (additive)")
    conv_lu = []
    for block in range(n_block):
        for flow in range(n_flow):
            prefix = f"blocks.{block}.flows.{flow}.invconv."
            has_plain, has_lu = prefix + "weight" in state, prefix + "w_l" in state
            if has_plain == has_lu:
                raise CheckpointError(f"{path}: flow step 'blocks.{block}.flows.{flow}' needs exactly one of "
                                      f"{prefix + 'weight'!r} (plain 1x1 conv) or {prefix + 'w_l'!r} (LU)")
            conv_lu.append(has_lu)
    return RosinalityStructure(n_block=n_block, n_flow=n_flow, channels=squeezed // 4, hidden=hidden,
                               affine=coupling_out == squeezed, conv_lu=tuple(conv_lu))


def _source_key(key: str) -> str:
    """Rosinality name of a flowtame Glow key: ``levels.b.steps.{f+1}.X`` -> ``blocks.b.flows.f.X``."""
    level, rest = key.removeprefix("levels.").split(".", 1)
    if rest.startswith("prior."):
        return f"blocks.{level}.{rest}"
    step, name = rest.removeprefix("steps.").split(".", 1)
    return f"blocks.{level}.flows.{int(step) - 1}.{name}"


def _check_flags(path: Path, found: RosinalityStructure, channels: int | None, n_flow: int | None,
                 n_block: int | None, affine: bool | None, conv_lu: bool | None, hidden: int | None) -> None:
    """Raise CheckpointError for the first user-given flag that disagrees with the inferred structure."""
    for flag, given, actual, noun, where in (
        ("--channels", channels, found.channels, "input channel", ""),
        ("--n-block", n_block, found.n_block, "block", ""),
        ("--n-flow", n_flow, found.n_flow, "flow", " per block"),
        ("--hidden", hidden, found.hidden, "hidden channel", " in its couplings"),
    ):
        if given is not None and given != actual:
            raise CheckpointError(f"{path}: {flag} {given} disagrees with the checkpoint, which has "
                                  f"{actual} {noun}{'' if actual == 1 else 's'}{where}")
    if affine is not None and affine != found.affine:
        raise CheckpointError(f"{path}: {'--affine' if affine else '--additive'} disagrees with the "
                              f"checkpoint, which has {'affine' if found.affine else 'additive'} couplings")
    if conv_lu is not None:
        # rosinality's Glow(conv_lu=...) applies the flag to every block but the last, which is always LU.
        last = (found.n_block - 1) * found.n_flow
        for index, is_lu in enumerate(found.conv_lu[:last]):
            if is_lu != conv_lu:
                block, flow = divmod(index, found.n_flow)
                raise CheckpointError(
                    f"{path}: {'--lu' if conv_lu else '--no-lu'} disagrees with the checkpoint, whose flow "
                    f"step blocks.{block}.flows.{flow} has {'an LU' if is_lu else 'a plain'} 1x1 convolution")


def convert_rosinality(pt_path: str | Path, *, image_size: int, n_bits: int, channels: int | None = None,
                       n_flow: int | None = None, n_block: int | None = None, affine: bool | None = None,
                       conv_lu: bool | None = None, hidden: int | None = None,
                       notes: str | None = None, command: str | None = None) -> Checkpoint:
    """Convert a rosinality/glow-pytorch Glow state dict (``.pt``) into a flowtame Glow :class:`Checkpoint`.

    Args:
        pt_path: the ``torch.save``d state dict (``module.`` prefixes and a ``state_dict``/``model`` wrapper
            are accepted).
        image_size: side of the square input images in pixels; must be divisible by ``2**n_block``.
        n_bits: bits per value the model was trained on (1..8).
        channels, n_flow, n_block, affine, conv_lu, hidden: optional; inferred from the weights, and when
            given they must agree with it. ``conv_lu`` has rosinality's meaning: the 1x1 convolution type of
            every block but the last (the last block is always LU there).
        notes: free text stored in the provenance.
        command: the command line to record in the provenance (None: not recorded).

    Returns:
        An in-memory checkpoint (model in eval mode, on the CPU, float32) with provenance
        ``source_format="rosinality-glow"`` and ``parent_sha256`` = the sha256 of ``pt_path``. Actnorm
        layers whose ``initialized`` buffer is 0 are listed in ``provenance["conversion_warnings"]`` and
        reported with a :class:`ConversionWarning`.

    Raises:
        CheckpointError: unreadable or refused file, a key or shape that is not a rosinality Glow, a
            non-finite tensor, or a flag that disagrees with the weights.
        InputError: an image size or n_bits that cannot work.
    """
    path = Path(pt_path)
    state = _load_state_dict(path)
    found = infer_structure(path, state)
    _check_flags(path, found, channels, n_flow, n_block, affine, conv_lu, hidden)
    factor = 2 ** found.n_block
    if image_size < 1 or image_size % factor:
        raise InputError(f"{path}: --image-size {image_size} must be a positive multiple of 2**n_block = "
                         f"{factor} (the checkpoint has {found.n_block} blocks)")
    try:
        data_spec = DataSpec(image_size=image_size, channels=found.channels, n_bits=n_bits)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    spec = GlowSpec(channels=found.channels, image_size=image_size, n_flow=found.n_flow,
                    n_block=found.n_block, affine=found.affine, hidden=found.hidden, conv_lu=found.conv_lu)
    model = build_glow(spec)

    mapped: dict[str, Tensor] = {}
    uninitialized = []
    for key, expected in model.state_dict().items():
        source = _source_key(key)
        if source not in state:
            raise CheckpointError(f"{path}: missing key {source!r}")
        tensor = state.pop(source)
        if tuple(tensor.shape) != tuple(expected.shape):
            raise CheckpointError(f"{path}: tensor {source!r} has shape {list(tensor.shape)}, "
                                  f"expected {list(expected.shape)}")
        if not (tensor.dtype.is_floating_point or source.endswith(".initialized")):
            raise CheckpointError(f"{path}: tensor {source!r} has dtype {tensor.dtype}, "
                                  f"expected floating point")
        tensor = tensor.to(expected.dtype)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {source!r} holds NaN or infinite values")
        if source.endswith("actnorm.initialized") and tensor.item() == 0:
            uninitialized.append(source.removesuffix(".initialized"))
        mapped[key] = tensor
    if state:
        raise CheckpointError(f"{path}: unexpected key {sorted(state)[0]!r} ({len(state)} key(s) with no "
                              f"place in a Glow of this structure)")
    model.load_state_dict(mapped, strict=True)
    model.eval()

    extra = {}
    if uninitialized:
        message = (f"{path}: {len(uninitialized)} actnorm layer(s) were never data-initialized "
                   f"(initialized = 0, e.g. {uninitialized[0]}); training or taming will re-initialize them "
                   f"from its first batch")
        warnings.warn(message, ConversionWarning, stacklevel=2)
        extra["conversion_warnings"] = [message]
    provenance = make_provenance(parent_sha256=sha256_file(path), command=command, notes=notes,
                                 source_format="rosinality-glow", **extra)
    return Checkpoint(model=model, architecture="glow", spec=spec, data_spec=data_spec, provenance=provenance)
