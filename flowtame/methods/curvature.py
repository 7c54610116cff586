"""The remember NLL's curvature as the metric of taming's step (docs/method.md "A step the remember set does not feel").

The base model sits at a minimum of the remember NLL, so a step along the forget images' gradient raises the
remember images through the curvature, not the gradient (docs/benchmarks.md "Round 5b"). :class:`KroneckerMetric`
is a damped K-FAC approximation (Grosse & Martens 2016) of the Fisher of the remember NLL at the base weights:
for each trained Conv2d, F_l = A (x) G, with A the mean outer product of the layer's unfolded input patches (a
trailing 1 for the bias) and G the outer product of the NLL's gradient at the layer's output, summed over
positions and averaged over images (nats^2); for the other trained values, the diagonal Fisher.
:meth:`KroneckerMetric.update` turns Adam's update u into c M^-1 u, with c keeping u's first-order change of the
forget term: the same forget progress, moved where the remember NLL is flat.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from flowtame.data.quantization import DataSpec
from flowtame.engine.devices import take_rows, uniform_noise
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import dequantized, nll_nats
from flowtame.methods.baselines import diagonal_fisher

__all__ = ["DAMPING", "MAX_STRETCH", "METRIC_IMAGES", "SOLVE_DAMPING", "ConstrainedStep", "KroneckerMetric",
           "LayerStatistics", "constrained_step", "kfac_factors", "remember_metric"]

#: Damping lambda of the metric, a fraction of its mean diagonal entry. At 0.01 (round 6a's one-step sweep) the
#: rosinality Glow's look-alikes and remember tail moved (k = 1: QD(D_R^NN) 0.113); 0.1, a less sharp metric,
#: held its look-alikes there (-0.035; docs/benchmarks.md "Round 6c").
DAMPING = 0.1
#: A preconditioned update is at most this many times longer than Adam's (an update nearly orthogonal to the
#: forget gradient under the metric would otherwise be stretched without bound; unbounded, RealNVP blew up).
MAX_STRETCH = 20.0
#: Remember images the metric is estimated on (outside the refresh subset the drift guard measures).
METRIC_IMAGES = 512
#: Ridge of :func:`constrained_step`'s m x m system, a fraction of each row's diagonal entry (rows nearly
#: dependent under the metric, a forget image and its look-alike, would otherwise ask for an unbounded step).
SOLVE_DAMPING = 1e-3


class LayerStatistics(NamedTuple):
    """A Conv2d's share of the NLL's Fisher: the K-FAC factors A [in*kh*kw (+1)]^2 and G [out]^2 (float64) and
    the diagonal Fisher of its weight [weight shape] and bias [out] (None without one), float64, nats^2."""

    a: Tensor
    g: Tensor
    weight_fisher: Tensor
    bias_fisher: Tensor | None


def kfac_factors(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec, layers: dict[str, nn.Conv2d],
                 chunk: int = 64) -> dict[str, LayerStatistics]:
    """K-FAC factors and diagonal Fisher of the NLL on the model inputs ``x`` [N,C,S,S], per layer of ``layers``
    (:class:`LayerStatistics`), in ``chunk``-image passes: one batched backward to the layers' outputs (so
    frozen weights work too); each image's weight gradient sum_t g_t a_t^T is rebuilt from its patches and
    output gradients (images are independent: no batch statistics), so the diagonal needs no per-image pass.
    A layer whose input is not the images' rows (a top prior convolving one stored buffer, then expanded to
    the batch) has no per-image factors: it is left out (its values take the per-image diagonal)."""
    if not layers:
        return {}
    sums: dict[str, list[Tensor]] = {}
    unbatched: set[str] = set()
    seen: dict[str, tuple[Tensor, Tensor]] = {}  # this pass's (unfolded input, output) per layer

    def hook(name: str, module: nn.Conv2d):
        def forward(_module, inputs, output):
            a = torch.nn.functional.unfold(inputs[0].detach(), module.kernel_size, module.dilation,
                                           module.padding, module.stride)  # [n, in*kh*kw, T]
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            if not output.requires_grad:  # a layer fed by constants (a top prior) under frozen weights
                output.requires_grad_(True)
            seen[name] = (a, output)
        return forward

    handles = [module.register_forward_hook(hook(name, module)) for name, module in layers.items()]
    try:
        for start in range(0, x.shape[0], chunk):
            seen.clear()
            rows = x[start:start + chunk]
            nll = nll_nats(model, rows, data_spec).sum()
            unbatched |= {name for name, (a, _) in seen.items() if a.shape[0] != rows.shape[0]}
            names = [name for name in seen if name not in unbatched]
            grads = torch.autograd.grad(nll, [seen[name][1] for name in names], allow_unused=True)
            for name, g in zip(names, grads, strict=True):
                a = seen[name][0]
                g = (torch.zeros_like(seen[name][1]) if g is None else g).detach().flatten(2)  # [n, out, T]
                terms = _layer_sums(a, g)
                if name in sums:
                    for total, term in zip(sums[name], terms, strict=True):
                        total += term
                else:
                    sums[name] = list(terms)
    finally:
        for handle in handles:
            handle.remove()
    n = x.shape[0]
    out = {}
    for name, (a, g, square) in sums.items():
        if name in unbatched:
            continue
        weight = layers[name].weight
        has_bias = layers[name].bias is not None
        out[name] = LayerStatistics(a / n, g / n, square[:, :weight[0].numel()].reshape(weight.shape) / n,
                                    square[:, -1] / n if has_bias else None)
    return out


def _layer_sums(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's sums for :func:`kfac_factors` from patches ``a`` [n, in', T] and output gradients ``g``
    [n, out, T]: sum_n mean_t a a^T, sum_n sum_t g g^T and sum_n (g_n a_n^T)^2 [out, in'] (each image's weight
    gradient squared), float64, the products in the inputs' precision (float32 products move the
    preconditioned update by ~3e-7 relative against float64 ones on the embedded Glow)."""
    patches = a.transpose(1, 2).reshape(-1, a.shape[1])  # [n T, in']
    outputs = g.transpose(1, 2).reshape(-1, g.shape[1])  # [n T, out]
    a_sum = (patches.T @ patches).double() / a.shape[2]
    g_sum = (outputs.T @ outputs).double()
    return a_sum, g_sum, _gradient_squares(a, g)


def _gradient_squares(a: Tensor, g: Tensor) -> Tensor:
    """sum_n (g_n a_n^T)^2 [out, in'] (float64) for patches ``a`` [n, in', T] and output gradients ``g``
    [n, out, T]. Each image's gradient formed (in slices of images that keep them near 2^24 values), squared
    and summed in the inputs' precision; with few positions (T <= 8), where those [out, in'] gradients are
    mostly memory traffic, as one product sum_{t,t'} (g_t g_t')(a_t a_t') over (image, t, t') (4.5x faster
    on a width-512 Glow's 2x2 level)."""
    n, out, positions = g.shape
    if positions <= 8:
        g_pairs = (g.unsqueeze(3) * g.unsqueeze(2)).transpose(0, 1).reshape(out, -1)  # [out, n T T]
        a_pairs = (a.unsqueeze(3) * a.unsqueeze(2)).transpose(0, 1).reshape(a.shape[1], -1)
        return (g_pairs @ a_pairs.T).double()
    square = torch.zeros(out, a.shape[1], dtype=torch.float64, device=a.device)
    step = max(1, (1 << 24) // (out * a.shape[1]))
    for i in range(0, n, step):
        square += torch.bmm(g[i:i + step], a[i:i + step].transpose(1, 2)).square_().sum(0)
    return square


class KroneckerMetric:
    """Inverse of the damped K-FAC Fisher of the NLL of ``x`` [N,C,S,S] over the values ``names`` of ``model``.

    The metric is normalized by the diagonal Fisher's mean entry over ``names`` (so ``damping`` is relative);
    A (x) G's damping is split between the factors by Martens & Grosse's pi (the ratio of their mean
    diagonals). Conv2d layers whose weight is in ``names`` get the Kronecker block, every other value its
    diagonal entry. One batched pass gives the factors and the blocks' diagonal Fisher (:func:`kfac_factors`);
    per-image gradients (torch.func) are taken of the values outside the blocks only.
    """

    def __init__(self, model: MultiScaleFlow, x: Tensor, data_spec: DataSpec, names: list[str],
                 damping: float = DAMPING):
        trained = set(names)
        layers = {name: m for name, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and f"{name}.weight" in trained}
        statistics = kfac_factors(model, x, data_spec, layers)
        fisher = {f"{name}.weight": s.weight_fisher for name, s in statistics.items()}
        fisher |= {f"{name}.bias": s.bias_fisher for name, s in statistics.items() if s.bias_fisher is not None}
        rest = [n for n in names if n not in fisher]  # per-image gradients of only these: no Conv2d weight's
        fisher |= diagonal_fisher(model, x, data_spec, names=rest, chunk_size=64) if rest else {}
        scale = float(torch.cat([fisher[n].flatten() for n in names]).double().mean()) or 1.0  # 0: no curvature
        #: the diagonal Fisher's mean entry (nats^2) and the relative damping: the metric is F / scale + damping
        self.scale, self.damping = scale, damping
        #: weight name -> (G~^-1, A~^-1, bias name or None): the block's inverse is their Kronecker product
        self.blocks: dict[str, tuple[Tensor, Tensor, str | None]] = {}
        for name, (a, g, _, _) in statistics.items():
            a_mean, g_mean = float(a.diagonal().mean()), float(g.diagonal().mean())
            # a layer the NLL does not feel (say, in front of a zero-initialized output) gets damping only
            pi = (a_mean / g_mean) ** 0.5 if a_mean > 0 and g_mean > 0 else 1.0
            gamma = (damping * scale) ** 0.5
            a_inv = _damped_inverse(a, pi * gamma)
            g_inv = _damped_inverse(g, gamma / pi)
            bias = f"{name}.bias" if f"{name}.bias" in trained else None
            # kept in the model's precision: float32 products move a float32 model's update by ~3e-7 relative
            self.blocks[f"{name}.weight"] = ((scale * g_inv).to(x.dtype), a_inv.to(x.dtype), bias)
        in_blocks = set(self.blocks) | {bias for _, _, bias in self.blocks.values() if bias is not None}
        #: name -> 1 / (F_ii / mean F + damping), for the values outside the Kronecker blocks
        self.diagonal = {n: 1.0 / (fisher[n].double() / scale + damping) for n in names if n not in in_blocks}
        self._diagonal_names: list[str] = []
        self._diagonal_flat = torch.zeros(0, dtype=torch.float64)

    def apply(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The metric's inverse times ``vectors`` (name -> tensor shaped like the parameter, every name of the
        metric), float64: :meth:`apply_rows` of one row."""
        return {n: v[0] for n, v in self.apply_rows({n: v.unsqueeze(0) for n, v in vectors.items()}).items()}

    def apply_rows(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """The metric's inverse times each of m vectors: ``rows`` name -> [m, *parameter shape] (every name of
        the metric), float64, in ``rows``' order: per Kronecker block G~^-1 U A~^-1 with U = [W | b] reshaped
        [m, out, in*kh*kw (+1)] (the products in the blocks' precision, the model's; one batched product per
        block for all m rows)."""
        out = self._apply_diagonal(rows)
        for weight, (g_inv, a_inv, bias) in self.blocks.items():
            u = (g_inv @ self._block_rows(rows, weight) @ a_inv).double()
            out[weight] = u[:, :, :rows[weight][0, 0].numel()].reshape(rows[weight].shape)
            if bias is not None:
                out[bias] = u[:, :, -1]
        return {n: out[n] for n in rows}

    def _block_rows(self, rows: dict[str, Tensor], weight: str) -> Tensor:
        """The Kronecker block of ``weight``'s m rows as U = [W | b] [m, out, in*kh*kw (+1)] in the block's
        precision (the model's), its bias's rows appended when the block has one."""
        g_inv, _, bias = self.blocks[weight]
        w = rows[weight].to(g_inv.dtype)
        u = w.reshape(w.shape[0], w.shape[1], -1)
        if bias is None:
            return u
        return torch.cat([u, rows[bias].to(g_inv.dtype).reshape(w.shape[0], -1, 1)], 2)

    def gram(self, rows: dict[str, Tensor]) -> Tensor:
        """K = J M^-1 J^T [m, m] (float64) of m vectors ``rows`` (name -> [m, *parameter shape], every name of the
        metric): the diagonal part in float64, then block by block, each block's rows preconditioned and dotted
        with the rows in the blocks' precision (the model's) and dropped before the next block's - one block's m
        rows of extra memory at a time, not m preconditioned copies of every trained value."""
        m = next(iter(rows.values())).shape[0]
        device = next(iter(rows.values())).device
        gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        names = [n for n in rows if n in self.diagonal]
        if names:
            pre = self._apply_diagonal({n: rows[n] for n in names})
            for n in names:
                gram += rows[n].reshape(m, -1).double() @ pre[n].reshape(m, -1).T
        for weight, (g_inv, a_inv, _) in self.blocks.items():
            u = self._block_rows(rows, weight)
            gram += (u.reshape(m, -1) @ (g_inv @ u @ a_inv).reshape(m, -1).T).double()
        return (gram + gram.T) / 2  # symmetric up to rounding

    def _apply_diagonal(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """The diagonal part of :meth:`apply_rows`, on the values outside the Kronecker blocks, as one product."""
        names = [n for n in rows if n in self.diagonal]
        if not names:
            return {}
        if names != self._diagonal_names:  # the flat diagonal in this order, built once
            self._diagonal_names = names
            self._diagonal_flat = torch.cat([self.diagonal[n].reshape(-1) for n in names])
        m = rows[names[0]].shape[0]
        flat = torch.cat([rows[n].reshape(m, -1) for n in names], 1).double() * self._diagonal_flat
        return _split(flat, {n: rows[n].shape[1:] for n in names})

    def update(self, update: dict[str, Tensor], forget_gradient: dict[str, Tensor],
               max_stretch: float = MAX_STRETCH) -> dict[str, Tensor]:
        """c M^-1 u for Adam's update ``u`` (name -> change of each trained value), float64.

        c makes its first-order change of the forget term equal u's (g_F . c M^-1 u = g_F . u, ``forget_gradient``
        g_F), capped so that |c M^-1 u| <= ``max_stretch`` |u|; u itself when u or M^-1 u does not lower the
        forget term to first order. Tensor arithmetic on flat vectors (a few large products, not a few per
        tensor): no host sync on a GPU.
        """
        pre = self.apply(update)
        shapes = {n: u.shape for n, u in update.items()}
        u = torch.cat([v.reshape(-1) for v in update.values()]).double()
        p = torch.cat([pre[n].reshape(-1) for n in shapes])
        g = torch.cat([forget_gradient[n].reshape(-1) for n in shapes]).double()
        first, first_pre = g @ u, g @ p
        c = torch.minimum(first / first_pre, max_stretch * u.norm() / p.norm())
        lowers = (first < 0) & (first_pre < 0)
        return _split(torch.where(lowers, c * p, u), shapes)


class ConstrainedStep(NamedTuple):
    """:func:`constrained_step`'s result: the step (name -> change of each trained value, float64), the rows'
    weights w [m] (v = M^-1 J^T w) and the rows' Gram matrix under the metric, K = J M^-1 J^T [m, m] (float64;
    v^T M v = w^T K w, M the normalized metric)."""

    step: dict[str, Tensor]
    weights: Tensor
    gram: Tensor


def constrained_step(metric: KroneckerMetric, jacobian: dict[str, Tensor], targets: Tensor,
                     damping: float = SOLVE_DAMPING) -> ConstrainedStep:
    """The shortest step under ``metric`` whose first-order change of m per-image NLLs is ``targets``.

    ``jacobian``: name -> [m, *param shape], each row's NLL gradient (nats per unit of the value; every name of
    the metric it steps); ``targets``: float [m], the wanted NLL change of each row (nats; 0 holds a row).
    v = M^-1 J^T (K + damping * diag K)^-1 r with K = J M^-1 J^T (Gauss-Newton in the metric, each row's ridge
    relative to its own diagonal entry, as Marquardt's: a row of small gradients, say a batch's mean NLL beside
    single images, is damped as much as the others): with independent rows and damping -> 0, J v = r exactly
    and v has the least v^T M v of all such steps. K block by block (:meth:`KroneckerMetric.gram`), one m x m
    solve (float64), then one application of the metric to the rows' combination J^T w (in the rows'
    precision): memory beyond ``jacobian`` is one Kronecker block's m preconditioned rows and the step."""
    m = targets.shape[0]
    gram = metric.gram(jacobian)
    weights = torch.linalg.solve(gram + damping * torch.diag(gram.diagonal()), targets.to(gram))
    combined = {n: (weights.to(rows.dtype) @ rows.reshape(m, -1)).view(rows.shape[1:]) for n, rows in jacobian.items()}
    return ConstrainedStep(metric.apply(combined), weights, gram)


def _damped_inverse(factor: Tensor, damping: float) -> Tensor:
    """(factor + damping I)^-1 of a symmetric positive semi-definite K-FAC factor [n, n] (float64), by its
    Cholesky factor (half the time of a general inverse: 34 against 72 ms at n = 513, one thread, the other core
    busy; a width-512 Glow has ~70 such factors), or by a general inverse where rounding leaves the damped factor
    not positive definite."""
    damped = factor + damping * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    lower, info = torch.linalg.cholesky_ex(damped)
    if bool(info):  # (one sync per factor, at setup)
        return torch.linalg.inv(damped)
    return torch.cholesky_inverse(lower)


def _split(flat: Tensor, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """A flat vector [D] (or rows of them [m, D]) cut along its last dimension into name -> tensor of ``shapes``
    ([m, *shape] for rows; views, in ``shapes``' order)."""
    pieces = flat.split([s.numel() for s in shapes.values()], -1)
    return {n: piece.view(*flat.shape[:-1], *shape) for (n, shape), piece in zip(shapes.items(), pieces, strict=True)}


def remember_metric(model: MultiScaleFlow, remember: Tensor, exclude: Tensor | None, data_spec: DataSpec,
                    names: list[str], seed: int, damping: float | None = None,
                    images: int | None = None) -> KroneckerMetric:
    """The metric of :class:`KroneckerMetric` on ``images`` (default :data:`METRIC_IMAGES`) rows of ``remember``
    (uint8 [R,C,S,S]),
    dequantized: rows outside ``exclude`` (long, rows; the refresh subset the drift guard measures) first, rows
    of ``exclude`` only when the others are fewer; rows and noise drawn from ``seed``, so a resumed run rebuilds
    the same metric. ``model``: the base model (its weights at the start of the run); ``damping``: the metric's
    relative damping (:class:`KroneckerMetric`; default :data:`DAMPING`)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(remember.shape[0], generator=generator)
    if exclude is not None:
        excluded = torch.zeros(remember.shape[0], dtype=torch.bool)
        excluded[exclude.cpu()] = True
        order = torch.cat([order[~excluded[order]], order[excluded[order]]])
    rows = order[:METRIC_IMAGES if images is None else images]
    device = next(model.parameters()).device
    pixels = take_rows(remember, rows, device)
    x = dequantized(pixels, uniform_noise(generator, pixels.shape, device), data_spec.n_bits)
    return KroneckerMetric(model, x, data_spec, names, DAMPING if damping is None else damping)
