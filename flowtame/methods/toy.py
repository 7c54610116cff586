"""Taming flows on continuous vector data, and the paper's 2-D illustration (seed 000, Fig. 2).

- :class:`GaussianMixture` and :func:`five_gaussians`: four isotropic Gaussians on the corners of a square
  plus one in the middle, equal weights; :meth:`GaussianMixture.assign` gives each point its nearest mode,
  or "none" beyond a radius (default :data:`ASSIGN_RADIUS_STDS` standard deviations).
- :func:`fit_flow`: maximum-likelihood training of a vector flow with Adam (the "pretrained" model).
- :class:`VectorTamingMethod`: the paper's losses (Eq. 9-12, :mod:`flowtame.methods.objective`) for vector data,
  run by :class:`flowtame.engine.loop.Engine`, optionally with a likelihood anchor (flowtame's extension, not the
  paper's): ``anchor * mean(((NLL_T(a) - NLL_B(a)) / σ_B)²)`` over anchor points a, by default base-model
  samples nearer to D_R than to D_F (:func:`replay_anchor_points`), which holds the density of each
  remembered region where the paper's remember term only holds the pooled NLL's mean and std.
  Vector data are continuous, so there is no quantization and no dequantization noise: NLL is ``-log p(x)``
  in nats of the continuous density (it can be negative), and the remember term's "BPD" is that NLL over
  ``D ln 2``. The stopping rule is the image method's: every forget point satisfies ``|d| < epsilon``,
  confirmed against the *current* model's remember statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowtame.data.quantization import nats_per_bpd
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import batched_nll, nll_nats
from flowtame.likelihood.threshold import default_epsilon, threshold_distance
from flowtame.methods.objective import forget_loss, remember_loss
from flowtame.methods.remember import RememberNormal

#: Default radius of :meth:`GaussianMixture.assign`, in mixture standard deviations. For a 2-D Gaussian
#: the mass beyond r standard deviations is exp(-r²/2): 3.4e-4 at r = 4.
ASSIGN_RADIUS_STDS = 4.0

#: The label :meth:`GaussianMixture.fractions` uses for points farther than the radius from every centre.
NO_MODE = "none"


@dataclass(frozen=True)
class GaussianMixture:
    """Equal-weight mixture of isotropic Gaussians N(centre_k, std² I) in R^dim.

    ``centres`` float [K, dim]; ``names`` one per mode.
    """

    centres: Tensor
    std: float
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.centres.ndim != 2 or self.centres.shape[0] != len(self.names):
            raise ValueError(f"need one name per centre: centres {list(self.centres.shape)}, "
                             f"{len(self.names)} names")
        if len(set(self.names)) != len(self.names) or NO_MODE in self.names:
            raise ValueError(f"mode names must be distinct and not {NO_MODE!r}: {self.names}")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def dim(self) -> int:
        return self.centres.shape[1]

    def index(self, name: str) -> int:
        """Position of mode ``name`` in ``centres``."""
        if name not in self.names:
            raise ValueError(f"unknown mode {name!r} (modes: {', '.join(self.names)})")
        return self.names.index(name)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(points [n, dim], mode index [n]): each point's mode drawn uniformly, then its Gaussian."""
        labels = torch.randint(len(self.names), (n,), generator=generator)
        noise = torch.randn(n, self.dim, generator=generator)
        return self.centres[labels] + self.std * noise, labels

    def sample_mode(self, name: str, n: int, generator: torch.Generator) -> Tensor:
        """n points [n, dim] from the Gaussian of mode ``name`` only."""
        return self.centres[self.index(name)] + self.std * torch.randn(n, self.dim, generator=generator)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density [N] of points [N, dim] under the mixture, in nats."""
        sq = torch.cdist(x, self.centres).square()
        log_comp = -0.5 * sq / self.std ** 2 - self.dim * math.log(self.std * math.sqrt(2 * math.pi))
        return torch.logsumexp(log_comp, 1) - math.log(len(self.names))

    def assign(self, x: Tensor, radius: float | None = None) -> Tensor:
        """Nearest mode index [N] of points [N, dim]; -1 where the nearest centre is farther than ``radius``
        (default ``ASSIGN_RADIUS_STDS * std``)."""
        radius = ASSIGN_RADIUS_STDS * self.std if radius is None else radius
        dist, nearest = torch.cdist(x, self.centres).min(1)
        return torch.where(dist <= radius, nearest, torch.full_like(nearest, -1))

    def fractions(self, x: Tensor, radius: float | None = None) -> dict[str, float]:
        """Share of points [N, dim] assigned to each mode, plus :data:`NO_MODE` (sums to 1)."""
        counts = torch.bincount(self.assign(x, radius) + 1, minlength=len(self.names) + 1).tolist()
        total = max(x.shape[0], 1)
        return {name: counts[k + 1] / total for k, name in enumerate(self.names)} | {NO_MODE: counts[0] / total}


def five_gaussians(half_side: float = 1.5, std: float = 0.2) -> GaussianMixture:
    """The paper's Fig. 2 data: Gaussians at the corners (±half_side, ±half_side) and at the origin."""
    h = half_side
    centres = torch.tensor([[-h, h], [h, h], [-h, -h], [h, -h], [0.0, 0.0]])
    return GaussianMixture(centres, std, ("upper-left", "upper-right", "lower-left", "lower-right", "middle"))


#: Rows per no-grad likelihood pass over vectors (:func:`vector_set_nll`).
VECTOR_BATCH = 4096


def vector_set_nll(model: MultiScaleFlow, x: Tensor) -> Tensor:
    """Continuous NLL (nats) [N] of vectors ``x`` [N, dim] without gradients: :func:`batched_nll` in batches of
    :data:`VECTOR_BATCH`."""
    return batched_nll(model, x, batch_size=VECTOR_BATCH)


def fit_flow(model: MultiScaleFlow, data: Tensor, *, steps: int, batch_size: int, lr: float,
             generator: torch.Generator) -> float:
    """Maximum likelihood on ``data`` [N, dim]: Adam, learning rate cosine-decayed from ``lr`` to 0, minibatches
    drawn with replacement from ``generator``. Returns the final mean NLL (nats) over ``data``."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        batch = data[torch.randint(data.shape[0], (batch_size,), generator=generator)]
        optimizer.zero_grad(set_to_none=True)
        nll_nats(model, batch).mean().backward()
        optimizer.step()
        schedule.step()
    return vector_set_nll(model, data).mean().item()


@torch.no_grad()
def replay_anchor_points(model: MultiScaleFlow, forget: Tensor, remember: Tensor, n: int,
                         generator: torch.Generator) -> Tensor:
    """Anchor points [<= n, dim] for :class:`VectorTamingMethod`: n samples of ``model`` (the base flow),
    keeping those whose nearest point of ``forget`` [F, dim] ∪ ``remember`` [R, dim] lies in ``remember``."""
    replay = model.sample(n, generator=generator)
    nearest_forget = torch.cdist(replay, forget).min(1).values
    nearest_remember = torch.cdist(replay, remember).min(1).values
    return replay[nearest_remember < nearest_forget]


class VectorTamingMethod:
    """The paper's taming (Eq. 9-12) for flows on continuous vectors; a :class:`flowtame.engine.loop.Method`.

    Built from the *base* model (before any step): N_B = (mean, std) of the remember NLL is fitted once over
    the whole remember set. Each iteration makes one forward/backward over [forget batch; remember batch]
    (the whole forget set when it fits in ``batch_size``; ``batch_size`` remember points drawn with
    replacement). The KL term's N_T takes its value from the latest refreshed mu_R, sigma_R and its gradient
    from the remember batch, as in :class:`flowtame.methods.taming.TamingMethod` (``kl_estimate="refreshed"``).
    mu_R, sigma_R are re-estimated every ``refresh_every`` iterations on the remember set, or on a fixed
    random subset of ``refresh_size`` points corrected by the base model's whole-set vs subset difference.

    With ``anchor`` > 0 each iteration also draws ``batch_size`` of ``anchor_points`` (default: the remember
    set) and adds ``anchor * mean(((NLL_T - NLL_B) / σ_B)²)`` to the remember loss, NLL_B each point's NLL
    under the base model (computed once) and σ_B the base remember std: a per-point hold on the density,
    where the KL term only sees the pooled mean and std (examples/toy2d measures both).

    Stopping (Eq. 10): the d values of the training forward screen the rule; when every forget point's
    latest d passes, the method refreshes mu_R, sigma_R under the current weights, recomputes d for the whole
    forget set and stops only if ``|d| < epsilon`` for all of them. No noise is involved, so the check is exact.
    """

    name = "vector-taming"

    def __init__(self, model: MultiScaleFlow, forget: Tensor, remember: Tensor, *, generator: torch.Generator,
                 delta: float = 4.0, epsilon: float | None = None, alpha: float = 0.6, gamma: float = 0.6,
                 batch_size: int = 256, refresh_every: int = 10, refresh_size: int | None = None,
                 forget_loss_kind: str = "squared", forget_unit: str = "sigma", anchor: float = 0.0,
                 anchor_points: Tensor | None = None):
        if forget.ndim != 2 or remember.ndim != 2 or forget.shape[1] != remember.shape[1]:
            raise ValueError(f"forget and remember must be [N, dim] with the same dim: "
                             f"{list(forget.shape)}, {list(remember.shape)}")
        if forget.shape[0] < 1 or remember.shape[0] < 2:
            raise ValueError("need at least one forget point and two remember points")
        if anchor < 0:
            raise ValueError(f"anchor must be >= 0, got {anchor}")
        if anchor_points is not None and (anchor_points.ndim != 2 or anchor_points.shape[0] < 1
                                          or anchor_points.shape[1] != remember.shape[1]):
            raise ValueError(f"anchor points must be [N >= 1, {remember.shape[1]}], got {list(anchor_points.shape)}")
        self.forget, self.remember = forget, remember
        self.delta = delta
        self.epsilon = default_epsilon(delta) if epsilon is None else epsilon
        self.alpha, self.gamma = alpha, gamma
        self.batch_size = batch_size
        self.refresh_every = refresh_every
        self.forget_loss_kind, self.forget_unit = forget_loss_kind, forget_unit
        self.generator = generator
        self.nats_per_bpd = nats_per_bpd(forget.shape[1])
        base_nll = vector_set_nll(model, remember)
        self.base_remember_nll = base_nll  #: [R] nats, under the base model
        self.base_mean, self.base_std = base_nll.mean(), base_nll.std()
        self.anchor = anchor
        self.anchor_points = remember if anchor_points is None else anchor_points
        #: [A] nats, the anchor points' NLL under the base model; None when the anchor is off.
        self.anchor_base_nll: Tensor | None = None
        if anchor:
            self.anchor_base_nll = base_nll if anchor_points is None else vector_set_nll(model, anchor_points)
        if refresh_size is None or refresh_size >= remember.shape[0]:
            self.refresh_points = remember
            correction = (0.0, 1.0)
        else:
            subset = torch.randperm(remember.shape[0], generator=generator)[:refresh_size]
            self.refresh_points = remember[subset]
            correction = ((self.base_mean - base_nll[subset].mean()).item(),
                          (self.base_std / base_nll[subset].std()).item())
        #: N_T: mu_R, sigma_R of the model being tamed (refresh with subset correction, resume state).
        self.normal = RememberNormal(self.base_mean, self.base_std, correction)
        self.latest_d = torch.full((forget.shape[0],), float("inf"))
        self.confirmed_d: Tensor | None = None
        self.confirmations = 0

    @property
    def mu_r(self) -> Tensor:
        return self.normal.mu

    @property
    def sigma_r(self) -> Tensor:
        return self.normal.sigma

    @property
    def refreshes(self) -> int:
        return self.normal.refreshes

    def loss(self, model: MultiScaleFlow, iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        n_forget = self.forget.shape[0]
        if n_forget <= self.batch_size:
            forget_idx = torch.arange(n_forget)
        else:
            forget_idx = torch.randperm(n_forget, generator=self.generator)[:self.batch_size]
        remember_idx = torch.randint(self.remember.shape[0], (self.batch_size,), generator=self.generator)
        rows = [self.forget[forget_idx], self.remember[remember_idx]]
        anchor_base_nll = self.anchor_base_nll
        if anchor_base_nll is not None:
            anchor_idx = torch.randint(self.anchor_points.shape[0], (self.batch_size,), generator=self.generator)
            rows.append(self.anchor_points[anchor_idx])
        nll = nll_nats(model, torch.cat(rows))
        nll_forget, nll_remember = nll[:forget_idx.numel()], nll[forget_idx.numel():][:self.batch_size]
        loss_forget = forget_loss(nll_forget, self.mu_r, self.sigma_r, delta=self.delta,
                                  kind=self.forget_loss_kind, unit=self.forget_unit, nats_per_bpd=self.nats_per_bpd)
        batch_mean, batch_std = nll_remember.mean(), nll_remember.std()
        tamed_mean = self.mu_r + (batch_mean - batch_mean.detach())
        tamed_std = self.sigma_r + (batch_std - batch_std.detach())
        loss_remember, _, kl = remember_loss(nll_remember, self.base_mean, self.base_std, tamed_mean,
                                                    tamed_std, gamma=self.gamma, nats_per_bpd=self.nats_per_bpd)
        metrics = {"kl": kl}
        if anchor_base_nll is not None:
            drift = (nll[-self.batch_size:] - anchor_base_nll[anchor_idx]) / self.base_std
            metrics["anchor"] = drift.square().mean()
            loss_remember = loss_remember + self.anchor * metrics["anchor"]
        loss = self.alpha * loss_forget + (1 - self.alpha) * loss_remember
        self.latest_d[forget_idx] = threshold_distance(nll_forget.detach(), self.mu_r, self.sigma_r, self.delta)
        return loss, {"loss_forget": loss_forget, "loss_remember": loss_remember, "remember_nll": batch_mean,
                      **metrics, "max_abs_d": self.latest_d.abs().max(), "mean_d": self.latest_d.mean(),
                      "mu_r": self.mu_r, "sigma_r": self.sigma_r}

    @torch.no_grad()
    def refresh(self, model: MultiScaleFlow) -> None:
        """Re-estimate mu_R, sigma_R (nats) under the current weights."""
        self.normal.update(vector_set_nll(model, self.refresh_points))

    @torch.no_grad()
    def check_distances(self, model: MultiScaleFlow) -> Tensor:
        """d [F] of every forget point under the current weights, against the current mu_R, sigma_R."""
        return threshold_distance(vector_set_nll(model, self.forget), self.mu_r, self.sigma_r, self.delta)

    def after_step(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        if logged["max_abs_d"] < self.epsilon:
            self.confirmations += 1
            self.refresh(model)
            self.confirmed_d = self.check_distances(model)
            self.latest_d.copy_(self.confirmed_d)
            return bool((self.confirmed_d.abs() < self.epsilon).all())
        if (iteration + 1) % self.refresh_every == 0:
            self.refresh(model)
        return False

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.normal.state_tensors(), "latest_d": self.latest_d}

    def state_meta(self) -> dict[str, Any]:
        return {**self.normal.state_meta(), "confirmations": self.confirmations}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.normal.load_state(tensors, meta)
        self.latest_d = tensors["latest_d"].clone()
        self.confirmations = meta["confirmations"]
