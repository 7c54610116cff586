"""Where one taming iteration's time goes on the embedded model: the training step and the refresh.

Times, on the same trainable copy ``tame`` builds (channels-last on the CPU), (1) one training step over a
forget + remember batch (forward, backward, Adam) with every parameter training and with the coupling
outputs held fixed, and (2) the no-grad refresh forward over 256 and 512 remember-sized inputs; then
prints the PyTorch profiler's top operators of the fixed-outputs step. Inputs are random images of the
model's shape: the cost does not depend on the pixels.

    python benchmarks/step.py [--model embedded:glow-digits] [--batch 36] [--threads 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from flowtame.data.embedded import resolve_model_path
from flowtame.engine.devices import resolve_device, trainable_copy
from flowtame.io.checkpoint import load_checkpoint
from flowtame.jobs.tame import FREEZE_RULES, freeze_parameters
from flowtame.likelihood.nll import batched_nll, nll_nats


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, spec) -> None:
    """One forward, backward and Adam step on the mean NLL of ``x`` [B, C, H, W]."""
    optimizer.zero_grad(set_to_none=True)
    nll_nats(model, x, spec).mean().backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--batch", type=int, default=36, help="images per step (tame: 4 forget + 32 remember)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after 5 warm-up steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_checkpoint(resolve_model_path(args.model))
    spec, cpu = base.data_spec, resolve_device("cpu")
    shape = (spec.channels, spec.image_size, spec.image_size)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, *shape, generator=generator)
    print(f"model {args.model}; {args.batch} images per step; {args.threads} CPU threads; torch {torch.__version__}")
    trained = {}
    for rule in reversed(FREEZE_RULES):  # none first, then the default
        model = trainable_copy(base, cpu).train()
        freeze_parameters(model, rule)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6, foreach=True)
        for _ in range(5):
            train_step(model, optimizer, x, spec)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, x, spec)
        print(f"training step, freeze {rule:16s} {1e3 * (time.perf_counter() - start) / args.steps:7.1f} ms")
        trained[rule] = model, optimizer
    model, optimizer = trained[FREEZE_RULES[0]]
    model.eval()
    for size in (256, 512):
        refresh = torch.rand(size, *shape, generator=generator)
        batched_nll(model, refresh, spec)
        start = time.perf_counter()
        for _ in range(3):
            batched_nll(model, refresh, spec)
        print(f"refresh forward, {size} images        {1e3 * (time.perf_counter() - start) / 3:7.1f} ms")
    model.train()
    with profile() as prof:
        for _ in range(10):
            train_step(model, optimizer, x, spec)
    print(f"\nprofiler, 10 training steps (freeze {FREEZE_RULES[0]}):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
