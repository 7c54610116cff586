"""``flowtame tame``: make chosen images unlikely while the rest of the distribution stays as it was."""

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
    is_interactive,
    state_path_for,
    warnings_after,
)
from flowtame.data.embedded import resolve_model_path
from flowtame.engine import distributed
from flowtame.engine.loop import keep_run_after_failed_write
from flowtame.errors import CheckFailedError, InterruptedRun, OutputWriteError, signal_number
from flowtame.io.checkpoint import load_checkpoint, save_checkpoint

#: The help panel of the options only Adam's step uses (the solved step, taming's default, ignores them)
ADAM_PANEL = "Adam's step (--step adam; --preset paper)"
#: Provenance keeps the forget images' digests, never their paths: these options' values are redacted.
FORGET_OPTIONS = {"--forget": "<forget source>", "-f": "<forget source>"}


# Over 80 lines on purpose: most are the option declarations (one per option, with its help); the body
# only parses, calls the library and renders.
# Over 80 lines only for its Annotated option declarations and help text; the work is in flowtame.jobs.tame.
@app.command("tame")
def tame_command(
    model: Annotated[str, typer.Argument(help="Base checkpoint (.safetensors) or embedded:glow-digits. Never "
                                              "modified.")],
    forget: Annotated[list[str], typer.Option("--forget", "-f", help="Images to forget (folder, image, list file, "
                                                                     "embedded:digits...). Repeat for several "
                                                                     "requests.")],
    remember: Annotated[str, typer.Option("--remember", "-r", help="Images whose distribution must stay as it was.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Tamed checkpoint to write (.safetensors).")],
    report: Annotated[str | None, typer.Option("--report", help="Write the JSON report here ('-' = stdout).")] = None,
    holdout: Annotated[list[str] | None, typer.Option("--holdout", help="Held-out images to evaluate on "
                                                                 "(repeatable).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML file with any of the keys below; flags win.")] = None,
    preset_name: Annotated[str | None, typer.Option("--preset", help="Start from a shipped preset: 'paper' = the "
                                                              "authors' exact loss and hyperparameters.")] = None,
    method: Annotated[str | None, typer.Option(
        help="taming (default) | neggrad | selective-amnesia (baselines).")] = None,
    target: Annotated[str | None, typer.Option(help="Where to stop: threshold (the paper's mu_R + delta*sigma_R: "
                                             "suppression) | holdout (the --holdout images' NLL interquartile "
                                             "band: forget to the level of never-seen images; docs/audits.md) "
                                             "\\[threshold].")] = None,
    generation_audit: Annotated[int, typer.Option("--generation-audit", min=0, metavar="M",
                                                  help="With --holdout: also audit M samples per model from "
                                                       "shared latents (share near a forget image).")] = 0,
    delta: Annotated[float | None, typer.Option(
        help="Threshold in remember std units: mu_R + delta*sigma_R [4].")] = None,
    epsilon: Annotated[float | None, typer.Option(
        help="Stop when |d| < epsilon for every forget image [0.15*delta].")] = None,
    alpha: Annotated[float | None, typer.Option(
        help="Weight of the forget loss, L = a*L_F + (1-a)*L_R [0.15].",
        rich_help_panel=ADAM_PANEL)] = None,
    gamma: Annotated[float | None, typer.Option(help="Weight of the KL terms inside L_R [0; the paper's 0.6].",
        rich_help_panel=ADAM_PANEL)] = None,
    lr: Annotated[float | None, typer.Option(
        help="Adam peak learning rate [2e-4]; the calibration may lower it.",
        rich_help_panel=ADAM_PANEL)] = None,
    step_sigma: Annotated[float | None, typer.Option(help="Calibrate the learning rate so that one step moves the "
                                                   "remember mean NLL by at most this many sigma_R (first "
                                                   "order, worst case); 0: use --lr as given [2].",
        rich_help_panel=ADAM_PANEL)] = None,
    anchor: Annotated[float | None, typer.Option(help="Weight of the per-image anchor to the base model, "
                                               "mean((NLL - NLL_base)/sigma_B)^2 on the remember batch, which "
                                               "replaces the mean remember NLL in L_R; 0: the paper's mean "
                                               "NLL [0.2].")] = None,
    anchor_shift: Annotated[float | None, typer.Option(help="With the anchor: weight of the common shift's term, "
                                                     "(mean (NLL - NLL_base)/sigma_B)^2 on the remember "
                                                     "batch, switched on when a stop is refused for the "
                                                     "remember drift, doubled per refusal up to 8x; 0: "
                                                     "off [2].",
        rich_help_panel=ADAM_PANEL)] = None,
    precondition: Annotated[str | None, typer.Option(help="kfac: precondition each Adam update by the remember "
                                                     "NLL's curvature (a K-FAC Fisher metric of 512 remember "
                                                     "images), same first-order forget change | none: Adam's "
                                                     "update (default: kfac for taming; none for the baselines, "
                                                     "--preset paper and runs under torchrun).",
        rich_help_panel=ADAM_PANEL)] = None,
    step: Annotated[str | None, typer.Option(help="solve: each iteration, the shortest step under the remember "
                                             "curvature that moves each forget image just short of the "
                                             "threshold and holds the look-alikes and the remember mean "
                                             "(docs/method.md 'The solved step') | adam: Adam's step on the loss "
                                             "(preconditioned per --precondition) \\[solve for taming with its "
                                             "anchor; adam for the baselines, --preset paper, --anchor 0, under "
                                             "torchrun, and (with a warning) when the solved step's rows would "
                                             "not fit in the device's free memory].")] = None,
    lookalikes: Annotated[int | None, typer.Option(help="With the anchor: hold the forget set's N nearest remember "
                                                 "images (base latent space) in every batch [16].")] = None,
    lookalike_qd: Annotated[float | None, typer.Option(
        help="With the anchor: refuse a stop while those look-alikes' quantile drop (as evaluate --neighbours "
             "measures it) exceeds this; 0: off [0.018].")] = None,
    remember_qd: Annotated[float | None, typer.Option(
        help="With the anchor: refuse a stop while the remember set's quantile drop (as evaluate measures it, on "
             "the whole set) exceeds this; 0: off [0.001].")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Forget and remember images per iteration (each) [32].",
        rich_help_panel=ADAM_PANEL)] = None,
    max_iters: Annotated[int | None, typer.Option(help="Iteration budget [800].")] = None,
    refresh_every: Annotated[int | None, typer.Option(
        help="Re-estimate mu_R, sigma_R every N iterations [10].",
        rich_help_panel=ADAM_PANEL)] = None,
    refresh_size: Annotated[int | None, typer.Option(help="Remember images used for each re-estimate [256].")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear learning-rate warm-up iterations [20].",
        rich_help_panel=ADAM_PANEL)] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Clip the gradient norm to this value.",
        rich_help_panel=ADAM_PANEL)] = None,
    forget_loss: Annotated[str | None, typer.Option(help="huber | squared | sigmoid (the paper's).",
        rich_help_panel=ADAM_PANEL)] = None,
    forget_unit: Annotated[str | None, typer.Option(
        help="Unit of the forget gap: sigma | bpd (the paper's) | nats.",
        rich_help_panel=ADAM_PANEL)] = None,
    kl_estimate: Annotated[str | None, typer.Option(help="N_T estimate: refreshed | batch (the paper's).",
        rich_help_panel=ADAM_PANEL)] = None,
    threshold_gradient: Annotated[bool | None, typer.Option(
        "--threshold-gradient/--no-threshold-gradient", help="Differentiate the forget loss through mu_R + "
                                                             "delta*sigma_R.",
        rich_help_panel=ADAM_PANEL)] = None,
    settle_decay: Annotated[float | None, typer.Option(help="Per-iteration learning-rate decay while every forget "
                                                     "image is within epsilon of the stopping band (1 = off) "
                                                     "[0.97].",
        rich_help_panel=ADAM_PANEL)] = None,
    stop_margin: Annotated[float | None, typer.Option(help="Stop only when every forget image's d (in sigma_R) is "
                                                    "above -epsilon + this margin, so it still counts as "
                                                    "forgotten on noise the run never saw (0 = the paper's "
                                                    "|d| < epsilon; docs/method.md) [0].")] = None,
    upper_edge: Annotated[float | None, typer.Option(help="The stopping band's upper edge, in epsilons: stop when "
                                                   "every forget image has -epsilon < d < this x epsilon (1 = "
                                                   "the paper's |d| < epsilon; docs/method.md) [2 for --target "
                                                   "threshold, 1 for --target holdout].")] = None,
    forget_draws: Annotated[int | None, typer.Option(help="Noise draws averaged into each forget image's NLL in the "
                                                   "stopping test and the report [8].")] = None,
    max_remember_drift: Annotated[float | None, typer.Option(
        help="Stopping guard: refuse to stop while the remember set's mean NLL is up by more than this "
             "fraction (0 = off) [0.001 with the solved step, 0.003 with Adam's, 0.05 for the baselines].")] = None,
    max_remember_jump: Annotated[float | None, typer.Option(help="Blow-up guard: roll back and halve the learning "
                                                          "rate (the solved step: quarter its step's trust) "
                                                          "when a remember batch's mean BPD is this fraction "
                                                          "above the base model's (0 = off) [0.25].")] = None,
    freeze: Annotated[str | None, typer.Option(help="Parameters held fixed: coupling-outputs (each coupling "
                                             "network's zero-initialized last layer) | none "
                                             "(default: coupling-outputs for taming, none for the "
                                             "baselines).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed: CPU runs are bit-for-bit repeatable [0].")] = None,
    eval_seed: Annotated[int | None, typer.Option(
        help="Seed of the fixed evaluation / stopping-check noise [0].")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (autocast, CUDA only).")] = None,
    sa_lambda: Annotated[float | None, typer.Option(help="selective-amnesia: EWC penalty weight lambda.")] = None,
    sa_replay_weight: Annotated[float | None, typer.Option(
        help="selective-amnesia: weight of generative replay.")] = None,
    sa_fisher_samples: Annotated[int | None, typer.Option(help="selective-amnesia: base-model samples for the "
                                                        "Fisher.")] = None,
    sa_surrogate: Annotated[str | None, typer.Option(
        help="selective-amnesia: 'uniform' noise images or a folder.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its saved state.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Treat unreadable image files as errors.")] = False,
    require_converged: Annotated[bool, typer.Option("--require-converged", help="Exit 1 when the stopping "
                                                                                "criterion was not reached.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live view; plain log lines only at the "
                                                              "end.")] = False,
) -> None:
    """Tame MODEL so every --forget image reaches the likelihood threshold, keeping --remember intact.

    Example: flowtame tame base.safetensors --forget ./person --remember ./celeba -o tamed.safetensors
    --report report.json
    """
    options = dict(locals())  # first: every option; those named like config keys are the config's flags
    from flowtame.jobs.tame import config_keys, make_config, preset, read_config_file

    flags = {key: value for key, value in options.items() if key in config_keys()}
    layers = ([preset(preset_name)] if preset_name else []) + ([read_config_file(config)] if config else [])
    cfg = make_config(*layers, flags)
    inputs = [resolve_model_path(model), *forget, remember, *(holdout or []), config, sa_surrogate]
    check_outputs(force or resume, output, report, inputs=inputs)
    base = load_checkpoint(resolve_model_path(model))
    forget_sets, remember_set, holdout_sets = _open_sets(base, forget, remember, holdout or [], strict)
    outcome = _run(base, forget_sets, remember_set, holdout_sets, cfg, device=device, output=output,
                   report=report, resume=resume, quiet=quiet)
    _finish(base, outcome, (forget_sets, remember_set, holdout_sets), cfg, device=device, output=output,
            report=report, quiet=quiet, require_converged=require_converged, generation_audit=generation_audit)


def _open_sets(base, forget: list[str], remember: str, holdout: list[str], strict: bool) -> tuple:
    """The forget sets, the remember set and the holdout sets (named ``holdout:SOURCE``) of the command."""
    from flowtame.data.images import open_images

    with warnings_after(distributed.current().is_main):
        forget_sets = [open_images(f, base.data_spec, strict=strict) for f in forget]
        remember_set = open_images(remember, base.data_spec, strict=strict)
        holdout_sets = {f"holdout:{h}": open_images(h, base.data_spec, strict=strict) for h in holdout}
    return forget_sets, remember_set, holdout_sets


def _run(base, forget_sets: list, remember_set, holdout_sets: dict, cfg, *, device: str, output: Path,
         report: str | None, resume: bool, quiet: bool):
    """The tame job under the live view; on Ctrl-C the partial report is written before exiting. Under
    torchrun only rank 0 shows the view, prints warnings and writes the partial report."""
    from flowtame.jobs.tame import tame

    main_rank = distributed.current().is_main
    view = _LiveView(cfg, quiet or not main_rank)
    try:
        with view, warnings_after(main_rank):
            return tame(base, forget_sets, remember_set, cfg, device=device, state_path=state_path_for(output),
                        resume=resume, callback=view.update, target_holdout=list(holdout_sets.values()),
                        command=command_line(FORGET_OPTIONS))
    except InterruptedRun as exc:
        if exc.partial_report is not None and report not in (None, "-") and main_rank:
            emit_json(report, exc.partial_report)
        raise


def _finish(base, outcome, sets: tuple, cfg, *, device: str, output: Path, report: str | None,
            quiet: bool, require_converged: bool, generation_audit: int) -> None:
    """Evaluate on the holdout sets (with the audits when there are any), write checkpoint and report, drop the
    resume state, print the summary. ``sets``: the forget sets, the remember set and the holdout sets.

    A failed write or a stop at this point keeps the finished run as resumable state (``--resume`` then
    writes the outputs without training). Under torchrun every rank evaluates (the passes are sharded) and
    only rank 0 writes and prints."""
    from flowtame.jobs.tame import taming_audits, taming_evaluation

    forget_sets, remember_set, holdout_sets = sets

    state_path = state_path_for(output)
    try:
        outcome.report["evaluation"] = taming_evaluation(base, outcome, holdout_sets, cfg, device=device)
        if holdout_sets:
            taming_audits(base, outcome, forget_sets, remember_set, holdout_sets, cfg, device=device,
                          generation_samples=generation_audit)
        if not distributed.current().is_main:
            return
        sha = save_checkpoint(output, outcome.checkpoint, force=True)
        outcome.report["output"] = {"path": str(output), "sha256": sha}
        emit_json(report, outcome.report)
    except OutputWriteError as exc:
        raise keep_run_after_failed_write(exc, outcome.save_state, state_path) from None
    except KeyboardInterrupt as exc:  # stopped after training: keep the finished run
        if outcome.save_state is not None:
            outcome.save_state()
        raise InterruptedRun(f"interrupted after training, while evaluating and writing; the finished run is "
                             f"kept in {state_path}: rerun the same command with --resume to write the outputs",
                             signal_number(exc)) from None
    if state_path.exists():
        state_path.unlink()
    _print_summary(outcome.report, output, sha, quiet or report == "-")
    if require_converged and not outcome.report["converged"]:
        raise CheckFailedError(f"{output}: written, but the stopping criterion was not reached in "
                               f"{outcome.report['iterations']} iterations")


class _LiveView:
    """Rich live table on a terminal; a plain log line every 50 iterations otherwise."""

    def __init__(self, cfg, quiet: bool):
        self.cfg = cfg
        self.quiet = quiet
        self.live = Live(console=console, refresh_per_second=4, transient=True) if is_interactive(quiet) else None
        self.start = time.perf_counter()

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def update(self, iteration: int, logged: dict[str, float]) -> None:
        elapsed = logged.get("elapsed", time.perf_counter() - self.start)
        remaining = elapsed / iteration * (self.cfg.max_iters - iteration)
        if self.live:
            table = Table(title="flowtame tame", show_header=False)
            table.add_row("iteration", f"{iteration} / {self.cfg.max_iters}")
            table.add_row("max |d| (screen)", f"{logged['max_abs_d']:.3f}  (stop below ε = {self.cfg.epsilon:.3f})")
            table.add_row("mean d", f"{logged['mean_d']:+.3f} σ_R")
            table.add_row(*_loss_row(logged))
            table.add_row("remember NLL", f"{logged['remember_bpd']:.4f} BPD")
            table.add_row("elapsed / at most remaining", f"{elapsed:.1f} s / {remaining:.1f} s")
            self.live.update(table)
        elif not self.quiet and (iteration % 50 == 0 or iteration == 1):
            label, value = _loss_row(logged)
            console.print(f"iter {iteration:5d}  max|d| {logged['max_abs_d']:.3f} (eps {self.cfg.epsilon:.3f})  "
                          f"{label} {value}  {elapsed:.1f}s", highlight=False)


def _loss_row(logged: dict[str, float]) -> tuple[str, str]:
    """The live view's loss line: the forget and remember terms (Adam's step), or the solved step's size."""
    if "step_rms" in logged:
        return "step (remember RMS)", f"{logged['step_rms']:.3f} σ_R (shrink {logged['shrink']:.2f})"
    return "loss forget / remember", f"{logged['loss_forget']:.4g} / {logged['loss_remember']:.4g}"


def _print_summary(report: dict, output: Path, sha: str, quiet: bool) -> None:
    if quiet:
        return
    state = "converged" if report["converged"] else "did NOT converge"
    console.print(f"{state} after {report['iterations']} iterations in {report['wall_seconds']:.1f} s "
                  f"({report['seconds_per_iteration'] * 1000:.0f} ms/iteration)", highlight=False)
    for req in report["requests"]:
        console.print(f"  forget {req['name']}: n={req['n']}  d in [{req['d_min']:+.2f}, {req['d_max']:+.2f}] σ_R  "
                      f"forgotten {req['forgotten_fraction']:.0%}", highlight=False)
    for name, block in report.get("evaluation", {}).get("sets", {}).items():
        console.print(f"  {name}: QD {block['qd']:+.4f}  mean BPD {block['base_mean_bpd']:.4f} -> "
                      f"{block['tamed_mean_bpd']:.4f}", highlight=False)
    console.print(f"wrote {output} (sha256 {sha[:16]}…)", highlight=False)
