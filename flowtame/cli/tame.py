"""``flowtame tame``: make chosen images unlikely while the rest of the distribution stays as it was."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import typer
from rich.live import Live
from rich.table import Table

from flowtame.cli import app
from flowtame.cli._common import console, emit_json, err_console, is_interactive, state_path_for
from flowtame.data.embedded import resolve_model_path
from flowtame.errors import CheckFailedError, InterruptedRun
from flowtame.io.checkpoint import load_checkpoint, save_checkpoint
from flowtame.io.fileio import check_output_path


@app.command("tame")
def tame_command(
    model: str = typer.Argument(..., help="Base checkpoint (.safetensors) or embedded:glow-digits. Never modified."),
    forget: list[str] = typer.Option(..., "--forget", "-f", help="Images to forget (folder, image, list file, "
                                     "embedded:digits...). Repeat for several requests."),
    remember: str = typer.Option(..., "--remember", "-r", help="Images whose distribution must stay as it was."),
    output: Path = typer.Option(..., "--output", "-o", help="Tamed checkpoint to write (.safetensors)."),
    report: str = typer.Option(None, "--report", help="Write the JSON report here ('-' = stdout)."),
    holdout: list[str] = typer.Option(None, "--holdout", help="Held-out images to evaluate on (repeatable)."),
    config: Path = typer.Option(None, "--config", help="YAML file with any of the keys below; flags win."),
    preset_name: str = typer.Option(None, "--preset", help="Start from a shipped preset: 'paper' = the "
                                    "authors' exact loss and hyperparameters."),
    method: str = typer.Option(None, help="taming (default) | neggrad | selective-amnesia (baselines)."),
    target: str = typer.Option(None, help="Where to stop: threshold (the paper's mu_R + delta*sigma_R: "
                               "suppression) | holdout (the --holdout images' NLL interquartile band: forget to "
                               "the level of never-seen images; docs/audits.md) [threshold]."),
    generation_audit: int = typer.Option(0, "--generation-audit", min=0, metavar="M",
                                         help="With --holdout: also audit M samples per model from shared "
                                              "latents (share near a forget image)."),
    delta: float = typer.Option(None, help="Threshold in remember std units: mu_R + delta*sigma_R [4]."),
    epsilon: float = typer.Option(None, help="Stop when |d| < epsilon for every forget image [0.15*delta]."),
    alpha: float = typer.Option(None, help="Weight of the forget loss, L = a*L_F + (1-a)*L_R [0.15]."),
    gamma: float = typer.Option(None, help="Weight of the KL terms inside L_R [0.6]."),
    lr: float = typer.Option(None, help="Adam peak learning rate [2e-4]."),
    batch_size: int = typer.Option(None, help="Forget and remember images per iteration (each) [32]."),
    max_iters: int = typer.Option(None, help="Iteration budget [800]."),
    refresh_every: int = typer.Option(None, help="Re-estimate mu_R, sigma_R every N iterations [10]."),
    refresh_size: int = typer.Option(None, help="Remember images used for each re-estimate [256]."),
    warmup: int = typer.Option(None, help="Linear learning-rate warm-up iterations [20]."),
    grad_clip: float = typer.Option(None, help="Clip the gradient norm to this value."),
    forget_loss: str = typer.Option(None, help="huber | squared | sigmoid (the paper's)."),
    forget_unit: str = typer.Option(None, help="Unit of the forget gap: sigma | bpd (the paper's) | nats."),
    kl_estimate: str = typer.Option(None, help="N_T estimate: refreshed | batch (the paper's)."),
    threshold_gradient: bool = typer.Option(None, "--threshold-gradient/--no-threshold-gradient",
                                            help="Differentiate the forget loss through mu_R + delta*sigma_R."),
    settle_decay: float = typer.Option(None, help="Per-iteration learning-rate decay while every forget image "
                                       "is within 2*epsilon of the threshold (1 = off) [0.97]."),
    stop_margin: float = typer.Option(None, help="Stop only when every forget image's d (in sigma_R) is above "
                                      "-epsilon + this margin, so it still counts as forgotten on noise the run "
                                      "never saw (0 = the paper's |d| < epsilon; docs/method.md) [0]."),
    forget_draws: int = typer.Option(None, help="Noise draws averaged into each forget image's NLL in the "
                                     "stopping test and the report [8]."),
    max_remember_drift: float = typer.Option(None, help="Stopping guard: refuse to stop while the remember set's "
                                             "mean NLL is up by more than this fraction (0 = off) [0.008 for taming, "
                                             "0.05 for the baselines]."),
    max_remember_jump: float = typer.Option(None, help="Blow-up guard: roll back and halve the learning rate when "
                                            "a remember batch's mean BPD is this fraction above the base "
                                            "model's (0 = off) [0.25]."),
    freeze: str = typer.Option(None, help="Parameters held fixed: coupling-outputs (each coupling network's "
                               "zero-initialized last layer) | none [coupling-outputs for taming, none for "
                               "the baselines]."),
    seed: int = typer.Option(None, help="Seed: CPU runs are bit-for-bit repeatable [0]."),
    eval_seed: int = typer.Option(None, help="Seed of the fixed evaluation / stopping-check noise [0]."),
    precision: str = typer.Option(None, help="fp32 | bf16 | fp16 (autocast, CUDA only)."),
    sa_lambda: float = typer.Option(None, help="selective-amnesia: EWC penalty weight lambda."),
    sa_replay_weight: float = typer.Option(None, help="selective-amnesia: weight of generative replay."),
    sa_fisher_samples: int = typer.Option(None, help="selective-amnesia: base-model samples for the Fisher."),
    sa_surrogate: str = typer.Option(None, help="selective-amnesia: 'uniform' noise images or a folder."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its saved state."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    strict: bool = typer.Option(False, "--strict", help="Treat unreadable image files as errors."),
    require_converged: bool = typer.Option(False, "--require-converged",
                                           help="Exit 1 when the stopping criterion was not reached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live view; plain log lines only at the end."),
) -> None:
    """Tame MODEL so every --forget image reaches the likelihood threshold, keeping --remember intact.

    Example: flowtame tame base.safetensors --forget ./person --remember ./celeba -o tamed.safetensors
    --report report.json
    """
    from flowtame.data.images import open_images
    from flowtame.jobs.tame import make_config, preset, read_config_file, tame, taming_audits, taming_evaluation

    layers = []
    if preset_name:
        layers.append(preset(preset_name))
    if config:
        layers.append(read_config_file(config))
    flags = dict(method=method, target=target, delta=delta, epsilon=epsilon, alpha=alpha, gamma=gamma, lr=lr,
                 batch_size=batch_size, max_iters=max_iters, refresh_every=refresh_every,
                 refresh_size=refresh_size, warmup=warmup, grad_clip=grad_clip, forget_loss=forget_loss,
                 forget_unit=forget_unit, kl_estimate=kl_estimate, threshold_gradient=threshold_gradient,
                 settle_decay=settle_decay, stop_margin=stop_margin, forget_draws=forget_draws,
                 max_remember_drift=max_remember_drift, max_remember_jump=max_remember_jump,
                 freeze=freeze, seed=seed, eval_seed=eval_seed,
                 precision=precision, sa_lambda=sa_lambda, sa_replay_weight=sa_replay_weight,
                 sa_fisher_samples=sa_fisher_samples, sa_surrogate=sa_surrogate)
    cfg = make_config(*layers, flags)
    check_output_path(output, force or resume)
    if report not in (None, "-"):
        check_output_path(report, force or resume)
    state_path = state_path_for(output)
    base = load_checkpoint(resolve_model_path(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forget_sets = [open_images(f, base.data_spec, strict=strict) for f in forget]
        remember_set = open_images(remember, base.data_spec, strict=strict)
        holdout_sets = {f"holdout:{h}": open_images(h, base.data_spec, strict=strict) for h in holdout or []}
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {w.message}")

    view = _LiveView(cfg, quiet)
    try:
        with view:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome = tame(base, forget_sets, remember_set, cfg, device=device, state_path=state_path,
                               resume=resume, callback=view.update, target_holdout=list(holdout_sets.values()))
            for w in caught:
                err_console.print(f"[yellow]warning:[/] {w.message}")
    except InterruptedRun as exc:
        partial = getattr(exc, "partial_report", None)
        if partial is not None and report not in (None, "-"):
            emit_json(report, partial)
        raise
    evaluation = taming_evaluation(base, outcome, holdout_sets, cfg, device=device)
    outcome.report["evaluation"] = evaluation
    if holdout_sets:
        taming_audits(base, outcome, forget_sets, remember_set, holdout_sets, cfg, device=device,
                      generation_samples=generation_audit)
    sha = save_checkpoint(output, outcome.checkpoint, force=True)
    outcome.report["output"] = {"path": str(output), "sha256": sha}
    emit_json(report, outcome.report)
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
            table.add_row("loss forget / remember", f"{logged['loss_forget']:.4g} / {logged['loss_remember']:.4g}")
            table.add_row("remember NLL (batch)", f"{logged['remember_bpd']:.4f} BPD")
            table.add_row("elapsed / at most remaining", f"{elapsed:.1f} s / {remaining:.1f} s")
            self.live.update(table)
        elif not self.quiet and (iteration % 50 == 0 or iteration == 1):
            console.print(f"iter {iteration:5d}  max|d| {logged['max_abs_d']:.3f} (eps {self.cfg.epsilon:.3f})  "
                          f"L_F {logged['loss_forget']:.4g}  L_R {logged['loss_remember']:.4g}  "
                          f"{elapsed:.1f}s", highlight=False)


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
