"""How far from linear one Adam-sized step is (issue 23, round 5b): actual NLL change against its first order.

On a zoo model's base weights (the parameters taming trains: coupling outputs frozen), for one step of ``lr``
on every trained coordinate — along the sign of the forget images' NLL gradient (the direction Adam's steps take
once their momentum agrees) and along a random sign (pure jitter) — prints the change of the forget images' mean
NLL and of 256 remember images' mean NLL (nats, fixed dequantization noise), measured and to first order
(gradient . step); ``--groups`` also steps each parameter group alone along the forget sign, ``--project N``
projects that step off the span of N other remember images' per-image gradients. A first-order correction of
the step (a drift-neutral projection) can only hold the remember mean if the two columns agree. ``--fisher N``
(round 6a) also takes the forget step preconditioned by a metric of the remember NLL (diagonal Fisher or
K-FAC, estimated on N remember images disjoint from the 256 measured), scaled to the same first-order forget
rise, and prints the forget rise / remember rise ratio of each.

    python benchmarks/step_curvature.py --model embedded-glow --k 4
    python benchmarks/step_curvature.py --model realnvp --k 4 --lrs 2e-4 --fisher 512 --damping 1 0.1 0.01 1e-3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import build_protocol  # noqa: E402
from zoo import NEIGHBOURS  # noqa: E402
from zoo_models import DEFAULT_CACHE, ZOO, build, digits_source  # noqa: E402

from flowtame.flows.base import coupling_output_parameters  # noqa: E402
from flowtame.io.checkpoint import load_checkpoint  # noqa: E402
from flowtame.likelihood.nll import dequantized, nll_nats  # noqa: E402
from flowtame.methods.baselines import diagonal_fisher  # noqa: E402
from flowtame.methods.curvature import KroneckerMetric  # noqa: E402


def mean_nll(model: torch.nn.Module, x: torch.Tensor, spec) -> float:
    """Mean NLL (nats) of the dequantized inputs ``x``, no gradient."""
    with torch.no_grad():
        return float(nll_nats(model, x, spec).double().mean())


def flat(tensors) -> torch.Tensor:
    """Tensors flattened into one float64 vector."""
    return torch.cat([t.flatten() for t in tensors]).double()


@torch.no_grad()
def add_flat(params: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Add a flat vector (as :func:`flat` lays it out) to ``params`` in place."""
    offset = 0
    for p in params:
        p.add_(vector[offset:offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()


def group_of(name: str) -> str:
    """A parameter's group for ``--groups``: actnorm, invconv, prior, coupling (hidden layers), or its name."""
    for tag in ("actnorm", "invconv", "prior", "coupling"):
        if tag in name:
            return tag
    return name.split(".")[-1]


def step_changes(model, spec, params, xs, vector: torch.Tensor) -> tuple[float, float]:
    """Change of the mean NLL (nats) of each of ``xs`` = (forget, remember) after adding ``vector`` to ``params``."""
    before = [mean_nll(model, x, spec) for x in xs]
    add_flat(params, vector)
    after = [mean_nll(model, x, spec) for x in xs]
    add_flat(params, -vector)
    return after[0] - before[0], after[1] - before[1]


def preconditioned_steps(model, spec, pixels, names, params, xs, gradients, lrs, dampings, generator) -> None:
    """Forget steps preconditioned by a metric of the remember NLL estimated on ``pixels`` (disjoint images).

    With the diagonal Fisher F^ = F / mean(F) and damping lambda: ``sign/sqrtF`` = sign(g_F) / sqrt(F^ +
    lambda) and ``sign/F`` = sign(g_F) / (F^ + lambda) (Adam's sign step with a per-value learning rate set by
    the remember curvature), ``g/F`` = g_F / (F^ + lambda) (the diagonal natural gradient); ``sign/KF`` and
    ``g/KF``: the same two with the K-FAC metric (:class:`flowtame.methods.curvature.KroneckerMetric`),
    ``sign(g/KF)``: the sign of ``g/KF`` (what Adam makes of a forget gradient preconditioned before it).
    Every step is scaled to the plain sign step's first-order forget rise (g_F . step = lr |g_F|_1); prints
    each step's actual forget and remember rises (nats per image), their ratio, and its length against the
    sign step's.
    """
    x = dequantized(pixels, torch.rand(pixels.shape, generator=generator), spec.n_bits)
    start = time.perf_counter()
    fisher = diagonal_fisher(model, x, spec)
    seconds = time.perf_counter() - start
    metric = flat([fisher[name] for name in names])
    metric = metric / metric.mean()
    start = time.perf_counter()
    kfac = {damping: KroneckerMetric(model, x, spec, names, damping) for damping in dampings}
    kfac_seconds = (time.perf_counter() - start) / len(dampings)
    g_forget, g_remember = flat(gradients[0]), flat(gradients[1])
    print(f"diagonal Fisher of the remember NLL on {pixels.shape[0]} other remember images: {seconds:.1f} s "
          f"(K-FAC metric, {len(kfac[dampings[0]].blocks)} conv layers: {kfac_seconds:.1f} s); "
          f"F/mean(F) quantiles 10/50/90/99%: "
          + " ".join(f"{float(q):.3g}" for q in torch.quantile(metric[torch.randperm(metric.numel(),
                                                                                   generator=generator)[:100_000]],
                                                                torch.tensor([0.1, 0.5, 0.9, 0.99]).double())))
    print("lr      step              lambda  forget  remember  ratio  length | remember first order")
    for lr in lrs:
        sign = g_forget.sign()
        directions = [("sign", None, sign)]
        for damping in dampings:
            directions += [("sign/sqrtF", damping, sign / (metric + damping).sqrt()),
                           ("sign/F", damping, sign / (metric + damping)),
                           ("g/F", damping, g_forget / (metric + damping)),
                           ("sign/KF", damping, kfac_flat(kfac[damping], names, params, sign)),
                           ("g/KF", damping, kfac_flat(kfac[damping], names, params, g_forget)),
                           ("sign(g/KF)", damping, kfac_flat(kfac[damping], names, params, g_forget).sign())]
        for kind, damping, direction in directions:
            step = direction * (lr * float(g_forget.abs().sum()) / float(g_forget @ direction))
            forget, remember = step_changes(model, spec, params, xs, step)
            print(f"{lr:<7g} {kind:<16} {'' if damping is None else f'{damping:g}':>7} {forget:+7.3f} "
                  f"{remember:+9.3f} {forget / remember:6.1f} {float(step.norm() / (lr * sign.norm())):7.2f} | "
                  f"{float(g_remember @ step):+.3f}")


def kfac_flat(metric: KroneckerMetric, names: list[str], params: list[torch.Tensor], vector: torch.Tensor
              ) -> torch.Tensor:
    """``metric.apply`` on a flat vector laid out as :func:`flat` lays out ``params``."""
    pieces, offset = {}, 0
    for name, p in zip(names, params, strict=True):
        pieces[name] = vector[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    out = metric.apply(pieces)
    return flat([out[name] for name in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-glow", choices=list(ZOO))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 1e-4, 5e-5, 2e-5])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--groups", action="store_true",
                        help="also step each parameter group alone (forget sign only)")
    parser.add_argument("--project", type=int, nargs="*", default=[],
                        help="also the forget-sign step projected off the span of the per-image NLL gradients of N "
                             "other remember images (each N given), rescaled to the same length")
    parser.add_argument("--fisher", type=int, default=0,
                        help="also forget-sign steps preconditioned by the diagonal Fisher of the remember NLL, "
                             "estimated on N remember images disjoint from the 256 measured ones")
    parser.add_argument("--damping", type=float, nargs="+", default=[1.0, 0.1, 0.01],
                        help="damping of the Fisher preconditioners, as a fraction of the metric's mean diagonal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    base = load_checkpoint(build(args.model, args.cache))
    proto = build_protocol(base, args.digit, args.k, NEIGHBOURS, source=digits_source(args.model, args.cache))
    model, spec = base.model, base.data_spec
    model.train()
    frozen = set(coupling_output_parameters(model))
    names = [name for name, _ in model.named_parameters() if name not in frozen]
    params = [p for name, p in model.named_parameters() if name not in frozen]
    forget = proto.forget.pixels
    order = torch.randperm(proto.remember.pixels.shape[0], generator=generator)
    remember = proto.remember.pixels[order[:256]]
    x_forget = dequantized(forget, torch.rand(forget.shape, generator=generator), spec.n_bits)
    x_remember = dequantized(remember, torch.rand(remember.shape, generator=generator), spec.n_bits)
    g_forget = torch.autograd.grad(nll_nats(model, x_forget, spec).mean(), params)
    g_remember = torch.autograd.grad(nll_nats(model, x_remember, spec).mean(), params)
    print(f"{args.model}, k = {args.k}: {sum(p.numel() for p in params)} trained values; nats per image")
    print("lr      direction     forget: actual  first order | remember: actual  first order")
    groups = sorted({group_of(name) for name in names}) if args.groups else []
    for lr in args.lrs:
        for kind in ("forget sign", "random sign", *groups):
            signs = [torch.randint(0, 2, g.shape, generator=generator) * 2 - 1 if kind == "random sign"
                     else g.sign() if kind == "forget sign" or group_of(name) == kind else torch.zeros_like(g)
                     for g, name in zip(g_forget, names, strict=True)]
            step = [lr * s.to(g.dtype) for s, g in zip(signs, g_forget, strict=True)]
            f0, r0 = mean_nll(model, x_forget, spec), mean_nll(model, x_remember, spec)
            with torch.no_grad():
                for p, s in zip(params, step, strict=True):
                    p.add_(s)
            f1, r1 = mean_nll(model, x_forget, spec), mean_nll(model, x_remember, spec)
            with torch.no_grad():
                for p, s in zip(params, step, strict=True):
                    p.sub_(s)
            first_f = sum(float((g * s).sum()) for g, s in zip(g_forget, step, strict=True))
            first_r = sum(float((g * s).sum()) for g, s in zip(g_remember, step, strict=True))
            print(f"{lr:<7g} {kind:<12} {f1 - f0:+14.3f} {first_f:+12.3f} | {r1 - r0:+16.3f} {first_r:+12.3f}")
    for n in args.project:
        pixels = proto.remember.pixels[order[256:256 + n]]
        x = dequantized(pixels, torch.rand(pixels.shape, generator=generator), spec.n_bits)
        span = torch.stack([flat(torch.autograd.grad(nll_nats(model, x[i:i + 1], spec).sum(), params))
                            for i in range(x.shape[0])])
        basis, _ = torch.linalg.qr(span.T)
        for lr in args.lrs:
            step = lr * flat(g_forget).sign()
            projected = step - basis @ (basis.T @ step)
            projected = projected * step.norm() / projected.norm()
            changes = []
            for vector in (step, projected):
                f0, r0 = mean_nll(model, x_forget, spec), mean_nll(model, x_remember, spec)
                add_flat(params, vector)
                changes.append((mean_nll(model, x_forget, spec) - f0, mean_nll(model, x_remember, spec) - r0))
                add_flat(params, -vector)
            print(f"{lr:<7g} off {n:>4} remember gradients: forget {changes[1][0]:+.3f} (plain {changes[0][0]:+.3f}), "
                  f"remember {changes[1][1]:+.3f} (plain {changes[0][1]:+.3f}); "
                  f"{float(step @ projected) / float(step @ step):.3f} of the step kept")


    if args.fisher:
        preconditioned_steps(model, spec, proto.remember.pixels[order[256:256 + args.fisher]], names, params,
                             (x_forget, x_remember), (g_forget, g_remember), args.lrs, args.damping, generator)


if __name__ == "__main__":
    main()
