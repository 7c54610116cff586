"""The solved step's remember-mean recovery, step by step (docs/benchmarks.md "Round 13").

Runs :func:`zoo.tame_row` (the package's defaults + ``--override``) on one zoo model and k and prints, after
every solved step, the remember drift (relative rise of the refresh subset's mean NLL over N_B), what the mean
row asked of the step (nats, after the step's shrink) and what the mean did, the step's predicted RMS change of
the remember images' NLL (``step_rms``, sigma_R) and half its square in nats (``half_rms2``: the mean's
second-order rise were the metric, the remember images' Fisher, their NLL's Hessian), the shrink and the forget
images' d range (sigma_R), and the stop's verdict (a stop, "short": a forget image outside the band, or the
guards and holds that refused it, with the holds' figures: the look-alikes' and the remember set's quantile
drop and the whole set's KS normality p where they were judged); then the scored row. ``--metric-damping``,
``--mean-rows`` and ``--mean-averaging`` replace the solved step's SOLVE_METRIC_DAMPING, MEAN_ROWS and
MEAN_CHANGE_AVERAGING for the run (the sweeps of Round 13).

    python benchmarks/recovery_trace.py --model embedded-glow --k 15 --metric-damping 3e-4 --json /tmp/t.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import add_cell_arguments, load_cell, tame_row, write_json  # noqa: E402

from flowtame.methods import solved  # noqa: E402
from flowtame.methods.lookalikes import QuantileHold  # noqa: E402


def traced(trace: list[dict[str, Any]]):
    """A replacement for ``SolvedTaming.own_step`` that calls it and appends the step's mean-row figures (the
    targets it solved for kept by a wrapper of ``_targets``)."""
    original, original_targets = solved.SolvedTaming.own_step, solved.SolvedTaming._targets
    solved_for: list[Any] = [None]

    def targets(self: solved.SolvedTaming) -> Any:
        solved_for[0] = original_targets(self)
        return solved_for[0]

    solved.SolvedTaming._targets = targets  # type: ignore[method-assign]
    original_after = solved.SolvedTaming.after_step

    def after_step(self: solved.SolvedTaming, model: Any, iteration: int, logged: dict[str, float]) -> bool:
        before = _refusals(self)
        judged.clear()
        done = original_after(self, model, iteration, logged)
        if trace and trace[-1]["it"] == iteration:
            now = _refusals(self)
            refused = [key for key in now if now[key] > before[key]]
            verdict = "stop" if done else ", ".join(refused) if refused else "short"
            figures = dict(judged)
            trace[-1]["verdict"] = verdict
            trace[-1]["holds"] = figures
            shown = " ".join(f"{key} {value:.4f}" for key, value in figures.items())
            print(f"    verdict: {verdict}  {shown}", flush=True)
        return done

    solved.SolvedTaming.after_step = after_step  # type: ignore[method-assign]
    judged: dict[str, float] = {}  # this step's holds' figures, as they are judged (the method's state untouched)
    original_kept, original_ks = QuantileHold.kept, solved.ks_normality

    def kept(self: QuantileHold, nll: Any, now: Any) -> bool:
        judged[self.keys[0]] = self.drop(nll, now)
        return original_kept(self, nll, now)

    def ks_normality(nll: Any) -> dict[str, Any]:
        result = original_ks(nll)
        judged["normality_p"] = float(result["pvalue"])
        return result

    QuantileHold.kept = kept  # type: ignore[method-assign]
    solved.ks_normality = ks_normality  # type: ignore[assignment]

    def own_step(self: solved.SolvedTaming, model: Any, iteration: int) -> dict[str, Any]:
        before = None if self.forget_nll_now is None else float(self.mu_r)
        out = original(self, model, iteration)
        base, after = float(self.data.base_mean), float(self.mu_r)
        sigma = float(out["sigma_r"])
        entry = {"it": iteration, "drift": (after - base) / base, "asked": float(solved_for[0][-1] * out["shrink"]),
                 "realized": None if before is None else after - before, "shrink": float(out["shrink"]),
                 "step_rms": float(out["step_rms"]), "half_rms2": 0.5 * (float(out["step_rms"]) * sigma) ** 2,
                 "min_d": float(out["min_d"]), "max_d": float(out["max_d"])}
        trace.append(entry)
        realized = "-" if entry["realized"] is None else f"{entry['realized']:+.2f}"
        print(f"{iteration:3d} drift {100 * entry['drift']:+.3f}% asked {entry['asked']:+.2f} realized {realized} "
              f"step_rms {entry['step_rms']:.3f} half_rms2 {entry['half_rms2']:.2f} shrink {entry['shrink']:.2f} "
              f"d [{entry['min_d']:+.2f}, {entry['max_d']:+.2f}]", flush=True)
        return out

    return own_step


def _refusals(method: solved.SolvedTaming) -> dict[str, int]:
    """The method's refusal counters: the drift guard, the whole set, the normality hold and each quantile hold."""
    counts = {"drift": method.drift_refusals, "whole set": method.whole_set_refusals,
              "normality": method.normality_refusals}
    for hold in method.quantile_holds:
        counts[hold.keys[1]] = hold.refusals
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser, model="embedded-glow", k=15)
    parser.add_argument("--metric-damping", type=float, help="the solved step's metric damping")
    parser.add_argument("--mean-rows", type=int, help="images per mean-row batch")
    parser.add_argument("--mean-averaging", type=float, help="weight of the past in the mean row's average")
    parser.add_argument("--json", type=Path, required=True, help="write the trace and the scored row here")
    args = parser.parse_args()
    if args.metric_damping is not None:
        solved.SolvedTaming.metric_damping = args.metric_damping
    if args.mean_rows is not None:
        solved.MEAN_ROWS = args.mean_rows
    if args.mean_averaging is not None:
        solved.MEAN_CHANGE_AVERAGING = args.mean_averaging
    base, proto = load_cell(args)
    trace: list[dict[str, Any]] = []
    solved.SolvedTaming.own_step = traced(trace)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="flowtame-recovery-") as workdir:
        row = tame_row(base, proto, args.override, Path(workdir))
    write_json(args.json, {"model": args.model, "k": args.k, "metric_damping": solved.SolvedTaming.metric_damping,
                           "mean_rows": solved.MEAN_ROWS, "mean_averaging": solved.MEAN_CHANGE_AVERAGING,
                           "row": row, "trace": trace})
    keys = ("converged", "iterations", "total_seconds", "holdout_bpd_change", "qd_remember", "qd_neighbours",
            "evaluate_passed", "aborted")
    print({key: row.get(key) for key in keys})


if __name__ == "__main__":
    main()
