"""How much the forget images' NLL gradient overlaps the remember set's, on a zoo model (issue 23).

For the digit protocol's D_F (k images) and two random batches of 128 remember images, with fixed dequantization
noise and the coupling outputs held fixed (taming's default), prints the cosines between the gradients of the
mean NLL (forget draw 1 vs draw 2, remember batch vs another, forget vs remember) and, for a unit step along
sign(g_F) (what Adam's first steps do), g_F, and g_F with its remember component projected out, the first-order
change of the forget mean NLL (other noise draw) and of the remember mean NLL (other batch).

    python benchmarks/gradient_overlap.py tuning-glow --k 4 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import build_protocol  # noqa: E402
from zoo_models import DEFAULT_CACHE, ZOO, build, digits_source  # noqa: E402

from flowtame.io.checkpoint import load_checkpoint  # noqa: E402
from flowtame.jobs.tame import freeze_parameters  # noqa: E402
from flowtame.likelihood.nll import dequantized, nll_nats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(ZOO))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--remember", type=int, default=128, help="remember images per batch [128]")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_checkpoint(build(args.model, DEFAULT_CACHE))
    proto = build_protocol(base, 3, args.k, 16, source=digits_source(args.model, DEFAULT_CACHE))
    model = base.model.train()
    freeze_parameters(model, "coupling-outputs")
    params = [p for p in model.parameters() if p.requires_grad]
    spec = base.data_spec
    assert spec is not None

    def grad(pixels: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(seed))
        mean = nll_nats(model, dequantized(pixels, noise, spec.n_bits), spec).mean()
        return torch.cat([g.flatten() for g in torch.autograd.grad(mean, params)])

    remember = proto.remember.pixels
    draw = torch.Generator().manual_seed(0)
    g_f1, g_f2 = grad(proto.forget.pixels, 1), grad(proto.forget.pixels, 2)
    g_r1 = grad(remember[torch.randperm(remember.shape[0], generator=draw)[:args.remember]], 3)
    g_r2 = grad(remember[torch.randperm(remember.shape[0], generator=draw)[:args.remember]], 4)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    print(f"{args.model}, k = {args.k}, {g_f1.numel():,} trainable values: cos(g_F draw 1, draw 2) "
          f"{cos(g_f1, g_f2):.3f}, cos(g_R, g_R') {cos(g_r1, g_r2):.3f}, cos(g_F, g_R) {cos(g_f1, g_r1):.3f}")
    residual = g_f1 - (g_f1 @ g_r1) / (g_r1 @ g_r1) * g_r1
    for label, step in (("sign(g_F)", g_f1.sign()), ("g_F", g_f1 / g_f1.abs().max()),
                        ("g_F minus its g_R part", residual.sign())):
        forget, kept = float(g_f2 @ step), float(g_r2 @ step)
        print(f"  unit step along {label}: forget mean NLL {forget:+.4g} nats, remember mean NLL {kept:+.4g} nats, "
              f"ratio {forget / abs(kept):.2f}")


if __name__ == "__main__":
    main()
