"""Cost of the generation audit's exact latent distances (``nearest_distance``) against the float32
matrix-product ``cdist`` it replaced, and against the base-model encoding the audit does anyway.

For each size M x R x D (queries x reference rows x latent dimensions; random float64 latents, a tenth of the
queries copies of reference rows) it prints the median wall time of both over ``--repeats`` calls, the largest
distance the old one gave a copy (the exact one gives 0) and the largest disagreement elsewhere. With
``--encode`` it also times encoding R embedded digits with the embedded Glow (the audit encodes every
reference row once), for scale:

    python benchmarks/distances.py --threads 1 --encode
    python benchmarks/distances.py --sizes 256x100x3072 1531x256x256 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flowtame.likelihood.evaluation import nearest_distance

DEFAULT_SIZES = ("256x100x3072", "1000x256x3072", "1531x256x256", "1531x1437x256")


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _old(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The replaced metric: float32 cdist in its default (matrix-product) mode."""
    return torch.cdist(query.float(), reference.float()).min(1).values.double()


def measure(m: int, r: int, d: int, repeats: int) -> dict[str, float]:
    """Seconds per call of both metrics on [m, d] x [r, d], the old metric's largest copy distance and the
    largest |old - exact| on the other rows."""
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(r, d, generator=gen, dtype=torch.float64)
    copies = min(m // 10, r)
    query = torch.cat([reference[:copies], torch.randn(m - copies, d, generator=gen, dtype=torch.float64)])
    exact, old = nearest_distance(query, reference), _old(query, reference)
    assert bool((exact[:copies] == 0).all())
    return {"exact_s": _median_seconds(lambda: nearest_distance(query, reference), repeats),
            "old_s": _median_seconds(lambda: _old(query, reference), repeats),
            "old_copy_max": float(old[:copies].max()), "old_other_err": float((old - exact)[copies:].abs().max()),
            "typical": float(exact[copies:].median())}


def encode_seconds(repeats: int) -> tuple[int, float]:
    """(rows, seconds) of encoding the embedded digits' train split with the embedded Glow at bin centres."""
    from flowtame.data.embedded import resolve_model_path
    from flowtame.data.images import open_images
    from flowtame.io.checkpoint import load_checkpoint
    from flowtame.likelihood.evaluation import _latent_rows

    ckpt = load_checkpoint(resolve_model_path("embedded:glow-digits"))
    pixels = open_images("embedded:digits:train", ckpt.image_data("benchmark")).load_tensor()[0]
    ckpt.model.eval()
    cpu = torch.device("cpu")
    return pixels.shape[0], _median_seconds(lambda: _latent_rows(ckpt, pixels, cpu, 256), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="MxRxD")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--encode", action="store_true", help="also time the embedded Glow's encoding")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("M x R x D | exact float64 ms | old float32 mm ms | ratio | old: copy's distance | old: max error "
          "elsewhere | typical distance")
    for size in args.sizes:
        m, r, d = (int(v) for v in size.split("x"))
        f = measure(m, r, d, args.repeats)
        print(f"{size} | {f['exact_s'] * 1e3:.1f} | {f['old_s'] * 1e3:.1f} | {f['exact_s'] / f['old_s']:.1f} | "
              f"{f['old_copy_max']:.3g} | {f['old_other_err']:.3g} | {f['typical']:.3g}")
    if args.encode:
        rows, seconds = encode_seconds(args.repeats)
        print(f"encoding {rows} digits with the embedded Glow (bin centres, 256 a chunk): {seconds * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
