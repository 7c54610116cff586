"""The remember set's normal N_T = (mu_R, sigma_R) of the model being changed, in nats.

One object for every method that holds the remember set's likelihoods in place (taming, the baselines,
debias, the vector method): fitted to the base model's N_B, refreshed on a fixed subset of the remember set
(with the base model's whole-set vs subset correction), refreshed early when the remember batches' running
average says the value went stale, re-measured against the whole set when a whole-set check disagrees, and
saved in and restored from the engine's resume state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Weight of each remember batch's mean and std in their exponential average (the staleness test).
TRACK_WEIGHT = 0.3
#: Refresh early when the batches' average mean or std is this many sigma_R away from the refreshed value
#: (its noise is ~0.07 sigma_R for the mean and ~0.05 for the std at batch 32): the value is stale, and the KL
#: would keep pushing the same way for the rest of the refresh interval (docs/method.md "Blow-ups").
STALE_SIGMA = 0.25


class RememberNormal:
    """mu_R, sigma_R (0-dim tensors, nats) of the current model, starting at N_B = (``base_mean``, ``base_std``).

    ``subset_correction`` = (mean offset nats, std ratio) maps the refresh subset's NLL mean and std to the
    whole set's (:func:`flowtame.likelihood.statistics.subset_correction`); (0, 1) when the subset is the set.
    """

    def __init__(self, base_mean: Tensor, base_std: Tensor, subset_correction: tuple[float, float] = (0.0, 1.0)):
        self.base_mean, self.base_std = base_mean, base_std
        self.mean_offset, self.std_ratio = subset_correction
        self.mu = base_mean.clone()
        self.sigma = base_std.clone()
        self.track_mean, self.track_std = self.mu.clone(), self.sigma.clone()
        # the refresh subset's own (uncorrected) NLL mean and std at the latest refresh, nats
        self.subset_mean, self.subset_std = self.mu - self.mean_offset, self.sigma / self.std_ratio
        self.refreshes = 0
        self.early_refreshes = 0

    def update(self, subset_nll: Tensor) -> None:
        """A refresh: adopt the NLLs (nats) [S] of the refresh subset under the current weights, corrected."""
        self.subset_mean, self.subset_std = subset_nll.mean(), subset_nll.std()
        self.mu = self.subset_mean + self.mean_offset
        self.sigma = self.subset_std * self.std_ratio
        self.track_mean, self.track_std = self.mu.clone(), self.sigma.clone()
        self.refreshes += 1

    def track(self, batch_mean: Tensor, batch_std: Tensor) -> None:
        """Fold one remember batch's NLL mean and std (nats) into their exponential average."""
        self.track_mean = self.track_mean + TRACK_WEIGHT * (batch_mean.detach() - self.track_mean)
        self.track_std = self.track_std + TRACK_WEIGHT * (batch_std.detach() - self.track_std)

    def estimate(self, batch_mean: Tensor, batch_std: Tensor) -> tuple[Tensor, Tensor]:
        """N_T for the KL: the refreshed mu_R, sigma_R as values, with the gradient of this remember batch's NLL
        mean and std (nats) — a low-noise value that still tells the step which way the batch moves it."""
        return self.mu + (batch_mean - batch_mean.detach()), self.sigma + (batch_std - batch_std.detach())

    def stale(self) -> bool:
        """Whether the remember batches' exponential average left the refreshed mu_R, sigma_R by more than
        :data:`STALE_SIGMA` sigma_R: the model moved since the refresh, and the KL's pull is out of date."""
        limit = STALE_SIGMA * self.sigma
        return bool((self.track_mean - self.mu).abs() > limit or (self.track_std - self.sigma).abs() > limit)

    def remeasure(self, mean: Tensor, std: Tensor) -> None:
        """Adopt the whole set's NLL ``mean`` and ``std`` (nats), and re-measure the subset correction against
        the latest refresh: the correction drifted with the weights."""
        self.mean_offset = float(mean - self.subset_mean)
        self.std_ratio = float(std / self.subset_std)
        self.mu, self.sigma = mean, std

    def drift(self) -> float:
        """Relative rise of mu_R (latest refresh) over N_B's mean."""
        return float((self.mu - self.base_mean) / self.base_mean)

    def within(self, bound: float | None) -> bool:
        """Whether :meth:`drift` is within ``bound`` (relative; None: no bound)."""
        return drift_within(self.drift(), bound)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"mu_r": self.mu.reshape(1), "sigma_r": self.sigma.reshape(1),
                "track": torch.stack([self.track_mean, self.track_std]).reshape(2)}

    def state_meta(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes, "early_refreshes": self.early_refreshes,
                "subset_correction": [self.mean_offset, self.std_ratio]}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.mu, self.sigma = tensors["mu_r"].reshape(()), tensors["sigma_r"].reshape(())
        if "track" in tensors:
            self.track_mean, self.track_std = tensors["track"][0].clone(), tensors["track"][1].clone()
        self.refreshes = meta.get("refreshes", 0)
        self.early_refreshes = meta.get("early_refreshes", 0)
        self.mean_offset, self.std_ratio = meta.get("subset_correction", (self.mean_offset, self.std_ratio))


def drift_within(drift: float, bound: float | None) -> bool:
    """Whether a relative rise of the remember set's mean NLL, ``drift``, is within ``bound`` (None: no bound):
    the remember-drift guard's one test, at a stop and on the final evaluation."""
    return bound is None or drift <= bound
