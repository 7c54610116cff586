"""Images/s of ``flowtame stats`` in one process against several torchrun processes, on the same threads.

Runs, ``--repeats`` times each and alternating, ``python -m flowtame stats MODEL DATA --json OUT -q`` with
``OMP_NUM_THREADS=ranks`` (one process), the same with one thread (a control: how much of the difference
is the threads', not the processes'), and ``python -m torch.distributed.run --standalone
--nproc-per-node=ranks -m flowtame stats ...`` with ``OMP_NUM_THREADS=1`` per rank (Gloo on the CPU). Prints,
per run, the report's images/s (the likelihood pass on rank 0, gather included: N / its wall time) and the
whole command's wall time (start-up, model load and rendezvous included), then the medians.

    python benchmarks/distributed.py --model embedded:glow-digits --data embedded:digits:all --repeats 3
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


def run(model: str, data: str, batch_size: int, ranks: int | None, threads: int) -> tuple[float, float]:
    """One stats run -> (report images/s, command wall seconds); ``ranks`` None = one plain process."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stats.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run([sys.executable, *launcher, "-m", "flowtame", "stats", model, data, "--json", str(out),
                        "-q", "--batch-size", str(batch_size)], env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        report = json.loads(out.read_text())
    return report["sources"][0]["images_per_second"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--data", default="embedded:digits:all")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (1 thread each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = {f"1 process x {args.ranks} threads": (None, args.ranks),
               f"{args.ranks} processes x 1 thread": (args.ranks, 1),
               "1 process x 1 thread (control)": (None, 1)}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name, (ranks, threads) in configs.items():
            rate, wall = run(args.model, args.data, args.batch_size, ranks, threads)
            results[name].append((rate, wall))
            print(f"run {repeat + 1} {name}: {rate:.1f} images/s (pass), {wall:.2f} s (command)", flush=True)
    for name, runs in results.items():
        print(f"median {name}: {statistics.median(r for r, _ in runs):.1f} images/s (pass), "
              f"{statistics.median(w for _, w in runs):.2f} s (command)")


if __name__ == "__main__":
    main()
