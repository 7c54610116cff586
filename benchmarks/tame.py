"""flowtame tame vs the authors' released loop, on the same base model, forget and remember sets.

Prints, for both: iterations, converged, wall seconds, seconds per iteration, final QD on the forget set
and on the remember set (each model against its own remember normal, paired evaluation noise), the
change of mean holdout BPD, and the wall-time ratio.

    python benchmarks/tame.py [--model embedded:glow-digits] [--digit 3] [--k 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.io.checkpoint import load_checkpoint
from flowtame.jobs.tame import make_config, tame
from flowtame.likelihood.nll import pixel_nll
from flowtame.likelihood.statistics import fit_normal, quantile_drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--digit", type=int, default=3, help="the 'identity': forget images of this class")
    parser.add_argument("--k", type=int, default=4, help="forget images, chosen near the class median NLL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-iters", type=int, default=800)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_loop import run_reference

    from flowtame.likelihood.protocol import median_nearest

    base = load_checkpoint(resolve_model_path(args.model))
    spec = base.data_spec
    identity = open_images(f"embedded:digits:train:{args.digit}", spec)
    chosen, _ = median_nearest(base.model, identity, args.k, device="cpu")
    id_pixels, id_keys = identity.load_tensor()
    forget = id_pixels[chosen]
    forget_keys = [id_keys[i] for i in chosen]
    remember_set = open_images("embedded:digits:train", spec)
    r_pixels, r_keys = remember_set.load_tensor()
    keep = [i for i, k in enumerate(r_keys) if k not in set(forget_keys)]
    remember, remember_keys = r_pixels[keep], [r_keys[i] for i in keep]
    holdout_pixels, holdout_keys = open_images("embedded:digits:test", spec).load_tensor()
    cpu = torch.device("cpu")

    def measure(model) -> dict:
        model.eval()
        out = {}
        for name, (px, keys) in {"forget": (forget, forget_keys), "remember": (remember, remember_keys),
                                 "holdout": (holdout_pixels, holdout_keys)}.items():
            out[name] = pixel_nll(model, px, keys, spec, 0, cpu, draws=8 if name == "forget" else 1)
        return out

    base_nll = measure(base.model)
    base_fit = fit_normal(base_nll["remember"])

    def summary(nll: dict) -> dict:
        fit = fit_normal(nll["remember"])
        d = (nll["forget"] - (fit.mean + 4 * fit.std)) / fit.std
        return {
            "qd_forget": quantile_drop(base_nll["forget"], nll["forget"], base_fit, fit)["qd"],
            "qd_remember": quantile_drop(base_nll["remember"], nll["remember"], base_fit, fit)["qd"],
            "holdout_bpd_change_pct": 100 * (nll["holdout"].mean() / base_nll["holdout"].mean() - 1),
            "final_d": np.round(d, 2).tolist(),
        }

    # (1) the authors' loop
    ref_model = copy.deepcopy(base.model)
    ref = run_reference(ref_model, forget, remember, spec.n_bits, max_iters=args.max_iters)
    ref_summary = summary(measure(ref_model))

    # (2) flowtame tame, default configuration
    forget_set = _TensorSet("forget", forget, forget_keys)
    remember_tensor_set = _TensorSet("remember", remember, remember_keys)
    start = time.perf_counter()
    outcome = tame(base, [forget_set], remember_tensor_set, make_config({"max_iters": args.max_iters}), device="cpu")
    flowtame_wall = time.perf_counter() - start
    ft_summary = summary(measure(outcome.checkpoint.model))

    rows = [("authors' loop", ref.iterations, ref.converged, ref.wall_seconds, ref_summary),
            ("flowtame tame", outcome.report["iterations"], outcome.report["converged"],
             outcome.report["wall_seconds"], ft_summary)]
    print(f"model {args.model}; forget {args.k} images of digit {args.digit} (near the class median NLL); "
          f"remember {len(remember)} train images; holdout {len(holdout_pixels)} test images; "
          f"{args.threads} CPU threads")
    print(f"{'':15s} {'iters':>6s} {'conv':>5s} {'wall s':>8s} {'s/iter':>8s} {'QD(D_F)':>8s} {'QD(D_R)':>9s} "
          f"{'holdout BPD':>11s}  final d (sigma_R)")
    for name, iters, conv, wall, s in rows:
        print(f"{name:15s} {iters:6d} {str(conv):>5s} {wall:8.1f} {wall / max(iters, 1):8.4f} "
              f"{s['qd_forget']:8.4f} {s['qd_remember']:9.5f} {s['holdout_bpd_change_pct']:+10.3f}%  {s['final_d']}")
    print(f"flowtame total including loading, the base fit and the final evaluation passes: {flowtame_wall:.1f} s")
    print(f"wall-time ratio (authors' loop / flowtame): {ref.wall_seconds / outcome.report['wall_seconds']:.1f}x"
          + ("" if ref.converged else " (the authors' loop did not reach the criterion in its budget)"))


class _TensorSet:
    """An in-memory image set with the ImageSet interface tame() reads (name, load_tensor, skipped)."""

    def __init__(self, name: str, pixels: torch.Tensor, keys: list[str]):
        self.name, self._pixels, self._keys, self.skipped = name, pixels, keys, []

    def load_tensor(self):
        return self._pixels, list(self._keys)


if __name__ == "__main__":
    main()
