"""The one contract every flowtame flow follows.

Direction: ``forward`` maps data to latents (x -> z) and returns the per-sample log-determinant of that
map, a tensor of shape [B] on the input's device and dtype; ``inverse`` is its exact inverse.
A flow model is a :class:`MultiScaleFlow`: a list of levels, each a sequence of transforms followed by an
optional split that factors half of the channels out to a Gaussian prior (standard normal, or learned and
conditioned on the kept half as in Glow). Image flows and vector flows share this container.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: Tensor, prior: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Elementwise log density (nats) of z under N(mean, exp(log_sd)^2) for ``prior`` = (mean, log_sd), each
    broadcastable to z; standard normal when ``prior`` is None."""
    if prior is None:
        return -0.5 * LOG_2PI - 0.5 * z.square()
    mean, log_sd = prior
    return -0.5 * LOG_2PI - log_sd - 0.5 * (z - mean).square() * torch.exp(-2.0 * log_sd)


class Transform(nn.Module):
    """An invertible map, data side -> latent side.

    ``forward(x) -> (y, log_det)`` with ``log_det`` of shape [B] (nats, log|det dy/dx| per sample);
    ``inverse(y) -> x``; ``output_shape(shape)`` maps a per-sample shape (no batch dim) forward.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def coupling_output(self) -> nn.Module | None:
        """The zero-initialized output layer of this transform's conditioner network (a coupling's, or a MAF
        layer's MADE); None for transforms without one (actnorm, 1x1 convolution, squeeze, scaling)."""
        return None


def coupling_output_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of every coupling network's output layer (:meth:`Transform.coupling_output`)."""
    layers = [m.coupling_output() for m in model.modules() if isinstance(m, Transform)]
    owned = {id(p) for layer in layers if layer is not None for p in layer.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in owned]


class Squeeze(Transform):
    """Space-to-depth: [B, C, H, W] -> [B, 4C, H/2, W/2]; channel c*4 + 2*dy + dx holds pixel (2i+dy, 2j+dx).

    The ordering is the one of the common PyTorch Glow, so converted checkpoints keep their meaning.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: Tensor) -> Tensor:
        b, c, h, w = y.shape
        return y.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"cannot squeeze a {h}x{w} feature map: height and width must be even")
        return (c * 4, h // 2, w // 2)


class Level(nn.Module):
    """Transforms then, when ``split``, half of the channels (dim 1) factored out as a latent.

    ``prior`` maps the conditioning tensor (the kept half after a split; zeros of the level's output shape
    when not split) to ``cat([mean, log_sd], dim=1)``. ``None`` means a standard normal prior.
    """

    steps: Sequence[Transform]  # an nn.ModuleList (torch types its items as Module)

    def __init__(self, steps: Sequence[Transform], split: bool, prior: nn.Module | None = None):
        super().__init__()
        self.steps = cast("Sequence[Transform]", nn.ModuleList(steps))
        self.split = split
        self.prior = prior

    def prior_params(self, cond: Tensor) -> tuple[Tensor, Tensor] | None:
        """(mean, log_sd) of the prior given ``cond``; None for a standard normal prior."""
        if self.prior is None:
            return None
        mean, log_sd = self.prior(cond).chunk(2, 1)
        return mean, log_sd


class MultiScaleFlow(nn.Module):
    """A normalizing flow over tensors of per-sample shape ``event_shape``.

    - ``log_prob(x)``: [B] continuous log density in nats.
    - ``encode(x)``: (latents, log_det) with one latent tensor per level and log_det of shape [B].
    - ``decode(latents)``: the exact inverse of ``encode``.
    - ``decode_noise(noise)``: standardized noise (one tensor per level) -> samples, through the priors.
    - ``sample(n, temperature, generator)``: draws noise on the CPU (so a seed gives the same latents on
      every device and for every model of the same shape) and decodes it.
    """

    levels: Sequence[Level]  # an nn.ModuleList (torch types its items as Module)

    def __init__(self, levels: Sequence[Level], event_shape: tuple[int, ...]):
        super().__init__()
        if not levels or levels[-1].split:
            raise ValueError("a flow needs at least one level and its last level must not split")
        self.levels = cast("Sequence[Level]", nn.ModuleList(levels))
        self.event_shape = tuple(event_shape)
        shapes = []
        shape = self.event_shape
        for level in self.levels:
            for step in level.steps:
                shape = step.output_shape(shape)
            if level.split:
                if shape[0] % 2:
                    raise ValueError(f"cannot split {shape[0]} channels in half")
                shape = (shape[0] // 2, *shape[1:])
            shapes.append(shape)
        self.latent_shapes: tuple[tuple[int, ...], ...] = tuple(shapes)

    @property
    def num_dims(self) -> int:
        """D, the number of values per sample."""
        return math.prod(self.event_shape)

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"expected inputs of shape [B, {', '.join(map(str, self.event_shape))}], "
                             f"got {list(x.shape)}")

    def forward_with_prior(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """(latents, log_det [B], log_prior [B]) in one pass, data -> latent."""
        self._check_input(x)
        h = x
        log_det = x.new_zeros(x.shape[0])
        log_prior = x.new_zeros(x.shape[0])
        latents: list[Tensor] = []
        for level in self.levels:
            for step in level.steps:
                h, step_log_det = step(h)
                log_det = log_det + step_log_det
            if level.split:
                h, z = h.chunk(2, 1)
                prior = level.prior_params(h)
            else:
                z = h
                prior = level.prior_params(torch.zeros_like(h))
            log_prior = log_prior + gaussian_log_prob(z, prior).flatten(1).sum(1)
            latents.append(z)
        return latents, log_det, log_prior

    def log_prob(self, x: Tensor) -> Tensor:
        """Continuous log density log p(x) in nats, shape [B]."""
        _, log_det, log_prior = self.forward_with_prior(x)
        return log_prior + log_det

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        latents, log_det, _ = self.forward_with_prior(x)
        return latents, log_det

    def decode(self, latents: Sequence[Tensor]) -> Tensor:
        h: Tensor | None = None
        for level, z in zip(reversed(self.levels), reversed(list(latents)), strict=True):
            h = z if h is None else torch.cat([h, z], 1)
            for step in reversed(level.steps):
                h = step.inverse(h)
        assert h is not None  # there is at least one level, and zip(strict=True) gave each its latent
        return h

    def decode_noise(self, noise: Sequence[Tensor]) -> Tensor:
        """Map standardized noise (one tensor per level, shapes ``latent_shapes``) to data space."""
        h: Tensor | None = None
        for level, eps in zip(reversed(self.levels), reversed(list(noise)), strict=True):
            # the top level (first here, h None) never splits: it is conditioned on zeros
            prior = level.prior_params(h if h is not None and level.split else torch.zeros_like(eps))
            z = eps if prior is None else prior[0] + torch.exp(prior[1]) * eps
            h = z if h is None else torch.cat([h, z], 1)
            for step in reversed(level.steps):
                h = step.inverse(h)
        assert h is not None  # there is at least one level, and zip(strict=True) gave each its noise
        return h

    def sample_noise(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> list[Tensor]:
        """Standard-normal draws times ``temperature``, drawn on the CPU, then moved to ``device``."""
        param = next(self.parameters(), None)
        device = device if device is not None else (param.device if param is not None else "cpu")
        dtype = param.dtype if param is not None else torch.float32
        return [(torch.randn((n, *shape), generator=generator) * temperature).to(device=device, dtype=dtype)
                for shape in self.latent_shapes]

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n samples in data space, shape [n, *event_shape]."""
        return self.decode_noise(self.sample_noise(n, temperature, generator))
