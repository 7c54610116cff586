"""What the solved step's rows' per-image gradients cost at each chunk size (docs/benchmarks.md "Round 15").

Times :func:`flowtame.methods.baselines.per_sample_gradients` on a zoo model's trained values (coupling outputs
frozen) for ``--images`` random inputs under ``--draws`` draws each (the forget rows: 15 x 8; the held rows:
16 x 4), at each ``--chunks`` size (1: plain autograd one image at a time; more: vmap over that many images) and
at the package's default (``None``), interleaved, fastest of ``--repeats`` after a warm-up; and one batched
gradient of all the inputs' mean NLL (:func:`mean_nll_gradient`), the floor a per-image method could approach.
Freed host memory is kept, as the CLI does.

    python benchmarks/row_gradients.py --model tuning-glow --images 15 --draws 8
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_models import DEFAULT_CACHE, ZOO, build  # noqa: E402

from flowtame.engine.host_memory import retain_freed_host_memory  # noqa: E402
from flowtame.flows.base import coupling_output_parameters  # noqa: E402
from flowtame.io.checkpoint import load_checkpoint  # noqa: E402
from flowtame.methods.baselines import mean_nll_gradient, per_sample_gradients  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tuning-glow", choices=list(ZOO))
    parser.add_argument("--images", type=int, default=15)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 3, 6, 15])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_host_memory()
    base = load_checkpoint(build(args.model, args.cache))
    model, spec = base.model.eval(), base.data_spec
    frozen = set(coupling_output_parameters(model))
    names = [n for n, _ in model.named_parameters() if n not in frozen]
    groups = torch.rand(args.images, args.draws, spec.channels, spec.image_size, spec.image_size,
                        generator=torch.Generator().manual_seed(0)) - 0.5

    def rows(chunk: int | None) -> Callable[[], Any]:
        return lambda: list(per_sample_gradients(model, groups, spec, vectorized=True, chunk_size=chunk,
                                                 names=names))

    cases: dict[str, Callable[[], Any]] = {f"chunks of {c}": rows(c) for c in args.chunks}
    cases["default chunks"] = rows(None)
    cases["one batched gradient (floor)"] = lambda: mean_nll_gradient(model, groups.flatten(0, 1), spec, names)
    best = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():  # warm-up: torch.func's first transform, oneDNN primitives
        fn()
    for _ in range(args.repeats):
        for label, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - start)
    default = [next(iter(c.values())).shape[0] for c in rows(None)()]
    print(f"{args.model}: {sum(p.numel() for n, p in model.named_parameters() if n in set(names)):,} trained "
          f"values, {args.images} images x {args.draws} draws, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}; default chunks {default}")
    for label, seconds in best.items():
        print(f"{label:>30}: {seconds:.3f} s (fastest of {args.repeats})")


if __name__ == "__main__":
    main()
