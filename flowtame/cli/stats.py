"""``flowtame stats``: the per-image likelihood distribution of a model on one or more image sources."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import MofNCompleteColumn, Progress, TaskID
from rich.table import Table
from rich.text import Text

from flowtame.cli import app
from flowtame.cli._common import console, emit_json, is_interactive
from flowtame.data.embedded import resolve_model_path
from flowtame.engine import distributed
from flowtame.io.checkpoint import load_checkpoint
from flowtame.io.fileio import check_output_path


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
def _progress(live: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """Rich progress bars, one per source, while ``live``; None (no callback) otherwise."""
    if not live:
        yield None
        return
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"NLL {name}", total=None)
            bar.update(tasks[name], completed=done, total=total)

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
    model: Annotated[str, typer.Argument(help="A flowtame checkpoint, or 'embedded:glow-digits'.")],
    data: Annotated[list[str], typer.Argument(help="Image sources: folders, image files, .txt lists of image paths, "
                                                   "or embedded:digits[:all|train|test][:CLASS].")],
    json_path: Annotated[str | None, typer.Option(
        "--json", help="Write the statistics as JSON ('-' = stdout only).")] = None,
    per_image: Annotated[Path | None, typer.Option("--per-image", help="Write one CSV row per image: source, path, "
                                                                "key, nll_nats, bpd.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG: per source, the NLL histogram (BPD) and "
                                                      "its fitted normal.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the dequantization noise (same seed, same noise "
                                                     "for every model).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Image files read per batch; on the CPU a wide "
                                                       "model's forward passes take fewer at once.")] = 256,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, or bf16/fp16 autocast on CUDA.")] = "fp32",
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image instead of "
                                                          "skipping it with a warning.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing --json/--per-image/--plot files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no per-source lines, no table.")] = False,
) -> None:
    """Per-image NLL of MODEL on each DATA source: mean, std, range and quantiles in nats and BPD, with
    KS (against the fitted normal) and D'Agostino-Pearson normality tests.

    Unreadable image files are skipped with a warning and counted (--strict: exit 2 on the first one).

    Example: flowtame stats base.safetensors ./celeba faces.txt --json stats.json --plot nll.png
    """
    from flowtame.jobs.stats import likelihood_stats
    from flowtame.likelihood.nll import per_image_csv_file

    for output in (json_path if json_path != "-" else None, per_image, plot):
        if output is not None:
            check_output_path(output, force, [resolve_model_path(model), *data])
    ckpt = load_checkpoint(resolve_model_path(model))
    show = json_path != "-" and not quiet
    main_rank = distributed.current().is_main  # under torchrun only rank 0 shows progress and writes
    csv_file = per_image_csv_file(per_image) if per_image is not None and main_rank else contextlib.nullcontext()
    with _warnings_to_stderr(), csv_file as csv_stream, _progress(is_interactive(not show) and main_rank) as progress:
        outcome = likelihood_stats(ckpt, model, data, seed=seed, batch_size=batch_size, device=device,
                                   precision=precision, strict=strict, per_image_csv=csv_stream, progress=progress)
    if not main_rank:
        return
    report = outcome.report
    if not quiet:
        for source in report["sources"]:
            typer.echo(f"{source['name']}: {source['n']} image(s), {source['skipped']} skipped, "
                       f"{source['images_per_second']:.1f} images/s", err=True)
    emit_json(json_path, report)
    if plot is not None:
        _plot(plot, outcome.results, report["num_dims"], force)
    if show:
        console.print(_stats_table(report))


def _plot(path: Path, results: list, num_dims: int, force: bool) -> None:
    """Per source, the NLL histogram (BPD) and its fitted normal (sources of one image or no spread: no fit)."""
    from flowtame.figures.plots import plot_nll_histograms
    from flowtame.likelihood.statistics import fit_normal

    fits = {r.name: fit_normal(r.nll) for r in results if len(r) >= 2}
    plot_nll_histograms(path, {r.name: {r.name: r.nll} for r in results},
                        fits={name: fit for name, fit in fits.items() if fit.std > 0}, num_dims=num_dims, force=force)
