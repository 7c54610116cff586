"""``debias`` on every zoo model (issue 22): two digit classes as groups, a moderate and a far target.

For each model of benchmarks/zoo_models.py (built and cached there), the groups are its digits 0 ("zero") and
1 ("one") of the train split, the remember set is every train digit, and every sample is forced into one of the
two groups (no ``--other``: the issue's setting). The natural share of each group is measured first (the
job's own fixed draw and classifier, seed 0); the group it generates less often is the one moved:

- ``moderate``: that group's share + 10 points;
- ``far``: that group to 80% (80/20 the other way round from the natural ratio).

Each row is :func:`flowtame.jobs.debias.debias` with the package's defaults (lr cap, calibration, early
verdict) plus ``--override``: converged, iterations, wall seconds of the call, seconds per iteration of the
loop, the calibrated lr, the shares before/after on the fixed draw with Wilson 95% intervals and on the
independent check draw, collateral (remember QD and mean-BPD change from the report; holdout ΔBPD = relative
change of the test split's mean BPD, all digits, evaluation noise seed 0; in brackets the same for the digits
2-9 alone, the collateral proper) and, when the target was not reached, why: the early verdict's pace, what it
would need and the remember drift then; the remember-drift guard's drift at the share it refused to stop at; the
budget; and the holdout change over 1%.

    python benchmarks/debias_zoo.py --json /work/cache/zoo/debias-zoo.json            # every model, both targets
    python benchmarks/debias_zoo.py --models wide-glow --targets far --json x.json --resume
    python benchmarks/debias_zoo.py --print /work/cache/zoo/debias-zoo.json             # re-print a saved run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import load_classes  # noqa: E402
from zoo import write_json  # noqa: E402
from zoo_models import DEFAULT_CACHE, ZOO, build, digits_source  # noqa: E402

from flowtame.data.quantization import nats_per_bpd  # noqa: E402
from flowtame.io.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from flowtame.jobs.debias import debias, make_config  # noqa: E402
from flowtame.likelihood.nll import pixel_nll  # noqa: E402
from flowtame.methods.debias import FrequencyMeter, fit_latent_classifier, frequency_table  # noqa: E402

GROUPS = {"zero": 0, "one": 1}
TARGETS = ("moderate", "far")
MODERATE_POINTS = 0.10
FAR_SHARE = 0.80
MAX_HOLDOUT_BPD_CHANGE = 0.01


def natural_shares(base: Checkpoint, groups: dict[str, Any], config) -> dict[str, float]:
    """The base model's share of each group on the job's fixed draw (same classifier, seed and samples)."""
    model = base.model.eval()
    pixels = [s.pixels for s in groups.values()]
    classifier = fit_latent_classifier(model, pixels, base.data_spec.n_bits,
                                       held_out_fraction=config.held_out_fraction,
                                       weight_decay=config.classifier_weight_decay,
                                       max_iter=config.classifier_max_iter, seed=config.seed)
    meter = FrequencyMeter.draw(model, config.samples, config.temperature, config.seed, classifier,
                                base.data_spec.n_bits)
    table = frequency_table(meter.assign(model), list(groups))
    return {name: row["frequency"] for name, row in table["groups"].items()}


def targets_for(kind: str, natural: dict[str, float]) -> dict[str, float]:
    """The targets of a ``moderate`` or ``far`` row: the rarer group + 10 points, or to 80%."""
    rare = min(natural, key=natural.__getitem__)
    share = round(natural[rare] + MODERATE_POINTS, 3) if kind == "moderate" else FAR_SHARE
    return {name: share if name == rare else round(1 - share, 3) for name in natural}


def holdout_bpd(model: torch.nn.Module, holdout, spec) -> np.ndarray:
    """BPD of every holdout image [N] under ``model`` (evaluation noise seed 0)."""
    return np.asarray(pixel_nll(model, holdout.pixels, holdout.keys, spec, 0, torch.device("cpu"))) / nats_per_bpd(
        spec.num_dims)


def debias_row(base: Checkpoint, groups: dict[str, Any], remember, holdout, targets: dict[str, float],
               override: dict[str, Any], holdout_group_keys: list[list[str]] = ()) -> dict[str, Any]:
    """One debias() run and its figures (see the module docstring); ``holdout_group_keys``: the keys of the
    holdout images of each group (the "other digits" holdout change leaves them out)."""
    config = make_config(override)
    start = time.perf_counter()
    outcome = debias(base, groups, targets, config, remember_set=remember, device="cpu")
    total = time.perf_counter() - start
    report = outcome.report
    spec = base.data_spec
    model = outcome.checkpoint.model.eval()
    before_bpd, after_bpd = holdout_bpd(base.model.eval(), holdout, spec), holdout_bpd(model, holdout, spec)
    other = ~np.isin(np.asarray(holdout.keys), [k for key_list in holdout_group_keys for k in key_list])
    holdout_before, holdout_after = float(before_bpd.mean()), float(after_bpd.mean())
    remember_set = report["evaluation"]["sets"]["remember"]
    freq = report["frequencies"]
    return {
        "targets": targets, "converged": report["converged"], "iterations": report["iterations"],
        "total_seconds": total, "loop_seconds": report["wall_seconds"],
        "seconds_per_iteration": report["seconds_per_iteration"], "seconds": report["seconds"],
        "calibration": report.get("calibration"), "lr_reductions": report["lr_reductions"],
        "before": freq["before"], "after": freq["after"], "check_draw": freq.get("check_draw"),
        "remember_qd": remember_set["qd"], "remember_bpd_change": remember_set["bpd_change_relative"],
        "holdout_bpd_before": holdout_before, "holdout_bpd_after": holdout_after,
        "holdout_bpd_change": holdout_after / holdout_before - 1,
        "holdout_other_bpd_change": float(after_bpd[other].mean() / before_bpd[other].mean() - 1),
        "verdict": report.get("verdict"), "verdict_message": report.get("verdict_message"),
        "remember_drift": report.get("remember_drift"),
        "measurements": report.get("measurements"), "config": report["config"],
        "trajectory": [{"iteration": t["iteration"], "samples": t["samples"],
                        "stop_refused": t.get("stop_refused"), "remember_drift": t.get("remember_drift"),
                        **{n: t["groups"][n]["frequency"] for n in targets}} for t in report["trajectory"]],
    }


def why_not(row: dict[str, Any]) -> str:
    """Why a row did not reach its target with holdout ΔBPD <= 1% (empty when it did), from the report's figures:
    the early verdict's pace and projection, the remember-drift guard's drift and share, or the budget; then the
    collateral over its bound."""
    reasons = []
    name = next(n for n, t in row["targets"].items() if t > row["before"]["groups"][n]["frequency"])
    share = row["after"]["groups"][name]["frequency"]
    drifts = [t["remember_drift"] for t in row["trajectory"] if t.get("remember_drift") is not None]
    drift = f", remember drift {100 * drifts[-1]:+.2f}%" if drifts else ""
    verdict, kept = row.get("verdict"), row.get("remember_drift") or {}
    if row["converged"]:
        pass
    elif verdict:
        pace = f"{100 * 100 * verdict['rate']:+.1f} ± {100 * 100 * verdict['rate_se']:.1f} pts/100 it."
        needed = (f"would need ~{verdict['needed']} it. (budget left {verdict['budget_left']})" if verdict["needed"]
                  else "not moving toward it")
        if verdict.get("reason") == "remember drift":
            needed = "no move beyond its noise while the drift is past its bound and not falling"
        reasons.append(f"cannot reach: at it. {verdict['iteration']} {name} {verdict['share']:.3f}, moving {pace} "
                       f"over {verdict['points']} measurements, {needed}{drift}")
    elif kept.get("stop_refusals", 0) and row.get("verdict_message"):  # the remember-drift guard gave up
        refused = [t for t in row["trajectory"] if t.get("stop_refused")]
        reasons.append(f"remember drift {100 * refused[-1]['remember_drift']:+.2f}% > bound "
                       f"{100 * kept['bound']:.2f}% at share {share:.3f} ({len(refused)} stops refused)")
    elif kept.get("within_bound") is False and abs(share - row["targets"][name]) <= row["config"]["tolerance"]:
        reasons.append(f"at its target, but final remember drift {100 * kept['final']:+.2f}% > bound "
                       f"{100 * kept['bound']:.2f}%")
    else:
        reasons.append(f"budget of {row['config']['max_iters']} it. spent, {name} at {share:.3f}{drift}")
    if row["holdout_bpd_change"] > MAX_HOLDOUT_BPD_CHANGE:
        reasons.append(f"holdout ΔBPD {100 * row['holdout_bpd_change']:+.2f}% > 1%")
    return "; ".join(reasons)


def _share(table: dict[str, Any], name: str) -> str:
    g = table["groups"][name]
    return f"{g['frequency']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}]"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The zoo table as Markdown, one line per model x target."""
    lines = ["| model | target | group: natural → target | converged | iters | wall s | s/it | lr (calibrated) | "
             "before [95%] | after [95%] | it. per point | check draw before → after | remember QD | "
             "remember ΔBPD | holdout ΔBPD (other digits) | why not |",
             "| --- | --- | --- | --- |" + " ---: |" * 4 + " --- | --- | ---: | --- |" + " ---: |" * 3 + " --- |"]
    for r in rows:
        d = r["debias"]
        name = next(n for n, t in d["targets"].items() if t > d["before"]["groups"][n]["frequency"])
        check = d.get("check_draw")
        check_text = ("–" if not check else f"{check['before']['groups'][name]['frequency']:.3f} → "
                      f"{check['after']['groups'][name]['frequency']:.3f}")
        lr = d["calibration"]["lr"] if d.get("calibration") else d["config"]["lr"]
        moved = 100 * (d["after"]["groups"][name]["frequency"] - d["before"]["groups"][name]["frequency"])
        per_point = f"{d['iterations'] / moved:.1f}" if moved > 0 else "no move"
        other = "–" if d.get("holdout_other_bpd_change") is None else f"{100 * d['holdout_other_bpd_change']:+.2f}%"
        lines.append(
            f"| {r['model']} | {r['target']} | {name}: {d['before']['groups'][name]['frequency']:.3f} → "
            f"{d['targets'][name]:.3f} | {'yes' if d['converged'] else 'no'} | {d['iterations']} | "
            f"{d['total_seconds']:.0f} | {d['seconds_per_iteration']:.2f} | {lr:.2g} | "
            f"{_share(d['before'], name)} | {_share(d['after'], name)} | {per_point} | {check_text} | "
            f"{d['remember_qd']:+.4f} | "
            f"{100 * d['remember_bpd_change']:+.2f}% | {100 * d['holdout_bpd_change']:+.2f}% ({other}) | "
            f"{why_not(d) or '–'} |")
    return lines


def time_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Where each row's wall time went (seconds, from the report's ``seconds`` block)."""
    parts = ("classifier", "measurement", "calibration", "taming", "check_draw", "evaluation")
    lines = ["| model | target | " + " | ".join(parts) + " | loop measurements (full / screen) | refreshes |",
             "| --- | --- |" + " ---: |" * (len(parts) + 2)]
    for r in rows:
        d, m = r["debias"], r["debias"].get("measurements") or {}
        lines.append(f"| {r['model']} | {r['target']} | " + " | ".join(
            _fmt(d["seconds"].get(p)) for p in parts) + f" | {m.get('full_draw', '–')} / {m.get('screen', '–')} | "
            f"{m.get('refreshes', '–')} |")
    return lines


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def print_results(results: dict[str, Any]) -> None:
    print(f"\ndebias zoo: {results.get('date')}, override {json.dumps(results['override'])}, "
          f"{results.get('machine')}\ncommand: {results.get('command')}\n")
    for line in table_lines(results["rows"]):
        print(line)
    print()
    for line in time_lines(results["rows"]):
        print(line)
    print(f"\nwall s: the debias() call (classifier, measurements, calibration, loop, check draw, evaluation); "
          f"s/it: the loop's seconds per iteration; before/after: the rarer group's share on the fixed draw "
          f"({results['rows'][0]['debias']['config']['samples'] if results['rows'] else '?'} samples); "
          f"it. per point: iterations per point of share moved on the fixed draw; holdout: the test split, all "
          f"digits; time table: seconds of each part of the call (taming = the loop). "
          f"Run time {results.get('total_seconds', 0):.0f} s.")


def model_sets(name: str, base: Checkpoint, cache: Path) -> tuple[dict[str, Any], Any, Any, list[list[str]]]:
    """(groups zero and one of the train split, remember = every train digit, holdout = every test digit, the
    keys of the holdout's zeros and ones)."""
    source = digits_source(name, cache)
    spec = base.data_spec
    groups = {g: load_classes("train", [d], spec, source) for g, d in GROUPS.items()}
    holdout_group_keys = [load_classes("test", [d], spec, source).keys for d in GROUPS.values()]
    return (groups, load_classes("train", list(range(10)), spec, source),
            load_classes("test", list(range(10)), spec, source), holdout_group_keys)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "override": args.override, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}", "command": " ".join(sys.argv), "natural": {}, "rows": []}
    if args.resume and args.json and args.json.exists():
        previous = json.loads(args.json.read_text())
        results.update(rows=previous["rows"], natural=previous["natural"],
                       total_seconds=previous.get("total_seconds", 0))
    done = {(row["model"], row["target"]) for row in results["rows"]}
    start = time.perf_counter() - results.get("total_seconds", 0)
    config = make_config(args.override)
    for name in args.models:
        if all((name, kind) in done for kind in args.targets):
            continue
        base = load_checkpoint(build(name, args.cache))
        groups, remember, holdout, holdout_group_keys = model_sets(name, base, args.cache)
        if name not in results["natural"]:
            results["natural"][name] = natural_shares(base, groups, config)
        for kind in (k for k in args.targets if (name, k) not in done):
            targets = targets_for(kind, results["natural"][name])
            print(f"{name}, {kind} {targets}: debias ...", end="", flush=True)
            row = {"model": name, "target": kind,
                   "debias": debias_row(base, groups, remember, holdout, targets, args.override,
                                        holdout_group_keys)}
            d = row["debias"]
            print(f" {'reached' if d['converged'] else 'not reached'}, {d['iterations']} it., "
                  f"{d['total_seconds']:.0f} s {why_not(d)}", flush=True)
            results["rows"].append(row)
            results["total_seconds"] = time.perf_counter() - start
            if args.json:
                write_json(args.json, results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--override", type=json.loads, default={}, help="JSON of DebiasConfig keys")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every row here (after each row)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json")
    parser.add_argument("--print", type=Path, default=None, metavar="JSON", help="only re-print a --json file")
    args = parser.parse_args()
    if args.print:
        print_results(json.loads(args.print.read_text()))
        return
    torch.set_num_threads(args.threads)
    print_results(run(args))


if __name__ == "__main__":
    main()
