"""The retrained gold standard on the paper's protocol: retrain the embedded Glow without D_F, audit methods against it.

For each k: D_F, D'_F, D_R and the other classes' test images as in ``benchmarks/protocol.py`` (digit 3 by
default). The *retrained* model is trained on the embedded train split minus D_F with the exact recipe of
``examples/embedded/train_embedded.sh`` (the base checkpoint's architecture and hyperparameters, 2,500 steps of
32, lr 1e-3, warm-up 200, decay over the last 1,000, clip 50, seed 0, one CPU thread), cached under
``--cache``. Then taming (defaults), taming with ``--target holdout``, neggrad and Selective Amnesia (D_R
surrogate, as in protocol.py) each run through :func:`flowtame.jobs.tame.tame` and are audited by
:func:`flowtame.likelihood.auditing.add_audits` against the retrained model. Non-members (the membership
audit, and the holdout target): the digit's *test* images, which neither model trained on. Columns:

- forget quality: KS p of the method's vs the retrained model's NLL on D_F (TOFU; high = alike), and on D'_F;
- loss-attack AUC of D_F vs unseen test images of the digit (0.5 = indistinguishable, < 0.5 over-suppressed),
  the retrained model's own AUC, and MUSE's relative leakage (AUC - AUC_retrained) / AUC_retrained;
- generation share: samples (``--samples`` per model, temperature 0.7, shared latents) whose nearest training
  image is a D_F image within the held-out radius, with its Clopper–Pearson interval;
- collateral: the relative change of mean BPD on the other classes' test images, and QD(D_R);
- wall time: retraining vs the method's training loop.

    python benchmarks/retrain.py --k 4 15 --json /work/cache/retrain/results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from protocol import METHOD_LAYERS, TensorSet, build_protocol, with_surrogate

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.figures.sampling import sample_images
from flowtame.io.checkpoint import Checkpoint, load_checkpoint
from flowtame.jobs.tame import make_config, tame
from flowtame.jobs.train import resume_state_path, train_model
from flowtame.likelihood.auditing import AuditSets, AuditTolerances, add_audits
from flowtame.likelihood.evaluation import FORGET_DRAWS, summarize_evaluation
from flowtame.likelihood.nll import pixel_nll

METHODS = {"taming (defaults)": METHOD_LAYERS["taming (defaults)"],
           "taming (target holdout)": [{"target": "holdout"}],
           "neggrad": METHOD_LAYERS["neggrad"],
           "SA (D_R surrogate)": METHOD_LAYERS["SA (D_R surrogate)"],
           # not trained: the base itself and the retrained model audited as if they were tamed (the CI gate)
           "untouched base": None, "retrained": None}
#: The opt-in bounds every row is checked against (the CI gate both ways).
GATE = AuditTolerances(max_membership_auc_gap=0.1, max_privacy_leakage=0.1)
CPU = torch.device("cpu")


def retrain(base: Checkpoint, forget_keys: set[str], path: Path) -> tuple[Checkpoint, float]:
    """The recipe of examples/embedded/train_embedded.sh on the train split without D_F (cached at ``path``)."""
    timing = path.with_suffix(".seconds.json")
    if path.exists() and timing.exists():
        return load_checkpoint(path), json.loads(timing.read_text())["seconds"]
    pixels, keys = open_images("embedded:digits:train", base.data_spec).load_tensor()
    keep = [i for i, key in enumerate(keys) if key not in forget_keys]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        train_model(pixels[keep], base.architecture, base.spec, base.data_spec, steps=2500, batch_size=32, lr=1e-3,
                    warmup_steps=200, decay_steps=1000, grad_clip=50.0, seed=0, device="cpu", checkpoint_path=path,
                    force=True, notes=f"retrained without {len(forget_keys)} forget images (benchmarks/retrain.py)")
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    resume_state_path(path).unlink(missing_ok=True)  # only needed to continue training, as in train_embedded.sh
    timing.write_text(json.dumps({"seconds": seconds, "images": len(keep)}))
    return load_checkpoint(path), seconds


def nll_table(models: dict[str, Checkpoint], sets: dict[str, TensorSet]) -> dict[tuple[str, str], np.ndarray]:
    """(model, set) -> NLL (nats) with seed 0's keyed noise; forget sets with FORGET_DRAWS draws and once more
    with one draw (``forget@1``, the membership audit's)."""
    spec = next(iter(models.values())).data_spec
    table = {}
    for model_name, ckpt in models.items():
        for set_name, s in sets.items():
            draws = FORGET_DRAWS if set_name in ("forget", "forget_unseen") else 1
            table[(model_name, set_name)] = pixel_nll(ckpt.model, s.pixels, s.keys, spec, 0, CPU, draws=draws)
        f = sets["forget"]
        table[(model_name, "forget@1")] = pixel_nll(ckpt.model, f.pixels, f.keys, spec, 0, CPU, draws=1)
    return table


def audit_row(base: Checkpoint, tamed: Checkpoint, retrained: Checkpoint, sets: dict[str, TensorSet],
              base_table: dict, retrained_table: dict, samples: int) -> dict[str, Any]:
    """Evaluate and audit one tamed model against the base and the retrained one; a flat row of figures."""
    table = {**base_table, **retrained_table, **nll_table({"tamed": tamed}, sets)}
    names = {"holdout": "holdout:other classes", "members_holdout": "holdout:digit test"}
    evaluation = {(m, names.get(s, s)): v for (m, s), v in table.items() if m in ("base", "tamed") and s != "forget@1"}
    block = summarize_evaluation(evaluation, base.data_spec.num_dims, n_boot=200)
    known = {(m, "holdout" if s == "members_holdout" else s): v for (m, s), v in table.items()
             if s != "holdout"}
    drawn = sample_images([base, tamed, retrained], samples, 0.7, 0) if samples else None
    add_audits(block, base, tamed, AuditSets(forget=[sets["forget"]], remember=sets["remember"],
                                             holdout=[sets["members_holdout"]], forget_unseen=sets["forget_unseen"]),
               retrained=retrained, known=known, n_boot=1000, device="cpu", tolerances=GATE,
               samples=None if drawn is None else dict(zip(("base", "tamed", "retrained"), drawn, strict=True)),
               sampling=None if drawn is None else {"samples": samples, "temperature": 0.7, "seed": 0})
    audits = block["audits"]
    loss = audits["membership"]["attacks"]["loss"]
    retrained_sets = audits["retrained"]["sets"]
    row = {
        "forgotten": block["sets"]["forget"]["forgotten_fraction"],
        "forget_quality": retrained_sets["forget"]["forget_quality"]["tamed"]["pvalue"],
        "forget_quality_base": retrained_sets["forget"]["forget_quality"]["base"]["pvalue"],
        "forget_quality_unseen": retrained_sets["forget_unseen"]["forget_quality"]["tamed"]["pvalue"],
        "auc": loss["tamed"]["auc"], "auc_ci": [loss["tamed"]["auc_ci_low"], loss["tamed"]["auc_ci_high"]],
        "auc_base": loss["base"]["auc"], "auc_retrained": loss["retrained"]["auc"],
        "outlier_tpr_5": loss["tamed"]["tpr_outlier"]["0.05"]["value"],
        "leakage": audits["membership"]["relative_leakage"]["loss"]["tamed"],
        "reading": audits["goals"]["never_trained_on"]["reading"],
        "forget_mean_nll": block["sets"]["forget"]["tamed_mean_nll"],
        "forget_mean_nll_retrained": retrained_sets["forget"]["mean_nll"],
        "holdout_bpd_change": block["sets"]["holdout:other classes"]["bpd_change_relative"],
        "qd_remember": block["sets"]["remember"]["qd"],
        "gate": {c["name"]: c["passed"] for c in block["checks"] if c["name"].startswith("membership.")},
    }
    if audits["generation"] is not None:
        g = audits["generation"]["models"]
        row.update(generation={m: [g[m]["share"], g[m]["ci_low"], g[m]["ci_high"]] for m in g},
                   generation_radius=audits["generation"]["radius"])
    return row


def run_k(base: Checkpoint, digit: int, k: int, cache: Path, samples: int, surrogate: str,
          methods: list[str]) -> dict[str, Any]:
    proto = build_protocol(base, digit, k, n_neighbours=1)
    cached = cache / f"retrained-digit{digit}-k{k}.safetensors"
    retrained, retrain_seconds = retrain(base, set(proto.forget.keys), cached)
    test_digit = TensorSet(f"embedded:digits:test:{digit}",
                           *open_images(f"embedded:digits:test:{digit}", base.data_spec).load_tensor())
    sets = {"forget": proto.forget, "forget_unseen": proto.unseen, "remember": proto.remember,
            "holdout": proto.holdout, "members_holdout": test_digit}
    print(f"k = {k}: retrained in {retrain_seconds:.0f} s; scoring base and retrained ...", flush=True)
    base_table = nll_table({"base": base}, sets)
    retrained_table = nll_table({"retrained": retrained}, sets)
    rows = {}
    for label in methods:
        layers = METHODS[label]
        print(f"  {label} ...", end="", flush=True)
        if layers is None:
            model = base if label == "untouched base" else retrained
            row = audit_row(base, model, retrained, sets, base_table, retrained_table, samples)
            row.update(iterations=0, converged=False, loop_seconds=retrain_seconds if model is retrained else 0.0,
                       target=None)
            rows[label] = row
            print(f" AUC {row['auc']:.3f}, gate {row['gate']}", flush=True)
            continue
        config = make_config(*with_surrogate(layers, proto, surrogate), {"seed": 0})
        outcome = tame(base, [proto.forget], proto.remember, config, device="cpu", target_holdout=[test_digit])
        report = outcome.report
        row = audit_row(base, outcome.checkpoint, retrained, sets, base_table, retrained_table, samples)
        row.update(iterations=report["iterations"], converged=report["converged"],
                   loop_seconds=report["wall_seconds"], target=report["target"])
        rows[label] = row
        print(f" {report['iterations']} iterations, forget quality {row['forget_quality']:.3g}, AUC {row['auc']:.3f} "
              f"(retrained {row['auc_retrained']:.3f}), leakage {row['leakage']:+.3f}", flush=True)
    return {"k": k, "retrain_seconds": retrain_seconds, "rows": rows}


def print_rows(result: dict[str, Any]) -> None:
    print(f"\nk = {result['k']} (retraining: {result['retrain_seconds']:.0f} s)")
    print(f"{'method':26s} {'iters':>5s} {'loop s':>7s} {'forgot':>6s} {'FQ D_F':>8s} {'FQ Dp_F':>8s} {'AUC':>6s} "
          f"{'AUC_re':>6s} {'leak':>7s} {'gen share':>10s} {'holdout BPD':>11s}  gate (AUC gap, leakage <= 0.1)")
    for label, r in result["rows"].items():
        gen = r.get("generation", {}).get("tamed")
        print(f"{label:26s} {r['iterations']:5d} {r['loop_seconds']:7.1f} {r['forgotten']:6.0%} "
              f"{r['forget_quality']:8.3g} {r['forget_quality_unseen']:8.3g} {r['auc']:6.3f} {r['auc_retrained']:6.3f} "
              f"{r['leakage']:+7.3f} {'' if gen is None else f'{gen[0]:.1%}':>10s} {r['holdout_bpd_change']:+11.2%}  "
              f"{' '.join('pass' if ok else 'FAIL' for ok in r['gate'].values())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="+", default=[4])
    parser.add_argument("--samples", type=int, default=500, help="generation audit: samples per model [500]")
    parser.add_argument("--cache", default="/work/cache/retrain", help="retrained checkpoints are kept here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for taming (retraining uses 1)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    base = load_checkpoint(resolve_model_path(args.model))
    results = []
    with tempfile.TemporaryDirectory() as surrogate:
        for k in args.k:
            results.append(run_k(base, args.digit, k, cache, args.samples, surrogate, args.methods))
            print_rows(results[-1])
            if args.json:
                Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                       "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
