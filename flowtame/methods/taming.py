"""Taming methods, each a loss-and-stopping policy run by :class:`flowtame.engine.loop.Engine`.

All methods share the data layout of :class:`TamingData` (forget and remember images as uint8 tensors,
fixed check noise, the base model's remember normal fitted once) and the same stopping test: every forget
image's distance to the threshold, judged on fixed dequantization noise that training never uses and
against the *current* model's remember statistics, satisfies -epsilon < d < upper_edge * epsilon (the paper's
Eq. 10, |d| < epsilon, with ``upper_edge`` 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowtame.data.quantization import DataSpec, nats_per_bpd
from flowtame.engine.devices import distinct_indices, random_indices, take_rows, uniform_noise
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import batched_nll, dequantized, nll_nats
from flowtame.likelihood.statistics import NormalFit
from flowtame.likelihood.threshold import threshold_distance
from flowtame.methods.lookalikes import REMEMBER_KEYS, QuantileHold
from flowtame.methods.objective import anchor_loss, forget_loss, remember_loss, shift_loss
from flowtame.methods.remember import STALE_SIGMA, TRACK_WEIGHT, RememberNormal

__all__ = ["KL_ESTIMATES", "METHODS", "STALE_SIGMA", "TRACK_WEIGHT", "TamingData", "TamingMethod",
           "settings_section"]

#: The settling decay never takes the learning rate below this fraction of its peak.
MIN_SETTLE_FACTOR = 0.05
#: Weight of a new training-forward d in each forget image's smoothed d (the stopping test's screen).
#: One fresh noise draw moves d by up to ~0.6 sigma_R on small models; the smoothing keeps the screen from
#: waiting for every image's noise to be lucky at once.
SCREEN_WEIGHT = 0.3
#: Growth of a straggler's forget weight per refused confirmation (:meth:`TamingMethod.grow_stragglers`), and
#: its bound. With the anchor on, the forget pull on an image the check finds short of the band is balanced by
#: the anchor on its look-alikes; growing that image's weight moves the balance past the edge.
STRAGGLER_GROWTH = 1.25
MAX_FORGET_WEIGHT = 8.0
#: With the anchor on, the common shift's term (``anchor_shift``) is off until a confirmation is refused for the
#: remember drift; it then weighs 1x ``anchor_shift``, growing x SHIFT_GROWTH per further drift refusal, at most
#: MAX_SHIFT_FACTOR x (:meth:`TamingMethod.remember_kept`). Held from the start it doubled the iterations (a
#: common shift is part of how a step raises the forget images); applied only when the stop needs it, it costs
#: iterations at the end, on the runs that drifted.
SHIFT_GROWTH = 2.0
MAX_SHIFT_FACTOR = 8.0
#: At a stop refused by the remember set's quantile hold: this many more remember images, those whose NLL rose
#: most (beyond the common shift) under the current weights, join the anchor's look-alike rows.
TAIL_ROWS = 16
#: At a stop refused by a quantile hold (the look-alikes' or the remember set's), the anchor's weight grows by
#: this factor, at most to MAX_ANCHOR_FACTOR times ``anchor``: the pull that brings those images back.
ANCHOR_GROWTH = 2.0
MAX_ANCHOR_FACTOR = 8.0
#: Iteration at which the forget images' pace is projected to the budget (:meth:`TamingMethod.check_progress`).
PROGRESS_CHECK = 50
#: Taming's default bound on the remember set's relative mean-NLL rise at a stop (``max_remember_drift``): 0.3%,
#: so that a held-out set's BPD, which drifts up to ~0.2 points more than the remember set's on a model that
#: fits its training images better than held-out ones (the embedded Glow), stays within 0.5% (docs/method.md
#: "Holding the common shift").
TAMING_MAX_REMEMBER_DRIFT = 0.003
#: ``debias``'s default bound (:class:`flowtame.methods.debias.DebiasConfig`), a margin under ``evaluate
#: --check``'s 1% bound; measured for debias at 0.8% and left there.
DEFAULT_MAX_REMEMBER_DRIFT = 0.008
#: N_T estimators (``kl_estimate``): ``refreshed`` (default), ``batch`` (the paper's).
KL_ESTIMATES = ("refreshed", "batch")


@dataclass
class TamingData:
    """Everything a method reads during training, already on its device.

    ``forget`` uint8 [F,C,H,W] with ``forget_request`` long [F] (which --forget source each image came from)
    and ``forget_check_noise`` float [K,F,C,H,W] (or [F,C,H,W] for K = 1) in [0,1): K fixed draws whose
    NLLs are averaged in the stopping test; ``remember`` uint8 [R,C,H,W] (where
    :func:`flowtame.engine.devices.training_rows` puts it: on the GPU when it fits, else pinned); ``refresh`` float
    [S,C,H,W]: a fixed subset of the remember set, dequantized with fixed noise, used to re-estimate mu_R,
    sigma_R; ``base_mean``/``base_std``: N_B in nats, fitted once over the whole remember set under the base
    model. ``whole_remember_nll(model)``, when given, is the NLL (nats, float64 [R]) of the whole remember set
    on the evaluation's keyed noise, exactly as the report computes it: a confirmation that passes on the
    refresh subset is then re-judged against the whole set's normal before the run stops. ``lookalikes``:
    long [L] (CPU), rows of ``remember`` nearest the forget set, held by the anchor in every batch;
    ``lookalike_check``: float [L,C,H,W], those images dequantized with the evaluation's keyed noise (the stop's
    look-alike check, :class:`~flowtame.methods.lookalikes.QuantileHold`). ``base_remember_nll``: float64 [R]
    (CPU), the whole remember set's NLL (nats) under the base model on the evaluation's keyed noise (the tame
    job's base pass; the stop's quantile-drop guards start from it). ``refresh_rows``: long [S] (CPU), the
    rows of ``remember`` that ``refresh`` holds, when ``refresh`` is on the evaluation's keyed noise: a whole-set
    pass right after a refresh then takes those rows' NLLs from it (``whole_remember_nll(model, known=(refresh_rows,
    nll))`` measures only the other rows). ``evaluation_inputs(rows)``: remember images ``rows`` (long [n], CPU)
    dequantized with the evaluation's keyed noise [n,C,H,W], on the device (the solved step's held rows).
    ``base_forget_nll``: float64 [F] (CPU), the forget images' NLL (nats) under the base model averaged over the K
    check draws (the tame job's base pass; the solved step's first measurement).
    """

    data_spec: DataSpec
    forget: Tensor
    forget_request: Tensor
    forget_check_noise: Tensor
    remember: Tensor
    refresh: Tensor
    base_mean: Tensor
    base_std: Tensor
    whole_remember_nll: Callable[..., Tensor] | None = None
    lookalikes: Tensor | None = None
    lookalike_check: Tensor | None = None
    base_remember_nll: Tensor | None = None
    refresh_rows: Tensor | None = None
    evaluation_inputs: Callable[[Tensor], Tensor] | None = None
    base_forget_nll: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.forget.device


class TamingMethod:
    """The paper's method (Eq. 9-12) with correct gradients and measured defaults.

    Each iteration makes ONE forward/backward pass over [forget batch; remember batch] with fresh
    dequantization noise. The KL term compares N_B (fixed) with N_T, whose value is the latest refreshed
    estimate of the tamed model's remember normal and whose gradient comes from the remember batch
    (``kl_estimate="refreshed"``), or is the remember batch's own fit (``"batch"``, the paper's estimator).
    With ``threshold_gradient`` the forget loss also differentiates through mu_R in the threshold
    mu_R + delta*sigma_R (value from the refresh, gradient from the remember batch), as the paper's d(x)
    depends on the tamed model's mu_R: a step that raises every NLL alike then earns nothing, so the forget
    push is selective. sigma_R stays a constant there (its gradient, delta times larger, would reward
    spreading the remember NLLs); the released code treated both as constants (``--no-threshold-gradient``).
    mu_R, sigma_R are refreshed every ``refresh_every`` iterations on the fixed refresh subset. The stopping
    test screens each forget image's smoothed d from the training forwards (exponential average,
    :data:`SCREEN_WEIGHT`) and, only when they all pass, confirms with a no-grad pass over D_F on K fixed
    check draws (NLL averaged) against freshly refreshed statistics. d is relative to the tamed model's own
    mu_R, so a model whose every NLL rose passes it; the confirmation therefore also requires the remember
    mean NLL to have risen by at most ``max_remember_drift`` (relative, = relative mean BPD) over N_B's.
    ``generator`` draws each iteration's indices and noise (a generator on the GPU when training there,
    :func:`flowtame.engine.devices.loop_generator`); ``setup_generator`` (default: the same) what a method builds
    once, such as Selective Amnesia's replay pool.
    """

    name = "taming"
    #: Parameters held fixed unless the config says otherwise (:data:`flowtame.jobs.tame.FREEZE_RULES`).
    default_freeze = "coupling-outputs"
    #: Stopping guard unless the config says otherwise: stop only while the remember set's mean NLL is at most
    #: 0.3% above N_B's (docs/method.md "Stopping", "Holding the common shift").
    default_max_remember_drift = TAMING_MAX_REMEMBER_DRIFT
    #: The remember curvature metric's relative damping and remember images when the job builds one
    #: (``precondition: kfac``); None: :func:`~flowtame.methods.curvature.remember_metric`'s defaults
    #: (:class:`~flowtame.methods.solved.SolvedTaming` has its own).
    metric_damping: float | None = None
    metric_images: int | None = None
    #: The method's own settings (a frozen dataclass built from the config's ``method_settings`` section named
    #: like the method, dashes as underscores), or None for a method without any.
    settings_class: type | None = None
    #: Whether the config's ``anchor`` applies (the baselines run as published, without it).
    anchored = True
    #: Iterations between two confirmations (no-grad passes over the forget set's check draws), at least.
    confirm_gap = 5
    #: Whether the config's ``precondition`` applies (the baselines run as published, without it).
    preconditioned = True

    def __init__(self, data: TamingData, config: Any, *, delta: float, epsilon: float, generator: torch.Generator,
                 subset_correction: tuple[float, float] = (0.0, 1.0), base_model: MultiScaleFlow | None = None,
                 setup_generator: torch.Generator | None = None):
        """``config``: the run's settings (a :class:`flowtame.jobs.tame.TameConfig` or any object with its
        fields: ``alpha``, ``gamma``, ``batch_size``, ``refresh_every``, ``forget_loss``, ``forget_unit``,
        ``kl_estimate``, ``threshold_gradient``, ``settle_decay``, ``stop_margin``, ``upper_edge``,
        ``max_remember_drift``, ``max_remember_jump``, ``anchor``, ``anchor_shift``,
        ``lookalike_qd``, ``remember_qd``);
        ``delta``, ``epsilon``: the stopping target in sigma_R (the config's, or the held-out images' band);
        ``subset_correction``: the refresh subset's correction (see :class:`RememberNormal`)."""
        if config.kl_estimate not in KL_ESTIMATES:
            raise ValueError(f"unknown kl_estimate {config.kl_estimate!r}")
        self.data = data
        self.delta, self.epsilon, self.alpha, self.gamma = delta, epsilon, config.alpha, config.gamma
        self.batch_size = config.batch_size
        self.refresh_every = config.refresh_every
        self.forget_loss_kind, self.forget_unit = config.forget_loss, config.forget_unit
        self.kl_estimate = config.kl_estimate
        self.generator = generator
        self.setup_generator = generator if setup_generator is None else setup_generator
        self.threshold_gradient = config.threshold_gradient
        self.settle_decay = config.settle_decay
        self.stop_margin = config.stop_margin
        self.upper_factor = config.upper_edge
        self.max_remember_drift = config.max_remember_drift
        self.max_remember_jump = config.max_remember_jump
        self.lr_factor = 1.0
        self.config = config
        self.base_model = base_model
        #: Weight of the per-image anchor to the base model on the remember batch (0: off; see :meth:`loss`).
        self.anchor_weight = float(config.anchor or 0.0) if self.anchored else 0.0
        #: With the anchor on: weight of the common shift's term (:func:`~flowtame.methods.objective.shift_loss`)
        #: on the random remember rows (0: off), times :attr:`shift_factor`.
        self.shift_weight = float(config.anchor_shift or 0.0) if self.anchor_weight > 0 else 0.0
        #: 0 until a confirmation is refused for the remember drift, then 1, x :data:`SHIFT_GROWTH` per further
        #: refusal, at most :data:`MAX_SHIFT_FACTOR` (:meth:`remember_kept`).
        self.shift_factor = 0.0
        #: 1, x :data:`ANCHOR_GROWTH` per stop a quantile hold refused, at most :data:`MAX_ANCHOR_FACTOR`.
        self.anchor_factor = 1.0
        if self.anchor_weight > 0 and base_model is None:
            raise ValueError("the anchor term needs the frozen base model")
        #: Remember rows [T] added to the anchor's look-alike rows at stops the remember guard refused
        #: (:meth:`widen_anchor_pool`), else None.
        self.tail_rows: Tensor | None = None
        self._anchor_pool: Tensor | None = None
        self._build_anchor_pool()
        self.lookalike_hold = self._lookalike_hold(float(config.lookalike_qd or 0.0))
        self.remember_hold = self._remember_hold(float(config.remember_qd or 0.0))
        self.nats_per_bpd = nats_per_bpd(data.data_spec.num_dims)
        self.base_bpd = float(data.base_mean) / self.nats_per_bpd
        #: N_T: mu_R, sigma_R of the model being tamed (refresh, early refresh, subset correction, resume state).
        self.normal = RememberNormal(data.base_mean, data.base_std, subset_correction)
        self.calibration = None  # set by the tame job when the learning rate was calibrated
        self.latest_d = torch.full((data.forget.shape[0],), float("inf"), device=data.device)
        #: Per forget image: the weight of its forget term [F] (1 until it straggles; see :meth:`after_step`).
        self.forget_weight = torch.ones(data.forget.shape[0], device=data.device)
        self.last_confirm = -self.confirm_gap
        self.confirmed_d: Tensor | None = None
        self.confirmations = 0
        self.drift_refusals = 0
        self.whole_set_refusals = 0
        #: mean d of the forget images at the first iteration, and the early warning when their pace is too slow
        self.progress_start: float | None = None
        self.progress_warning: str | None = None
        #: The whole remember set's NLL [R] (float64, CPU) under the weights the run stopped with, for the report.
        self.final_remember_nll: Tensor | None = None
        #: The latest confirmation's forget NLLs [K, F] (float32, one row per check draw), and at a stop their
        #: mean [F] (float64, CPU, summed draw by draw as :func:`~flowtame.likelihood.nll.pixel_nll` does), so
        #: the report reuses the stop's own measurement instead of repeating it.
        self.check_draws: Tensor | None = None
        self.final_forget_nll: Tensor | None = None
        #: The latest refresh's NLLs [S] of the refresh subset (nats).
        self.refresh_nll: Tensor | None = None
        #: The remember curvature metric (:class:`~flowtame.methods.curvature.KroneckerMetric`) Adam's updates
        #: are preconditioned by (``precondition: kfac``; set by the tame job), else None.
        self.metric: Any = None
        #: This iteration's forget term gradient (name -> [param shape]), with the metric on.
        self.forget_gradient: dict[str, Tensor] | None = None

    def _lookalike_hold(self, bound: float) -> QuantileHold | None:
        """The stop's look-alike guard (``lookalike_qd`` > 0, with the anchor and look-alikes), else None."""
        d = self.data
        if bound <= 0 or self.anchor_weight <= 0 or d.lookalikes is None or d.lookalike_check is None \
                or d.lookalikes.numel() == 0:
            return None
        assert d.base_remember_nll is not None
        return QuantileHold(d.lookalikes, d.lookalike_check, bound, d.base_remember_nll[d.lookalikes].numpy(),
                            NormalFit(float(d.base_mean), float(d.base_std)), d.data_spec)

    def _remember_hold(self, bound: float) -> QuantileHold | None:
        """The stop's remember-set guard (``remember_qd`` > 0, with the anchor and the whole-set pass), else None:
        judged on the whole-set pass only, where every remember image's NLL is measured."""
        d = self.data
        if bound <= 0 or self.anchor_weight <= 0 or d.whole_remember_nll is None or d.base_remember_nll is None:
            return None
        return QuantileHold(None, None, bound, d.base_remember_nll.numpy(),
                            NormalFit(float(d.base_mean), float(d.base_std)), d.data_spec,
                            keys=REMEMBER_KEYS)

    @property
    def quantile_holds(self) -> list[QuantileHold]:
        """The stop's quantile-drop guards that are on: the look-alikes', then the remember set's."""
        return [hold for hold in (self.lookalike_hold, self.remember_hold) if hold is not None]

    # ------------------------------------------------------------------ the remember normal's figures
    @property
    def mu_r(self) -> Tensor:
        return self.normal.mu

    @mu_r.setter
    def mu_r(self, value: Tensor) -> None:
        self.normal.mu = value

    @property
    def sigma_r(self) -> Tensor:
        return self.normal.sigma

    @sigma_r.setter
    def sigma_r(self, value: Tensor) -> None:
        self.normal.sigma = value

    @property
    def track_mean(self) -> Tensor:
        return self.normal.track_mean

    @property
    def mean_offset(self) -> float:
        return self.normal.mean_offset

    @property
    def std_ratio(self) -> float:
        return self.normal.std_ratio

    @property
    def refreshes(self) -> int:
        return self.normal.refreshes

    @property
    def early_refreshes(self) -> int:
        return self.normal.early_refreshes

    # ------------------------------------------------------------------ batches
    def _batch(self) -> tuple[Tensor, Tensor, int, int]:
        """(inputs [Bf+Br+Bl,...] with fresh noise, forget indices [Bf], Bf, Br): forget rows, ``batch_size``
        random remember rows and, with the anchor on and ``data.lookalikes`` given, :meth:`lookalike_rows`
        of the forget set's nearest remember images."""
        d = self.data
        forget_idx = distinct_indices(self.generator, self.batch_size, d.forget.shape[0]).to(d.device)
        remember = take_rows(d.remember, random_indices(self.generator, d.remember.shape[0], self.batch_size),
                             d.device)
        parts = [d.forget[forget_idx], remember]
        if self.lookalike_rows > 0:
            pool = self.anchor_pool
            assert pool is not None
            pick = distinct_indices(self.generator, self.lookalike_rows, pool.shape[0])
            parts.append(take_rows(d.remember, pool[pick.to(pool.device)], d.device))  # (same device: no copy)
        pixels = torch.cat(parts)
        noise = uniform_noise(self.generator, pixels.shape, d.device)
        return dequantized(pixels, noise, d.data_spec.n_bits), forget_idx, forget_idx.numel(), remember.shape[0]

    @property
    def lookalike_rows(self) -> int:
        """Look-alike rows per batch: a quarter of ``batch_size`` (at least 1), at most all of
        :attr:`anchor_pool` (the look-alikes and the tail rows); 0 without the anchor or such rows."""
        looks = self.anchor_pool
        if self.anchor_weight <= 0 or looks is None or looks.numel() == 0:
            return 0
        return min(looks.numel(), max(1, self.batch_size // 4))

    # ------------------------------------------------------------------ engine protocol
    def loss(self, model: MultiScaleFlow, iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        """This iteration's loss (:meth:`objective`) from one forward over [forget; remember; look-alikes].
        With the anchor on, the frozen base model's NLLs of the remember and look-alike rows (same
        dequantized images, no gradient) go with them."""
        x, forget_idx, n_forget, n_remember = self._batch()
        if self.metric is not None:
            nll = self._forward_keeping_forget_gradient(model, x, forget_idx, n_forget)
        else:
            nll = nll_nats(model, x, self.data.data_spec)
        nll_forget, nll_remember = nll[:n_forget], nll[n_forget:n_forget + n_remember]
        if self.anchor_weight > 0:
            assert self.base_model is not None
            # no gradient; under torchrun each rank evaluates only its shard of the rows
            base_nll = batched_nll(self.base_model, x[n_forget:], self.data.data_spec)
            loss, metrics = self.objective(model, nll_forget, nll_remember, anchor=(nll[n_forget:], base_nll),
                                           forget_weight=self.forget_weight[forget_idx])
        else:
            loss, metrics = self.objective(model, nll_forget, nll_remember)
        if self.metric is not None and self.anchor_weight > 0:  # the forget rows came back detached
            loss = loss + _gradient_surrogate(model, self.forget_gradient)
        d_now = threshold_distance(nll_forget.detach(), self.mu_r, self.sigma_r, self.delta)
        previous = self.latest_d[forget_idx]
        self.latest_d[forget_idx] = torch.where(previous.isfinite(), previous + SCREEN_WEIGHT * (d_now - previous),
                                                d_now)
        metrics.update(max_abs_d=self.latest_d.abs().max(), min_d=self.latest_d.min(), max_d=self.latest_d.max(),
                       mean_d=self.latest_d.mean(), mu_r=self.mu_r, sigma_r=self.sigma_r)
        return loss, metrics

    def _forward_keeping_forget_gradient(self, model: MultiScaleFlow, x: Tensor, forget_idx: Tensor,
                                         n_forget: int) -> Tensor:
        """NLLs [B] (nats) of ``x``, its first ``n_forget`` rows forwarded on their own so that the forget term's
        gradient (its NLL part; mu_R, sigma_R held) is taken from them alone (:attr:`forget_gradient`).

        With the anchor on, the objective weighs the forget rows as this term does and its derivative with
        respect to their NLLs is this term's (mu_R's batch-mean part adds zero to its value), so the forget
        rows' share of the loss's gradient IS :attr:`forget_gradient`: their NLLs come back detached (their
        graph freed, not walked a second time) and :meth:`loss` adds a zero-valued term whose gradient is
        :attr:`forget_gradient` instead."""
        nll_forget = nll_nats(model, x[:n_forget], self.data.data_spec)
        term = self.alpha * forget_loss(nll_forget, self.mu_r, self.sigma_r, delta=self.delta,
                                        kind=self.forget_loss_kind, unit=self.forget_unit,
                                        nats_per_bpd=self.nats_per_bpd, weight=self.forget_weight[forget_idx])
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        reuse = self.anchor_weight > 0  # (:meth:`loss` adds the surrogate on the same test)
        gradient = torch.autograd.grad(term, [p for _, p in trained], retain_graph=not reuse)
        self.forget_gradient = {name: g for (name, _), g in zip(trained, gradient, strict=True)}
        nll_rest = nll_nats(model, x[n_forget:], self.data.data_spec)
        return torch.cat([nll_forget.detach() if reuse else nll_forget, nll_rest])

    @property
    def transforms_update(self) -> bool:
        """Whether the engine hands each Adam update to :meth:`transform_update` (with the metric on)."""
        return self.metric is not None

    def transform_update(self, model: MultiScaleFlow, before: dict[str, Tensor]) -> None:
        """Replace Adam's update (the trained values now minus ``before``, name -> tensor) by the metric's
        preconditioned one with the same first-order forget change
        (:meth:`~flowtame.methods.curvature.KroneckerMetric.update`); kept as is when it does not lower the
        forget term."""
        if self.forget_gradient is None:
            return
        params = dict(model.named_parameters())
        update = {name: params[name].detach() - value for name, value in before.items()}
        new = self.metric.update(update, self.forget_gradient)
        self.forget_gradient = None
        with torch.no_grad():
            for name, value in before.items():
                params[name].copy_(value + new[name].to(value.dtype))

    def objective(self, model: nn.Module, nll_forget: Tensor, nll_remember: Tensor,
                  anchor: tuple[Tensor, Tensor] | None = None, forget_weight: Tensor | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss from this iteration's per-image NLLs (nats); subclasses (baselines) replace it.

        ``anchor``: (NLL [N] of the remember and look-alike rows under the model, the base model's [N]) when
        the anchor is on; its term, plus ``shift_weight * shift_factor`` times the common shift's term on the
        first ``len(nll_remember)`` rows, then replaces the remember NLL term A (see :func:`remember_loss`).
        ``forget_weight``: [Bf] weights of the forget rows' terms (None: all 1).
        Must return the scalar loss and at least ``loss_forget``, ``loss_remember``, ``remember_bpd``.
        """
        batch_mean, batch_std = nll_remember.mean(), nll_remember.std()
        # an exponential average of the remember batches: tells when the refreshed value went stale
        self.normal.track(batch_mean, batch_std)
        if self.kl_estimate == "refreshed":
            tamed_mean, tamed_std = self.normal.estimate(batch_mean, batch_std)
        else:
            tamed_mean, tamed_std = batch_mean, batch_std
        if self.threshold_gradient:
            mu, sigma = self.mu_r + (batch_mean - batch_mean.detach()), self.sigma_r
        else:
            mu, sigma = self.mu_r, self.sigma_r
        loss_forget = forget_loss(nll_forget, mu, sigma, delta=self.delta, kind=self.forget_loss_kind,
                                  unit=self.forget_unit, nats_per_bpd=self.nats_per_bpd, weight=forget_weight)
        anchor_term = anchor_value = shift = None
        if anchor is not None:
            anchor_value = anchor_loss(*anchor, self.data.base_std)
            anchor_term = self.anchor_weight * self.anchor_factor * anchor_value
            if self.shift_weight * self.shift_factor > 0:
                # the random remember rows only (the look-alikes that follow them are not a sample of the set)
                rows = nll_remember.shape[0]
                shift = shift_loss(anchor[0][:rows], anchor[1][:rows], self.data.base_std)
                anchor_term = anchor_term + self.shift_weight * self.shift_factor * shift
        loss_remember, nll_term, kl = remember_loss(nll_remember, self.data.base_mean, self.data.base_std,
                                                    tamed_mean, tamed_std, gamma=self.gamma,
                                                    nats_per_bpd=self.nats_per_bpd, anchor=anchor_term)
        loss = self.alpha * loss_forget + (1 - self.alpha) * loss_remember
        metrics = {"loss_forget": loss_forget, "loss_remember": loss_remember, "remember_bpd": nll_term, "kl": kl}
        if anchor_value is not None:
            metrics["anchor"] = anchor_value.detach()
        if shift is not None:
            metrics["shift"] = shift.detach()
        return loss, metrics

    @torch.no_grad()
    def refresh(self, model: MultiScaleFlow) -> None:
        """Re-estimate mu_R, sigma_R (nats) of the current model on the fixed refresh subset.

        The subset estimate is corrected by the base model's whole-set vs subset difference
        (``subset_correction``), so at iteration 0 it equals N_B exactly; a whole-set check that disagrees
        re-measures that correction under the current weights (:meth:`whole_set_agrees`).
        """
        self.refresh_nll = batched_nll(model, self.data.refresh, self.data.data_spec)
        self.normal.update(self.refresh_nll)

    def diverged(self, logged: dict[str, float]) -> str | None:
        """A reason to roll back: this iteration's remember batch is ``max_remember_jump`` above N_B (mean BPD).

        Taming moves the remember BPD by about 1%; a jump of 25% (the default) is a blow-up, and the engine
        rolls back to the last good weights and halves the learning rate.
        """
        if self.max_remember_jump is not None and logged["remember_bpd"] > self.base_bpd * (1 + self.max_remember_jump):
            return (f"the remember batch's mean BPD jumped to {logged['remember_bpd']:.3f} "
                    f"(base {self.base_bpd:.3f})")
        return None

    def rolled_back(self, model: MultiScaleFlow) -> None:
        """After the engine restored the last good weights: re-estimate mu_R, sigma_R on them, so the remember
        term does not keep steering by statistics measured on the discarded (blown-up) weights."""
        self.refresh(model)

    def divergence_advice(self) -> str:
        """What to change when the blow-up guard gives up: a learning rate whose worst-case step fits the model."""
        calibration = getattr(self, "calibration", None)
        if calibration is None:
            return "try a smaller --lr, or leave --step-sigma at its default so the learning rate is calibrated"
        return (f"one step at the calibrated lr {calibration.lr:.2g} moves the remember mean NLL by up to "
                f"{calibration.lr * calibration.sensitivity / calibration.sigma:.2g} sigma_R on this model "
                f"(first order); try --step-sigma {calibration.step_sigma / 4:.2g}")

    def remember_drift(self) -> float:
        """Relative rise of the remember set's mean NLL (latest refresh) over the base model's N_B mean."""
        return self.normal.drift()

    def remember_kept(self) -> bool:
        """False (and counted) when the remember mean NLL rose by more than ``max_remember_drift``; a refusal
        also switches on (then grows) the common shift's term, the pull that brings the mean back
        (docs/method.md "Holding the common shift")."""
        if self.normal.within(self.max_remember_drift):
            return True
        self.drift_refusals += 1
        self.shift_factor = 1.0 if self.shift_factor == 0 else min(MAX_SHIFT_FACTOR, self.shift_factor * SHIFT_GROWTH)
        return False

    def lookalikes_kept(self, model: MultiScaleFlow) -> bool:
        """With the look-alike guard: their quantile drop on the evaluation's noise, against the refreshed mu_R,
        sigma_R, is within ``lookalike_qd`` (a refusal is counted; docs/method.md "Holding the look-alikes").
        A cheap pass over L images; the whole-set pass judges again (:meth:`whole_set_agrees`)."""
        if self.lookalike_hold is None:
            return True
        return self.lookalike_hold.kept_now(model, NormalFit(float(self.mu_r), float(self.sigma_r)))

    @torch.no_grad()
    def check_nll(self, model: MultiScaleFlow) -> Tensor:
        """NLL (nats) [F] of every forget image, averaged over the fixed check draws."""
        d = self.data
        draws = d.forget_check_noise if d.forget_check_noise.dim() > d.forget.dim() else d.forget_check_noise[None]
        self.check_draws = torch.stack([batched_nll(model, dequantized(d.forget, noise, d.data_spec.n_bits),
                                                    d.data_spec) for noise in draws])
        return self.check_draws.mean(0)

    def keep_final_forget_nll(self) -> None:
        """At a stop: the stop's check draws [K, F] as the final forget NLL [F] (float64, CPU), averaged the way
        the evaluation's keyed draws are (float64, draw by draw), so the report needs no second pass."""
        if self.check_draws is None:
            return
        total = self.check_draws[0].double().cpu()
        for draw in self.check_draws[1:]:
            total = total + draw.double().cpu()
        self.final_forget_nll = total / self.check_draws.shape[0]

    def whole_set_agrees(self, model: MultiScaleFlow, forget_nll: Tensor, refresh_nll: Tensor | None = None) -> bool:
        """With ``data.whole_remember_nll``: every forget image (NLL [F] on the check draws) also meets the
        criterion against the whole remember set's normal, the one the report judges by; a refusal is counted
        and training goes on with mu_R, sigma_R and the subset correction re-measured on the whole set. The
        subset estimate is off by a few hundredths of sigma_R, enough to stop with an image the report then
        counts as not forgotten (docs/method.md "Stopping"). ``refresh_nll``: the refresh subset's NLLs [S]
        under these weights (the confirmation's refresh), reused for its rows when ``data.refresh_rows`` says
        which they are."""
        if self.data.whole_remember_nll is None:
            return True
        if refresh_nll is not None and self.data.refresh_rows is not None:
            nll = self.data.whole_remember_nll(model, known=(self.data.refresh_rows, refresh_nll))
        else:
            nll = self.data.whole_remember_nll(model)
        mean, std = nll.mean().to(forget_nll), nll.std().to(forget_nll)
        d = threshold_distance(forget_nll, mean, std, self.delta)
        reached = bool(self.reached(d).all())
        whole = NormalFit(float(nll.mean()), float(nll.std()))
        held = self.remember_hold.refusals if self.remember_hold is not None else 0
        # every hold judges (a list, not all()'s short circuit): a look-alike refusal must not hide the remember
        # set's, whose refusal adds the tail rows
        if reached and all([hold.kept(hold.of_whole_set(nll), whole) for hold in self.quantile_holds]):
            self.final_remember_nll = nll
            return True
        if self.remember_hold is not None and self.remember_hold.refusals > held:
            self.widen_anchor_pool(nll)
        if not reached:  # (else refused by a quantile hold, judged on the whole set's normal as evaluate does)
            self.whole_set_refusals += 1
            self.confirmed_d = d
            self.latest_d.copy_(d)
        # the subset's correction drifted with the weights: re-measure it, so that training and the next
        # confirmations aim at the band the whole set defines
        self.normal.remeasure(mean, std)
        return False

    @property
    def anchor_pool(self) -> Tensor | None:
        """The remember rows [P] (long, on the data's device) the anchor holds besides the random ones: the
        look-alikes, then the :attr:`tail_rows` (None when there are neither). One tensor, built when the method
        is, then again only when the tail rows change (:meth:`widen_anchor_pool`, :meth:`load_state`), so a
        batch indexes it where its draws are, with no per-step copy or concatenation."""
        return self._anchor_pool

    def _build_anchor_pool(self) -> None:
        """(Re)build :attr:`anchor_pool` from ``data.lookalikes`` and :attr:`tail_rows` (both on the CPU)."""
        parts = [rows for rows in (self.data.lookalikes, self.tail_rows) if rows is not None]
        self._anchor_pool = torch.cat(parts).to(self.data.device) if parts else None

    def widen_anchor_pool(self, nll: Tensor) -> None:
        """Add the :data:`TAIL_ROWS` remember images whose NLL (``nll`` [R], nats, the whole-set pass) rose most
        over the base model's, beyond the common shift (the median rise), to :attr:`tail_rows` (kept on the CPU,
        as the resume state saves them), and rebuild :attr:`anchor_pool`."""
        base = self.data.base_remember_nll
        assert base is not None
        rise = nll.double() - base
        rise = rise - rise.median()
        for rows in (self.data.lookalikes, self.tail_rows):  # none twice
            if rows is not None and rows.numel() > 0:
                rise[rows.cpu()] = -float("inf")
        tail = rise.topk(min(TAIL_ROWS, int(rise.isfinite().sum()))).indices  # (at a refused stop: one sync)
        self.tail_rows = tail if self.tail_rows is None else torch.cat([self.tail_rows, tail])
        self._build_anchor_pool()

    def check_progress(self, iteration: int, logged: dict[str, float]) -> None:
        """At :data:`PROGRESS_CHECK` iterations, project the forget images' average pace (smoothed mean d per
        iteration since the first) onto the farthest image's gap; when that needs more than ``max_iters``,
        warn (once, also in the report) with what to change, instead of spending the whole budget silently."""
        if "mean_d" not in logged:
            return
        if self.progress_start is None:
            self.progress_start = logged["mean_d"]
            return
        budget = self.config.max_iters
        gap = self.lower_edge - logged["min_d"]
        if iteration != PROGRESS_CHECK or budget is None or gap <= 0:
            return
        pace = (logged["mean_d"] - self.progress_start) / iteration
        needed = iteration + gap / pace if pace > 0 else math.inf
        if needed <= budget:
            return
        self.progress_warning = (
            f"after {iteration} iterations the forget images gain {pace:.3f} sigma_R per iteration and the "
            f"farthest is {gap:.2f} sigma_R short: about {needed:.0f} iterations at this pace, over the budget "
            f"of {budget}; the remember term holds them back: try a larger --alpha (now {self.alpha:g}) or "
            f"--max-iters {int(min(needed, 1e6)) + 50}")
        warnings.warn(self.progress_warning, stacklevel=2)

    def after_step(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        if self.progress_warning is None:
            self.check_progress(iteration, logged)
        if logged["min_d"] > self.lower_edge - self.epsilon and logged["max_d"] < self.upper_edge + self.epsilon:
            # settling: Adam's steps do not shrink with the gradient, so near the threshold the images would
            # jitter across the band; decay the learning rate while every one is within epsilon of it
            self.lr_factor = max(MIN_SETTLE_FACTOR, self.lr_factor * self.settle_decay)
        else:
            # an image is (back) more than epsilon outside the band: recover the learning rate at the same pace
            self.lr_factor = min(1.0, self.lr_factor / self.settle_decay)
        return self.screen_and_confirm(model, iteration, logged)

    @property
    def lower_edge(self) -> float:
        """The stopping band's lower edge in sigma_R: -epsilon, raised by ``stop_margin``."""
        return self.stop_margin - self.epsilon

    @property
    def upper_edge(self) -> float:
        """The stopping band's upper edge in sigma_R: ``upper_edge`` epsilons (1: Eq. 10's epsilon)."""
        return self.upper_factor * self.epsilon

    def screen_passes(self, logged: dict[str, float]) -> bool:
        """The cheap screen on the training forwards' smoothed d: every forget image inside the stopping band."""
        return logged["max_d"] < self.upper_edge and logged["min_d"] > self.lower_edge

    def reached(self, d: Tensor) -> Tensor:
        """Which forget images [F] meet the stopping criterion at distances ``d`` (sigma_R): past the lower edge,
        -epsilon raised by ``stop_margin`` (so that an image stopped near it still counts as forgotten, d >
        -epsilon, on the evaluation's independent noise and whole-set statistics), and under the upper edge
        (:attr:`upper_edge`; Eq. 10's |d| < epsilon when ``upper_edge`` is 1)."""
        return (d > self.lower_edge) & (d < self.upper_edge)

    def screen_and_confirm(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        """Confirm a passing screen on the fixed check draws against fresh statistics (at most every
        ``confirm_gap`` iterations); otherwise refresh mu_R, sigma_R on schedule. True when converged."""
        if self.screen_passes(logged) and iteration - self.last_confirm >= self.confirm_gap:
            self.last_confirm = iteration
            self.confirmations += 1
            self.refresh(model)
            forget_nll = self.check_nll(model)
            self.confirmed_d = threshold_distance(forget_nll, self.mu_r, self.sigma_r, self.delta)
            self.latest_d.copy_(self.confirmed_d)
            self.grow_stragglers(self.confirmed_d)
            held = sum(hold.refusals for hold in self.quantile_holds)
            done = (bool(self.reached(self.confirmed_d).all()) and self.remember_kept()
                    and self.lookalikes_kept(model) and self.whole_set_agrees(model, forget_nll, self.refresh_nll))
            if sum(hold.refusals for hold in self.quantile_holds) > held:
                self.anchor_factor = min(MAX_ANCHOR_FACTOR, self.anchor_factor * ANCHOR_GROWTH)
            if done:
                self.keep_final_forget_nll()
            return done
        if (iteration + 1) % self.refresh_every == 0:
            self.refresh(model)
        elif self.kl_estimate == "refreshed" and self.stale():
            self.normal.early_refreshes += 1
            self.refresh(model)
        return False

    def grow_stragglers(self, d: Tensor) -> None:
        """After a confirmation (d [F] on the check draws): with the anchor on, each image found short of the
        band has its forget weight multiplied by :data:`STRAGGLER_GROWTH`, at most :data:`MAX_FORGET_WEIGHT`.
        The screen passed, so the others are close: a straggler that stays short is held by its balance with
        the anchor on its look-alikes, which a larger step only reaches sooner; a stronger pull moves it. The
        weight is kept once the image is in the band (dropping it would bring the balance back)."""
        if self.anchor_weight <= 0:
            return
        short = d < self.lower_edge
        self.forget_weight[short] = (self.forget_weight[short] * STRAGGLER_GROWTH).clamp(max=MAX_FORGET_WEIGHT)

    def stale(self) -> bool:
        """Whether the remember batches' exponential average left the refreshed mu_R, sigma_R by more than
        :data:`STALE_SIGMA` sigma_R: the model moved since the refresh, and the KL's pull is out of date."""
        return self.normal.stale()

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {**self.normal.state_tensors(), "latest_d": self.latest_d, "forget_weight": self.forget_weight}
        if self.tail_rows is not None:
            tensors["tail_rows"] = self.tail_rows
        return tensors

    def state_meta(self) -> dict[str, Any]:
        hold = {key: value for guard in self.quantile_holds for key, value in guard.state_meta().items()}
        return {"last_confirm": self.last_confirm, **self.normal.state_meta(), **hold,
                "confirmations": self.confirmations, "lr_factor": self.lr_factor, "shift_factor": self.shift_factor,
                "anchor_factor": self.anchor_factor,
                "drift_refusals": self.drift_refusals, "whole_set_refusals": self.whole_set_refusals,
                "progress_start": self.progress_start, "progress_warning": self.progress_warning}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.normal.load_state(tensors, meta)
        self.latest_d = tensors["latest_d"].clone()
        if "forget_weight" in tensors:
            self.forget_weight = tensors["forget_weight"].clone()
        if "tail_rows" in tensors:
            self.tail_rows = tensors["tail_rows"].cpu().clone()  # (the engine hands state to the device)
        self._build_anchor_pool()
        self.last_confirm = meta["last_confirm"]
        self.confirmations = meta["confirmations"]
        self.lr_factor = meta["lr_factor"]
        self.shift_factor = meta.get("shift_factor", 0.0)
        self.anchor_factor = meta.get("anchor_factor", 1.0)
        self.drift_refusals = meta.get("drift_refusals", 0)
        self.whole_set_refusals = meta.get("whole_set_refusals", 0)
        self.progress_start = meta.get("progress_start")
        self.progress_warning = meta.get("progress_warning")
        for hold in self.quantile_holds:
            hold.load_state(meta)


def _gradient_surrogate(model: nn.Module, gradient: dict[str, Tensor] | None) -> Tensor:
    """A zero scalar whose gradient with respect to each parameter of ``model`` named in ``gradient`` (name ->
    [param shape]) is that entry: sum_p p . g - (the same, detached)."""
    assert gradient is not None
    params = dict(model.named_parameters())
    value = torch.stack([(params[name] * g).sum() for name, g in gradient.items()]).sum()
    return value - value.detach()


#: Method name -> class; baselines register here (``flowtame.methods.baselines``). Every class takes the
#: TamingMethod constructor arguments plus ``config`` (the TameConfig) and ``base_model`` (frozen, eval).
#: A method's own settings are ``config.method_settings[settings_section(name)]`` (:attr:`settings_class`).
METHODS: dict[str, type[TamingMethod]] = {"taming": TamingMethod}


def settings_section(method: str) -> str:
    """The config section of a method's own settings: its name with dashes as underscores."""
    return method.replace("-", "_")
