"""Holding the forget set's look-alikes, and the remember set, where ``evaluate`` judges them (issue 23).

The anchor holds every remember row, the look-alikes included, to its own base NLL. ``evaluate`` judges a set
differently: by its quantile drop, each model against its *own* remember normal, so a look-alike that kept its
NLL while the rest of the remember set became more likely counts as pushed out (its D_R^NN), and a remember set
whose NLLs changed shape (not only place and spread) shows a drop too (its D_R). :class:`QuantileHold`
measures that quantity at the stop and refuses a stop where it exceeds a bound (docs/method.md "Holding the
look-alikes").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowtame.data.quantization import DataSpec
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import batched_nll
from flowtame.likelihood.statistics import NormalFit, likelihood_quantile

#: A stop is refused by one hold at most this many times; after that it is accepted with the set's quantile drop
#: in the report (``lookalike_qd``, ``lookalike_refusals``; ``remember_qd``, ``remember_qd_refusals``). The
#: tuning Glow's k = 1 run needed 4 look-alike refusals (a stop at the peak learning rate caught a swing); on the
#: test suite's tiny Glows the look-alikes' drop sat at 0.025-0.03 for 65 confirmations, so an unbounded refusal
#: only spent the budget.
MAX_HOLD_REFUSALS = 5


#: The holds' names in the resume state and the report, (quantile drop, refusals): the look-alikes', the remember
#: set's.
LOOKALIKE_KEYS = ("lookalike_qd", "lookalike_refusals")
REMEMBER_KEYS = ("remember_qd", "remember_qd_refusals")


def quantile_drop(base_nll: np.ndarray, nll: np.ndarray, base: NormalFit, now: NormalFit) -> float:
    """Mean quantile drop of N images, ``mean q(base_nll; base) - mean q(nll; now)`` (nats [N] each), as
    ``evaluate`` computes a set's ``qd`` (:func:`flowtame.likelihood.statistics.quantile_drop`, no interval)."""
    return float(likelihood_quantile(base_nll, base).mean() - likelihood_quantile(nll, now).mean())


class QuantileHold:
    """A set's guard at the stop: the look-alikes' (``lookalike_qd``) or the whole remember set's (``remember_qd``).

    ``rows``: long [L] (CPU), the set's rows of the remember set (None: every row); ``check``: those images
    dequantized with the evaluation's keyed noise [L,C,H,W] (on the method's device; None when the set is only
    judged on the whole-set pass); ``bound``: the largest quantile drop a stop accepts; ``base_nll``: float64 [L],
    the base model's NLL of those images on that noise (nats; the tame job's whole-set base pass at ``rows``);
    ``base_fit``: N_B (nats); ``keys``: the names of its quantile drop and refusals in the state and the report.
    """

    def __init__(self, rows: Tensor | None, check: Tensor | None, bound: float, base_nll: np.ndarray,
                 base_fit: NormalFit, data_spec: DataSpec,
                 keys: tuple[str, str] = LOOKALIKE_KEYS):
        self.keys = keys
        self.rows, self.check, self.bound, self.base_nll = rows, check, bound, base_nll
        self.data_spec, self.base_fit = data_spec, base_fit
        self.refusals = 0
        #: the quantile drop measured at the latest check (None before the first)
        self.last_qd: float | None = None

    def drop(self, nll: np.ndarray, now: NormalFit) -> float:
        """The set's quantile drop for its NLL [L] under the current model (nats) against that model's remember
        normal ``now`` (:func:`quantile_drop`), judging nothing."""
        return quantile_drop(self.base_nll, nll, self.base_fit, now)

    def kept(self, nll: np.ndarray, now: NormalFit) -> bool:
        """True when the set's quantile drop (its NLL [L] under the current model, nats, against that model's
        remember normal ``now``) is within the bound, or the stop was already refused
        :data:`MAX_HOLD_REFUSALS` times; otherwise counts a refusal."""
        self.last_qd = self.drop(nll, now)
        if self.last_qd <= self.bound or self.refusals >= MAX_HOLD_REFUSALS:
            return True
        self.refusals += 1
        return False

    @torch.no_grad()
    def kept_now(self, model: MultiScaleFlow, now: NormalFit) -> bool:
        """:meth:`kept` on a fresh no-grad pass over the L check images (the cheap check at a confirmation)."""
        assert self.check is not None
        return self.kept(batched_nll(model, self.check, self.data_spec).double().cpu().numpy(), now)

    def of_whole_set(self, nll: Tensor) -> np.ndarray:
        """This set's NLLs [L] (float64) out of the whole remember set's [R]."""
        return (nll if self.rows is None else nll[self.rows]).numpy()

    def state_meta(self) -> dict[str, Any]:
        """The last quantile drop and the refusals, under :attr:`keys` (the report's names)."""
        qd_key, refusals_key = self.keys
        return {qd_key: self.last_qd, refusals_key: self.refusals}

    def load_state(self, meta: dict[str, Any]) -> None:
        qd_key, refusals_key = self.keys
        self.refusals = meta.get(refusals_key, 0)
        self.last_qd = meta.get(qd_key)


def hold_figures(holds: Iterable[QuantileHold]) -> dict[str, Any]:
    """Both holds' figures for the report (refusals and the last quantile drop, under :data:`LOOKALIKE_KEYS` and
    :data:`REMEMBER_KEYS`): each hold's :meth:`~QuantileHold.state_meta`; a hold that is off (not in ``holds``)
    reads as one that never judged: 0 refusals, no drop (None)."""
    figures: dict[str, Any] = {}
    for qd_key, refusals_key in (LOOKALIKE_KEYS, REMEMBER_KEYS):
        figures.update({refusals_key: 0, qd_key: None})
    for hold in holds:
        figures.update(hold.state_meta())
    return figures
