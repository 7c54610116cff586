"""The whole pipeline on the embedded default model and data, as one library call.

stats -> choose forget images -> tame -> evaluate -> before/after samples, writing every artifact into one
folder, with the equivalent ``flowtame`` command lines so a user can repeat each step by hand.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.figures.plots import plot_nll_histograms
from flowtame.figures.sampling import sample_grid, save_png
from flowtame.io.checkpoint import load_checkpoint, save_checkpoint
from flowtame.io.fileio import write_json_atomic
from flowtame.jobs.stats import likelihood_stats
from flowtame.jobs.tame import TameConfig, make_config, tame, taming_evaluation
from flowtame.likelihood.protocol import median_nearest, write_pngs
from flowtame.likelihood.statistics import fit_normal

MODEL = "embedded:glow-digits"
REMEMBER = "embedded:digits:train"
HOLDOUT = "embedded:digits:test"


@dataclass
class DemoResult:
    """What the demo wrote and measured; ``stats`` is the stats report (``flowtame stats --json``'s shape),
    ``report`` the tame report (with its evaluation block)."""

    out: Path
    stats: dict[str, Any]
    report: dict[str, Any]
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(out: str | Path, *, digit: int = 3, k: int = 4, device: str = "cpu", force: bool = False,
             config: TameConfig | None = None, log: Callable[[str], None] = print,
             callback: Callable[[int, dict[str, float]], None] | None = None,
             command: str | None = None) -> DemoResult:
    """Forget ``k`` images of ``digit`` (nearest the class's median likelihood) from the embedded Glow.

    ``command``: the command line recorded in the tamed checkpoint's provenance (None: not recorded).

    Writes into ``out``: stats.json, forget/*.png, tamed.safetensors, report.json, nll.png, samples.png.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_checkpoint(resolve_model_path(MODEL), device=device)
    spec = base.image_data("the demo")
    config = config or make_config({})

    log(f"[1/5] likelihood statistics of {REMEMBER} and {HOLDOUT} under {MODEL}")
    stats = likelihood_stats(base, MODEL, [REMEMBER, HOLDOUT], seed=config.eval_seed, device=device).report
    for source in stats["sources"]:
        s = source["bpd"]
        log(f"      {source['name']}: n={source['n']}  mean {s['mean']:.4f} BPD  std {s['std']:.4f}  "
            f"median {s['quantiles']['50']:.4f}")
    write_json_atomic(out / "stats.json", stats)

    identity = open_images(f"embedded:digits:train:{digit}", spec)
    chosen, _ = median_nearest(base.model, identity, k, seed=config.eval_seed, device=device)
    forget_dir = out / "forget"
    for old in forget_dir.glob("*.png") if forget_dir.exists() else ():
        old.unlink()
    write_pngs(identity, chosen, forget_dir, prefix=f"digit{digit}")
    log(f"[2/5] forget request: {k} images of digit {digit} nearest the class's median NLL -> {forget_dir}/")

    step = "the solved step" if config.solving else f"Adam's step, lr {config.lr:g}"
    log(f"[3/5] taming (method {config.method}, delta {config.delta}, epsilon {config.epsilon:.2f}, {step}, "
        f"at most {config.max_iters} iterations)")
    forget_set = open_images(forget_dir, spec)
    remember_set = open_images(REMEMBER, spec)
    holdout = {f"holdout:{HOLDOUT}": open_images(HOLDOUT, spec)}
    outcome = tame(base, [forget_set], remember_set, config, device=device, callback=callback, command=command)
    report = outcome.report
    log(f"      {'converged' if report['converged'] else 'did NOT converge'} after {report['iterations']} "
        f"iterations, {report['wall_seconds']:.1f} s; final d of the forget images: "
        f"[{report['requests'][0]['d_min']:+.2f}, {report['requests'][0]['d_max']:+.2f}] sigma_R")

    log("[4/5] evaluation (paired noise): quantile drops, BPD before/after, KS tests")
    report["evaluation"] = taming_evaluation(base, outcome, holdout, config, device=device)
    sha = save_checkpoint(out / "tamed.safetensors", outcome.checkpoint, force=True)
    report["output"] = {"path": str(out / "tamed.safetensors"), "sha256": sha}
    write_json_atomic(out / "report.json", report)
    nll = outcome.nll
    plot_nll_histograms(out / "nll.png", {
        "base (before)": {"remember": nll[("base", "remember")], "forget": nll[("base", "forget")]},
        "tamed (after)": {"remember": nll[("tamed", "remember")], "forget": nll[("tamed", "forget")]},
    }, fits={"base (before)": fit_normal(nll[("base", "remember")]),
             "tamed (after)": fit_normal(nll[("tamed", "remember")])},
        delta=config.delta, epsilon=config.epsilon, num_dims=spec.num_dims, force=True)

    log("[5/5] samples from the same latents, base (top row) and tamed (bottom row)")
    tamed = load_checkpoint(out / "tamed.safetensors", device=device)
    save_png(out / "samples.png", sample_grid([base, tamed], 12, temperature=0.7, seed=0), force=True)

    forget_arg = shlex.quote(str(forget_dir))
    commands = [
        f"flowtame stats {MODEL} {REMEMBER} {HOLDOUT} --json {out / 'stats.json'}",
        f"flowtame tame {MODEL} --forget {forget_arg} --remember {REMEMBER} --holdout {HOLDOUT} "
        f"-o {out / 'tamed.safetensors'} --report {out / 'report.json'} --force",
        f"flowtame evaluate {MODEL} {out / 'tamed.safetensors'} --forget {forget_arg} --remember {REMEMBER} "
        f"--holdout {HOLDOUT} --plot {out / 'nll.png'} --check",
        f"flowtame sample {MODEL} {out / 'tamed.safetensors'} -n 12 --temperature 0.7 --seed 0 "
        f"-o {out / 'samples.png'} --force",
    ]
    return DemoResult(out=out, stats=stats, report=report, commands=commands,
                      seconds=time.perf_counter() - start)
