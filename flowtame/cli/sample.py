"""``flowtame sample``: one grid, one row per model, every model decoding the same noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowtame.cli import app
from flowtame.cli._common import console
from flowtame.data.embedded import resolve_model_path
from flowtame.engine.devices import resolve_device
from flowtame.figures.sampling import default_scale, make_grid, sample_images, save_individual, save_png
from flowtame.io.checkpoint import load_checkpoint
from flowtame.io.fileio import check_output_path


@app.command()
def sample(
    *,
    models: Annotated[list[str], typer.Argument(help="One or more checkpoints (or 'embedded:glow-digits'); one grid "
                                                     "row each.")],
    n: Annotated[int, typer.Option("-n", "--num-samples", help="Samples per model (grid columns).")] = 16,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Noise scale (standard deviations).")] = 0.7,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shared noise draw.")] = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Grid PNG to write.")],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Also write every sample as its own PNG here.")] = None,
    scale: Annotated[int, typer.Option("--scale", help="Integer upscaling (nearest neighbour); default makes "
                                                       "tiles at least 64 pixels wide.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (noise is drawn on the "
                                                         "CPU).")] = "auto",
) -> None:
    """Sample a grid in which every model decodes the very same latents (drawn once from --seed).

    Models must share latent shapes. The same model given twice yields two identical rows.

    Example: flowtame sample base.safetensors tamed.safetensors -n 16 --temperature 0.7 --seed 0 -o grid.png
    """
    check_output_path(output, force, [resolve_model_path(m) for m in models])
    target = resolve_device(device)
    checkpoints = [load_checkpoint(resolve_model_path(m), device=target) for m in models]
    images = sample_images(checkpoints, n, temperature, seed)
    grid_scale = default_scale(max(images.shape[-2:])) if scale is None else scale
    save_png(output, make_grid(images, scale=grid_scale), force=force)
    console.print(f"wrote {output}: {len(checkpoints)} row(s) x {n} sample(s), temperature {temperature}, "
                  f"seed {seed}")
    if out_dir is not None:
        names = [Path(str(m)).stem.replace("embedded:", "") for m in models]
        written = save_individual(images, out_dir, names, scale=grid_scale, force=force)
        console.print(f"wrote {len(written)} PNG(s) under {out_dir}")
