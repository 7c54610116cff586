"""Host syncs and speed of Adam's taming loop (``step: adam``) on a CUDA GPU: lagged metrics (the CUDA default)
vs unlagged. (The solved step, taming's default, is never lagged: each of its few iterations reads its
measurement back to judge the stop.)

Runs ``tame`` twice on the same model and images for a fixed number of iterations (delta is raised so
the run does not stop early), once as shipped and once with the engine reading each iteration's scalars
before its step (``EngineConfig.lagged_metrics=False``, the CPU behaviour). During the second half of each
run ``torch.cuda.set_sync_debug_mode("warn")`` is on and every host sync it reports is counted; iterations
whose callback sees a confirmation of the stopping test (a deliberate host read) would show as outliers
(the maximum). Prints syncs per iteration, seconds per iteration of the training loop (the report's
``seconds_per_iteration``) and the ratio.

    python benchmarks/gpu_sync.py [--model embedded:glow-digits] [--k 4] [--iters 200] [--precision fp32]

Needs a CUDA GPU (exits 2 without one).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.engine.loop import Engine
from flowtame.io.checkpoint import load_checkpoint
from flowtame.jobs.tame import make_config, tame


def run(base, forget_set, remember_set, *, iters: int, precision: str, lagged: bool) -> dict[str, float]:
    """One tame run of ``iters`` iterations; syncs counted over its second half."""
    syncs: list[int] = []
    caught: list[warnings.WarningMessage] = []
    recorder = warnings.catch_warnings(record=True)

    def callback(iteration: int, logged: dict[str, float]) -> None:
        nonlocal caught
        if iteration == iters // 2:
            caught = recorder.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif iteration > iters // 2:
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
            caught.clear()

    original = Engine._lagged
    Engine._lagged = lambda self: lagged
    try:
        outcome = tame(base, [forget_set], remember_set,
                       make_config({"max_iters": iters, "delta": 40.0, "precision": precision,
                                    "step": "adam"}), device="cuda",
                       callback=callback)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        recorder.__exit__(None, None, None)
        Engine._lagged = original
    return {"syncs_per_iteration": sum(syncs) / max(len(syncs), 1), "max_syncs": max(syncs, default=0),
            "seconds_per_iteration": outcome.report["seconds_per_iteration"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_sync.py needs a CUDA GPU; none is visible", file=sys.stderr)
        raise SystemExit(2)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tame import _TensorSet  # the in-memory image set benchmarks/tame.py uses

    base = load_checkpoint(resolve_model_path(args.model))
    pixels, keys = open_images(f"embedded:digits:train:{args.digit}", base.data_spec).load_tensor()
    forget_set = _TensorSet("forget", pixels[:args.k], keys[:args.k])
    remember_set = open_images("embedded:digits:train", base.data_spec)  # tame drops the forget images from it
    warnings.filterwarnings("ignore", message=".*also forget images")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.model}, k = {args.k}, "
          f"{args.iters} iterations, {args.precision}")
    results = {}
    for lagged in (True, False):
        run(base, forget_set, remember_set, iters=20, precision=args.precision, lagged=lagged)  # warm-up
        results[lagged] = run(base, forget_set, remember_set, iters=args.iters, precision=args.precision,
                              lagged=lagged)
    for lagged, r in results.items():
        name = "lagged (default)" if lagged else "unlagged"
        print(f"{name:16s}  syncs/iteration {r['syncs_per_iteration']:.2f} (max {r['max_syncs']}), "
              f"{1e3 * r['seconds_per_iteration']:.1f} ms/iteration")
    ratio = results[False]["seconds_per_iteration"] / results[True]["seconds_per_iteration"]
    print(f"unlagged / lagged time per iteration: {ratio:.2f}x")


if __name__ == "__main__":
    main()
