"""One row of the ``debias`` zoo (benchmarks/debias_zoo.py) with a settings override, and where the NLL moved.

Runs :func:`flowtame.jobs.debias.debias` on one zoo model and target kind exactly as the zoo does (groups: the
train zeros and ones; remember: every train digit, or with ``--remember groups`` the default remember set, the
groups' own images), then measures the mean NLL (nats, evaluation noise seed 0) of every digit class of the
train and test splits under the base and the debiased model: which digits paid for the move. Prints one JSON
summary line, the per-digit changes and the trajectory; ``--json`` keeps everything (report figures, per-digit
NLLs, engine trajectory).

    python benchmarks/debias_row.py realnvp moderate --override '{"anchor": 0.2}' --json /work/cache/x.json
    python benchmarks/debias_row.py embedded-glow moderate --remember groups --json y.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from debias_zoo import TARGETS, model_sets, natural_shares, targets_for  # noqa: E402
from protocol import load_classes  # noqa: E402
from zoo_models import DEFAULT_CACHE, ZOO, build, digits_source  # noqa: E402

from flowtame.io.checkpoint import load_checkpoint  # noqa: E402
from flowtame.jobs.debias import debias, make_config  # noqa: E402
from flowtame.likelihood.nll import pixel_nll  # noqa: E402


def per_digit_nll(base, model, name: str, cache: Path) -> dict[str, list[float]]:
    """{"train0": [mean NLL base, mean NLL debiased, n], ...} for every split and digit (nats)."""
    spec, source, out = base.data_spec, digits_source(name, cache), {}
    for split in ("train", "test"):
        for digit in range(10):
            s = load_classes(split, [digit], spec, source)
            nll = [float(pixel_nll(m, s.pixels, s.keys, spec, 0, torch.device("cpu")).mean())
                   for m in (base.model.eval(), model.eval())]
            out[f"{split}{digit}"] = [*nll, int(s.pixels.shape[0])]
    return out


def pooled_change(per: dict[str, list[float]], split: str, digits: range) -> float:
    """Relative change of the mean NLL over the images of ``digits`` in ``split`` (per-digit means pooled by n)."""
    rows = [per[f"{split}{d}"] for d in digits]
    n = sum(r[2] for r in rows)
    return sum(r[1] * r[2] for r in rows) / sum(r[0] * r[2] for r in rows) - 1 if n else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_checkpoint(build(args.model, args.cache))
    groups, remember, _, _ = model_sets(args.model, base, args.cache)
    config = make_config(args.override)
    natural = (json.loads(args.natural_from.read_text())["natural"].get(args.model)
               if args.natural_from and args.natural_from.exists() else None)
    targets = targets_for(args.target, natural or natural_shares(base, groups, config))
    start = time.perf_counter()
    outcome = debias(base, groups, targets, config, remember_set=None if args.remember == "groups" else remember,
                     device="cpu")
    wall = time.perf_counter() - start
    report = outcome.report
    per = per_digit_nll(base, outcome.checkpoint.model, args.model, args.cache)
    result = {
        "model": args.model, "target": args.target, "override": args.override, "remember": args.remember,
        "targets": targets, "wall": wall, "converged": report["converged"], "iterations": report["iterations"],
        "calibration": report.get("calibration"), "verdict_message": report.get("verdict_message"),
        "remember_drift": report.get("remember_drift"), "after": report["frequencies"]["after"]["groups"],
        "check": report["frequencies"].get("check_draw"), "per_class": per,
        "traj": [{k: t.get(k) for k in ("iteration", "samples", "remember_drift", "stop_refused", "step_scale")}
                 | {g: t["groups"][g]["frequency"] for g in targets} for t in report["trajectory"]],
        "engine_trajectory": report.get("engine_trajectory"), "threshold": report["evaluation"].get("threshold")}
    for split in ("train", "test"):
        result[f"{split}_change_all"] = pooled_change(per, split, range(10))
        result[f"{split}_change_nongroup"] = pooled_change(per, split, range(2, 10))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(ZOO))
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--override", type=json.loads, default={}, help="JSON of DebiasConfig keys")
    parser.add_argument("--remember", choices=("digits", "groups"), default="digits",
                        help="every train digit (the zoo's), or the default remember set (the groups' images)")
    parser.add_argument("--natural-from", type=Path, default=None, metavar="JSON",
                        help="take the natural shares from a debias_zoo.py --json file instead of measuring them")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("traj", "per_class", "check", "engine_trajectory", "threshold")}))
    for key, (before, after, n) in result["per_class"].items():
        print(f"{key} {before:.1f} -> {after:.1f} ({100 * (after / before - 1):+.2f}%) n={n}")
    for row in result["traj"]:
        print(row)


if __name__ == "__main__":
    main()
