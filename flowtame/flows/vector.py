"""Flows for 2-D and tabular data (event shape ``(dim,)``): RealNVP with MLP couplings, and MAF.

- ``vector-realnvp``: affine couplings (Dinh et al., 2017) whose scale and shift come from an MLP of the other
  half; the halves are the even and the odd coordinates, alternating from one coupling to the next, so it
  works for ``dim = 2``.
- ``maf``: masked autoregressive flow (Papamakarios et al., 2017). Each layer is a MADE (Germain et al., 2015)
  giving ``mu_i, s_i`` from ``x_<i``; ``z_i = (x_i - mu_i) exp(-s_i)`` in one pass (data -> latent), while the
  inverse is computed one dimension at a time. The variable order is reversed from one layer to the next.

:class:`MLPCoupling` acts on the flattened event, whatever its shape, so NICE (``nice.py``) reuses it for
images. Every affine log-scale is bounded: ``log_scale = scale * tanh(raw)`` with a learned ``scale`` per
dimension, and every network's last layer is zero-initialized, so a fresh flow is the identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtame.flows import Architecture, register
from flowtame.flows.base import Level, MultiScaleFlow, Transform


def mlp(in_features: int, out_features: int, hidden: int, n_hidden_layers: int) -> nn.Sequential:
    """ReLU MLP, ``n_hidden_layers`` hidden layers of width ``hidden``; the output layer starts at zero."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    out = nn.Linear(width, out_features)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


class MLPCoupling(Transform):
    """Coupling on the flattened event: coordinates ``parity::2`` condition the others through an MLP.

    ``x_a``: coordinates ``parity, parity + 2, ...`` of the flattened ``num_dims`` values; ``x_b``: the rest.
    Additive (NICE): ``y_b = x_b + t(x_a)``, log_det = 0. Affine (RealNVP):
    ``y_b = x_b exp(log_s(x_a)) + t(x_a)`` with ``log_s = scale * tanh(raw)``, log_det = sum(log_s) nats.
    Inputs of shape [B, *event] keep their shape.
    """

    def __init__(self, num_dims: int, parity: int, hidden: int, n_hidden_layers: int, affine: bool):
        super().__init__()
        if num_dims < 2:
            raise ValueError(f"a coupling needs at least 2 dimensions, got {num_dims}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        self.parity = parity
        self.affine = affine
        n_cond = len(range(parity, num_dims, 2))
        n_trans = num_dims - n_cond
        self.net = mlp(n_cond, 2 * n_trans if affine else n_trans, hidden, n_hidden_layers)
        self.scale = nn.Parameter(torch.ones(n_trans)) if affine else None

    def _shift_and_log_scale(self, cond: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.net(cond)
        if self.scale is None:  # not affine
            return out, None
        raw, shift = out.chunk(2, 1)
        return shift, self.scale * torch.tanh(raw)

    def coupling_output(self) -> nn.Module:
        return self.net[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.flatten(1)
        shift, log_scale = self._shift_and_log_scale(flat[:, self.parity::2])
        trans = flat[:, 1 - self.parity::2]
        y = flat.clone()
        if log_scale is None:
            y[:, 1 - self.parity::2] = trans + shift
            return y.view_as(x), x.new_zeros(x.shape[0])
        y[:, 1 - self.parity::2] = trans * torch.exp(log_scale) + shift
        return y.view_as(x), log_scale.sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        flat = y.flatten(1)
        shift, log_scale = self._shift_and_log_scale(flat[:, self.parity::2])
        unshifted = flat[:, 1 - self.parity::2] - shift
        x = flat.clone()
        x[:, 1 - self.parity::2] = unshifted if log_scale is None else unshifted * torch.exp(-log_scale)
        return x.view_as(y)


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask`` of shape [out, in] (not saved)."""

    mask: Tensor

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder: [B, dim] -> [B, 2*dim] = cat(mu, raw), output i depending only on inputs before i.

    ``order`` (a permutation of 1..dim) is each input's degree; hidden unit k has degree ``k % (dim - 1) + 1``
    and sees inputs of degree <= its own; output i sees hidden units of degree < order[i]. The output layer
    starts at zero.
    """

    def __init__(self, order: Tensor, hidden: int, n_hidden_layers: int):
        super().__init__()
        dim = order.numel()
        if dim < 2:
            raise ValueError(f"MADE needs at least 2 dimensions, got {dim}")
        layers: list[nn.Module] = []
        previous = order
        for _ in range(n_hidden_layers):
            degrees = torch.arange(hidden) % (dim - 1) + 1
            layers += [MaskedLinear(degrees[:, None] >= previous[None, :]), nn.ReLU()]
            previous = degrees
        out = MaskedLinear(order.repeat(2)[:, None] > previous[None, :])
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MAFLayer(Transform):
    """One MAF layer on [B, dim]: ``z = (x - mu(x)) exp(-log_s(x))``, log_det = -sum(log_s) (nats).

    ``log_s = scale * tanh(raw)``. ``reverse`` orders the variables dim..1 instead of 1..dim. The inverse runs
    the MADE ``dim`` times: after pass k the first k variables (in order) are exact.
    """

    def __init__(self, dim: int, hidden: int, n_hidden_layers: int, reverse: bool):
        super().__init__()
        order = torch.arange(1, dim + 1)
        self.made = MADE(order.flip(0) if reverse else order, hidden, n_hidden_layers)
        self.scale = nn.Parameter(torch.ones(dim))

    def coupling_output(self) -> nn.Module:
        return self.made.net[-1]

    def _shift_and_log_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.made(x).chunk(2, 1)
        return shift, self.scale * torch.tanh(raw)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_and_log_scale(x)
        return (x - shift) * torch.exp(-log_scale), -log_scale.sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        x = torch.zeros_like(y)
        for _ in range(y.shape[1]):
            shift, log_scale = self._shift_and_log_scale(x)
            x = y * torch.exp(log_scale) + shift
        return x


@dataclass(frozen=True)
class VectorRealNVPSpec:
    """RealNVP for ``dim``-vectors: ``n_couplings`` affine couplings, ``n_hidden_layers`` x ``hidden`` MLP."""

    dim: int
    n_couplings: int = 8
    hidden: int = 64
    n_hidden_layers: int = 2

    def __post_init__(self) -> None:
        if self.dim < 2:
            raise ValueError(f"dim must be at least 2 (a coupling splits the vector in two), got {self.dim}")
        if self.n_couplings < 1 or self.hidden < 1 or self.n_hidden_layers < 1:
            raise ValueError("n_couplings, hidden and n_hidden_layers must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def build_vector_realnvp(spec: VectorRealNVPSpec) -> MultiScaleFlow:
    """Couplings alternating even/odd conditioning coordinates, standard-normal prior; event shape (dim,)."""
    steps = [MLPCoupling(spec.dim, k % 2, spec.hidden, spec.n_hidden_layers, affine=True)
             for k in range(spec.n_couplings)]
    return MultiScaleFlow([Level(steps, split=False)], (spec.dim,))


@dataclass(frozen=True)
class MAFSpec:
    """MAF for vectors of ``dim`` values: ``n_layers`` MADEs, each ``n_hidden_layers`` x ``hidden`` units."""

    dim: int
    n_layers: int = 5
    hidden: int = 64
    n_hidden_layers: int = 2

    def __post_init__(self) -> None:
        if self.dim < 2:
            raise ValueError(f"dim must be at least 2, got {self.dim}")
        if self.n_layers < 1 or self.hidden < 1 or self.n_hidden_layers < 1:
            raise ValueError("n_layers, hidden and n_hidden_layers must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def build_maf(spec: MAFSpec) -> MultiScaleFlow:
    """MAF layers, variable order reversed between layers, standard-normal prior; event shape (dim,)."""
    steps = [MAFLayer(spec.dim, spec.hidden, spec.n_hidden_layers, reverse=k % 2 == 1)
             for k in range(spec.n_layers)]
    return MultiScaleFlow([Level(steps, split=False)], (spec.dim,))


register(Architecture("vector-realnvp", VectorRealNVPSpec, build_vector_realnvp, "vector"))
register(Architecture("maf", MAFSpec, build_maf, "vector"))
