"""The taming objective (paper Eq. 5-12), written with differentiable torch ops throughout.

Units: NLLs enter in nats per image; the remember NLL term is averaged in bits per dimension (BPD), as in
the authors' code. KL divergences between normal fits are unit-free (scaling both normals by the same
factor leaves KL unchanged), so they may be computed in nats. The forget term's unit matters (it sets the
scale inside the sigmoid of the paper's loss) and is an explicit choice: ``"bpd"``, ``"nats"`` or
``"sigma"`` (distance to the threshold in remember standard deviations, d).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowtame.likelihood.threshold import forget_threshold

FORGET_LOSSES = ("sigmoid", "squared", "huber")
FORGET_UNITS = ("bpd", "nats", "sigma")


def kl_normal(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    """KL(P || Q) for univariate normals P=(mean_p, std_p), Q=(mean_q, std_q); gradients through every term."""
    return torch.log(std_q / std_p) + (std_p.square() + (mean_p - mean_q).square()) / (2 * std_q.square()) - 0.5


def symmetric_kl(mean_b: Tensor, std_b: Tensor, mean_t: Tensor, std_t: Tensor) -> Tensor:
    """KL(N_B || N_T) + KL(N_T || N_B) (paper Eq. 11, both directions)."""
    return kl_normal(mean_b, std_b, mean_t, std_t) + kl_normal(mean_t, std_t, mean_b, std_b)


def forget_loss(nll: Tensor, mu: Tensor, sigma: Tensor, *, delta: float, kind: str, unit: str,
                nats_per_bpd: float, huber_width: float = 0.3, weight: Tensor | None = None) -> Tensor:
    """Forget loss over a batch of forget images (Eq. 9); ``nll``, ``mu``, ``sigma`` in nats.

    - ``sigmoid``: the paper's ``mean sigmoid(Δ²)``, Δ = NLL - (mu + delta*sigma) expressed in ``unit``;
      its pull fades as Δ -> 0 and vanishes when Δ² is large (saturation).
    - ``squared``: ``mean Δ²``: a pull proportional to the gap, never saturating.
    - ``huber``: ``mean huber(Δ)`` with its quadratic zone |Δ| < ``huber_width`` (in remember standard
      deviations, converted to ``unit``): a constant pull far from the threshold, so an image does not stall
      short of it when the remember term pushes back, that fades smoothly inside the stopping band.
    All are minimal at the threshold, matching the stopping rule |d| < epsilon. ``weight`` [B] scales each
    image's term before the mean (None: all 1).
    """
    if kind not in FORGET_LOSSES or unit not in FORGET_UNITS:
        raise ValueError(f"unknown forget loss {kind!r} / unit {unit!r}")
    scales: dict[str, Tensor | float] = {"bpd": nats_per_bpd, "sigma": sigma, "nats": 1.0}
    scale = scales[unit]
    gap = (nll - forget_threshold(mu, sigma, delta)) / scale
    if kind == "sigmoid":
        terms = torch.sigmoid(gap.square())
    elif kind == "squared":
        terms = gap.square()
    else:
        width = huber_width * sigma.detach() / scale
        terms = torch.where(gap.abs() < width, gap.square() / (2 * width), gap.abs() - width / 2)
    return (terms if weight is None else weight * terms).mean()


def anchor_loss(nll: Tensor, base_nll: Tensor, base_std: Tensor) -> Tensor:
    """Per-image anchor to the base model: ``mean_i ((NLL_theta(x_i) - NLL_base(x_i)) / sigma_B)^2``.

    ``nll`` [B] (with gradient) and ``base_nll`` [B] (no gradient) are nats on the same dequantized images;
    ``base_std`` is sigma_B (nats). Its pull on each image is proportional to that image's current deviation,
    measured every step (a closed loop), unlike the KL's, whose coefficient is frozen between refreshes.
    """
    return ((nll - base_nll) / base_std).square().mean()


def shift_loss(nll: Tensor, base_nll: Tensor, base_std: Tensor) -> Tensor:
    """The common shift's term: ``(mean_i (NLL_theta(x_i) - NLL_base(x_i)) / sigma_B)^2``.

    Same inputs as :func:`anchor_loss` ([B] nats, ``base_std`` sigma_B nats). The anchor's mean of squares is
    the squared mean plus the deviations' variance; a shift common to every image, which is what a held-out
    set's mean BPD sees, is a small share of it (0.5% of the BPD is ~0.05 sigma_B on the digits, 0.0025 in the
    anchor), so this term weights that share on its own.
    """
    return ((nll - base_nll) / base_std).mean().square()


def remember_loss(nll_remember: Tensor, base_mean: Tensor, base_std: Tensor, tamed_mean: Tensor,
                  tamed_std: Tensor, *, gamma: float, nats_per_bpd: float, anchor: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(L_R, mean NLL term in BPD, symmetric KL) with ``L_R = (1-gamma)*A + gamma*(KL(B||T) + KL(T||B))``.

    ``anchor``: a (weighted) :func:`anchor_loss` that takes A's place, ``L_R = (1-gamma)*anchor + gamma*KL``;
    A, the mean remember NLL, keeps training the model (lowering every NLL), which the anchor does not.
    The mean NLL term is returned (for the logs) either way.
    """
    nll_term = nll_remember.mean() / nats_per_bpd
    kl = symmetric_kl(base_mean, base_std, tamed_mean, tamed_std)
    first = nll_term if anchor is None else anchor
    return (1 - gamma) * first + gamma * kl, nll_term, kl
