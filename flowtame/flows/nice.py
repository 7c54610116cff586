"""NICE (Dinh, Krueger & Bengio, 2014) for images.

The image is treated as one flat vector of D = C*H*W values inside each transform (the event shape stays
(C, H, W)): ``n_couplings`` additive couplings ``y_b = x_b + m(x_a)``, with ``m`` a ReLU MLP and the
conditioning half ``a`` alternating between the even and the odd flattened coordinates, then a diagonal
scaling layer ``y = x exp(s)`` (log_det = sum(s)). The prior is a standard normal; the paper also used a
logistic prior, which flowtame does not offer so that every model shares the Gaussian latent space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from flowtame.flows import Architecture, register
from flowtame.flows.base import Level, MultiScaleFlow, Transform
from flowtame.flows.vector import MLPCoupling


class DiagonalScaling(Transform):
    """``y = x * exp(s)`` on the flattened event, ``s`` of shape [D] (zero at init); log_det = sum(s) nats."""

    def __init__(self, num_dims: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(num_dims))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x.flatten(1) * torch.exp(self.log_scale)
        return y.view_as(x), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return (y.flatten(1) * torch.exp(-self.log_scale)).view_as(y)


@dataclass(frozen=True)
class NICESpec:
    """NICE hyperparameters: ``n_couplings`` additive couplings, MLPs of ``n_hidden_layers`` x ``hidden``.

    The defaults are the paper's MNIST model (4 couplings, 5 hidden layers of 1000 units).
    """

    channels: int
    image_size: int
    n_couplings: int = 4
    hidden: int = 1000
    n_hidden_layers: int = 5

    def __post_init__(self) -> None:
        if self.channels < 1 or self.image_size < 1:
            raise ValueError("channels and image_size must be positive")
        if self.channels * self.image_size ** 2 < 2:
            raise ValueError("NICE needs at least 2 values per image to split them in two")
        if self.n_couplings < 1 or self.hidden < 1 or self.n_hidden_layers < 1:
            raise ValueError("n_couplings, hidden and n_hidden_layers must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def build_nice(spec: NICESpec) -> MultiScaleFlow:
    """Additive couplings (alternating even/odd conditioning), diagonal scaling, standard-normal prior."""
    num_dims = spec.channels * spec.image_size ** 2
    steps: list[Transform] = [MLPCoupling(num_dims, k % 2, spec.hidden, spec.n_hidden_layers, affine=False)
                              for k in range(spec.n_couplings)]
    steps.append(DiagonalScaling(num_dims))
    return MultiScaleFlow([Level(steps, split=False)], (spec.channels, spec.image_size, spec.image_size))


register(Architecture("nice", NICESpec, build_nice, "image"))
