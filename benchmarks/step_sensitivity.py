"""How far one coherent optimizer step moves a model's remember mean NLL (issue 23, docs/method.md "Blow-ups").

Adam moves every trainable weight by about lr per step, so to first order a step changes the remember set's
mean NLL m by up to ``lr * ||grad m||_1``. This script prints that sensitivity (the one the learning-rate
calibration uses, :func:`flowtame.methods.calibration.remember_sensitivity`) on 256 remember images (digits of
every class but ``--digit``, fixed noise), the calibrated learning rate, and the measured change of m after
a sign step of several sizes up (every weight moved by lr the way that raises m) and down:

    python benchmarks/step_sensitivity.py embedded:glow-digits
    python benchmarks/step_sensitivity.py tuning.safetensors --source 'digits-bilinear/{split}/{digit}'
"""

from __future__ import annotations

import argparse

import torch

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.io.checkpoint import load_checkpoint
from flowtame.jobs.tame import TameConfig, freeze_parameters
from flowtame.likelihood.nll import batched_nll, dequantized, nll_nats
from flowtame.methods.calibration import calibrate_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--source", default="embedded:digits:{split}:{digit}",
                        help="template of one split's and class's digits [embedded digits]")
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(resolve_model_path(args.model))
    spec, model = ckpt.data_spec, ckpt.model
    pixels = torch.cat([open_images(args.source.format(split="train", digit=c), spec).load_tensor()[0]
                        for c in range(10) if c != args.digit])
    generator = torch.Generator().manual_seed(0)
    chosen = pixels[torch.randperm(pixels.shape[0], generator=generator)[:args.images]]
    x = dequantized(chosen, torch.rand(chosen.shape, generator=generator), spec.n_bits)
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_parameters(model, "coupling-outputs")
    params = [p for p in model.parameters() if p.requires_grad]
    before = batched_nll(model, x, spec)
    m0, sigma = float(before.mean()), float(before.std())
    defaults = TameConfig()
    calibration = calibrate_lr(model, x, spec, lr_cap=defaults.lr, step_sigma=defaults.step_sigma, sigma=sigma)
    print(f"{args.model}: {sum(p.numel() for p in params):,} trainable values; remember mean NLL {m0:.1f} nats, "
          f"sd {sigma:.1f}; ||grad m||_1 = {calibration.sensitivity:.4g} nats per unit step; a step at lr "
          f"{defaults.lr:g} moves m by up to {calibration.step_sigma_at_cap:.2f} sd (first order); calibrated lr "
          f"{calibration.lr:.3g} (step_sigma {defaults.step_sigma})")
    grads = torch.autograd.grad(nll_nats(model, x, spec).mean(), params)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for lr in (1e-6, 1e-5, 3e-5, 1e-4, 2e-4):
            changes = []
            for sign in (1.0, -1.0):
                for p, p0, g in zip(params, start, grads, strict=True):
                    p.copy_(p0 + sign * lr * g.sign())
                changes.append(float(batched_nll(model, x, spec).mean()) - m0)
            print(f"  sign step lr {lr:.0e}: up {changes[0]:+9.2f} nats ({changes[0] / sigma:+6.2f} sd), "
                  f"down {changes[1]:+9.2f}; first order {lr * calibration.sensitivity:9.2f}")
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0)


if __name__ == "__main__":
    main()
