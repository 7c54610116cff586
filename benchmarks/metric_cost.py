"""What the remember curvature metric costs (issue 23 item 4, round 7b): its setup, piece by piece, and its
per-iteration update, on a zoo model's base weights with the parameters taming trains (coupling outputs frozen).

Times (``time.perf_counter``, best of ``--repeats``) :func:`flowtame.methods.curvature.remember_metric` as tame
builds it (512 remember images), its two passes (``diagonal_fisher``: the per-image gradients; ``kfac_factors``:
the batched K-FAC pass), one :meth:`KroneckerMetric.update` of an Adam-sized random update, and the metric
applied to ``--rows`` random rows (the solved step's m) one row at a time with ``apply`` and, where the revision
has it, all at once with ``apply_rows``; then the solved step's solve on those rows as the rows of its system
(``constrained_step``: the Gram matrix K = J M^-1 J^T, the m x m solve and the metric applied to J^T w; and
``gram`` alone), best of ``--repeats``; prints the number of trained values inside and outside the Kronecker
blocks. Runs on any revision of the package (the
pieces are looked up by name), so the same script times the code before and after a change.

    python benchmarks/metric_cost.py --model embedded-glow --threads 1
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

from protocol import build_protocol  # noqa: E402
from zoo import NEIGHBOURS  # noqa: E402
from zoo_models import DEFAULT_CACHE, ZOO, build, digits_source  # noqa: E402

import flowtame.methods.curvature as curvature  # noqa: E402
from flowtame.flows.base import coupling_output_parameters  # noqa: E402
from flowtame.io.checkpoint import load_checkpoint  # noqa: E402


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The fastest of ``repeats`` calls of ``fn`` (seconds) and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def timed_pieces(names: tuple[str, ...]) -> dict[str, float]:
    """Wrap ``curvature``'s module functions ``names`` so that their seconds add up in the returned dict."""
    seconds: dict[str, float] = {}
    for name in names:
        fn = getattr(curvature, name)

        def timed(*args: Any, _fn: Callable[..., Any] = fn, _name: str = name, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start
        setattr(curvature, name, timed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-glow", choices=list(ZOO))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="setup repeats (best of) [2]")
    parser.add_argument("--updates", type=int, default=20, help="update calls timed (mean) [20]")
    parser.add_argument("--rows", type=int, default=32, help="rows the metric is applied to [32]")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_checkpoint(build(args.model, args.cache))
    proto = build_protocol(base, 3, args.k, NEIGHBOURS, source=digits_source(args.model, args.cache))
    model = base.model.eval()
    frozen = set(coupling_output_parameters(model))
    names = [n for n, _ in model.named_parameters() if n not in frozen]
    pieces = timed_pieces(("diagonal_fisher", "kfac_factors"))
    setup, metric = best_of(args.repeats, lambda: curvature.remember_metric(
        model, proto.remember.pixels, None, base.data_spec, names, seed=0))
    per_call = {k: v / args.repeats for k, v in pieces.items()}
    params = dict(model.named_parameters())
    inside = sum(params[n].numel() for n in names if n not in metric.diagonal)
    outside = sum(params[n].numel() for n in metric.diagonal)
    generator = torch.Generator().manual_seed(0)
    update = {n: 2e-4 * torch.randn(params[n].shape, generator=generator) for n in names}
    gradient = {n: -u.sign() * torch.rand(u.shape, generator=generator) for n, u in update.items()}
    metric.update(update, gradient)
    start = time.perf_counter()
    for _ in range(args.updates):
        metric.update(update, gradient)
    per_update = (time.perf_counter() - start) / args.updates
    rows = {n: torch.randn(args.rows, *params[n].shape, generator=generator) for n in names}
    one_at_a_time, _ = best_of(args.repeats, lambda: [metric.apply({n: rows[n][i] for n in names})
                                                      for i in range(args.rows)])
    at_once = best_of(args.repeats, lambda: metric.apply_rows(rows))[0] if hasattr(metric, "apply_rows") else None
    solve = gram = None
    if hasattr(curvature, "constrained_step"):
        targets = torch.randn(args.rows, generator=generator, dtype=torch.float64)
        solve = best_of(args.repeats, lambda: curvature.constrained_step(metric, rows, targets))[0]
        gram = best_of(args.repeats, lambda: metric.gram(rows))[0] if hasattr(metric, "gram") else None
    print(f"{args.model}: {len(names)} trained tensors, {inside:,} values in {len(metric.blocks)} Kronecker blocks, "
          f"{outside:,} on the diagonal; {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"remember_metric (512 images): {setup:.2f} s (best of {args.repeats})")
    for name, value in per_call.items():
        print(f"  {name}: {value:.2f} s (mean per build)")
    print(f"update: {1e3 * per_update:.1f} ms per call (mean of {args.updates})")
    print(f"the metric applied to {args.rows} rows: {one_at_a_time:.3f} s one at a time"
          + ("" if at_once is None else f", {at_once:.3f} s at once (apply_rows; {one_at_a_time / at_once:.1f}x)"))
    if solve is not None:
        print(f"the solve on {args.rows} rows (constrained_step): {solve:.3f} s"
              + ("" if gram is None else f", of which the Gram matrix {gram:.3f} s (best of {args.repeats})"))


if __name__ == "__main__":
    main()
