"""The remember NLL's curvature as a metric for the forget push (issue 23, round 6a; experimental).

:class:`KroneckerMetric` holds a damped K-FAC approximation (Grosse & Martens 2016) of the Fisher of the
remember NLL at the base weights: for every trained Conv2d, F_l = A (x) G with A the mean outer product of the
layer's unfolded input patches (a trailing 1 for the bias) and G the per-image outer product of the NLL's
gradient at the layer's output summed over positions (nats^2); for the other trained values, the diagonal
Fisher. :meth:`KroneckerMetric.apply` multiplies a gradient by the metric's inverse.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowtame.data.quantization import DataSpec
from flowtame.likelihood.nll import nll_nats
from flowtame.methods.baselines import diagonal_fisher


def kfac_factors(model: nn.Module, x: Tensor, data_spec: DataSpec, layers: dict[str, nn.Conv2d],
                 chunk: int = 64) -> dict[str, tuple[Tensor, Tensor]]:
    """(A [in*kh*kw(+1)]^2, G [out]^2), float64, per layer of ``layers``, on the model inputs ``x`` [N,C,S,S]."""
    sums: dict[str, list[Tensor]] = {}

    def hook(name: str, module: nn.Conv2d):
        def forward(_module, inputs, output):
            a = torch.nn.functional.unfold(inputs[0].detach(), module.kernel_size, module.dilation,
                                           module.padding, module.stride).double()
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            a_sum = torch.einsum("nit,njt->ij", a, a) / a.shape[2]

            def backward(g: Tensor) -> None:
                g = g.detach().double().flatten(2)
                g_sum = torch.einsum("nit,njt->ij", g, g)
                if name in sums:
                    sums[name][0] += a_sum
                    sums[name][1] += g_sum
                else:
                    sums[name] = [a_sum, g_sum]
            output.register_hook(backward)
        return forward

    handles = [module.register_forward_hook(hook(name, module)) for name, module in layers.items()]
    try:
        for start in range(0, x.shape[0], chunk):
            torch.autograd.grad(nll_nats(model, x[start:start + chunk], data_spec).sum(),
                                [m.weight for m in layers.values()])
    finally:
        for handle in handles:
            handle.remove()
    return {name: (a / x.shape[0], g / x.shape[0]) for name, (a, g) in sums.items()}


class KroneckerMetric:
    """Damped inverse of the remember NLL's K-FAC Fisher over the trained values ``names`` of ``model``.

    ``x`` [N,C,S,S]: dequantized remember images (not the ones the run measures its drift on); ``damping``
    lambda: a fraction of the diagonal Fisher's mean entry, split between A and G by Martens & Grosse's pi.
    """

    def __init__(self, model: nn.Module, x: Tensor, data_spec: DataSpec, names: list[str], damping: float):
        modules = dict(model.named_modules())
        trained = set(names)
        layers = {name: m for name, m in modules.items()
                  if isinstance(m, nn.Conv2d) and f"{name}.weight" in trained}
        fisher = diagonal_fisher(model, x, data_spec)
        scale = float(torch.cat([fisher[n].flatten() for n in names]).double().mean())
        self.diagonal = {n: 1.0 / (fisher[n].double() / scale + damping) for n in names}
        self.layers: dict[str, tuple[Tensor, Tensor, str | None]] = {}
        for name, (a, g) in kfac_factors(model, x, data_spec, layers).items():
            pi = (float(a.diagonal().mean()) / float(g.diagonal().mean())) ** 0.5
            gamma = (damping * scale) ** 0.5
            a_inv = torch.linalg.inv(a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype))
            g_inv = torch.linalg.inv(g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype))
            bias = f"{name}.bias" if f"{name}.bias" in trained else None
            self.layers[f"{name}.weight"] = (scale * g_inv, a_inv, bias)

    def apply(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """The metric's inverse times ``grads`` (name -> tensor shaped like the parameter), float64."""
        out = {n: g.double() * self.diagonal[n] for n, g in grads.items()}
        for weight, (g_inv, a_inv, bias) in self.layers.items():
            w = grads[weight].double()
            u = w.reshape(w.shape[0], -1)
            if bias is not None:
                u = torch.cat([u, grads[bias].double().reshape(-1, 1)], 1)
            u = g_inv @ u @ a_inv
            out[weight] = u[:, :w[0].numel()].reshape(w.shape)
            if bias is not None:
                out[bias] = u[:, -1]
        return out
