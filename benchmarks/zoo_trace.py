"""Per-iteration trace of one zoo run (issue 23, round 3b): why a model forgets slowly.

Runs :func:`zoo.tame_row` (the package's defaults + ``--override``) on one zoo model and k, and records after
every step the method's state: each forget image's latest confirmed d (sigma_R), the training forwards' min d
and max |d|, the remember drift (relative rise of the remember mean NLL over the base model's), shift_factor,
drift / whole-set refusals, confirmations, the forget weights and the settle lr factor. Writes the trace and
the scored row as JSON, and prints a summary every ``--every`` iterations.

    python benchmarks/zoo_trace.py --model realnvp --k 8 --json /work/cache/zoo/d24/base.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import add_cell_arguments, load_cell, tame_row, write_json  # noqa: E402

from flowtame.likelihood.nll import pixel_nll  # noqa: E402
from flowtame.methods.solved import SolvedTaming  # noqa: E402
from flowtame.methods.taming import TamingMethod  # noqa: E402


def lookalike_figures(method: TamingMethod, model: torch.nn.Module, proto: Any) -> dict[str, Any]:
    """The look-alikes' state under ``model``: whether the anchor's look-alikes are evaluate's neighbours
    (``same_as_neighbours``), their mean z = (NLL - mu_R)/sigma_R under the base model's whole-set normal and
    under the current refreshed mu_R, sigma_R (evaluation noise of seed 0), and the QD they would show (mean
    q_base - q_tamed, as :func:`flowtame.likelihood.statistics.quantile_drop` with the refreshed normal)."""
    rows = method.data.lookalikes
    if rows is None:
        return {}
    idx = rows.tolist()
    spec, cpu = method.data.data_spec, torch.device("cpu")
    pixels, keys = proto.remember.pixels[idx], [proto.remember.keys[i] for i in idx]
    was_training = model.training
    model.eval()
    nll = pixel_nll(model, pixels, keys, spec, 0, cpu)
    model.train(was_training)
    base = method.lookalike_base if hasattr(method, "lookalike_base") else None
    if base is None:
        base = pixel_nll(method.base_model, pixels, keys, spec, 0, cpu)
        method.lookalike_base = base
    mu_b, sd_b = float(method.data.base_mean), float(method.data.base_std)
    mu_t, sd_t = float(method.mu_r), float(method.sigma_r)
    z_base, z_now = (base - mu_b) / sd_b, (nll - mu_t) / sd_t
    return {"same_as_neighbours": sorted(idx) == sorted(proto.neighbours.indices.tolist()),
            "la_z_base": float(z_base.mean()), "la_z": float(z_now.mean()),
            "la_qd": float(stats.norm.sf(z_base).mean() - stats.norm.sf(z_now).mean()),
            "la_rise": float(((nll - base) / sd_b).mean())}


def traced(trace: list[dict[str, Any]], every: int, proto: Any = None, cls: type = TamingMethod):
    """A replacement for ``cls.after_step`` (TamingMethod's, or SolvedTaming's own) that calls it, then appends
    the method's state; with ``proto``, also the look-alikes' figures (:func:`lookalike_figures`) every
    iteration."""
    original = cls.after_step

    def after_step(self: TamingMethod, model: torch.nn.Module, iteration: int, logged: dict[str, float]) -> bool:
        confirmations = self.confirmations
        done = original(self, model, iteration, logged)
        entry = {"it": iteration, "min_d": logged.get("min_d"), "max_abs_d": logged.get("max_abs_d"),
                 "mean_d": logged.get("mean_d"), "remember_bpd": logged.get("remember_bpd"),
                 "anchor": logged.get("anchor"),
                 "drift": self.remember_drift(), "shift_factor": self.shift_factor,
                 "drift_refusals": self.drift_refusals, "whole_set_refusals": self.whole_set_refusals,
                 "confirmations": self.confirmations, "lr_factor": self.lr_factor,
                 "lookalike_refusals": getattr(self.lookalike_hold, "refusals", 0),
                 "forget_weight": [round(float(w), 3) for w in self.forget_weight.flatten()],
                 "smoothed_d": [round(float(v), 3) for v in self.latest_d.flatten()]}
        if proto is not None:
            entry.update(lookalike_figures(self, model, proto), lr=logged.get("lr"))
        if self.confirmations > confirmations and self.confirmed_d is not None:
            entry["confirmed_d"] = [round(float(v), 3) for v in self.confirmed_d.flatten()]
        trace.append(entry)
        if iteration % every == 0 or "confirmed_d" in entry or done:
            print(f"{iteration:4d} min_d {entry['min_d']:+.2f} max|d| {entry['max_abs_d']:.2f} "
                  f"drift {100 * entry['drift']:.3f}% shift x{entry['shift_factor']:g} "
                  f"refusals {entry['drift_refusals']}/{entry['whole_set_refusals']} "
                  f"conf {entry['confirmations']} lr_f {entry['lr_factor']:.2f} "
                  f"w {max(entry['forget_weight']):.2f}" + (f" d {entry['confirmed_d']}" if "confirmed_d" in entry
                                                            else "")
                  + (f" la_qd {entry['la_qd']:+.4f} la_rise {entry['la_rise']:+.3f} la_ref "
                     f"{entry['lookalike_refusals']}" if "la_qd" in entry
                     else ""), flush=True)
        return done

    return after_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser, model="realnvp", k=8)
    parser.add_argument("--every", type=int, default=20, help="print a line every N iterations [20]")
    parser.add_argument("--lookalikes", action="store_true",
                        help="also trace the look-alikes' NLL and QD every iteration (16 images per step)")
    parser.add_argument("--json", type=Path, required=True, help="write the trace and the scored row here")
    args = parser.parse_args()
    base, proto = load_cell(args)
    trace: list[dict[str, Any]] = []
    for cls in (TamingMethod, SolvedTaming):  # (the solved step judges its stop in its own after_step)
        cls.after_step = traced(trace, args.every, proto if args.lookalikes else None, cls)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="flowtame-trace-") as workdir:
        row = tame_row(base, proto, args.override, Path(workdir), stop_as_row=True)  # Ctrl-C: keep the trace
    write_json(args.json, {"model": args.model, "k": args.k, "override": args.override, "row": row,
                           "trace": trace})
    keys = ("converged", "iterations", "total_seconds", "holdout_bpd_change", "evaluate_passed", "aborted")
    print({key: row.get(key) for key in keys})


if __name__ == "__main__":
    main()
