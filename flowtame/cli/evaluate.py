"""``flowtame evaluate``: what taming changed, set by set, and whether it passes the checks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import MofNCompleteColumn, Progress, TaskID
from rich.table import Table

from flowtame.cli import app
from flowtame.cli._common import check_outputs, console, emit_json, is_interactive
from flowtame.data.embedded import resolve_model_path
from flowtame.engine import distributed
from flowtame.errors import CheckFailedError, InputError
from flowtame.io.checkpoint import load_checkpoint


@contextlib.contextmanager
def _progress(live: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A Rich progress bar per model/set pass while ``live``; None (no callback) otherwise."""
    if not live:
        yield None
        return
    tasks: dict[str, TaskID] = {}
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(f"NLL {label}", total=total)
            bar.update(tasks[label], completed=done)

        yield update


def _format_check(check: dict) -> str:
    value = "n/a" if check["value"] is None else f"{check['value']:.4g}"
    return f"{check['name']} ({value}, needs {check['comparison']} {check['bound']:g})"


def _set_table(name: str, s: dict, epsilon: float) -> Table:
    """One set's figures: a row per figure, base | tamed | change."""
    table = Table(title=escape(f"{name} ({s['role']}, n={s['n']})"), title_justify="left")
    for column in ("figure", "base", "tamed", "change"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    change = "n/a" if s["bpd_change_relative"] is None else f"{s['bpd_change_relative']:+.2%}"
    table.add_row("mean NLL (nats)", f"{s['base_mean_nll']:.3f}", f"{s['tamed_mean_nll']:.3f}",
                  f"{s['tamed_mean_nll'] - s['base_mean_nll']:+.3f}")
    table.add_row("mean BPD", f"{s['base_mean_bpd']:.4f}", f"{s['tamed_mean_bpd']:.4f}", change)
    table.add_row("q (change: QD)", f"{s['q_base']:.4f}", f"{s['q_tamed']:.4f}", f"{s['qd']:+.4f}")
    table.add_row("QD 95% interval", "", "", escape(f"[{s['qd_ci_low']:+.4f}, {s['qd_ci_high']:+.4f}]"))
    table.add_row(f"forgotten, d > -{epsilon:.3g}", f"{s['forgotten_fraction_base']:.1%}",
                  f"{s['forgotten_fraction']:.1%}", "")
    d_base, d_tamed = s["d"]["base"], s["d"]["tamed"]
    table.add_row("d min..max (σ_R)", f"{d_base['min']:+.2f}..{d_base['max']:+.2f}",
                  f"{d_tamed['min']:+.2f}..{d_tamed['max']:+.2f}", "")
    ks = s["ks_base_vs_tamed"]
    table.add_row("KS base vs tamed", "", "", f"D {ks['statistic']:.3f} p {ks['pvalue']:.2g}")
    return table


def _threshold_table(block: dict) -> Table:
    """The remember-set fits, thresholds and normality tests of both models."""
    threshold = block["threshold"]
    table = Table(title=f"remember fits, threshold μ_R + {threshold['delta']:g}σ_R", title_justify="left")
    for column in ("figure", "base", "tamed"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    base, tamed = threshold["base"], threshold["tamed"]
    for label, key, digits in (("μ_R (nats)", "mu_nats", 3), ("σ_R (nats)", "sigma_nats", 3),
                               ("μ_R (BPD)", "mu_bpd", 4), ("σ_R (BPD)", "sigma_bpd", 4),
                               ("threshold (nats)", "threshold_nats", 3), ("threshold (BPD)", "threshold_bpd", 4)):
        table.add_row(label, f"{base[key]:.{digits}f}", f"{tamed[key]:.{digits}f}")
    normality = block["normality"]
    table.add_row("KS normality p", *(f"{normality[m]['ks']['pvalue']:.3g}" for m in ("base", "tamed")))
    table.add_row("D'Agostino p", *("n/a" if normality[m]["dagostino"] is None
                                    else f"{normality[m]['dagostino']['pvalue']:.3g}" for m in ("base", "tamed")))
    return table


def _checks_table(block: dict) -> Table:
    table = Table(title="checks")
    for column in ("check", "value", "bound", "result"):
        table.add_column(column, justify="left" if column == "check" else "right")
    for check in block["checks"]:
        value = "n/a" if check["value"] is None else f"{check['value']:.4g}"
        result = "[green]pass[/green]" if check["passed"] else "[bold red]FAIL[/bold red]"
        table.add_row(escape(check["name"]), value, f"{check['comparison']} {check['bound']:g}", result)
    return table


# Over 80 lines only for its Annotated option declarations and help text; the work is in flowtame.likelihood.evaluation.
@app.command()
def evaluate(
    base_model: Annotated[str, typer.Argument(metavar="BASE", help="The base checkpoint.")],
    tamed_model: Annotated[str, typer.Argument(metavar="TAMED", help="The tamed checkpoint.")],
    forget: Annotated[str, typer.Option("--forget", help="The forget set D_F (folder, image, list file or "
                                                         "embedded:digits...).")],
    remember: Annotated[str, typer.Option("--remember", help="The remember set D_R; fixes μ_R, σ_R per model.")],
    forget_unseen: Annotated[str | None, typer.Option("--forget-unseen", help="Unseen images of what was forgotten "
                                                                       "(D'_F).")] = None,
    holdout: Annotated[list[str] | None, typer.Option("--holdout", help="A held-out set (repeatable).")] = None,
    neighbours: Annotated[int, typer.Option("--neighbours", help="Also evaluate the K remember images nearest "
                                                                 "to the forget set in the base model's latent "
                                                                 "space.")] = 0,
    delta: Annotated[float, typer.Option("--delta", help="Forget threshold μ_R + δσ_R, in σ_R units.")] = 4.0,
    epsilon: Annotated[float | None, typer.Option("--epsilon", help="Margin: forgotten when d > -ε (σ_R units) "
                                                             "[0.15·δ].")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the dequantization noise (same for both models) "
                                                     "and of the bootstrap.")] = 0,
    forget_draws: Annotated[int, typer.Option(
        "--forget-draws", min=1, help="Noise draws averaged into each forget image's NLL (one draw moves an "
                                      "image by up to ~0.6 σ_R; see docs/report-schema.md).")] = 8,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples for the QD interval.")] = 1000,
    json_path: Annotated[str | None, typer.Option(
        "--json", help="Write the report as JSON ('-' = stdout only).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write NLL histograms before/after as a PNG.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit with code 1 when a check fails.")] = False,
    min_forgotten_fraction: Annotated[float, typer.Option(help="Check: forget images forgotten, at least.")] = 1.0,
    max_remember_qd: Annotated[float, typer.Option(help="Check: QD(remember), at most.")] = 0.01,
    max_holdout_qd: Annotated[float, typer.Option(help="Check: QD of each holdout set, at most.")] = 0.02,
    max_neighbours_qd: Annotated[float, typer.Option(help="Check: QD(neighbours), at most.")] = 0.02,
    max_remember_bpd_increase: Annotated[float, typer.Option(help="Check: relative increase of the remember "
                                                                  "set's mean BPD, at most (0.01 = 1%).")] = 0.01,
    min_normality_p: Annotated[float, typer.Option(help="Check: KS normality p of the remember NLL under "
                                                        "the tamed model, above.")] = 0.001,
    retrained: Annotated[str | None, typer.Option("--retrained", help="Audit: a model trained without the forget set "
                                                               "(the gold standard; forget quality, "
                                                               "leakage).")] = None,
    generation_audit: Annotated[int, typer.Option("--generation-audit", min=0, metavar="M",
                                                  help="Audit: M samples per model from shared latents; share "
                                                       "near a forget image (needs --holdout).")] = 0,
    generation_temperature: Annotated[float, typer.Option(help="Generation audit: sampling temperature.")] = 0.7,
    radius_quantile: Annotated[float, typer.Option(help="Generation audit: radius = this quantile of the "
                                                        "held-out images' distance to their nearest training "
                                                        "image.")] = 0.05,
    audit_plot: Annotated[Path | None, typer.Option("--audit-plot", help="Write the membership audit's ROC curves and "
                                                                  "NLL histograms (forget vs held-out) per model "
                                                                  "as a PNG.")] = None,
    max_membership_auc_gap: Annotated[float | None, typer.Option(help="Check (opt-in): |AUC - 0.5| of the loss attack "
                                                               "on the tamed model, at most.")] = None,
    max_privacy_leakage: Annotated[float | None, typer.Option(help="Check (opt-in): |relative leakage| against "
                                                            "--retrained, at most.")] = None,
    min_forget_quality: Annotated[float | None, typer.Option(help="Check (opt-in): KS p of tamed vs --retrained NLL "
                                                           "on the forget set, at least.")] = None,
    max_generation_share: Annotated[float | None, typer.Option(help="Check (opt-in): the tamed model's share of "
                                                             "samples near a forget image, at most.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Image files read per batch; on the CPU a wide "
                                                       "model's forward passes take fewer at once.")] = 256,
    precision: Annotated[str, typer.Option("--precision", help="fp32, or bf16/fp16 autocast on CUDA.")] = "fp32",
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image instead of "
                                                          "skipping it.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing --json/--plot files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no tables.")] = False,
) -> None:
    """Compare TAMED with BASE on the forget, remember and held-out sets (nats, BPD, q, QD, KS).

    Both models see the same dequantization noise. QD compares each model with its own μ_R, σ_R, so the
    absolute mean NLL/BPD of each set is reported too. With --check, exits 1 naming each failed check.

    Example: flowtame evaluate base.safetensors tamed.safetensors --forget ./person --remember ./celeba
    --holdout ./test --neighbours 16 --json report.json --plot nll.png --check
    """
    from flowtame.data.images import open_images
    from flowtame.likelihood.auditing import AuditTolerances
    from flowtame.likelihood.evaluation import Tolerances, build_report, check_models, collect_nll, evaluate_models

    inputs = [resolve_model_path(base_model), resolve_model_path(tamed_model), forget, remember, forget_unseen,
              *(holdout or []), retrained]
    check_outputs(force, json_path, plot, audit_plot, inputs=inputs)
    base = load_checkpoint(resolve_model_path(base_model))
    tamed = load_checkpoint(resolve_model_path(tamed_model))
    check_models(base, tamed)
    sources = {"forget": forget, "remember": remember, "forget_unseen": forget_unseen,
               **{f"holdout:{source}": source for source in holdout or []}}
    data_spec = base.image_data("evaluation")
    sets = {name: open_images(source, data_spec, strict=strict) for name, source in sources.items() if source}
    tolerances = Tolerances(min_forgotten_fraction=min_forgotten_fraction, max_remember_qd=max_remember_qd,
                            max_holdout_qd=max_holdout_qd, max_neighbours_qd=max_neighbours_qd,
                            max_remember_bpd_increase=max_remember_bpd_increase,
                            min_normality_p=min_normality_p)
    show = json_path != "-" and not quiet
    # The NLL are collected first so the plot can use them; evaluate_models then reuses them.
    with _progress(is_interactive(not show) and distributed.current().is_main) as progress:
        nll = collect_nll(base, tamed, sets, seed=seed, batch_size=batch_size, device=device,
                          precision=precision, progress=progress, forget_draws=forget_draws)
    block = evaluate_models(base, tamed, sets, delta=delta, epsilon=epsilon, seed=seed, neighbours=neighbours,
                            batch_size=batch_size, device=device, precision=precision, n_boot=n_boot,
                            tolerances=tolerances, precomputed=nll, forget_draws=forget_draws)
    audit_tolerances = AuditTolerances(max_membership_auc_gap=max_membership_auc_gap,
                                       max_privacy_leakage=max_privacy_leakage,
                                       min_forget_quality=min_forget_quality,
                                       max_generation_share=max_generation_share)
    if _audits_requested(holdout, retrained, generation_audit, audit_tolerances, audit_plot):
        _run_audits(block, base, tamed, sets, nll, retrained=retrained, generation=generation_audit,
                    temperature=generation_temperature, radius_quantile=radius_quantile, n_boot=n_boot,
                    tolerances=audit_tolerances, device=device, batch_size=batch_size, precision=precision,
                    plot=audit_plot, force=force)
    if not distributed.current().is_main:
        return  # under torchrun: rank 0 alone reports, writes and checks
    report = build_report(base, tamed, block)
    emit_json(json_path, report)
    if plot is not None:
        _plot(plot, nll, block, force)
    if show:
        _print_tables(block)
    if check and not block["passed"]:
        failed = [_format_check(c) for c in block["checks"] if not c["passed"]]
        raise CheckFailedError(f"{len(failed)} check(s) failed: {'; '.join(failed)}")


def _plot(path: Path, nll: dict, block: dict, force: bool) -> None:
    """Remember and forget NLL histograms of both models, with each model's remember fit and threshold."""
    from flowtame.figures.plots import plot_nll_histograms
    from flowtame.likelihood.statistics import NormalFit

    threshold = block["threshold"]
    panels = {f"{model} ({when})": {name: nll[(model, name)] for name in ("remember", "forget")}
              for model, when in (("base", "before"), ("tamed", "after"))}
    fits = {f"{model} ({when})": NormalFit(threshold[model]["mu_nats"], threshold[model]["sigma_nats"])
            for model, when in (("base", "before"), ("tamed", "after"))}
    plot_nll_histograms(path, panels, fits=fits, delta=threshold["delta"], epsilon=threshold["epsilon"],
                        num_dims=block["num_dims"], force=force)


def _print_tables(block: dict) -> None:
    """Per-set tables, the threshold table, the warnings and the checks."""
    for name, set_block in block["sets"].items():
        console.print(_set_table(name, set_block, block["threshold"]["epsilon"]))
    console.print(_threshold_table(block))
    for warning in block["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if block.get("audits"):
        for table in _audit_tables(block["audits"]):
            console.print(table)
        if block["audits"]["goals"]["tension"]:
            console.print(f"[yellow]tension:[/yellow] {escape(block['audits']['goals']['tension'])}")
    console.print(_checks_table(block))
    console.print("[bold green]all checks passed[/bold green]" if block["passed"]
                  else "[bold red]some checks failed[/bold red]")


def _audits_requested(holdout, retrained, generation: int, tolerances, plot) -> bool:
    """Whether the audits run: always with --holdout; asking for one without it is a usage error."""
    asked = (retrained is not None or generation > 0 or plot is not None
             or any(v is not None for v in tolerances.to_dict().values()))
    if asked and not holdout:
        raise InputError("the audits (--retrained, --generation-audit, audit bounds) need --holdout: held-out "
                         "images the models never saw, from the forget images' distribution")
    return bool(holdout)


def _run_audits(block: dict, base, tamed, sets: dict, nll: dict, *, retrained: str | None, generation: int,
                temperature: float, radius_quantile: float, n_boot: int, tolerances, device: str, batch_size: int,
                precision: str, plot: Path | None, force: bool) -> None:
    """Membership, retrained and generation audits added to ``block`` (see flowtame.likelihood.auditing)."""
    import numpy as np

    from flowtame.figures.sampling import sample_images
    from flowtame.likelihood.auditing import AuditSets, add_audits
    from flowtame.likelihood.evaluation import check_models

    holdout_names = [name for name in sets if name.startswith("holdout:")]
    known = {(m, name): nll[(m, name)] for m in ("base", "tamed") for name in ("forget", "forget_unseen", "remember")
             if (m, name) in nll}
    for m in ("base", "tamed"):
        known[(m, "holdout")] = np.concatenate([nll[(m, name)] for name in holdout_names])
    retrained_ckpt = None
    if retrained is not None:
        retrained_ckpt = load_checkpoint(resolve_model_path(retrained))
        check_models(base, retrained_ckpt)
    samples, sampling = None, None
    if generation:
        models = {"base": base, "tamed": tamed, **({"retrained": retrained_ckpt} if retrained_ckpt else {})}
        drawn = sample_images(list(models.values()), generation, temperature, block["seed"])
        samples = dict(zip(models, drawn, strict=True))
        sampling = {"samples": generation, "temperature": temperature, "seed": block["seed"]}
    audit_sets = AuditSets(forget=[sets["forget"]], remember=sets["remember"],
                           holdout=[sets[name] for name in holdout_names], forget_unseen=sets.get("forget_unseen"))
    scores: dict = {}
    add_audits(block, base, tamed, audit_sets, retrained=retrained_ckpt, samples=samples, sampling=sampling,
               known=known, n_boot=n_boot, radius_quantile=radius_quantile, tolerances=tolerances, device=device,
               batch_size=batch_size, precision=precision, membership_nll=scores)
    if plot is not None:
        from flowtame.figures.audit_plots import plot_membership

        aucs = {m: a["auc"] for m, a in block["audits"]["membership"]["attacks"]["loss"].items()}
        plot_membership(plot, scores["forget"], scores["holdout"], aucs, force=force)


def _audit_tables(audits: dict) -> list[Table]:
    """The membership attacks per model, the goals, and (when run) the retrained and generation audits."""
    membership = audits["membership"]
    table = Table(title=escape(f"membership audit: {membership['n_members']} forget vs {membership['n_nonmembers']} "
                               "held-out images (AUC 0.5 = indistinguishable)"), title_justify="left")
    for column in ("attack", "model", "AUC [95%]", "TPR@1%FPR", "TPR@5%FPR", "outlier TPR@5%FPR"):
        table.add_column(column, justify="left" if column in ("attack", "model") else "right")
    for attack, models in membership["attacks"].items():
        for model, a in models.items():
            table.add_row(attack, model, escape(f"{a['auc']:.3f} [{a['auc_ci_low']:.3f}, {a['auc_ci_high']:.3f}]"),
                          f"{a['tpr']['0.01']['value']:.2f}", f"{a['tpr']['0.05']['value']:.2f}",
                          f"{a['tpr_outlier']['0.05']['value']:.2f}")
    tables = [table]
    goals = audits["goals"]
    table = Table(title="goals", title_justify="left")
    for column in ("goal", "figure", "met"):
        table.add_column(column)
    table.add_row("suppression (beyond μ_R + δσ_R)", f"forgotten {goals['suppression']['forgotten_fraction']:.0%}",
                  str(goals["suppression"]["met"]))
    never = goals["never_trained_on"]
    table.add_row("never trained on (loss AUC ∋ 0.5)", f"AUC {never['auc']:.3f}, {never['reading']}",
                  str(never["met"]))
    tables.append(table)
    if audits["retrained"] is not None:
        table = Table(title="retrained gold standard (its own μ_R, σ_R)", title_justify="left")
        for column in ("set", "retrained mean NLL", "retrained q", "forget quality tamed (KS p)", "base (KS p)"):
            table.add_column(column, justify="left" if column == "set" else "right")
        for name, s in audits["retrained"]["sets"].items():
            quality = s["forget_quality"]
            table.add_row(name, f"{s['mean_nll']:.3f}", f"{s['q']:.4f}", f"{quality['tamed']['pvalue']:.3g}",
                          f"{quality['base']['pvalue']:.3g}")
        tables.append(table)
    if audits["generation"] is not None:
        generation = audits["generation"]
        table = Table(title=f"generation audit: radius {generation['radius']:.3g} (latent units)",
                      title_justify="left")
        for column in ("model", "within radius [95%]", "nearest is forget"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for model, g in generation["models"].items():
            table.add_row(model, escape(f"{g['share']:.2%} [{g['ci_low']:.2%}, {g['ci_high']:.2%}]"),
                          f"{g['share_nearest']:.2%}")
        tables.append(table)
    return tables
