"""TarFlow (Zhai et al., "Normalizing Flows are Capable Generative Models", ICML 2025) as a flowtame flow.

An image [C, H, W] on flowtame's scale [-0.5, 0.5) is scaled by 2 to TarFlow's [-1, 1) (log_det D·log 2),
cut into T = (H/p)·(W/p) patches of D_p = C·p·p values ([B, T, D_p], patch t = row-major (i, j), values in
(c, dy, dx) order), and passed through ``n_block`` autoregressive affine flows. Block k reads the patches in
order t = 0..T-1 when k is even and T-1..0 when k is odd; in its own order, with a causal transformer h over
the patches before t:

    z_t = (x_t - b_t) · exp(-a_t),   (a_t, b_t) = h(x_<t),   (a_0, b_0) = 0,   log_det = -sum_t a_t.

The latent [B, T, D_p] has the prior N(0, var) with the fixed buffer ``var`` (ones unless a converted
checkpoint says otherwise). The inverse runs one patch at a time with a key/value cache per attention layer.
Class-conditional models add a learned class embedding to every block's input: that of ``class_label``, or
the mean of all classes' embeddings when it is None (the unconditional evaluation).
Parameter names follow apple/ml-tarflow's state dicts (``proj_in``, ``pos_embed``, ``class_embed``,
``attn_blocks.{j}.attention.{norm, qkv, proj}``, ``attn_blocks.{j}.mlp.{norm, main.0, main.2}``,
``proj_out``), so its checkpoints convert by renaming alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtame.flows import Architecture, register
from flowtame.flows.base import Level, MultiScaleFlow, Transform


class ScaleData(Transform):
    """``y = factor * x``; log_det = D·log(factor) per sample."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = math.prod(x.shape[1:]) * math.log(self.factor)
        return x * self.factor, x.new_full((x.shape[0],), log_det)

    def inverse(self, y: Tensor) -> Tensor:
        return y / self.factor


class Patchify(Transform):
    """[B, C, H, W] -> [B, T, C·p·p]: patch t = i·(W/p) + j, values ordered (c, dy, dx) (``F.unfold``'s order)."""

    def __init__(self, patch_size: int, shape: tuple[int, int, int]):
        super().__init__()
        self.p = patch_size
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        p = self.p
        y = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        return y, x.new_zeros(b)

    def inverse(self, y: Tensor) -> Tensor:
        c, h, w = self.shape
        p = self.p
        return y.view(y.shape[0], h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(y.shape[0], c, h, w)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        if h % self.p or w % self.p:
            raise ValueError(f"cannot cut a {h}x{w} image into {self.p}x{self.p} patches")
        return ((h // self.p) * (w // self.p), c * self.p * self.p)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention. ``qkv`` output channels are (q, k, v) x heads x head_dim."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        """x [B, T, W] -> [B, T, W]. Without ``cache``: causal attention over the T tokens. With ``cache``
        (a list, [] at first): x is the next token(s), attending to every cached token and to themselves
        causally; their keys and values are appended to the cache."""
        b, t, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3 * self.heads, -1).transpose(1, 2).chunk(3, dim=1)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        past = k.shape[2] - t
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, width))


class MLP(nn.Module):
    """Pre-norm feed-forward: LayerNorm -> Linear(W, eW) -> GELU -> Linear(eW, W)."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.main = nn.Sequential(nn.Linear(width, width * expansion), nn.GELU(),
                                  nn.Linear(width * expansion, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.main(self.norm(x))


class AttentionBlock(nn.Module):
    """x + attention(x), then + mlp(.)."""

    def __init__(self, width: int, heads: int, expansion: int):
        super().__init__()
        self.attention = Attention(width, heads)
        self.mlp = MLP(width, expansion)

    def forward(self, x: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        x = x + self.attention(x, cache)
        return x + self.mlp(x)


class TarFlowBlock(Transform):
    """One autoregressive affine flow over patches [B, T, D_p], in reversed patch order when ``flip``.

    ``class_label`` (an attribute, None: the mean class embedding) picks the class of a conditional block.
    """

    def __init__(self, dim: int, width: int, num_patches: int, layers: int, heads: int, expansion: int,
                 flip: bool, nvp: bool = True, num_classes: int = 0):
        super().__init__()
        self.flip = flip
        self.nvp = nvp
        self.proj_in = nn.Linear(dim, width)
        self.pos_embed = nn.Parameter(torch.randn(num_patches, width) * 1e-2)
        self.class_embed = nn.Parameter(torch.randn(num_classes, 1, width) * 1e-2) if num_classes else None
        self.class_label: int | None = None
        self.attn_blocks = nn.ModuleList(AttentionBlock(width, heads, expansion) for _ in range(layers))
        self.proj_out = nn.Linear(width, 2 * dim if nvp else dim)
        nn.init.zeros_(self.proj_out.weight)  # a fresh block is the identity
        nn.init.zeros_(self.proj_out.bias)

    def coupling_output(self) -> nn.Module:
        return self.proj_out

    def _order(self, x: Tensor) -> Tensor:
        return x.flip(1) if self.flip else x

    def _embed(self, x: Tensor, positions: slice) -> Tensor:
        """proj_in(x) + position (+ class) embeddings; x [B, t, D_p] in block order."""
        h = self.proj_in(x) + self._order(self.pos_embed.unsqueeze(0))[:, positions]
        if self.class_embed is not None:
            h = h + (self.class_embed.mean(0) if self.class_label is None else self.class_embed[self.class_label])
        return h

    def _shift_scale(self, h: Tensor) -> tuple[Tensor, Tensor]:
        out = self.proj_out(h)
        return out.chunk(2, -1) if self.nvp else (torch.zeros_like(out), out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._order(x)
        h = self._embed(x, slice(None))
        for block in self.attn_blocks:
            h = block(h)
        a, b = self._shift_scale(h)
        a = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], 1)  # (a_t, b_t) from the patches before t
        b = torch.cat([torch.zeros_like(b[:, :1]), b[:, :-1]], 1)
        return self._order((x - b) * torch.exp(-a)), -a.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        """One patch at a time, in block order, with a key/value cache per attention layer (T-1 steps)."""
        z = self._order(y)
        caches: list[list[Tensor]] = [[] for _ in self.attn_blocks]
        patches = [z[:, :1]]
        for t in range(z.shape[1] - 1):
            h = self._embed(patches[-1], slice(t, t + 1))
            for block, cache in zip(self.attn_blocks, caches, strict=True):
                h = block(h, cache)
            a, b = self._shift_scale(h)
            patches.append(z[:, t + 1:t + 2] * torch.exp(a) + b)
        return self._order(torch.cat(patches, 1))


class PatchPrior(nn.Module):
    """The latent's prior N(0, var): returns cat([mean, log_sd], dim=1) for a conditioning tensor [B, T, D_p]."""

    var: Tensor  # buffer [T, D_p]

    def __init__(self, num_patches: int, dim: int):
        super().__init__()
        self.register_buffer("var", torch.ones(num_patches, dim))

    def forward(self, cond: Tensor) -> Tensor:
        log_sd = (0.5 * torch.log(self.var)).expand_as(cond)
        return torch.cat([torch.zeros_like(cond), log_sd], 1)


@dataclass(frozen=True)
class TarFlowSpec:
    """TarFlow hyperparameters: ``patch_size`` p, transformer ``width`` and ``heads``, ``n_block`` flow blocks of
    ``layers_per_block`` attention layers, MLP ``expansion``; ``nvp`` False: volume-preserving (shift only);
    ``num_classes`` > 0: class-conditional, evaluated for ``class_label`` (None: the mean class embedding)."""

    channels: int
    image_size: int
    patch_size: int = 4
    width: int = 256
    n_block: int = 4
    layers_per_block: int = 2
    heads: int = 4
    expansion: int = 4
    nvp: bool = True
    num_classes: int = 0
    class_label: int | None = None

    def __post_init__(self) -> None:
        for name in ("channels", "image_size", "patch_size", "width", "n_block", "layers_per_block", "heads",
                     "expansion", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < (0 if name == "num_classes" else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        if not isinstance(self.nvp, bool):
            raise ValueError(f"nvp must be true or false, got {self.nvp!r}")
        if self.image_size % self.patch_size or self.image_size == self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size} "
                             f"with at least 2 patches per side")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.class_label is not None and not (
                isinstance(self.class_label, int) and 0 <= self.class_label < self.num_classes):
            raise ValueError(f"class_label {self.class_label!r} is not a class of this model "
                             f"(it has {self.num_classes} classes)")

    def to_dict(self) -> dict:
        return asdict(self)


def set_class_label(model: MultiScaleFlow, label: int | None) -> None:
    """Evaluate (and sample) a class-conditional TarFlow for class ``label``, or unconditionally (None)."""
    for module in model.modules():
        if isinstance(module, TarFlowBlock):
            if label is not None and (module.class_embed is None or not 0 <= label < module.class_embed.shape[0]):
                raise ValueError(f"class {label} is not a class of this model")
            module.class_label = label


def build_tarflow(spec: TarFlowSpec) -> MultiScaleFlow:
    side = spec.image_size // spec.patch_size
    num_patches, dim = side * side, spec.channels * spec.patch_size ** 2
    shape = (spec.channels, spec.image_size, spec.image_size)
    steps: list[Transform] = [ScaleData(2.0), Patchify(spec.patch_size, shape)]
    steps += [TarFlowBlock(dim, spec.width, num_patches, spec.layers_per_block, spec.heads, spec.expansion,
                           flip=k % 2 == 1, nvp=spec.nvp, num_classes=spec.num_classes)
              for k in range(spec.n_block)]
    model = MultiScaleFlow([Level(steps, split=False, prior=PatchPrior(num_patches, dim))], shape)
    set_class_label(model, spec.class_label)
    return model


register(Architecture("tarflow", TarFlowSpec, build_tarflow, "image"))
