"""Holding the forget set's look-alikes where ``evaluate --neighbours`` judges them (issue 23, item 3).

The anchor holds every remember row, the look-alikes included, to its own base NLL. ``evaluate`` judges the
look-alikes (its D_R^NN) differently: by their quantile drop, each model against its *own* remember normal,
so a look-alike that kept its NLL while the rest of the remember set became more likely counts as pushed
out. :class:`LookalikeHold` measures that quantity at the stop and refuses a stop where it exceeds a bound.
With ``lookalike_pull`` > 0 (off by default: measured worse on the tuning Glow) each refusal also switches on
(then doubles) a term on the look-alikes' mean deviation *relative to* the remember rows'
(:func:`lookalike_loss`), the direction that quantile drop measures (docs/method.md "Holding the
look-alikes").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowtame.data.quantization import DataSpec
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import batched_nll
from flowtame.likelihood.statistics import NormalFit, likelihood_quantile

#: Growth of :func:`lookalike_loss`'s factor per further refusal, and its bound (the factor goes 1, 2, 4, 8).
LOOKALIKE_GROWTH = 2.0
MAX_LOOKALIKE_FACTOR = 8.0
#: A stop is refused for the look-alikes at most this many times; after that it is accepted with their quantile
#: drop in the report (``lookalike_qd``, ``lookalike_refusals``). The tuning Glow's k = 1 run needed 4 refusals
#: (a stop at the peak learning rate caught a swing); on the test suite's tiny Glows the drop sat at 0.025-0.03
#: for 65 confirmations, so an unbounded refusal only spent the budget.
MAX_LOOKALIKE_REFUSALS = 5


def lookalike_loss(nll: Tensor, base_nll: Tensor, rows: int, base_std: Tensor) -> Tensor:
    """``(mean_la dev - mean_R dev)^2`` with ``dev = (NLL_theta - NLL_base) / sigma_B``.

    ``nll`` [B] (with gradient) and ``base_nll`` [B] (no gradient), nats on the same dequantized images: the
    first ``rows`` are random remember rows, the rest look-alike rows; ``base_std`` sigma_B (nats). Zero when
    the look-alikes moved as much as the remember rows did (a common shift, which the quantile drop does not
    see). Its gradient pushes the two means apart equally and oppositely, so along a direction every image's
    NLL shares (a Glow whose forget and remember gradients coincide) it cancels: with the remember rows' mean
    held constant the pull on the look-alikes alone moved every NLL, and the tuning Glow's remember mean swung
    by 3-6% (docs/benchmarks.md "Round 4b").
    """
    dev = (nll - base_nll) / base_std
    return (dev[rows:].mean() - dev[:rows].mean()).square()


def quantile_drop(base_nll: np.ndarray, nll: np.ndarray, base: NormalFit, now: NormalFit) -> float:
    """Mean quantile drop of N images, ``mean q(base_nll; base) - mean q(nll; now)`` (nats [N] each), as
    ``evaluate`` computes a set's ``qd`` (:func:`flowtame.likelihood.statistics.quantile_drop`, no interval)."""
    return float(likelihood_quantile(base_nll, base).mean() - likelihood_quantile(nll, now).mean())


class LookalikeHold:
    """The look-alikes' guard at the stop and its term's growing weight.

    ``rows``: long [L] (CPU), the look-alikes' rows of the remember set; ``check``: those images dequantized
    with the evaluation's keyed noise [L,C,H,W] (on the method's device); ``bound``: the largest quantile drop
    a stop accepts (``lookalike_qd``); ``base_model``: the frozen base model, whose NLL [L] of ``check`` is
    measured once; ``base_fit``: N_B (nats); ``pull``: the weight of :func:`lookalike_loss` after the first
    refusal (``lookalike_pull``; 0, the default: the check alone, which measured better on the tuning Glow).
    """

    def __init__(self, rows: Tensor, check: Tensor, bound: float, base_model: MultiScaleFlow, base_fit: NormalFit,
                 data_spec: DataSpec, pull: float = 0.0):
        self.rows, self.check, self.bound, self.pull = rows, check, bound, pull
        self.data_spec, self.base_fit = data_spec, base_fit
        self.base_nll = batched_nll(base_model, check, data_spec).double().cpu().numpy()
        #: 0 until a stop is refused for the look-alikes, then 1, x LOOKALIKE_GROWTH per refusal, at most 8
        self.factor = 0.0
        self.refusals = 0
        #: the quantile drop measured at the latest check (None before the first)
        self.last_qd: float | None = None

    @property
    def weight(self) -> float:
        """The weight of :func:`lookalike_loss` in the remember term now (0 until the first refusal)."""
        return self.pull * self.factor

    def kept(self, nll: np.ndarray, now: NormalFit) -> bool:
        """True when the look-alikes' quantile drop (their NLL [L] under the current model, nats, against its
        remember normal ``now``) is within the bound, or the stop was already refused
        :data:`MAX_LOOKALIKE_REFUSALS` times; otherwise counts a refusal and grows the term."""
        self.last_qd = quantile_drop(self.base_nll, nll, self.base_fit, now)
        if self.last_qd <= self.bound or self.refusals >= MAX_LOOKALIKE_REFUSALS:
            return True
        self.refusals += 1
        self.factor = 1.0 if self.factor == 0 else min(MAX_LOOKALIKE_FACTOR, self.factor * LOOKALIKE_GROWTH)
        return False

    @torch.no_grad()
    def kept_now(self, model: MultiScaleFlow, now: NormalFit) -> bool:
        """:meth:`kept` on a fresh no-grad pass over the L look-alikes (the cheap check at a confirmation)."""
        return self.kept(batched_nll(model, self.check, self.data_spec).double().cpu().numpy(), now)

    def state_meta(self) -> dict[str, Any]:
        return {"lookalike_factor": self.factor, "lookalike_refusals": self.refusals, "lookalike_qd": self.last_qd}

    def load_state(self, meta: dict[str, Any]) -> None:
        self.factor = meta.get("lookalike_factor", 0.0)
        self.refusals = meta.get("lookalike_refusals", 0)
        self.last_qd = meta.get("lookalike_qd")
