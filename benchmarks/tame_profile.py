"""Where a whole tame run's wall time goes (issue 23 item 4): setup, the loop, the end, piece by piece.

Runs :func:`flowtame.jobs.tame.tame` once on a zoo model and k (the digit protocol of benchmarks/zoo.py, the
package's defaults + ``--override``) with ``time.perf_counter`` around the pieces of the job, the engine and the
method (wrapped here, not in the library), and prints the split as a tree: each piece's total and exclusive
seconds (the rest of its parent is its own code), calls and seconds per call. Phases: ``setup`` (tame() up to
Engine.run: loading, N_B over the whole remember set, the forget set's base NLL, look-alike search, lr
calibration, check noise), ``loop`` (Engine.run: forward/backward, Adam, refreshes, confirmations, whole-set
re-judgements, snapshots) and ``end`` (after Engine.run: the final measurement and the report). Around the
whole run it reads the process's resource usage (``getrusage``: user and system CPU seconds, minor page faults,
peak resident memory), so ``--plain-malloc`` against the default (freed host memory retained, as the CLI does)
shows what the allocator costs in the kernel (docs/benchmarks.md "Round 14").

It also records where the iterations go: the first iteration whose screen passes, and each confirmation's
iteration and verdict (stop, images short, remember drift, whole set disagrees).

    python benchmarks/tame_profile.py --model embedded-glow --k 4 --json /work/cache/zoo/s25/prof-embedded.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import add_cell_arguments, load_cell, write_json  # noqa: E402

import flowtame.jobs.tame as tame_job  # noqa: E402
import flowtame.methods.solved as solved  # noqa: E402
import flowtame.methods.taming as taming  # noqa: E402
from flowtame.engine.loop import Engine  # noqa: E402
from flowtame.methods.solved import SolvedTaming  # noqa: E402
from flowtame.methods.taming import TamingMethod  # noqa: E402

#: Module functions timed where the job or the method calls them: (module, attribute).
MODULE_PIECES = [(tame_job, name) for name in (
    "_load_sets", "place_model", "pixel_nll", "stopping_target", "_taming_data", "nearest_rows",
    "dequantization_noise", "subset_correction", "trainable_copy", "freeze_parameters", "_build_method",
    "calibrate_lr", "remember_metric", "start_engine", "_tamed_outcome", "make_provenance")] + [
    (taming, "nll_nats"), (taming, "batched_nll")] + [
    (solved, name) for name in ("mean_nll_gradient", "constrained_step", "batched_nll")]
#: Methods timed: (class, attribute).
CLASS_PIECES = [(Engine, name) for name in ("_forward_backward", "_step", "_snapshot", "_record", "_healthy")] + [
    (TamingMethod, name) for name in ("_batch", "_forward_keeping_forget_gradient", "objective", "transform_update",
                                      "after_step", "refresh", "check_nll", "whole_set_agrees")] + [
    (SolvedTaming, name) for name in ("own_step", "_base_gradients", "_jacobian", "_averaged_row_gradients",
                                      "measure", "_base_measurement", "after_step", "whole_set_agrees")]


class Split:
    """Inclusive seconds and calls per call path ("loop/_forward_backward/nll_nats"), under the current phase."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.stack: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.marks: dict[str, float] = {}

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            path = f"{self.stack[-1] if self.stack else self.phase}/{label}"
            self.stack.append(path)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[path] += time.perf_counter() - start
                self.calls[path] += 1
                self.stack.pop()
        return timed

    def exclusive(self, path: str) -> float:
        """``path``'s seconds less its direct children's."""
        depth = path.count("/") + 1
        return self.seconds[path] - sum(s for p, s in self.seconds.items()
                                        if p.startswith(path + "/") and p.count("/") == depth)

    def phases(self) -> dict[str, float]:
        m = self.marks
        return {"setup": m["run_start"] - m["start"], "loop": m["run_end"] - m["run_start"],
                "end": m["end"] - m["run_end"], "total": m["end"] - m["start"]}

    def to_dict(self) -> dict[str, Any]:
        return {"phases": self.phases(),
                "pieces": {p: {"seconds": s, "exclusive": self.exclusive(p), "calls": self.calls[p]}
                           for p, s in sorted(self.seconds.items())}}


def install(split: Split, events: dict[str, Any]) -> None:
    """Wrap the pieces, mark the phases around Engine.run, and record the screen and the confirmations."""
    for module, name in MODULE_PIECES:
        setattr(module, name, split.wrap(name, getattr(module, name)))
    for cls, name in CLASS_PIECES:
        setattr(cls, name, split.wrap(name, getattr(cls, name)))
    run = Engine.run

    def timed_run(self: Engine, *args: Any, **kwargs: Any) -> Any:
        split.marks["run_start"], split.phase = time.perf_counter(), "loop"
        try:
            return run(self, *args, **kwargs)
        finally:
            split.marks["run_end"], split.phase = time.perf_counter(), "end"
    Engine.run = timed_run  # type: ignore[method-assign]
    confirm = TamingMethod.screen_and_confirm

    def watched(self: TamingMethod, model: torch.nn.Module, iteration: int, logged: dict[str, float]) -> bool:
        before = (self.confirmations, self.drift_refusals, self.whole_set_refusals)
        if self.screen_passes(logged) and events["first_screen"] is None:
            events["first_screen"] = iteration
        done = confirm(self, model, iteration, logged)
        if self.confirmations > before[0]:
            assert self.confirmed_d is not None
            short = int((~self.reached(self.confirmed_d)).sum())
            verdict = ("stop" if done else f"whole set ({short} short)" if self.whole_set_refusals > before[2]
                       else f"{short} short" if short else "drift" if self.drift_refusals > before[1] else "?")
            events["confirmations"].append({"it": iteration, "verdict": verdict,
                                            "min_d": round(float(self.confirmed_d.min()), 3),
                                            "drift": round(self.remember_drift(), 5)})
        return done
    TamingMethod.screen_and_confirm = watched  # type: ignore[method-assign]


def usage_since(before: resource.struct_rusage) -> dict[str, float]:
    """The process's user and system CPU seconds and minor page faults since ``before``, and its peak resident
    memory (GiB, over its whole life: the run's when the run is the largest thing it did)."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": now.ru_utime - before.ru_utime, "system_s": now.ru_stime - before.ru_stime,
            "minor_faults": now.ru_minflt - before.ru_minflt, "peak_rss_gib": now.ru_maxrss / 2**20}


def print_split(split: Split, report: dict[str, Any]) -> None:
    phases = split.phases()
    iters = max(report["iterations"], 1)
    print(f"\ntotal {phases['total']:.1f} s = setup {phases['setup']:.1f} + loop {phases['loop']:.1f} "
          f"+ end {phases['end']:.1f}; {report['iterations']} its, converged {report['converged']}, refreshes "
          f"{report['refreshes']} (early {report['early_refreshes']}), confirmations {report['confirmations']}, "
          f"drift refusals {report['drift_refusals']}, whole-set refusals {report['whole_set_refusals']}")
    print(f"{'piece':<62} {'total s':>8} {'own s':>7} {'calls':>6} {'ms/call':>8} {'% total':>7}")
    for phase in ("setup", "loop", "end"):
        print(f"{phase:<62} {phases[phase]:8.2f} {'':>7} {'':>6} {'':>8} {100 * phases[phase] / phases['total']:6.1f}%")
        for path in sorted(p for p in split.seconds if p.startswith(phase + "/")):
            seconds, calls = split.seconds[path], split.calls[path]
            name = "  " * path.count("/") + path.rsplit("/", 1)[1]
            print(f"{name:<62} {seconds:8.2f} {split.exclusive(path):7.2f} {calls:6d} {1e3 * seconds / calls:8.1f} "
                  f"{100 * seconds / phases['total']:6.1f}%")
    bare = sum(split.seconds[p] for p in ("loop/_record/_forward_backward", "loop/_forward_backward", "loop/_step")
               if p in split.seconds)
    print(f"bare steps (forward/backward + Adam): {bare:.1f} s = {bare / iters:.3f} s/it; "
          f"wall / (its x bare step) = {phases['total'] / bare:.2f}")


def forward_batches(base: Any, proto: Any, sizes: list[int], rows: int, repeats: int) -> None:
    """Seconds per image of a no-gradient forward (the evaluation passes') at each batch size in ``sizes``, under
    ``torch.no_grad`` and ``torch.inference_mode``, on the first ``rows`` remember images (keyed noise, seed 0);
    prints any difference of the NLLs from those of the largest batch size (none: bit-identical)."""
    from flowtame.data.images import dequantization_noise
    from flowtame.likelihood.nll import dequantized, nll_nats

    spec, model = base.data_spec, tame_job.place_model(base.model, torch.device("cpu")).eval()
    pixels, keys = proto.remember.pixels[:rows], proto.remember.keys[:rows]
    x = dequantized(pixels, dequantization_noise(keys, 0, tuple(pixels.shape[1:])), spec.n_bits)
    with torch.no_grad():
        reference = nll_nats(model, x[:max(sizes)], spec)
    best: dict[tuple[str, int], float] = {}
    for _ in range(repeats):  # interleaved, the fastest of the repeats kept: the machine's load varies
        for mode_name, mode in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            for size in sizes:
                with mode():
                    nll_nats(model, x[:size], spec)  # warm-up (oneDNN primitives for this shape)
                    start = time.perf_counter()
                    nll = torch.cat([nll_nats(model, x[i:i + size], spec) for i in range(0, rows, size)])
                    seconds = time.perf_counter() - start
                key = (mode_name, size)
                best[key] = min(best.get(key, float("inf")), seconds)
                diff = float((nll[:max(sizes)] - reference).abs().max())
                if diff:
                    print(f"{mode_name} batch {size}: NLLs differ from batch {max(sizes)}'s by {diff:.3g} nats")
    for (mode_name, size), seconds in best.items():
        print(f"{mode_name:>15} batch {size:4d}: {1e3 * seconds / rows:7.3f} ms/image (fastest of {repeats})",
              flush=True)


#: The split's rows for --table: (label, phase, the pieces' paths whose seconds it sums; own = exclusive seconds).
TABLE_ROWS = [
    ("setup: base NLLs (remember, forget)", [("setup/pixel_nll", False)]),
    ("setup: look-alike search", [("setup/_taming_data/nearest_rows", False)]),
    ("setup: lr calibration", [("setup/calibrate_lr", False)]),
    ("loop: training forward", [("loop/_forward_backward/nll_nats", False)]),
    ("loop: anchor's base forward", [("loop/_forward_backward/batched_nll", False)]),
    ("loop: backward, grad norm", [("loop/_forward_backward", True)]),
    ("loop: Adam", [("loop/_step", False)]),
    ("loop: refreshes", [("loop/_record/after_step/refresh", False)]),
    ("loop: confirmations' check draws", [("loop/_record/after_step/check_nll", False)]),
    ("loop: whole-set re-judgements", [("loop/_record/after_step/whole_set_agrees", False)]),
    ("loop (solved step): mean row's base gradients", [("loop/_forward_backward/own_step/_base_gradients", False)]),
    ("loop (solved step): rows' gradients", [("loop/_forward_backward/own_step/_jacobian", False)]),
    ("loop (solved step): solve", [("loop/_forward_backward/own_step/constrained_step", False)]),
    ("loop (solved step): measurements", [("loop/_forward_backward/own_step/measure", False)]),
    ("loop: snapshots", [("loop/_record/_snapshot", False), ("loop/_snapshot", False)]),
    ("end: final measurement, report", [("end/_tamed_outcome", False)]),
]


def split_table(paths: list[Path]) -> None:
    """One Markdown table of the splits saved by --json (a column per file): seconds per row of TABLE_ROWS, the
    phases, iterations and the wall over iterations x the bare step."""
    runs = [json.loads(p.read_text()) for p in paths]
    print("| piece | " + " | ".join(f"{r['model']} k = {r['k']} ({p.stem})" for r, p in zip(runs, paths, strict=True))
          + " |")
    print("| --- |" + " ---: |" * len(runs))
    for label, parts in TABLE_ROWS:
        cells = []
        for r in runs:
            pieces = r["split"]["pieces"]
            total = sum(pieces[p]["exclusive" if own else "seconds"] for p, own in parts if p in pieces)
            cells.append(f"{total:.1f} ({100 * total / r['split']['phases']['total']:.0f}%)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for phase in ("setup", "loop", "end", "total"):
        print(f"| **{phase}** | " + " | ".join(f"{r['split']['phases'][phase]:.1f}" for r in runs) + " |")
    print("| iterations | " + " | ".join(str(r["report"]["iterations"]) for r in runs) + " |")
    cells = []
    for r in runs:
        pieces = r["split"]["pieces"]
        bare = sum(pieces[p]["seconds"] for p in ("loop/_forward_backward", "loop/_step") if p in pieces)
        cells.append(f"{r['split']['phases']['total'] / bare:.2f}")
    print("| wall / (its x bare step) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser, model="embedded-glow", k=4)
    parser.add_argument("--json", type=Path, default=None, help="write the split, events and report summary here")
    parser.add_argument("--forward-batches", type=int, nargs="*", default=None, metavar="B",
                        help="instead of a run: time no-gradient forwards at these batch sizes")
    parser.add_argument("--rows", type=int, default=512, help="images for --forward-batches [512]")
    parser.add_argument("--repeats", type=int, default=3, help="repeats for --forward-batches [3]")
    parser.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only print the splits of these --json files side by side (Markdown)")
    args = parser.parse_args()
    if args.table:
        split_table(args.table)
        return
    base, proto = load_cell(args)
    if args.forward_batches:
        forward_batches(base, proto, args.forward_batches, args.rows, args.repeats)
        return
    config = tame_job.make_config(args.override)
    split, events = Split(), {"first_screen": None, "confirmations": []}
    install(split, events)
    before = resource.getrusage(resource.RUSAGE_SELF)
    split.marks["start"] = time.perf_counter()
    outcome = tame_job.tame(base, [proto.forget], proto.remember, config, device="cpu")
    split.marks["end"] = time.perf_counter()
    usage = usage_since(before)
    report = outcome.report
    print_split(split, report)
    print(f"the run's CPU: user {usage['user_s']:.1f} s, system {usage['system_s']:.1f} s, "
          f"{usage['minor_faults'] / 1e6:.2f}M minor page faults; peak RSS {usage['peak_rss_gib']:.2f} GiB "
          f"({args.host_memory})")
    print(f"first screen pass at iteration {events['first_screen']}; confirmations: "
          + ", ".join(f"{c['it']} {c['verdict']}" for c in events["confirmations"]))
    if args.json:
        keys = ("iterations", "converged", "wall_seconds", "refreshes", "early_refreshes", "confirmations",
                "drift_refusals", "whole_set_refusals", "lr_reductions", "calibration")
        write_json(args.json, {
            "model": args.model, "k": args.k, "override": args.override, "threads": args.threads,
            "allocator": args.host_memory, "usage": usage,
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "split": split.to_dict(), "events": events, "report": {key: report.get(key) for key in keys},
            "remember_normal": report["remember_normal"], "requests": report["requests"]})


if __name__ == "__main__":
    main()
