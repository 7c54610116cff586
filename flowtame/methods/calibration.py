"""How far one optimizer step moves the remember NLL on the model being tamed, and the learning rate that fits it.

Adam moves every trainable weight by about the learning rate per step whatever the gradient's size, so to
first order one step changes the remember set's mean NLL ``m`` by at most ``lr * ||grad m||_1`` nats (every
weight moving by lr in the direction that raises m). That L1 norm grows with the number of trainable
weights and with how sharply the NLL depends on them: 9.7e3 nats per unit step on the embedded digits Glow
(324k trainable values), 6.1e5 on a converted rosinality Glow of width 512 (5.1M): the same lr is a 63x
larger step in NLL there (docs/method.md "Blow-ups"). :func:`calibrate_lr` caps the learning rate so that
this worst-case first-order change stays under ``step_sigma`` remember standard deviations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from flowtame.data.quantization import DataSpec
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import nll_nats


@dataclass(frozen=True)
class Calibration:
    """The learning rate chosen for a model and what it was chosen from.

    ``sensitivity``: ``||grad m||_1``, nats of remember mean NLL per unit of coherent step (every trainable
    weight moved by 1); ``sigma``: the remember standard deviation (nats) the step is measured in;
    ``lr_cap``: the configured learning rate; ``lr``: the one used, ``min(lr_cap, step_sigma*sigma/sensitivity)``;
    ``step_sigma_at_cap``: the worst-case first-order change of m, in sigma, that one step at ``lr_cap`` would
    have made.
    """

    lr: float
    lr_cap: float
    step_sigma: float
    sensitivity: float
    sigma: float
    step_sigma_at_cap: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def remember_sensitivity(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec, chunk: int = 64) -> float:
    """``||grad_theta mean NLL(x)||_1`` over the model's trainable parameters (nats per unit weight change).

    ``x``: dequantized remember images [N, C, H, W] (fixed noise); gradients are accumulated in chunks of
    ``chunk`` images and the parameters' ``.grad`` are left as they were found (cleared).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0.0
    was_training = model.training
    model.train()
    grads = [torch.zeros_like(p) for p in params]
    for i in range(0, x.shape[0], chunk):
        part = nll_nats(model, x[i:i + chunk], data_spec).sum() / x.shape[0]
        for total, g in zip(grads, torch.autograd.grad(part, params, allow_unused=True), strict=True):
            if g is not None:
                total += g
    model.train(was_training)
    return float(sum(g.abs().sum().double() for g in grads))


def calibrate_lr(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec, *, lr_cap: float, step_sigma: float,
                 sigma: float) -> Calibration:
    """The largest learning rate up to ``lr_cap`` whose worst-case first-order effect on the remember mean NLL
    (``lr * sensitivity``) is at most ``step_sigma`` remember standard deviations ``sigma`` (nats)."""
    sensitivity = remember_sensitivity(model, x, data_spec)
    fitted = step_sigma * sigma / sensitivity if sensitivity > 0 else lr_cap
    return Calibration(lr=min(lr_cap, fitted), lr_cap=lr_cap, step_sigma=step_sigma, sensitivity=sensitivity,
                       sigma=sigma, step_sigma_at_cap=lr_cap * sensitivity / sigma)
