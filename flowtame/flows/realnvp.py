"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017) for images.

Every scale but the last: 3 affine couplings with checkerboard masks (alternating parity), a squeeze, 3 affine
couplings with channel masks (alternating halves), then half of the channels go to a standard-normal prior.
The last scale: 4 checkerboard couplings, no split. A coupling with binary mask ``b`` (1 = kept) computes

    y = b * x + (1 - b) * (x * exp(log_s) + t),   (log_s, t) = net(b * x),   log_s = scale * tanh(raw),

with log_det = sum((1 - b) * log_s) nats. The bounded ``log_s`` keeps fine-tuning stable; each net is a small
convolutional ResNet whose last convolution is zero-initialized, so a fresh model is the identity. Unlike the
paper, there is no batch normalization, so a model's output never depends on the rest of its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from flowtame.flows import Architecture, register
from flowtame.flows.base import Level, MultiScaleFlow, Squeeze, Transform


class ResidualBlock(nn.Module):
    """``h + conv3x3(relu(conv3x3(relu(h))))`` at constant width."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv2(torch.relu(self.conv1(torch.relu(h))))


def coupling_net(channels: int, hidden: int, n_res_blocks: int) -> nn.Sequential:
    """[B, C, H, W] -> [B, 2C, H, W] (raw log-scale, shift); the output convolution starts at zero."""
    out = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
    nn.init.zeros_(out.weight)
    assert out.bias is not None  # a Conv2d built with bias=True (the default)
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1),
                         *(ResidualBlock(hidden) for _ in range(n_res_blocks)), nn.ReLU(), out)


class AffineCoupling(Transform):
    """Masked affine coupling on [B, C, H, W] (see the module docstring).

    ``mask_type`` "checkerboard": pixel (i, j) is kept when (i + j) % 2 == parity, in every channel;
    "channel": the first half of the channels is kept when parity == 0, the second half when parity == 1.
    """

    def __init__(self, channels: int, hidden: int, n_res_blocks: int, mask_type: str, parity: int):
        super().__init__()
        if mask_type not in ("checkerboard", "channel"):
            raise ValueError(f"mask_type must be 'checkerboard' or 'channel', got {mask_type!r}")
        if mask_type == "channel" and channels % 2:
            raise ValueError(f"a channel-wise coupling needs an even number of channels, got {channels}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        self.mask_type = mask_type
        self.parity = parity
        self.net = coupling_net(channels, hidden, n_res_blocks)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def mask(self, x: Tensor) -> Tensor:
        """The kept-values mask b (1 = kept), broadcastable to x: [1, 1, H, W] or [1, C, 1, 1]."""
        if self.mask_type == "checkerboard":
            h, w = x.shape[2], x.shape[3]
            rows = torch.arange(h, device=x.device)[:, None]
            cols = torch.arange(w, device=x.device)[None, :]
            return ((rows + cols) % 2 == self.parity).to(x.dtype).view(1, 1, h, w)
        c = x.shape[1]
        first_half = (torch.arange(c, device=x.device) < c // 2).to(x.dtype)
        return (first_half if self.parity == 0 else 1 - first_half).view(1, c, 1, 1)

    def _shift_and_log_scale(self, kept: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.net(kept).chunk(2, 1)
        return shift * (1 - mask), self.scale * torch.tanh(raw) * (1 - mask)

    def coupling_output(self) -> nn.Module:
        return self.net[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.mask(x)
        shift, log_scale = self._shift_and_log_scale(x * mask, mask)
        return x * torch.exp(log_scale) + shift, log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        mask = self.mask(y)
        shift, log_scale = self._shift_and_log_scale(y * mask, mask)
        return (y - shift) * torch.exp(-log_scale)


@dataclass(frozen=True)
class RealNVPSpec:
    """RealNVP hyperparameters for ``channels`` x ``image_size`` x ``image_size`` images.

    ``n_scales`` scales (image_size must be divisible by 2**(n_scales - 1)); each coupling net has ``hidden``
    feature maps and ``n_res_blocks`` residual blocks.
    """

    channels: int
    image_size: int
    n_scales: int = 2
    hidden: int = 64
    n_res_blocks: int = 2

    def __post_init__(self) -> None:
        if self.channels < 1 or self.image_size < 1:
            raise ValueError("channels and image_size must be positive")
        if self.n_scales < 1 or self.hidden < 1:
            raise ValueError("n_scales and hidden must be positive")
        if self.n_res_blocks < 0:
            raise ValueError(f"n_res_blocks must be non-negative, got {self.n_res_blocks}")
        if self.image_size % (2 ** (self.n_scales - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**(n_scales - 1) = "
                             f"{2 ** (self.n_scales - 1)}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_realnvp(spec: RealNVPSpec) -> MultiScaleFlow:
    """The multi-scale RealNVP of the module docstring, standard-normal priors everywhere."""

    def couplings(channels: int, mask_type: str, count: int) -> list[Transform]:
        return [AffineCoupling(channels, spec.hidden, spec.n_res_blocks, mask_type, parity=k % 2)
                for k in range(count)]

    levels = []
    channels = spec.channels
    for _ in range(spec.n_scales - 1):
        steps = [*couplings(channels, "checkerboard", 3), Squeeze(), *couplings(4 * channels, "channel", 3)]
        levels.append(Level(steps, split=True))
        channels *= 2
    levels.append(Level(couplings(channels, "checkerboard", 4), split=False))
    return MultiScaleFlow(levels, (spec.channels, spec.image_size, spec.image_size))


register(Architecture("realnvp", RealNVPSpec, build_realnvp, "image"))
