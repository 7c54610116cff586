"""Glow (Kingma & Dhariwal, 2018) in the layout of the common PyTorch implementation.

Each level: squeeze, ``n_flow`` steps of (actnorm -> invertible 1x1 convolution -> coupling), then a split
with a learned conditional prior (a zero-initialized convolution of the kept half); the last level has a
learned top prior instead. Parameter names and conventions (actnorm ``scale``/``loc``, LU factors
``w_p, w_l, w_s, w_u``, ``sigmoid(log_s + 2)`` affine scale, zero-convolutions padded with ones) follow that
implementation (rosinality/glow-pytorch), so its checkpoints convert exactly.

The layout of the other common PyTorch Glow (y0ast/Glow-PyTorch) is a set of options of :class:`GlowSpec`, so
its checkpoints convert exactly too: log-scale actnorm, actnorm after bias-free hidden convolutions in the
coupling networks, interleaved shift/scale and prior mean/log-sd channels, zero padding in zero-convolutions,
a top prior that is a zero-convolution of a stored buffer (or a standard normal), and fixed channel
permutations (reverse, shuffle) instead of 1x1 convolutions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtame.flows.base import Level, MultiScaleFlow, Squeeze, Transform


class ActNorm(Transform):
    """Per-channel affine ``y = scale * (x + loc)``, log_det = H*W*sum(log|scale|) per sample.

    With ``log_scale=True`` the scale is stored as its logarithm (parameter ``log_scale``, y0ast's ``logs``):
    ``y = exp(log_scale) * (x + loc)``, log_det = H*W*sum(log_scale).

    Data-dependent initialization: on the first forward in training mode, if the ``initialized`` buffer is 0,
    ``loc`` and the scale are set so that the batch's per-channel output has zero mean and unit std. A model
    whose buffer says 1 (a loaded checkpoint) is never re-initialized. The buffer is read once (then cached
    until the next ``load_state_dict``), so the hot loop makes no host synchronisation.
    """

    initialized: Tensor  # buffer, scalar: 1.0 once initialized

    def __init__(self, channels: int, log_scale: bool = False):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_parameterized = log_scale
        if log_scale:
            self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        else:
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
        std = (flat.std(1) + 1e-6).view_as(self.loc)
        if self.log_parameterized:
            self.log_scale.copy_(-torch.log(std))
        else:
            self.scale.copy_(1.0 / std)
        self.initialized.fill_(1.0)

    def _log_abs_scale(self) -> Tensor:
        """log|scale|, shape [1, C, 1, 1]."""
        return self.log_scale if self.log_parameterized else torch.log(self.scale.abs())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self._known_initialized:
            if self.initialized.item() == 0:
                self.initialize(x)
            self._known_initialized = True
        h, w = x.shape[2], x.shape[3]
        log_det = h * w * self._log_abs_scale().sum()
        scale = torch.exp(self.log_scale) if self.log_parameterized else self.scale
        return scale * (x + self.loc), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        if self.log_parameterized:
            return y * torch.exp(-self.log_scale) - self.loc
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

    # buffers, [C, C] except s_sign [C]
    w_p: Tensor
    u_mask: Tensor
    l_mask: Tensor
    s_sign: Tensor
    l_eye: Tensor

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


class ChannelPermutation(Transform):
    """A fixed channel permutation ``y = x[:, order]`` (log_det 0): ``reverse`` order, or a random shuffle.

    ``order`` is a float buffer (checkpoints hold floating-point tensors only) of the indices [C].
    """

    order: Tensor

    def __init__(self, channels: int, shuffle: bool):
        super().__init__()
        order = torch.randperm(channels) if shuffle else torch.arange(channels - 1, -1, -1)
        self.register_buffer("order", order.float())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.order.long()], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y[:, torch.argsort(self.order.long())]


class ZeroConv2d(nn.Module):
    """3x3 convolution initialized to zero, input padded with ``pad_value`` (ones in rosinality's Glow, zeros in
    y0ast's), output scaled by exp(3 * scale). ``interleaved``: output channels reordered to (even, odd)
    so that ``chunk(2, 1)`` reads channels 0::2 and 1::2 (y0ast's split priors)."""

    def __init__(self, in_channels: int, out_channels: int, pad_value: float = 1.0, interleaved: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=0)
        nn.init.zeros_(self.conv.weight)
        assert self.conv.bias is not None  # a Conv2d built with bias=True (the default)
        nn.init.zeros_(self.conv.bias)
        self.scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.pad_value = pad_value
        self.interleaved = interleaved

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(F.pad(x, [1, 1, 1, 1], value=self.pad_value)) * torch.exp(self.scale * 3)
        return torch.cat([out[:, 0::2], out[:, 1::2]], 1) if self.interleaved else out


class BufferPrior(nn.Module):
    """A top prior that ignores its input: a zero-convolution of a stored buffer ``h`` [1, 2C, H, W] (y0ast's
    ``learn_top_fn(prior_h)``), expanded to the batch: returns cat([mean, log_sd]) [B, 2C, H, W]."""

    h: Tensor

    def __init__(self, channels: int, size: int, pad_value: float):
        super().__init__()
        self.register_buffer("h", torch.zeros(1, 2 * channels, size, size))
        self.conv = ZeroConv2d(2 * channels, 2 * channels, pad_value)

    def forward(self, cond: Tensor) -> Tensor:
        return self.conv(self.h).expand(cond.shape[0], -1, -1, -1)


class ConvActNorm(nn.Module):
    """A bias-free convolution followed by an actnorm (y0ast's hidden layers of the coupling networks)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, log_scale: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, 0.05)
        self.actnorm = ActNorm(out_channels, log_scale=log_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm(self.conv(x))[0]


class GlowCoupling(Transform):
    """Coupling on channel halves (a, b): additive ``b + t(a)`` or affine ``(b + t(a)) * sigmoid(log_s(a) + 2)``.

    rosinality's layout (the defaults): hidden convolutions with biases, the network's output halves are
    (log_s, t). y0ast's: ``net_actnorm`` (bias-free hidden convolutions each followed by an actnorm, log-scale
    when ``log_actnorm``), ``interleaved`` (t = out[:, 0::2], log_s = out[:, 1::2]) and ``pad_value`` 0 in the
    zero-convolution.
    """

    def __init__(self, channels: int, hidden: int, affine: bool, net_actnorm: bool = False,
                 log_actnorm: bool = False, interleaved: bool = False, pad_value: float = 1.0):
        super().__init__()
        if channels % 2:
            raise ValueError(f"coupling needs an even number of channels, got {channels}")
        self.affine = affine
        self.interleaved = interleaved
        out = ZeroConv2d(hidden, channels if affine else channels // 2, pad_value, interleaved and affine)
        if net_actnorm:
            self.net = nn.Sequential(ConvActNorm(channels // 2, hidden, 3, log_actnorm), nn.ReLU(),
                                     ConvActNorm(hidden, hidden, 1, log_actnorm), nn.ReLU(), out)
            return
        convs = (nn.Conv2d(channels // 2, hidden, 3, padding=1), nn.Conv2d(hidden, hidden, 1))
        for conv in convs:
            nn.init.normal_(conv.weight, 0.0, 0.05)
            assert conv.bias is not None  # built with bias=True (the default)
            nn.init.zeros_(conv.bias)
        self.net = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), out)

    def coupling_output(self) -> nn.Module:
        return self.net[-1]

    def _log_s_and_t(self, a: Tensor) -> tuple[Tensor, Tensor]:
        first, second = self.net(a).chunk(2, 1)
        return (second, first) if self.interleaved else (first, second)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, 1)
        if not self.affine:
            return torch.cat([a, b + self.net(a)], 1), x.new_zeros(x.shape[0])
        log_s, t = self._log_s_and_t(a)
        log_scale = F.logsigmoid(log_s + 2.0)
        return torch.cat([a, (b + t) * torch.exp(log_scale)], 1), log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        a, b = y.chunk(2, 1)
        if not self.affine:
            return torch.cat([a, b - self.net(a)], 1)
        log_s, t = self._log_s_and_t(a)
        return torch.cat([a, b * torch.exp(-F.logsigmoid(log_s + 2.0)) - t], 1)


class FlowStep(Transform):
    """actnorm -> channel mixing (invertible 1x1 convolution, plain or LU, or a fixed permutation) -> coupling.

    ``permutation`` is "invconv", "reverse" or "shuffle"; ``log_actnorm``, ``net_actnorm`` and ``interleaved``
    are :class:`GlowSpec`'s layout options, ``pad_value`` the zero-convolutions' padding (1 or 0).
    """

    invconv: InvConv1x1 | InvConv1x1LU | ChannelPermutation

    def __init__(self, channels: int, hidden: int, affine: bool, conv_lu: bool, permutation: str = "invconv",
                 log_actnorm: bool = False, net_actnorm: bool = False, interleaved: bool = False,
                 pad_value: float = 1.0):
        super().__init__()
        self.actnorm = ActNorm(channels, log_scale=log_actnorm)
        if permutation == "invconv":
            self.invconv = InvConv1x1LU(channels) if conv_lu else InvConv1x1(channels)
        else:
            self.invconv = ChannelPermutation(channels, shuffle=permutation == "shuffle")
        self.coupling = GlowCoupling(channels, hidden, affine, net_actnorm, log_actnorm, interleaved, pad_value)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, ld1 = self.actnorm(x)
        h, ld2 = self.invconv(h)
        h, ld3 = self.coupling(h)
        return h, ld1 + ld2 + ld3

    def inverse(self, y: Tensor) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


PERMUTATIONS = ("invconv", "reverse", "shuffle")
TOP_PRIORS = ("conv", "buffer", "standard")


@dataclass(frozen=True)
class GlowSpec:
    """Glow hyperparameters. ``conv_lu`` holds one flag per flow step (level-major), True for LU 1x1 convs.

    Layout options (defaults: rosinality/glow-pytorch; y0ast/Glow-PyTorch needs the others):
    ``permutation`` "invconv" (1x1 convolutions, ``conv_lu`` says which kind) | "reverse" | "shuffle";
    ``log_actnorm``: actnorm scales stored as logs; ``net_actnorm``: coupling networks with bias-free hidden
    convolutions each followed by an actnorm; ``interleaved``: affine couplings read (t, log_s) and split
    priors (mean, log_sd) from channels (0::2, 1::2) rather than from the two halves; ``zero_pad``:
    zero-convolutions pad with zeros rather than ones; ``top_prior`` "conv" (a zero-convolution of zeros
    shaped like the top latent) | "buffer" (a zero-convolution of a stored [2C, H, W] buffer) | "standard".
    """

    channels: int
    image_size: int
    n_flow: int = 8
    n_block: int = 3
    affine: bool = False
    hidden: int = 512
    conv_lu: tuple[bool, ...] = field(default=())
    permutation: str = "invconv"
    log_actnorm: bool = False
    net_actnorm: bool = False
    interleaved: bool = False
    zero_pad: bool = False
    top_prior: str = "conv"

    def __post_init__(self) -> None:
        for name in ("channels", "image_size", "n_flow", "n_block", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("affine", "log_actnorm", "net_actnorm", "interleaved", "zero_pad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {', '.join(PERMUTATIONS)}, got {self.permutation!r}")
        if self.top_prior not in TOP_PRIORS:
            raise ValueError(f"top_prior must be one of {', '.join(TOP_PRIORS)}, got {self.top_prior!r}")
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
    pad = 0.0 if spec.zero_pad else 1.0
    for block in range(spec.n_block):
        last = block == spec.n_block - 1
        squeezed = channels * 4
        steps: list[Transform] = [Squeeze()]
        for flow in range(spec.n_flow):
            steps.append(FlowStep(squeezed, spec.hidden, spec.affine, spec.conv_lu[block * spec.n_flow + flow],
                                  spec.permutation, spec.log_actnorm, spec.net_actnorm, spec.interleaved, pad))
        prior: nn.Module | None
        if not last:
            prior = ZeroConv2d(squeezed // 2, squeezed, pad, spec.interleaved)
        elif spec.top_prior == "conv":
            prior = ZeroConv2d(squeezed, squeezed * 2, pad)
        elif spec.top_prior == "buffer":
            prior = BufferPrior(squeezed, spec.image_size // 2 ** spec.n_block, pad)
        else:
            prior = None
        levels.append(Level(steps, split=not last, prior=prior))
        channels = squeezed // 2
    return MultiScaleFlow(levels, (spec.channels, spec.image_size, spec.image_size))
