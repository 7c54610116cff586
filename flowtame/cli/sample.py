"""``flowtame sample``: one grid, one row per model, every model decoding the same noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowtame.cli import app
from flowtame.cli._common import console, emit_json
from flowtame.data.embedded import resolve_model_path
from flowtame.engine.devices import resolve_device
from flowtame.errors import InputError
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
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", help="Also write every sample as its own PNG here.")] = None,
    scale: Annotated[int | None, typer.Option("--scale", help="Integer upscaling (nearest neighbour); default makes "
                                                       "tiles at least 64 pixels wide.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (noise is drawn on the "
                                                         "CPU).")] = "auto",
    audit_forget: Annotated[str | None, typer.Option("--audit-forget", help="Generation audit: the forget images; the "
                                                                     "first model is the base whose latents "
                                                                     "measure distance (docs/audits.md).")] = None,
    audit_remember: Annotated[str | None, typer.Option("--audit-remember", help="Generation audit: the remember "
                                                                         "images.")] = None,
    audit_holdout: Annotated[list[str] | None, typer.Option("--audit-holdout", help="Generation audit: held-out images "
                                                                             "that calibrate the radius "
                                                                             "(repeatable).")] = None,
    radius_quantile: Annotated[float, typer.Option(help="Generation audit: radius = this quantile of the "
                                                        "held-out images' distance to their nearest training "
                                                        "image.")] = 0.05,
    audit_json: Annotated[str | None, typer.Option("--audit-json", help="Write the generation audit as JSON ('-' = "
                                                                 "stdout).")] = None,
) -> None:
    """Sample a grid in which every model decodes the very same latents (drawn once from --seed).

    Models must share latent shapes. The same model given twice yields two identical rows.

    Example: flowtame sample base.safetensors tamed.safetensors -n 16 --temperature 0.7 --seed 0 -o grid.png
    """
    inputs = [resolve_model_path(m) for m in models] + [audit_forget, audit_remember, *(audit_holdout or [])]
    check_output_path(output, force, inputs)
    auditing = _audit_inputs(audit_forget, audit_remember, audit_holdout)
    if audit_json not in (None, "-"):
        check_output_path(audit_json, force, inputs)
    target = resolve_device(device)
    checkpoints = [load_checkpoint(resolve_model_path(m), device=target) for m in models]
    images = sample_images(checkpoints, n, temperature, seed)
    grid_scale = default_scale(max(images.shape[-2:])) if scale is None else scale
    save_png(output, make_grid(images, scale=grid_scale), force=force)
    console.print(f"wrote {output}: {len(checkpoints)} row(s) x {n} sample(s), temperature {temperature}, "
                  f"seed {seed}")
    if auditing is not None:
        _generation_audit(checkpoints, models, images, *auditing, radius_quantile, device, audit_json, temperature,
                          seed)
    if out_dir is not None:
        names = [Path(str(m)).stem.replace("embedded:", "") for m in models]
        written = save_individual(images, out_dir, names, scale=grid_scale, force=force)
        console.print(f"wrote {len(written)} PNG(s) under {out_dir}")


def _audit_inputs(forget: str | None, remember: str | None, holdout: list[str] | None
                  ) -> tuple[str, str, list[str]] | None:
    """The generation audit's (forget, remember, holdout) sources when all three are given, None when none is."""
    if forget is not None and remember is not None and holdout:
        return forget, remember, holdout
    if forget is not None or remember is not None or holdout:
        raise InputError("the generation audit needs --audit-forget, --audit-remember and --audit-holdout together")
    return None


def _generation_audit(checkpoints, models: list[str], images, forget: str, remember: str, holdout: list[str],
                      radius_quantile: float, device: str, audit_json: str | None, temperature: float,
                      seed: int) -> None:
    """Share of each row's samples near a forget image (the first model's latent space), printed and written."""
    from flowtame.data.images import open_images
    from flowtame.likelihood.auditing import AuditSets, generation_audit

    spec = checkpoints[0].data_spec
    sets = AuditSets(forget=[open_images(forget, spec)], remember=open_images(remember, spec),
                     holdout=[open_images(h, spec) for h in holdout])
    names = [f"{i}:{m}" for i, m in enumerate(models)]
    block = generation_audit(checkpoints[0], dict(zip(names, images, strict=True)), sets,
                             radius_quantile=radius_quantile, device=device)
    block = {"samples": int(images.shape[1]), "temperature": temperature, "seed": seed, **block}
    if audit_json is not None:
        emit_json(audit_json, block)
    if audit_json != "-":
        for name, g in block["models"].items():
            console.print(f"{name}: {g['within_radius']} of {g['samples']} samples within {block['radius']:.3g} of a "
                          f"forget image ({g['share']:.2%}, 95% {g['ci_low']:.2%}..{g['ci_high']:.2%}); nearest "
                          f"training image a forget image: {g['share_nearest']:.2%}", highlight=False)
