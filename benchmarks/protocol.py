"""The paper's Table 1 / Table 2 protocol on the embedded digits, for taming and the baselines.

A digit class plays the paper's "identity":

- D_F: the k train images of the class nearest the class's median NLL under the base model
  (:func:`flowtame.likelihood.protocol.median_nearest`), k in {1, 4, 8, 15};
- D'_F (forget_unseen): every other image of the class (train and test splits);
- D_R: the train images of the other nine classes;
- D_R^NN: the ``--neighbours`` remember images nearest D_F in the base model's latent space
  (:func:`flowtame.likelihood.evaluation.find_neighbours`);
- holdout: the test images of the other nine classes.

Every method runs through :func:`flowtame.jobs.tame.tame` (same engine, batches and stopping machinery):
taming with the shipped defaults, taming with ``--preset paper``, neggrad and selective-amnesia (each
with its flowtame defaults), and selective-amnesia with a surrogate folder of remember images instead of
uniform noise ("SA (D_R surrogate)": every ``SURROGATE_STRIDE``-th image of D_R, written to a temporary
folder), an adaptation under which it can forget without destroying an unconditional flow. Table 2's
ablations remove one term of taming's loss from the shipped defaults: the remember loss (alpha = 1), the NLL
term A (gamma = 1), both KL terms (gamma = 0).

Each run is scored by :func:`flowtame.likelihood.evaluation.summarize_evaluation` (each model against its own remember
normal, paired evaluation noise): QD on every set, the forgotten fraction of D_F (d > -epsilon), mean BPD of
D_R and of the holdout before/after, converged, iterations and wall time. Targets (a miss is marked ``!``):
every forget image forgotten; QD(D_R) < 0.01; QD(D_R^NN) < 0.02; holdout mean BPD up by < 1%; and, at equal
forgetting, taming (defaults) with less collateral on D_R and D_R^NN than neggrad and selective-amnesia.

    python benchmarks/protocol.py                      # k = 4, the four methods, ablations (~10 min, 2 cores)
    python benchmarks/protocol.py --k 1 4 8 15 --ablation-k 15    # the paper's full grid
    python benchmarks/protocol.py --model /tmp/x.safetensors --json results.json
    python benchmarks/protocol.py --methods "taming (defaults)" --ablation-k --seeds 0 1 2 3 4   # seed spread
    python benchmarks/protocol.py --k 1 --methods "taming (defaults)" --ablation-k --override '{"lr": 1e-4}'

``--override`` (JSON of TameConfig keys) is merged into every run's configuration after the method's own;
``--override-for LABEL JSON`` into that method's runs only, last:

    python benchmarks/protocol.py --k 8 --ablation-k --methods "taming (defaults)" "SA (D_R surrogate)" \\
        --override-for "SA (D_R surrogate)" '{"alpha": 0.6}'
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.errors import TrainingDivergedError
from flowtame.io.checkpoint import Checkpoint, load_checkpoint
from flowtame.jobs.tame import make_config, preset, tame
from flowtame.likelihood.evaluation import FORGET_DRAWS, find_neighbours, summarize_evaluation
from flowtame.likelihood.nll import pixel_nll
from flowtame.likelihood.protocol import median_nearest

#: Stands for the folder of D_R images that :func:`with_surrogate` writes: every SURROGATE_STRIDE-th one.
SURROGATE_PLACEHOLDER = "<D_R surrogate>"
SURROGATE_STRIDE = 5
#: Method label -> config layers (merged left to right, then --max-iters) for the comparison table.
METHOD_LAYERS: dict[str, list[dict[str, Any]]] = {
    "taming (defaults)": [],
    "taming (paper)": [preset("paper")],
    "neggrad": [{"method": "neggrad"}],
    "selective-amnesia": [{"method": "selective-amnesia"}],
    "SA (D_R surrogate)": [{"method": "selective-amnesia", "sa_surrogate": SURROGATE_PLACEHOLDER}],
}
#: Table 2's ablations of taming, from the shipped defaults.
ABLATION_LAYERS: dict[str, list[dict[str, Any]]] = {
    "full loss (defaults)": [],
    "no remember loss (alpha=1)": [{"alpha": 1.0}],
    "no NLL term A (gamma=1)": [{"gamma": 1.0}],
    "no KL terms (gamma=0)": [{"gamma": 0.0}],
}
MAX_REMEMBER_QD = 0.01
MAX_NEIGHBOURS_QD = 0.02
MAX_HOLDOUT_BPD_CHANGE = 0.01
#: Where the digits of one split and class come from (``{split}``: train or test; ``{digit}``: 0-9).
EMBEDDED_DIGITS = "embedded:digits:{split}:{digit}"


class TensorSet:
    """In-memory images with the parts of the ImageSet interface tame() and find_neighbours() read."""

    def __init__(self, name: str, pixels: torch.Tensor, keys: list[str]):
        self.name, self.pixels, self.keys, self.skipped = name, pixels, list(keys), []

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def load_tensor(self) -> tuple[torch.Tensor, list[str]]:
        return self.pixels, list(self.keys)

    def iter_batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield SimpleNamespace(pixels=self.pixels[i:i + batch_size], keys=self.keys[i:i + batch_size])


def load_classes(split: str, classes: list[int], spec, source: str = EMBEDDED_DIGITS) -> TensorSet:
    pixels, keys = [], []
    for c in classes:
        p, k = open_images(source.format(split=split, digit=c), spec).load_tensor()
        pixels.append(p)
        keys.extend(k)
    return TensorSet(source.format(split=split, digit="+".join(map(str, classes))), torch.cat(pixels), keys)


@dataclass
class Protocol:
    """The sets of one k and their base-model NLL (nats, evaluation noise of seed 0)."""

    forget: TensorSet
    unseen: TensorSet
    remember: TensorSet
    holdout: TensorSet
    neighbours: Any
    base_nll: dict[str, np.ndarray]


def build_protocol(base: Checkpoint, digit: int, k: int, n_neighbours: int,
                   source: str = EMBEDDED_DIGITS) -> Protocol:
    """The protocol's sets for identity ``digit`` and ``k`` forget images; ``source``: the template of one
    split's and class's digits (default the embedded digits)."""
    spec = base.data_spec
    identity = open_images(source.format(split="train", digit=digit), spec)
    chosen, _ = median_nearest(base.model, identity, k, device="cpu")
    id_pixels, id_keys = identity.load_tensor()
    rest = [i for i in range(len(id_keys)) if i not in set(chosen)]
    test_id_pixels, test_id_keys = open_images(source.format(split="test", digit=digit), spec).load_tensor()
    forget = TensorSet(f"digit {digit}: {k} train images nearest the median NLL", id_pixels[chosen],
                       [id_keys[i] for i in chosen])
    unseen = TensorSet(f"digit {digit}: the other {len(rest) + len(test_id_keys)} images",
                       torch.cat([id_pixels[rest], test_id_pixels]), [id_keys[i] for i in rest] + test_id_keys)
    others = [c for c in range(10) if c != digit]
    remember = load_classes("train", others, spec, source)
    holdout = load_classes("test", others, spec, source)
    neighbours = find_neighbours(base, forget, remember, n_neighbours, device="cpu")
    cpu = torch.device("cpu")
    base_nll = {name: pixel_nll(base.model, s.pixels, s.keys, spec, 0, cpu, draws=draws)
                for name, s, draws in (("forget_unseen", unseen, FORGET_DRAWS), ("holdout", holdout, 1))}
    return Protocol(forget, unseen, remember, holdout, neighbours, base_nll)


def score(base: Checkpoint, proto: Protocol, outcome, config, total_seconds: float,
          n_boot: int = 200) -> dict[str, Any]:
    """A tame() outcome scored on every set of ``proto``: a flat row of figures (QD, BPD changes).

    ``evaluate_passed``/``failed_checks``: the checks of ``flowtame evaluate --check`` with its default
    tolerances (:class:`flowtame.evaluation.Tolerances`) on the same per-image NLL (D_R^NN as
    ``--neighbours``); ``remember_normality_p_{base,tamed}``: the KS normality p-value of the remember NLL its
    ``remember.normality_p`` check reads (tamed)."""
    spec, cpu = base.data_spec, torch.device("cpu")
    table = dict(outcome.nll)
    for name, s, draws in (("forget_unseen", proto.unseen, config.forget_draws), ("holdout", proto.holdout, 1)):
        table[("base", name)] = proto.base_nll[name]
        table[("tamed", name)] = pixel_nll(outcome.checkpoint.model, s.pixels, s.keys, spec, 0, cpu, draws=draws)
    block = summarize_evaluation(table, spec.num_dims, delta=config.delta, epsilon=config.epsilon, n_boot=n_boot,
                                 neighbours=proto.neighbours, forget_draws=config.forget_draws)
    sets = block["sets"]
    report = outcome.report
    return {
        "converged": report["converged"], "iterations": report["iterations"],
        "whole_set_refusals": report.get("whole_set_refusals", 0), "lr_reductions": report.get("lr_reductions", 0),
        "loop_seconds": report["wall_seconds"], "total_seconds": total_seconds,
        "forgotten": sets["forget"]["forgotten_fraction"],
        "d_min": sets["forget"]["d"]["tamed"]["min"], "d_max": sets["forget"]["d"]["tamed"]["max"],
        "q_forget": sets["forget"]["q_tamed"],
        "remember_bpd_base": sets["remember"]["base_mean_bpd"], "remember_bpd": sets["remember"]["tamed_mean_bpd"],
        "holdout_bpd_change": sets["holdout"]["bpd_change_relative"],
        **{f"qd_{name}": sets[name]["qd"] for name in ("forget", "forget_unseen", "remember", "neighbours",
                                                       "holdout")},
        **{f"remember_normality_p_{m}": block["normality"][m]["ks"]["pvalue"] for m in ("base", "tamed")},
        "evaluate_passed": block["passed"],
        "failed_checks": [c["name"] for c in block["checks"] if not c["passed"]],
    }


def run_one(base: Checkpoint, proto: Protocol, layers: list[dict[str, Any]], max_iters: int | None,
            seed: int = 0) -> dict[str, Any]:
    """One tame() run (training seed ``seed``) scored on every set: a flat row of figures (QD, BPD changes,
    targets)."""
    config = make_config(*layers, {"max_iters": max_iters, "seed": seed})
    print(f"  running {config.method} ...", end="", flush=True)
    start = time.perf_counter()
    try:
        outcome = tame(base, [proto.forget], proto.remember, config, device="cpu")
    except TrainingDivergedError as exc:  # the blow-up roll-back gave up: a result of the protocol too
        print(f" failed: {exc}", flush=True)
        return {"failed": str(exc), "total_seconds": time.perf_counter() - start,
                "targets": dict.fromkeys(("forgotten", "qd_remember", "qd_neighbours", "holdout_bpd"), False)}
    total = time.perf_counter() - start
    row = score(base, proto, outcome, config, total)
    report = outcome.report
    print(f" {report['iterations']} iterations, {total:.0f} s", flush=True)
    row["targets"] = {
        "forgotten": row["forgotten"] == 1.0,
        "qd_remember": row["qd_remember"] < MAX_REMEMBER_QD,
        "qd_neighbours": row["qd_neighbours"] < MAX_NEIGHBOURS_QD,
        "holdout_bpd": row["holdout_bpd_change"] < MAX_HOLDOUT_BPD_CHANGE,
    }
    return row


def _mark(value: str, ok: bool) -> str:
    return value + (" " if ok else "!")


def print_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    header = (f"{'':28s} {'conv':>5s} {'iters':>5s} {'loop s':>7s} {'total s':>7s} {'forgot':>7s} {'d range':>14s} "
              f"{'QD D_F':>7s} {'QD D_F2':>8s} {'QD D_R':>9s} {'QD NN':>9s} {'QD hold':>8s} {'R BPD':>15s} "
              f"{'hold BPD':>9s}")
    print(header)
    print("-" * len(header))
    for label, r in rows.items():
        if "failed" in r:
            print(f"{label:28s} FAILED after {r['total_seconds']:.0f} s: {r['failed']}")
            continue
        t = r["targets"]
        forgot = _mark(f"{r['forgotten']:6.0%}", t["forgotten"])
        qd_r = _mark(f"{r['qd_remember']:+8.4f}", t["qd_remember"])
        qd_nn = _mark(f"{r['qd_neighbours']:+8.4f}", t["qd_neighbours"])
        hold = _mark(f"{100 * r['holdout_bpd_change']:+7.2f}%", t["holdout_bpd"])
        print(f"{label:28s} {str(r['converged']):>5s} {r['iterations']:5d} {r['loop_seconds']:7.1f} "
              f"{r['total_seconds']:7.1f} {forgot} {r['d_min']:+6.2f}..{r['d_max']:+5.2f} {r['qd_forget']:7.3f} "
              f"{r['qd_forget_unseen']:8.3f} {qd_r}{qd_nn}{r['qd_holdout']:+8.4f} "
              f"{r['remember_bpd_base']:6.4f}->{r['remember_bpd']:6.4f} {hold}")


def with_surrogate(layers: list[dict[str, Any]], proto: Protocol, folder: str) -> list[dict[str, Any]]:
    """``layers`` with the surrogate placeholder replaced by ``folder``, filled with every
    :data:`SURROGATE_STRIDE`-th image of D_R (once; D_R does not depend on k)."""
    if not any(layer.get("sa_surrogate") == SURROGATE_PLACEHOLDER for layer in layers):
        return layers
    if not any(Path(folder).iterdir()):
        for i in range(0, len(proto.remember), SURROGATE_STRIDE):
            Image.fromarray(proto.remember.pixels[i, 0].numpy()).save(Path(folder) / f"{i:05d}.png")
    return [{**layer, "sa_surrogate": folder} if layer.get("sa_surrogate") == SURROGATE_PLACEHOLDER else layer
            for layer in layers]


def compare(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Lines on the last target: taming (defaults) vs each baseline, at equal forgetting.

    Collateral is compared when both forgot every image, or when the baseline forgot part of D_F and taming at
    least as much (taming then wins only by doing more with less damage); a baseline that forgot nothing did
    not do the task, and no comparison is made."""
    lines = []
    ours = rows.get("taming (defaults)")
    if ours is None:
        return lines
    for baseline, theirs in rows.items():
        if baseline.startswith("taming"):
            continue
        if "failed" in ours or "failed" in theirs:
            lines.append(f"vs {baseline}: a run failed -> comparison MISSED")
            continue
        forgotten = f"forgotten: taming {ours['forgotten']:.0%}, {baseline} {theirs['forgotten']:.0%}"
        if not (theirs["forgotten"] > 0 and ours["forgotten"] >= theirs["forgotten"]):
            lines.append(f"vs {baseline}: not at equal forgetting ({forgotten}) -> comparison MISSED")
            continue
        less = {s: abs(ours[f"qd_{s}"]) < abs(theirs[f"qd_{s}"]) for s in ("remember", "neighbours")}
        verdict = "met" if all(less.values()) else "MISSED"
        lines.append(f"vs {baseline}: |QD(D_R)| {abs(ours['qd_remember']):.4f} vs {abs(theirs['qd_remember']):.4f}, "
                     f"|QD(D_R^NN)| {abs(ours['qd_neighbours']):.4f} vs {abs(theirs['qd_neighbours']):.4f} "
                     f"({forgotten}); less collateral on both: {verdict}")
    return lines


def mean_over_seeds(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Rows averaged over seeds for :func:`compare`: mean forgotten fraction and mean |QD| on D_R, D_R^NN;
    a method that failed on any seed stays failed."""
    merged = {}
    for label in per_seed[0]:
        runs = [rows[label] for rows in per_seed]
        if any("failed" in r for r in runs):
            merged[label] = {"failed": "on some seed"}
            continue
        merged[label] = {"forgotten": sum(r["forgotten"] for r in runs) / len(runs),
                         **{f"qd_{s}": sum(abs(r[f"qd_{s}"]) for r in runs) / len(runs)
                            for s in ("remember", "neighbours")}}
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--digit", type=int, default=3, help="the class playing the identity [3]")
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="sizes of D_F (paper: 1 4 8 15) [4]")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_LAYERS), choices=list(METHOD_LAYERS),
                        metavar="METHOD", help=f"subset of: {', '.join(METHOD_LAYERS)}")
    parser.add_argument("--ablation-k", type=int, nargs="*", default=[4],
                        help="run Table 2's ablations at these k (paper: 15; none: no ablations) [4]")
    parser.add_argument("--neighbours", type=int, default=32, help="size of D_R^NN [32]")
    parser.add_argument("--max-iters", type=int, default=None, help="iteration budget (default: each config's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds: Table 1 runs once per seed (ablations: the first seed) [0]")
    parser.add_argument("--override", type=json.loads, default={},
                        help="JSON of TameConfig keys merged into every run, e.g. '{\"freeze\": \"none\"}'")
    parser.add_argument("--override-for", nargs=2, action="append", default=[], metavar=("METHOD", "JSON"),
                        help="JSON of TameConfig keys merged into one method's runs (repeatable)")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args()
    method_overrides = {label: json.loads(text) for label, text in args.override_for}
    unknown = set(method_overrides) - set(args.methods)
    if unknown:
        parser.error(f"--override-for names methods not run: {', '.join(sorted(unknown))}")
    torch.set_num_threads(args.threads)
    base = load_checkpoint(resolve_model_path(args.model))
    print(f"model {args.model} (sha256 {base.sha256[:16]}); identity: digit {args.digit}; "
          + (f"override {json.dumps(args.override)}; " if args.override else "")
          + "".join(f"{label}: override {json.dumps(o)}; " for label, o in method_overrides.items())
          + f"{args.threads} CPU threads ({platform.processor() or platform.machine()}); torch {torch.__version__}")
    results: dict[str, Any] = {"model": args.model, "sha256": base.sha256, "digit": args.digit,
                               "override": args.override, "method_overrides": method_overrides, "runs": {}}
    start = time.perf_counter()
    surrogate_dir = tempfile.TemporaryDirectory(prefix="flowtame-protocol-")
    for k in sorted(set(args.k) | set(args.ablation_k)):
        proto = build_protocol(base, args.digit, k, args.neighbours)
        print(f"\nk = {k}: |D_F| = {len(proto.forget)}, |D'_F| = {len(proto.unseen)}, |D_R| = {len(proto.remember)}, "
              f"|D_R^NN| = {proto.neighbours.indices.size}, |holdout| = {len(proto.holdout)}")
        for seed in args.seeds if k in args.k else []:
            rows = {label: run_one(base, proto, [*with_surrogate(METHOD_LAYERS[label], proto, surrogate_dir.name),
                                                 args.override, method_overrides.get(label, {})],
                                 args.max_iters, seed)
                    for label in args.methods}
            print_table(f"Table 1 (k = {k}, seed {seed}): methods", rows)
            for line in compare(rows):
                print("  " + line)
            results["runs"][f"methods k={k} seed={seed}"] = rows
        if k in args.k and len(args.seeds) > 1:
            per_seed = [results["runs"][f"methods k={k} seed={seed}"] for seed in args.seeds]
            print(f"\nk = {k}, mean over seeds {' '.join(map(str, args.seeds))}:")
            for line in compare(mean_over_seeds(per_seed)):
                print("  " + line)
        if k in args.ablation_k:
            rows = {label: run_one(base, proto, [*layers, args.override], args.max_iters, args.seeds[0])
                    for label, layers in ABLATION_LAYERS.items()}
            print_table(f"Table 2 (k = {k}): taming ablations", rows)
            results["runs"][f"ablations k={k}"] = rows
    print(f"\nColumns: conv = stopping rule confirmed; forgot = fraction of D_F with d > -eps (evaluation noise, "
          f"the tamed model's own remember fit); d range in sigma_R; QD D_F2 = QD(D'_F); R BPD = mean BPD of D_R "
          f"base->tamed; hold BPD = relative change of the holdout's mean BPD. '!' marks a missed target "
          f"(forgot 100%, QD(D_R) < {MAX_REMEMBER_QD}, QD(NN) < {MAX_NEIGHBOURS_QD}, holdout BPD < "
          f"+{100 * MAX_HOLDOUT_BPD_CHANGE:.0f}%). Total time {time.perf_counter() - start:.0f} s.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
