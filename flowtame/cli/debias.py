"""``flowtame debias``: change how often a model generates each group of images (paper Sec. 4.2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from flowtame.cli import app
from flowtame.cli._common import (
    check_outputs,
    command_line,
    console,
    emit_json,
    err_console,
    is_interactive,
    state_path_for,
    warnings_after,
)
from flowtame.data.embedded import resolve_model_path
from flowtame.engine import distributed
from flowtame.engine.loop import keep_run_after_failed_write
from flowtame.errors import CheckFailedError, InputError, InterruptedRun, OutputWriteError
from flowtame.io.checkpoint import load_checkpoint, save_checkpoint

#: Printed when no --remember is given (docs/debias.md, "Without --remember"): the remember set is then the groups'
#: own images, which the run moves on purpose.
NO_REMEMBER_WARNING = ("no --remember: the remember set is the groups' own images, so the anchor holds the images "
                       "the run must move, nothing holds the rest of what the model generates, and the remember "
                       "figures (and --max-remember-drift) measure the groups' intended change, not collateral; "
                       "give the images the model was trained on with --remember")
#: Options whose value may be a path; the provenance's command line shows them as ``<path>`` (group names kept).
PATH_OPTIONS = {option: "<path>" for option in ("--group", "-g", "--remember", "-r", "--other", "--classifier",
                                                 "--output", "-o", "--report", "--config")}
GROUP_OPTIONS = ("--group", "-g")


# Over 80 lines on purpose: most are the option declarations (one per option, with its help); the body
# only parses, calls the library and renders.
# Over 80 lines only for its Annotated option declarations and help text; the work is in flowtame.jobs.debias.
@app.command("debias")
def debias_command(
    model: Annotated[str, typer.Argument(help="Base checkpoint (.safetensors) or embedded:glow-digits. Never "
                                              "modified.")],
    group: Annotated[list[str], typer.Option("--group", "-g", help="NAME=PATH: a group's images (folder, image, "
                                                                   "list file, embedded:digits...). Two or more.")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="NAME=FRACTION in (0,1): the wanted share of "
                                                                     "samples. For every group, or all but one (the "
                                                                     "rest is implied).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Debiased checkpoint to write (.safetensors).")],
    report: Annotated[str | None, typer.Option("--report", help="Write the JSON report here ('-' = stdout).")] = None,
    remember: Annotated[str | None, typer.Option("--remember", "-r", help="Images whose likelihood distribution "
                                                                   "must stay as it was (default: all the "
                                                                   "groups' images).")] = None,
    other: Annotated[str | None, typer.Option("--other", help="Images of none of the groups (group images in it are "
                                                       "left out): samples classified as 'other' are not "
                                                       "counted, so frequencies are relative among the "
                                                       "groups (without --other every sample is assigned to a "
                                                       "group).")] = None,
    classifier: Annotated[Path | None, typer.Option(
        "--classifier", help="TorchScript module: images [B,C,H,W] in [-0.5,0.5) -> logits [B, groups (+1 "
                             "'other' with --other)] in --group order (default: a logistic regression on "
                             "the base model's latents).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file with any of the keys below (and the "
                                                          "other DebiasConfig keys); flags win.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Stop when every frequency is this close to its target "
                                                  "[0.02].")] = None,
    samples: Annotated[int | None, typer.Option(help="Samples per measurement (one fixed draw) [1024].")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature [0.5, the authors'].")] = None,
    measure_every: Annotated[int | None, typer.Option(help="Measure the frequencies every N iterations [10].")] = None,
    max_iters: Annotated[int | None, typer.Option(help="Iteration budget [400].")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam peak learning rate, scaled down as the gaps close; the "
                                           "calibration may lower it [2e-5].")] = None,
    step_sigma: Annotated[float | None, typer.Option(
        help="Calibrate the learning rate so that one step moves the remember mean NLL by at most this many "
             "sigma_R, as tame does (0: off) [0.5].")] = None,
    verdict: Annotated[bool | None, typer.Option("--verdict/--no-verdict", help="Stop early when the measured progress "
                                                                         "says the targets cannot be reached "
                                                                         "within --max-iters \\[on].")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear learning-rate warm-up iterations [20].")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Images per group, and remember images, per iteration [16].")] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of the group loss, L = a*L_G + (1-a)*L_R [0.6].")] = None,
    gamma: Annotated[float | None, typer.Option(help="Weight of the KL terms inside L_R [0; the paper's 0.6].")] = None,
    anchor: Annotated[float | None, typer.Option(help="Weight of the per-image anchor to the base model, "
                                               "mean((NLL - NLL_base)/sigma_B)^2 on the remember batch, which "
                                               "replaces the mean remember NLL in L_R (as in tame); 0: the "
                                               "paper's mean NLL [1.0].")] = None,
    max_remember_drift: Annotated[float | None, typer.Option(
        help="Stopping guard (as tame's): refuse to stop, and report unconverged, while the remember set's mean "
             "NLL is up by more than this fraction (0 = off) [0.008].")] = None,
    soft_delta: Annotated[float | None, typer.Option(help="Over-represented groups' NLL is pushed up to mu_R + "
                                                   "soft_delta*sigma_R at most [2].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sample draw, the classifier split and the batches "
                                           "[0].")] = None,
    check_draw: Annotated[bool | None, typer.Option(
        "--check-draw/--no-check-draw", help="Measure base and result again on an independent draw (seed+1) "
                                             "the stopping rule never saw \\[on].")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its saved state.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Treat unreadable image files as errors.")] = False,
    require_converged: Annotated[bool, typer.Option("--require-converged", help="Exit 1 when the targets "
                                                                                "were not reached.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live view; plain log lines only at the "
                                                              "end.")] = False,
) -> None:
    """Rebalance how often MODEL generates each --group, toward the --target fractions.

    Example: flowtame debias base.safetensors --group male=./male --group female=./female
    --target male=0.5 -o balanced.safetensors --report debias.json
    """
    options = dict(locals())  # first: every option; those named like DebiasConfig keys are the config's flags
    from flowtame.data.images import open_images
    from flowtame.jobs.debias import config_keys, debias, make_config, parse_groups, parse_targets, read_config_file

    sources = parse_groups(group)
    targets = parse_targets(target, list(sources))
    settings = make_config(read_config_file(config) if config else {},
                           {key: value for key, value in options.items() if key in config_keys()})
    inputs = [resolve_model_path(model), *sources.values(), remember, other, classifier, config]
    check_outputs(force or resume, output, report, inputs=inputs)
    if classifier is not None and not classifier.is_file():
        raise InputError(f"{classifier}: no such classifier file", keys=("classifier",))
    state_path = state_path_for(output)
    base = load_checkpoint(resolve_model_path(model))
    if base.data_spec is None:
        raise InputError(f"{model}: debiasing needs an image model")
    main_rank = distributed.current().is_main  # under torchrun only rank 0 shows, warns and writes
    with warnings_after(main_rank):
        group_sets = {name: open_images(source, base.data_spec, strict=strict) for name, source in sources.items()}
        remember_set = open_images(remember, base.data_spec, strict=strict) if remember else None
        other_set = open_images(other, base.data_spec, strict=strict) if other else None
    view = _LiveView(settings, list(sources), quiet or not main_rank)
    try:
        with view:
            outcome = debias(base, group_sets, targets, settings, remember_set=remember_set, other_set=other_set,
                             classifier_path=classifier, device=device, state_path=state_path, resume=resume,
                             callback=view.update, command=command_line(PATH_OPTIONS, GROUP_OPTIONS))
    except InterruptedRun as exc:
        if exc.partial_report is not None and report not in (None, "-") and main_rank:
            emit_json(report, exc.partial_report)
        raise
    if main_rank:
        _finish(outcome, output, state_path, report, quiet, no_remember=remember is None)
    if require_converged and not outcome.report["converged"]:
        raise CheckFailedError(f"{output}: written, but the targets were not reached within "
                               f"{settings.tolerance} in {outcome.report['iterations']} iterations")


def _finish(outcome, output: Path, state_path: Path, report: str | None, quiet: bool, no_remember: bool) -> None:
    """Write checkpoint and report (a failed write keeps the finished run as resumable state), drop the resume
    state, print the summary, any failed check, the early verdict and, without --remember, what that means."""
    try:
        sha = save_checkpoint(output, outcome.checkpoint, force=True)
        outcome.report["output"] = {"path": str(output), "sha256": sha}
        emit_json(report, outcome.report)
    except OutputWriteError as exc:
        raise keep_run_after_failed_write(exc, outcome.save_state, state_path) from None
    if state_path.exists():
        state_path.unlink()
    _print_summary(outcome.report, output, sha, quiet or report == "-")
    _warn_failed_checks(outcome.report)
    _say_verdict(outcome.report)
    if no_remember:  # said after the run, so that bad input stays one line
        err_console.print(f"[yellow]warning:[/] {NO_REMEMBER_WARNING}", highlight=False)


def _say_verdict(report: dict) -> None:
    """The early "cannot reach" verdict (the progress rate's, or the remember-drift guard's), one stderr line,
    when the run stopped on it (quiet or not)."""
    if report.get("verdict_message"):
        err_console.print(f"[yellow]stopped early:[/] {report['verdict_message']}", highlight=False)


class _LiveView:
    """Rich live table on a terminal; a plain log line at every measurement otherwise (unless quiet)."""

    def __init__(self, config, group_names: list[str], quiet: bool):
        self.config = config
        self.group_names = group_names
        self.quiet = quiet
        self.live = Live(console=console, refresh_per_second=4, transient=True) if is_interactive(quiet) else None
        self.start = time.perf_counter()

    def __enter__(self) -> _LiveView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def update(self, iteration: int, logged: dict[str, float]) -> None:
        elapsed = logged.get("elapsed", time.perf_counter() - self.start)
        if self.live:
            table = Table(title="flowtame debias", show_header=False)
            table.add_row("iteration", f"{iteration} / {self.config.max_iters}")
            table.add_row("largest |frequency - target|",
                          f"{logged['max_gap']:.3f}  (stop at {self.config.tolerance:.3f}; measured every "
                          f"{self.config.measure_every})")
            for name in self.group_names:
                table.add_row(f"group {name} NLL (batch)", f"{logged[f'bpd/{name}']:.4f} BPD")
            table.add_row("loss groups / remember", f"{logged['loss_groups']:.4g} / {logged['loss_remember']:.4g}")
            table.add_row("elapsed", f"{elapsed:.1f} s")
            self.live.update(table)
        elif not self.quiet and iteration % self.config.measure_every == 0:
            console.print(f"iter {iteration:5d}  max|f - target| {logged['max_gap']:.3f} "
                          f"(tol {self.config.tolerance:.3f})  L_G {logged['loss_groups']:.4g}  "
                          f"L_R {logged['loss_remember']:.4g}  {elapsed:.1f}s", highlight=False)


def _print_summary(report: dict, output: Path, sha: str, quiet: bool) -> None:
    if quiet:
        return
    state = "reached the targets" if report["converged"] else "did NOT reach the targets"
    console.print(f"{state} after {report['iterations']} iterations in {report['wall_seconds']:.1f} s "
                  f"(classifier {report['classifier']['kind']})", highlight=False)
    before, after = report["frequencies"]["before"]["groups"], report["frequencies"]["after"]["groups"]
    for name, target in report["targets"].items():
        console.print(f"  {name}: {before[name]['frequency']:.3f} -> {after[name]['frequency']:.3f} "
                      f"[{after[name]['ci_low']:.3f}, {after[name]['ci_high']:.3f}]  target {target:.3f}",
                      highlight=False)
    check = report["frequencies"].get("check_draw")
    if check:
        console.print(f"  independent draw (seed {check['seed']}): " + ", ".join(
            f"{name} {check['before']['groups'][name]['frequency']:.3f} -> "
            f"{check['after']['groups'][name]['frequency']:.3f}" for name in report["targets"]), highlight=False)
    evaluation = report["evaluation"]
    remember = evaluation["sets"]["remember"]
    console.print(f"  remember: QD {remember['qd']:+.4f}  mean BPD {remember['base_mean_bpd']:.4f} -> "
                  f"{remember['tamed_mean_bpd']:.4f}", highlight=False)
    console.print(f"wrote {output} (sha256 {sha[:16]}…)", highlight=False)


def _warn_failed_checks(report: dict) -> None:
    """One stderr line per failed preservation check (the outputs are written all the same)."""
    for check in report["evaluation"]["checks"]:
        if not check["passed"]:
            value = "n/a" if check["value"] is None else f"{check['value']:.4g}"
            err_console.print(f"[yellow]warning:[/] preservation check {check['name']} failed: {value} (must be "
                              f"{check['comparison']} {check['bound']:g}); see the report's evaluation block",
                              highlight=False)
