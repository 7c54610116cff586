"""Quantization, dequantization and the units of every likelihood flowtame prints.

Images are quantized to ``n_bits`` (n_bins = 2**n_bits): ``x = floor(x255 / 2**(8 - n_bits)) / n_bins - 0.5``,
so values lie in [-0.5, 0.5 - 1/n_bins]. Dequantization adds uniform noise u ~ U(0, 1/n_bins) per value.
The discrete NLL in nats is ``-log p(x + u) + D * log(n_bins)``; bits per dimension ``BPD = NLL / (D ln 2)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class DataSpec:
    """What a model's inputs are: ``channels`` x ``image_size`` x ``image_size`` values at ``n_bits`` bits."""

    image_size: int
    channels: int
    n_bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits must be between 1 and 8, got {self.n_bits}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    @property
    def n_bins(self) -> int:
        return 2 ** self.n_bits

    @property
    def num_dims(self) -> int:
        """D = channels * image_size**2."""
        return self.channels * self.image_size ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def quantize(pixels: np.ndarray | Tensor, n_bits: int) -> Tensor:
    """uint8 pixels (any shape, values 0..255) -> float32 in [-0.5, 0.5) on the n_bits grid."""
    x = torch.as_tensor(pixels)
    if x.dtype != torch.uint8:
        raise TypeError(f"quantize expects uint8 pixels, got {x.dtype}")
    n_bins = 2 ** n_bits
    return torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor").float() / n_bins - 0.5


def dequantize(x: Tensor, n_bits: int, noise: Tensor) -> Tensor:
    """Add uniform dequantization noise: ``noise`` in [0, 1) of x's shape, scaled to one bin width."""
    return x + noise / (2 ** n_bits)


def discrete_nll(log_prob: Tensor, num_dims: int, n_bits: int) -> Tensor:
    """Continuous log density (nats) of x + u -> discrete NLL in nats: ``-log_prob + D log(n_bins)``."""
    return -log_prob + num_dims * n_bits * math.log(2.0)


def nats_per_bpd(num_dims: int) -> float:
    """How many nats one bit per dimension is for an image of ``num_dims`` values: D ln 2."""
    return num_dims * math.log(2.0)


def nats_to_bpd(nll: Tensor | np.ndarray | float, num_dims: int):
    """NLL in nats -> bits per dimension."""
    return nll / nats_per_bpd(num_dims)


def bpd_to_nats(bpd: Tensor | np.ndarray | float, num_dims: int):
    """Bits per dimension -> NLL in nats."""
    return bpd * nats_per_bpd(num_dims)
