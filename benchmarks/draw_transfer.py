"""How much of a solved step's asked change reaches noise draws it was not solved on (docs/benchmarks.md "Round 9").

One solved step (flowtame.methods.curvature.constrained_step under the remember K-FAC metric) asks each forget
image's NLL to rise by ``--push`` nats, its gradient averaged over D fresh dequantization draws; the change is
then measured on 32 independent draws. Prints, per metric damping and D, the fraction of the asked change each
image made, and the remember set's mean and RMS change beside the metric's predicted RMS.

    python benchmarks/draw_transfer.py --model embedded-glow --k 4 --damping 1e-3 1e-2 1e-1 --draws 1 2 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import add_cell_arguments, load_cell  # noqa: E402

from flowtame.jobs.tame import freeze_parameters  # noqa: E402
from flowtame.likelihood.nll import batched_nll, dequantized  # noqa: E402
from flowtame.methods.baselines import per_sample_gradients  # noqa: E402
from flowtame.methods.curvature import constrained_step, remember_metric  # noqa: E402

EVAL_DRAWS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser, model="embedded-glow", k=4)
    parser.add_argument("--damping", type=float, nargs="+", default=[1e-3], help="metric dampings [1e-3]")
    parser.add_argument("--draws", type=int, nargs="+", default=[1, 2, 8], help="draws per forget row [1 2 8]")
    parser.add_argument("--push", type=float, default=5.0, help="asked NLL rise per image, nats [5]")
    args = parser.parse_args()
    base, proto = load_cell(args)
    model, spec = base.model.eval(), base.data_spec
    freeze_parameters(model, "coupling-outputs")  # (tame's default)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    forget, remember = proto.forget.pixels, proto.remember.pixels
    k = forget.shape[0]
    generator = torch.Generator().manual_seed(5)

    def fresh(pixels: torch.Tensor, draws: int) -> torch.Tensor:
        pixels = pixels.repeat(draws, 1, 1, 1)
        return dequantized(pixels, torch.rand(pixels.shape, generator=generator), spec.n_bits)

    judge = fresh(forget, EVAL_DRAWS)
    held_out = fresh(remember[torch.randperm(remember.shape[0], generator=generator)[:512]], 1)
    forget_before = batched_nll(model, judge, spec).double().view(EVAL_DRAWS, k).mean(0)
    remember_before = batched_nll(model, held_out, spec).double()
    print(f"{args.model}, k = {k}, {sum(params[n].numel() for n in names):,} trained values, push {args.push} nats")
    for damping in args.damping:
        metric = remember_metric(model, remember, None, spec, names, seed=1, damping=damping)
        for draws in args.draws:
            groups = fresh(forget, draws).unflatten(0, (draws, k)).transpose(0, 1)  # each image's draws together
            chunks = list(per_sample_gradients(model, groups, spec, vectorized=True, chunk_size=None, names=names))
            jacobian = {n: torch.cat([chunk[n] for chunk in chunks]) for n in names}
            solved = constrained_step(metric, jacobian, torch.full((k,), args.push, dtype=torch.float64))
            saved = {n: params[n].detach().clone() for n in names}
            with torch.no_grad():
                for n, change in solved.step.items():
                    params[n].add_(change.to(params[n].dtype))
                forget_after = batched_nll(model, judge, spec).double().view(EVAL_DRAWS, k).mean(0)
                remember_change = batched_nll(model, held_out, spec).double() - remember_before
                for n in names:
                    params[n].copy_(saved[n])
            made = (forget_after - forget_before) / args.push
            predicted_rms = float((metric.scale * (solved.weights @ solved.gram @ solved.weights)).sqrt())
            print(f"damping {damping:g}, {draws:2d} draws: made {' '.join(f'{v:.2f}' for v in made.tolist())} "
                  f"(mean {float(made.mean()):.2f}) | remember mean {float(remember_change.mean()):+.4f} nats, "
                  f"RMS {float(remember_change.square().mean().sqrt()):.3f} (metric's prediction "
                  f"{predicted_rms:.3f})", flush=True)


if __name__ == "__main__":
    main()
