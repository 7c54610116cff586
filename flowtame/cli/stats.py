"""``flowtame stats``: the per-image likelihood distribution of a model on one or more image sources."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import typer
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table
from rich.text import Text

from flowtame.cli import app
from flowtame.cli._common import console, emit_json, is_interactive
from flowtame.data.embedded import resolve_model_path
from flowtame.errors import InputError
from flowtame.io.checkpoint import load_checkpoint
from flowtame.io.fileio import check_output_path

SCHEMA_VERSION = 1


class _EchoHandler(logging.Handler):
    """Library warnings (e.g. skipped image files) as ``flowtame: warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"flowtame: warning: {record.getMessage()}", err=True)


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    logger = logging.getLogger("flowtame")
    handler = _EchoHandler(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def _progress(live: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar for one source while ``live``; None (no callback) otherwise."""
    if not live:
        yield None
        return
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(f"NLL {label}", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _stats_table(report: dict) -> Table:
    """One row per statistic, one column per source (fits narrow terminals for a few sources)."""
    d = report["num_dims"]
    table = Table(title=f"per-image NLL under {report['model']['name']} (dequantization seed {report['seed']}; "
                        f"BPD = nats / ({d}·ln 2))")
    table.add_column("statistic")
    for source in report["sources"]:
        table.add_column(Text(source["name"]), justify="right", overflow="fold")

    def p_value(test: dict | None) -> str:
        return "n/a" if test is None else f"{test['pvalue']:.3g}"

    def number(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = [
        ("images", lambda s: str(s["n"])),
        ("skipped files", lambda s: str(s["skipped"])),
        ("NLL mean (nats)", lambda s: number(s["nats"]["mean"], 2)),
        ("NLL std (nats)", lambda s: number(s["nats"]["std"], 2)),
        ("BPD mean", lambda s: number(s["bpd"]["mean"], 4)),
        ("BPD std", lambda s: number(s["bpd"]["std"], 4)),
        ("BPD min", lambda s: number(s["bpd"]["min"], 4)),
        ("BPD 5% / 50% / 95%", lambda s: " / ".join(number(s["bpd"]["quantiles"][q], 4) for q in ("5", "50", "95"))),
        ("BPD max", lambda s: number(s["bpd"]["max"], 4)),
        ("KS vs fitted normal p", lambda s: p_value(s["ks_normality"])),
        ("D'Agostino-Pearson p", lambda s: p_value(s["dagostino"])),
        ("images / s", lambda s: number(s["images_per_second"], 1)),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(source) for source in report["sources"]))
    return table


@app.command()
def stats(
    model: str = typer.Argument(..., help="A flowtame checkpoint, or 'embedded:glow-digits'."),
    data: list[str] = typer.Argument(..., help="Image sources: folders, image files, .txt lists of image "
                                               "paths, or embedded:digits[:all|train|test][:CLASS]."),
    json_path: str = typer.Option(None, "--json", help="Write the statistics as JSON ('-' = stdout only)."),
    per_image: Path = typer.Option(None, "--per-image", help="Write one CSV row per image: source, path, "
                                                             "key, nll_nats, bpd."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG: per source, the NLL histogram (BPD) and its "
                                                   "fitted normal."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dequantization noise (same seed, same noise for "
                                               "every model)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16/fp16 autocast on CUDA."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unreadable image instead of "
                                                        "skipping it with a warning."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json/--per-image/--plot files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no per-source lines, no table."),
) -> None:
    """Per-image NLL of MODEL on each DATA source: mean, std, range and quantiles in nats and BPD, with
    KS (against the fitted normal) and D'Agostino-Pearson normality tests.

    Unreadable image files are skipped with a warning and counted (--strict: exit 2 on the first one).

    Example: flowtame stats base.safetensors ./celeba faces.txt --json stats.json --plot nll.png
    """
    from flowtame.data.images import open_images
    from flowtame.likelihood.nll import compute_nll, per_image_csv_file
    from flowtame.likelihood.statistics import fit_normal, summarize_nll

    for output in (json_path if json_path != "-" else None, per_image, plot):
        if output is not None:
            check_output_path(output, force, [resolve_model_path(model), *data])
    ckpt = load_checkpoint(resolve_model_path(model))
    if ckpt.data_spec is None:
        raise InputError(f"{model}: a {ckpt.architecture} model has no image data spec; stats needs an image "
                         "model")
    image_sets = [open_images(source, ckpt.data_spec, strict=strict) for source in data]
    show = json_path != "-" and not quiet
    report = {
        "schema_version": SCHEMA_VERSION,
        "command": "stats",
        "model": {"name": model, "path": str(ckpt.path), "sha256": ckpt.sha256,
                  "architecture": ckpt.architecture},
        "data": ckpt.data_spec.to_dict(),
        "num_dims": ckpt.data_spec.num_dims,
        "seed": seed,
        "precision": precision,
        "sources": [],
    }
    results = []
    csv_file = per_image_csv_file(per_image) if per_image is not None else contextlib.nullcontext()
    with _warnings_to_stderr(), csv_file as csv_stream:
        for image_set in image_sets:
            with _progress(is_interactive(not show), image_set.name) as progress:
                result = compute_nll(ckpt.model, image_set, seed=seed, batch_size=batch_size, device=device,
                                     precision=precision, progress=progress, per_image_csv=csv_stream)
            bad = ~np.isfinite(result.nll)
            if bad.any():
                raise InputError(f"{model}: non-finite NLL for {int(bad.sum())} image(s) of {image_set.name} "
                                 f"(first: {result.paths[int(np.argmax(bad))]})")
            results.append(result)
            report["sources"].append({
                "name": image_set.name,
                **summarize_nll(result.nll, result.num_dims),
                "skipped": len(result.skipped),
                "skipped_files": [{"path": path, "reason": reason} for path, reason in result.skipped],
                "images_per_second": result.images_per_second,
            })
            if not quiet:
                typer.echo(f"{image_set.name}: {len(result)} image(s), {len(result.skipped)} skipped, "
                           f"{result.images_per_second:.1f} images/s", err=True)
    emit_json(json_path, report)
    if plot is not None:
        from flowtame.figures.plots import plot_nll_histograms

        fits = {r.name: fit_normal(r.nll) for r in results if len(r) >= 2}
        plot_nll_histograms(plot, {r.name: {r.name: r.nll} for r in results},
                            fits={name: fit for name, fit in fits.items() if fit.std > 0},
                            num_dims=ckpt.data_spec.num_dims, force=force)
    if show:
        console.print(_stats_table(report))
