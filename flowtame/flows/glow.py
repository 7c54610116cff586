"""Glow (Kingma & Dhariwal, 2018) in the layout of the common PyTorch implementation.

Each level: squeeze, ``n_flow`` steps of (actnorm -> invertible 1x1 convolution -> coupling), then a split
with a learned conditional prior (a zero-initialized convolution of the kept half); the last level has a
learned top prior instead. Parameter names and conventions (actnorm ``scale``/``loc``, LU factors
``w_p, w_l, w_s, w_u``, ``sigmoid(log_s + 2)`` affine scale, zero-convolutions padded with ones) follow that
implementation, so its checkpoints convert exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtame.flows.base import Level, MultiScaleFlow, Squeeze, Transform


class ActNorm(Transform):
    """Per-channel affine ``y = scale * (x + loc)``, log_det = H*W*sum(log|scale|) per sample.

    Data-dependent initialization: on the first forward in training mode, if the ``initialized`` buffer is 0,
    ``loc`` and ``scale`` are set so that the batch's per-channel output has zero mean and unit std. A model
    whose buffer says 1 (a loaded checkpoint) is never re-initialized. The buffer is read once (then cached
    until the next ``load_state_dict``), so the hot loop makes no host synchronisation.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0.0))
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self._known_initialized:
            if self.initialized.item() == 0:
                self.initialize(x)
            self._known_initialized = True
        h, w = x.shape[2], x.shape[3]
        log_det = h * w * torch.log(self.scale.abs()).sum()
        return self.scale * (x + self.loc), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y / self.scale - self.loc


class InvConv1x1(Transform):
    """Invertible 1x1 convolution with a full weight matrix (random rotation at init)."""

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        self.weight = nn.Parameter(q.view(channels, channels, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2], x.shape[3]
        log_det = h * w * torch.linalg.slogdet(self.weight.squeeze(-1).squeeze(-1).double())[1].to(x.dtype)
        return F.conv2d(x, self.weight), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight.squeeze(-1).squeeze(-1).double()).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])


class InvConv1x1LU(Transform):
    """Invertible 1x1 convolution, LU-parameterized: W = P (L ⊙ mask_L + I) (U ⊙ mask_U + diag(sign·exp(w_s))).

    P, the masks and the signs are fixed buffers; log|det W| = sum(w_s), so log_det = H*W*sum(w_s).
    """

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        u_mask = torch.triu(torch.ones(channels, channels), 1)
        self.register_buffer("w_p", p)
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.contiguous())
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_eye", torch.eye(channels))
        self.w_l = nn.Parameter(lower)
        self.w_s = nn.Parameter(torch.log(s.abs()))
        self.w_u = nn.Parameter(torch.triu(upper, 1))

    def weight_matrix(self) -> Tensor:
        """The [C, C] matrix W."""
        lower = self.w_l * self.l_mask + self.l_eye
        upper = self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s))
        return self.w_p @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2], x.shape[3]
        log_det = h * w * self.w_s.sum()
        return F.conv2d(x, self.weight_matrix()[:, :, None, None]), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight_matrix().double()).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])


class ZeroConv2d(nn.Module):
    """3x3 convolution initialized to zero, input padded with ones, output scaled by exp(3 * scale)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=0)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, [1, 1, 1, 1], value=1.0)) * torch.exp(self.scale * 3)


class GlowCoupling(Transform):
    """Coupling on channel halves (a, b): additive ``b + t(a)`` or affine ``(b + t(a)) * sigmoid(log_s(a) + 2)``."""

    def __init__(self, channels: int, hidden: int, affine: bool):
        super().__init__()
        if channels % 2:
            raise ValueError(f"coupling needs an even number of channels, got {channels}")
        self.affine = affine
        self.net = nn.Sequential(
            nn.Conv2d(channels // 2, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv2d(hidden, channels if affine else channels // 2),
        )
        for conv in (self.net[0], self.net[2]):
            nn.init.normal_(conv.weight, 0.0, 0.05)
            nn.init.zeros_(conv.bias)

    def coupling_output(self) -> nn.Module:
        return self.net[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, 1)
        if not self.affine:
            return torch.cat([a, b + self.net(a)], 1), x.new_zeros(x.shape[0])
        log_s, t = self.net(a).chunk(2, 1)
        log_scale = F.logsigmoid(log_s + 2.0)
        return torch.cat([a, (b + t) * torch.exp(log_scale)], 1), log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        a, b = y.chunk(2, 1)
        if not self.affine:
            return torch.cat([a, b - self.net(a)], 1)
        log_s, t = self.net(a).chunk(2, 1)
        return torch.cat([a, b * torch.exp(-F.logsigmoid(log_s + 2.0)) - t], 1)


class FlowStep(Transform):
    """actnorm -> invertible 1x1 convolution (plain or LU) -> coupling."""

    def __init__(self, channels: int, hidden: int, affine: bool, conv_lu: bool):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1LU(channels) if conv_lu else InvConv1x1(channels)
        self.coupling = GlowCoupling(channels, hidden, affine)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, ld1 = self.actnorm(x)
        h, ld2 = self.invconv(h)
        h, ld3 = self.coupling(h)
        return h, ld1 + ld2 + ld3

    def inverse(self, y: Tensor) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


@dataclass(frozen=True)
class GlowSpec:
    """Glow hyperparameters. ``conv_lu`` holds one flag per flow step (level-major), True for LU 1x1 convs."""

    channels: int
    image_size: int
    n_flow: int = 8
    n_block: int = 3
    affine: bool = False
    hidden: int = 512
    conv_lu: tuple[bool, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("channels", "image_size", "n_flow", "n_block", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.affine, bool):
            raise ValueError(f"affine must be true or false, got {self.affine!r}")
        if self.n_flow < 1 or self.n_block < 1 or self.hidden < 1:
            raise ValueError("n_flow, n_block and hidden must be positive")
        if self.image_size % (2 ** self.n_block):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**n_block = {2 ** self.n_block}")
        flags = tuple(bool(f) for f in self.conv_lu) if self.conv_lu else (True,) * (self.n_flow * self.n_block)
        if len(flags) != self.n_flow * self.n_block:
            raise ValueError(f"conv_lu needs {self.n_flow * self.n_block} flags (one per flow step), got {len(flags)}")
        object.__setattr__(self, "conv_lu", flags)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conv_lu"] = list(self.conv_lu)
        return d


def build_glow(spec: GlowSpec) -> MultiScaleFlow:
    levels = []
    channels = spec.channels
    for block in range(spec.n_block):
        last = block == spec.n_block - 1
        squeezed = channels * 4
        steps: list[Transform] = [Squeeze()]
        for flow in range(spec.n_flow):
            steps.append(FlowStep(squeezed, spec.hidden, spec.affine, spec.conv_lu[block * spec.n_flow + flow]))
        prior = ZeroConv2d(squeezed, squeezed * 2) if last else ZeroConv2d(squeezed // 2, squeezed)
        levels.append(Level(steps, split=not last, prior=prior))
        channels = squeezed // 2
    return MultiScaleFlow(levels, (spec.channels, spec.image_size, spec.image_size))
