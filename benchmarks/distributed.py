"""``flowtame stats`` (images/s) and ``flowtame tame`` (seconds per iteration) in one process against several
torchrun processes, on the same threads.

Runs, ``--repeats`` times each and alternating, the command with ``OMP_NUM_THREADS=ranks`` (one process), the
same with one thread (a control: how much of the difference is the threads', not the processes'), and
``python -m torch.distributed.run --standalone --nproc-per-node=ranks -m flowtame ...`` with
``OMP_NUM_THREADS=1`` per rank (Gloo on the CPU).

- ``stats MODEL DATA --json OUT -q``: the report's images/s (the likelihood pass on rank 0, gather included:
  N / its wall time) and the whole command's wall time (start-up, model load and rendezvous included).
- ``tame MODEL --forget FORGET --remember DATA --max-iters ITERS``: the report's seconds per iteration (the
  training loop's wall time over its iterations: forward/backward of the batch, DDP's all-reduce, the
  per-iteration agreement, the refreshes and stopping checks) and the command's wall time. The batch is the
  same in every configuration (``--batch-size`` forget + as many remember rows); 2 ranks evaluate half of it
  each.

Then the medians. Example (the figures in docs/benchmarks.md):

    python benchmarks/distributed.py --command both --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _launch(args: list[str], ranks: int | None, threads: int) -> float:
    """Run ``flowtame ARGS`` (``ranks`` None = one plain process); the command's wall seconds."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *launcher, "-m", "flowtame", *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def run_stats(options: argparse.Namespace, ranks: int | None, threads: int) -> tuple[float, float]:
    """One stats run -> (report images/s, command wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stats.json"
        wall = _launch(["stats", options.model, options.data, "--json", str(out), "-q", "--batch-size",
                        str(options.batch_size)], ranks, threads)
        return json.loads(out.read_text())["sources"][0]["images_per_second"], wall


def run_tame(options: argparse.Namespace, ranks: int | None, threads: int) -> tuple[float, float]:
    """One tame run of ``--max-iters`` iterations -> (report seconds per iteration, command wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tamed.safetensors"
        wall = _launch(["tame", options.model, "--forget", options.forget, "--remember", options.data,
                        "--max-iters", str(options.iters), "--batch-size", str(options.tame_batch), "--device",
                        "cpu", "-q", "-o", str(out), "--report", f"{out}.json",
                        # Adam's plain step: the one a torchrun run takes, so both sides take the same steps
                        "--step", "adam", "--precondition", "none"], ranks, threads)
        report = json.loads(Path(f"{out}.json").read_text())
        assert report["iterations"] == options.iters, "the run converged early: raise --iters or change the sets"
        return report["seconds_per_iteration"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", choices=("stats", "tame", "both"), default="stats")
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--data", default="embedded:digits:all", help="stats' source; tame's remember set")
    parser.add_argument("--forget", default="embedded:digits:test:3", help="tame's forget set")
    parser.add_argument("--batch-size", type=int, default=256, help="stats' batch")
    parser.add_argument("--tame-batch", type=int, default=32, help="tame's --batch-size (forget and remember rows)")
    parser.add_argument("--iters", type=int, default=20, help="tame's --max-iters")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (1 thread each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = {f"1 process x {args.ranks} threads": (None, args.ranks),
               f"{args.ranks} processes x 1 thread": (args.ranks, 1),
               "1 process x 1 thread (control)": (None, 1)}
    commands = {"stats": (run_stats, "images/s (pass)"), "tame": (run_tame, "s/iteration (loop)")}
    chosen = list(commands) if args.command == "both" else [args.command]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        for command in chosen:
            runner, unit = commands[command]
            for name, (ranks, threads) in configs.items():
                figure, wall = runner(args, ranks, threads)
                results.setdefault((command, name), []).append((figure, wall))
                print(f"run {repeat + 1} {command} {name}: {figure:.4g} {unit}, {wall:.2f} s (command)", flush=True)
    for (command, name), runs in results.items():
        print(f"median {command} {name}: {statistics.median(f for f, _ in runs):.4g} {commands[command][1]}, "
              f"{statistics.median(w for _, w in runs):.2f} s (command)")


if __name__ == "__main__":
    main()
