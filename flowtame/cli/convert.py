"""``flowtame convert``: import a checkpoint written by another project as a flowtame checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from flowtame.cli import app
from flowtame.cli._common import command_line
from flowtame.errors import InputError
from flowtame.io.checkpoint import Checkpoint, save_checkpoint
from flowtame.io.convert import SOURCE_FORMATS, ConversionWarning, convert_rosinality
from flowtame.io.convert_tarflow import convert_tarflow
from flowtame.io.convert_y0ast import convert_y0ast
from flowtame.io.fileio import check_output_path


# Over 80 lines only for its Annotated option declarations and help text; the work is in flowtame.io.convert*.
@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="The checkpoint to import (a PyTorch state dict, read weights-only).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the flowtame .safetensors file.")],
    source_format: Annotated[str, typer.Option(
        "--from", help=f"Format of SOURCE: {', '.join(SOURCE_FORMATS)}.")] = "rosinality-glow",
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Side of the square training images (pixels); required for rosinality-glow, "
                             "read from the weights (and checked) for y0ast-glow and tarflow.")] = None,
    n_bits: Annotated[int | None, typer.Option("--n-bits", help="Bits per value the model was trained on "
                                                                "(1-8); required for rosinality-glow, "
                                                                "default 8 for y0ast-glow and tarflow.")] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="Input channels (1 or 3); checked.")] = None,
    n_flow: Annotated[int | None, typer.Option("--n-flow", help="rosinality-glow: flow steps per block; "
                                                                "checked.")] = None,
    n_block: Annotated[int | None, typer.Option("--n-block", help="rosinality-glow: number of blocks; "
                                                                  "tarflow: number of flow blocks; checked.")] = None,
    affine: Annotated[bool | None, typer.Option("--affine/--additive", help="Coupling type; checked.")] = None,
    conv_lu: Annotated[bool | None, typer.Option("--lu/--no-lu", help="LU 1x1 convs in all but the last "
                                                                      "block (rosinality's conv_lu; its last "
                                                                      "block is always LU); checked.")] = None,
    hidden: Annotated[int | None, typer.Option("--hidden", help="rosinality-glow: coupling hidden width; "
                                                                "checked.")] = None,
    hparams: Annotated[Path | None, typer.Option(
        "--hparams", help="y0ast-glow: the hparams.json its train.py wrote (K, L, hidden_channels, "
                          "flow_coupling, flow_permutation, LU_decomposed, learn_top); checked against the "
                          "weights.")] = None,
    permutations: Annotated[Path | None, typer.Option(
        "--permutations", help="y0ast-glow with flow_permutation shuffle: a JSON list of the channel orders, "
                               "one per flow step (that code does not save them).")] = None,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="tarflow: patch size (else from the "
                                                                        "file name); checked.")] = None,
    width: Annotated[int | None, typer.Option("--width", help="tarflow: transformer width (else from the "
                                                              "file name); checked.")] = None,
    layers_per_block: Annotated[int | None, typer.Option(
        "--layers-per-block", help="tarflow: attention layers per block (else from the file name); checked.")] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="tarflow: attention heads (default: width / "
                                                              "64, that code's head size).")] = None,
    class_label: Annotated[int | None, typer.Option(
        "--class", help="tarflow, class-conditional models: evaluate and sample this class (default: "
                        "unconditional, the mean class embedding).")] = None,
    notes: Annotated[str | None, typer.Option("--notes", help="Free text kept in the checkpoint's provenance.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
) -> None:
    """Convert a Glow (rosinality/glow-pytorch, y0ast/Glow-PyTorch) or TarFlow (apple/ml-tarflow) checkpoint
    to a flowtame checkpoint, exactly.

    The structure is read from the weights; any structure flag, hparams.json or file name must agree with it.
    rosinality-glow needs --image-size and --n-bits. y0ast-glow takes --hparams. tarflow reads its
    hyperparameters from flags or from that project's file name
    {dataset}_model_{patch_size}_{channels}_{num_blocks}_{layers_per_block}_{noise_std}.pth.

    Example: flowtame convert glow.pt -o base.safetensors --from rosinality-glow --image-size 128 --n-bits 5

    Example: flowtame convert afhq_model_8_768_8_8_0.07.pth -o tarflow.safetensors --from tarflow
    """
    if source_format not in SOURCE_FORMATS:
        raise InputError(f"--from {source_format}: unknown source format "
                         f"(known: {', '.join(SOURCE_FORMATS)})")
    _check_flags(source_format, patch_size=patch_size, width=width, heads=heads, layers_per_block=layers_per_block,
                 class_label=class_label, hparams=hparams, permutations=permutations, n_flow=n_flow,
                 n_block=n_block, affine=affine, conv_lu=conv_lu, hidden=hidden)
    output = check_output_path(output, force, [source, hparams, permutations])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        if source_format == "y0ast-glow":
            checkpoint = convert_y0ast(source, hparams=hparams, image_size=image_size, channels=channels,
                                       n_bits=8 if n_bits is None else n_bits, permutations=permutations,
                                       notes=notes, command=command_line())
        elif source_format == "tarflow":
            checkpoint = convert_tarflow(source, patch_size=patch_size, width=width, n_block=n_block,
                                         layers_per_block=layers_per_block, heads=heads, image_size=image_size,
                                         channels=channels, n_bits=8 if n_bits is None else n_bits,
                                         class_label=class_label, notes=notes, command=command_line())
        else:
            if image_size is None or n_bits is None:
                raise InputError("--from rosinality-glow needs --image-size and --n-bits (the weights do not "
                                 "hold them)")
            checkpoint = convert_rosinality(source, image_size=image_size, n_bits=n_bits, channels=channels,
                                            n_flow=n_flow, n_block=n_block, affine=affine, conv_lu=conv_lu,
                                            hidden=hidden, notes=notes, command=command_line())
    for warning in caught:
        typer.echo(f"flowtame: warning: {warning.message}", err=True)
    sha256 = save_checkpoint(output, checkpoint, force=force)
    typer.echo(_summary(output, checkpoint, sha256))


#: Per source format, the flags that do not apply to it (flag -> convert's parameter).
NOT_APPLICABLE = {
    "rosinality-glow": {"--patch-size": "patch_size", "--width": "width", "--heads": "heads",
                        "--layers-per-block": "layers_per_block", "--class": "class_label",
                        "--hparams": "hparams", "--permutations": "permutations"},
    "y0ast-glow": {"--patch-size": "patch_size", "--width": "width", "--heads": "heads", "--n-flow": "n_flow",
                   "--layers-per-block": "layers_per_block", "--class": "class_label", "--n-block": "n_block",
                   "--affine/--additive": "affine", "--lu/--no-lu": "conv_lu", "--hidden": "hidden"},
    "tarflow": {"--n-flow": "n_flow", "--affine/--additive": "affine", "--lu/--no-lu": "conv_lu",
                "--hidden": "hidden", "--hparams": "hparams", "--permutations": "permutations"}}


def _check_flags(source_format: str, **values: object) -> None:
    """InputError when a flag that does not apply to ``source_format`` was given (``values``: by parameter)."""
    for flag, name in NOT_APPLICABLE[source_format].items():
        if values[name] is not None:
            raise InputError(f"{flag} does not apply to --from {source_format}")


def _summary(output: Path, checkpoint: Checkpoint, sha256: str) -> str:
    """The line convert prints: the imported model's structure, size and digest."""
    spec = checkpoint.spec
    if checkpoint.architecture == "tarflow":
        conditioning = (f", {spec.num_classes} classes, evaluated "
                        f"{'unconditionally' if spec.class_label is None else f'for class {spec.class_label}'}"
                        if spec.num_classes else "")
        return (f"wrote {output}: tarflow {spec.channels}x{spec.image_size}x{spec.image_size} "
                f"({spec.n_block} blocks x {spec.layers_per_block} layers, patch {spec.patch_size}, width "
                f"{spec.width}, {spec.heads} head{'s' if spec.heads > 1 else ''}{conditioning}, "
                f"{checkpoint.image_data('convert').n_bits} bits), "
                f"{checkpoint.num_parameters:,} parameters, sha256 {sha256}")
    convs = "LU" if all(spec.conv_lu) else ("plain" if not any(spec.conv_lu) else
                                            "".join("L" if v else "P" for v in spec.conv_lu))
    if spec.permutation != "invconv":
        convs = f"none ({spec.permutation} permutations)"
    coupling = "affine" if spec.affine else "additive"
    return (f"wrote {output}: glow {spec.channels}x{spec.image_size}x{spec.image_size} "
            f"({spec.n_block} blocks x {spec.n_flow} flows, {coupling} coupling, "
            f"1x1 convs {convs}, hidden {spec.hidden}, {checkpoint.image_data('convert').n_bits} bits), "
            f"{checkpoint.num_parameters:,} parameters, sha256 {sha256}")
