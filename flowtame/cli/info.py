"""``flowtame info``: what a checkpoint holds."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from flowtame.cli import app
from flowtame.cli._common import check_outputs, console, emit_json
from flowtame.data.embedded import resolve_model_path
from flowtame.io.checkpoint import load_checkpoint


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="A flowtame .safetensors checkpoint, or 'embedded:glow-digits'.")],
    json_path: Annotated[str | None, typer.Option(
        "--json", help="Also write the description as JSON ('-' = stdout).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")] = False,
) -> None:
    """Show a checkpoint's architecture, parameter count, data spec, provenance and sha256.

    Example: flowtame info base.safetensors --json - | jq .provenance
    """
    check_outputs(force, json_path, inputs=[resolve_model_path(model)])
    ckpt = load_checkpoint(resolve_model_path(model))
    description = ckpt.info()
    if json_path == "-":
        emit_json("-", description)
        return
    table = Table(title=ckpt.path.name if ckpt.path is not None else model, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("architecture", ckpt.architecture)
    table.add_row("parameters", f"{ckpt.num_parameters:,}")
    for key, value in ckpt.spec.to_dict().items():
        if key == "conv_lu":
            value = "all LU" if all(value) else ("all plain" if not any(value) else
                                                 "".join("L" if v else "P" for v in value))
        table.add_row(f"  {key}", str(value))
    if ckpt.data_spec:
        ds = ckpt.data_spec
        table.add_row("data", f"{ds.channels}x{ds.image_size}x{ds.image_size}, {ds.n_bits} bits")
    table.add_row("latent shapes", ", ".join("x".join(map(str, s)) for s in ckpt.model.latent_shapes))
    for key, value in ckpt.provenance.items():
        table.add_row(f"provenance.{key}", str(value))
    table.add_row("sha256", ckpt.sha256 or "")
    console.print(table)
    emit_json(json_path, description)
