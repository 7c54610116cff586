"""``flowtame convert``: import a checkpoint written by another project as a flowtame checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from flowtame.cli import app
from flowtame.cli._common import command_line
from flowtame.errors import InputError
from flowtame.io.checkpoint import save_checkpoint
from flowtame.io.convert import SOURCE_FORMATS, ConversionWarning, convert_rosinality
from flowtame.io.fileio import check_output_path


@app.command()
def convert(
    *,
    source: Annotated[Path, typer.Argument(help="The checkpoint to import (a PyTorch state dict, read weights-only).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the flowtame .safetensors file.")],
    source_format: Annotated[str, typer.Option(
        "--from", help=f"Format of SOURCE: {', '.join(SOURCE_FORMATS)}.")] = "rosinality-glow",
    image_size: Annotated[int, typer.Option("--image-size", help="Side of the square training images (pixels).")],
    n_bits: Annotated[int, typer.Option("--n-bits", help="Bits per value the model was trained on (1-8).")],
    channels: Annotated[int | None, typer.Option("--channels", help="Input channels (1 or 3); checked.")] = None,
    n_flow: Annotated[int | None, typer.Option("--n-flow", help="Flow steps per block; checked.")] = None,
    n_block: Annotated[int | None, typer.Option("--n-block", help="Number of blocks; checked.")] = None,
    affine: Annotated[bool | None, typer.Option("--affine/--additive", help="Coupling type; checked.")] = None,
    conv_lu: Annotated[bool | None, typer.Option("--lu/--no-lu", help="LU 1x1 convs in all but the last "
                                                                      "block (rosinality's conv_lu; its last "
                                                                      "block is always LU); checked.")] = None,
    hidden: Annotated[int | None, typer.Option("--hidden", help="Coupling hidden width; checked.")] = None,
    notes: Annotated[str | None, typer.Option("--notes", help="Free text kept in the checkpoint's provenance.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
) -> None:
    """Convert a rosinality/glow-pytorch Glow checkpoint to a flowtame checkpoint.

    The structure (blocks, flows, channels, coupling, 1x1 conv type of every layer) is read from the weights.
    Any structure flag you give must agree with it. Image size and n_bits must be given.

    Example: flowtame convert glow.pt -o base.safetensors --from rosinality-glow --image-size 128 --n-bits 5
    """
    if source_format not in SOURCE_FORMATS:
        raise InputError(f"--from {source_format}: unknown source format "
                         f"(known: {', '.join(SOURCE_FORMATS)})")
    output = check_output_path(output, force)
    if source.exists() and output.exists() and source.resolve() == output.resolve():
        raise InputError(f"{output}: is the input checkpoint; choose another output path")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        checkpoint = convert_rosinality(source, image_size=image_size, n_bits=n_bits, channels=channels,
                                        n_flow=n_flow, n_block=n_block, affine=affine, conv_lu=conv_lu,
                                        hidden=hidden, notes=notes, command=command_line())
    for warning in caught:
        typer.echo(f"flowtame: warning: {warning.message}", err=True)
    sha256 = save_checkpoint(output, checkpoint, force=force)
    spec = checkpoint.spec
    convs = "LU" if all(spec.conv_lu) else ("plain" if not any(spec.conv_lu) else
                                            "".join("L" if v else "P" for v in spec.conv_lu))
    coupling = "affine" if spec.affine else "additive"
    typer.echo(f"wrote {output}: glow {spec.channels}x{spec.image_size}x{spec.image_size} "
               f"({spec.n_block} blocks x {spec.n_flow} flows, {coupling} coupling, "
               f"1x1 convs {convs}, hidden {spec.hidden}, {checkpoint.data_spec.n_bits} bits), "
               f"{checkpoint.num_parameters:,} parameters, sha256 {sha256}")
