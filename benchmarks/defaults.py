"""The measurements behind taming's defaults: one forget request on the embedded model, several configs.

D_F: the k train images of one digit nearest that digit's median NLL (the protocol's choice); D_R: the whole
train split (the other images of the same digit included, the harder "forget these images, not the class"
case); holdout: the test split. Each config (JSON, merged over the shipped defaults) runs through
:func:`flowtame.jobs.tame.tame` and prints iterations, converged, the largest |d| of D_F, QD and relative mean-BPD
change of D_R and of the holdout, the training loop's seconds and the whole run's (evaluation included).

    python benchmarks/defaults.py --digit 3 --k 4 '{}' '{"alpha": 0.3}' '{"alpha": 0.6}'

``--mu-r-until N`` also prints the refreshed remember mean mu_R (BPD) at every trajectory point up to
iteration N: the early rise of the remember likelihoods that holding the coupling outputs fixed removes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.data.quantization import nats_per_bpd
from flowtame.io.checkpoint import load_checkpoint
from flowtame.jobs.tame import make_config, tame, taming_evaluation
from flowtame.likelihood.protocol import median_nearest, write_pngs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="JSON objects of TameConfig keys, e.g. '{\"alpha\": 0.3}'")
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mu-r-until", type=int, default=0,
                        help="print mu_R (BPD) at the trajectory points up to this iteration [0: none]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    base = load_checkpoint(resolve_model_path(args.model))
    spec = base.data_spec
    identity = open_images(f"embedded:digits:train:{args.digit}", spec)
    chosen, _ = median_nearest(base.model, identity, args.k, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        write_pngs(identity, chosen, folder)
        forget = open_images(folder, spec)
        remember = open_images("embedded:digits:train", spec)
        holdout = open_images("embedded:digits:test", spec)
        print(f"{'config':40s} {'iters':>5s} {'conv':>5s} {'max|d|':>6s} {'QD D_R':>8s} {'D_R BPD':>8s} "
              f"{'QD hold':>8s} {'hold BPD':>8s} {'loop s':>6s} {'wall s':>6s}")
        for text in args.configs:
            config = make_config(json.loads(text))
            start = time.perf_counter()
            outcome = tame(base, [forget], remember, config, device="cpu")
            block = taming_evaluation(base, outcome, {"holdout": holdout}, config, device="cpu")
            sets, report = block["sets"], outcome.report
            print(f"{text:40s} {report['iterations']:5d} {str(report['converged']):>5s} "
                  f"{report['requests'][0]['max_abs_d']:6.2f} {sets['remember']['qd']:+8.4f} "
                  f"{100 * sets['remember']['bpd_change_relative']:+7.2f}% {sets['holdout']['qd']:+8.4f} "
                  f"{100 * sets['holdout']['bpd_change_relative']:+7.2f}% {report['wall_seconds']:6.1f} "
                  f"{time.perf_counter() - start:6.0f}",
                  flush=True)
            if args.mu_r_until:
                points = [p for p in report["trajectory"] if p["iteration"] <= args.mu_r_until]
                print("    mu_R (BPD) by iteration: " + " ".join(
                    f"{p['iteration']}:{p['mu_r'] / nats_per_bpd(spec.num_dims):.4f}" for p in points), flush=True)


if __name__ == "__main__":
    main()
