"""Taming by a solved step (``step: solve``; docs/method.md "The solved step").

Adam's step pushes a sum of loss terms and waits for the forget pull and the anchor's pull back to balance; most
of a run's iterations went to that balance (docs/benchmarks.md "Round 8a"). The solved step asks for the changes
it wants instead. Each iteration linearizes the NLL of a few rows around the current weights:

- each forget image (gradient averaged over :data:`FORGET_DRAWS` fresh noise draws), asked to move to
  :data:`FORGET_AIM` epsilons from the threshold, inside the stopping band (at most :data:`TARGET_CAP` sigma_R per
  step);
- each row the anchor holds (the look-alikes, then the tail rows a refused stop added; gradient averaged over
  :data:`HOLD_DRAWS` draws), asked back to its base NLL on the evaluation's noise;
- the remember set's mean NLL (the remember set's gradient under the base model - on the whole remember set, or
  on :data:`BASE_GRADIENT_ROWS` of its images that include the drift guard's refresh subset, drawn once - plus the
  displacement since: one batch of those images, of :data:`MEAN_ROWS`, now minus under the base model - the
  batches in turn, each one's base gradient kept from the first step - averaged over the steps with weight
  :data:`MEAN_CHANGE_AVERAGING` for the past), asked back to the base mean;

and takes the shortest step under the remember curvature metric M (:func:`~flowtame.methods.curvature.constrained_step`)
that makes those first-order changes, shrunk so that its predicted remember RMS change stays within
:data:`STEP_RMS` sigma_R. After every step the stop is judged on the check draws and the refresh subset, then on
the whole remember set, as Adam's step's confirmations are, and the whole set's normality
(:data:`NORMALITY_HOLD_P`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flowtame.engine.devices import free_memory, take_rows, uniform_noise
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import batched_nll, dequantized
from flowtame.likelihood.statistics import NormalFit, ks_normality
from flowtame.likelihood.threshold import threshold_distance
from flowtame.methods.baselines import mean_nll_gradient, per_sample_gradients
from flowtame.methods.curvature import constrained_step
from flowtame.methods.lookalikes import MAX_HOLD_REFUSALS
from flowtame.methods.taming import TAIL_ROWS, TamingData, TamingMethod

__all__ = ["BASE_GRADIENT_ROWS", "FORGET_AIM", "FORGET_DRAWS", "HOLD_DRAWS", "HOLD_FEEDFORWARD",
           "HOLD_FEEDFORWARD_FROM", "MEAN_CHANGE_AVERAGING", "MEAN_ROWS", "NORMALITY_HOLD_P",
           "SOLVED_MAX_REMEMBER_DRIFT", "SOLVE_METRIC_DAMPING", "SOLVE_METRIC_IMAGES", "STEP_RMS", "TARGET_CAP",
           "SolvedTaming", "memory_needed", "memory_shortfall", "normality_bound"]

#: Fresh noise draws whose per-image gradients are averaged for each forget row. A single draw's gradient is
#: mostly that draw's: a step solved on one draw moved the image's NLL on other draws by a third of what it
#: asked, on two draws by a half, on eight by 0.83 (embedded Glow, docs/benchmarks.md "Round 9").
FORGET_DRAWS = 8
#: Fresh noise draws averaged for each row the anchor holds (the look-alikes, the tail rows). On one draw a held
#: row's hold transferred weakly to the evaluation's noise and the look-alike hold ran out of refusals: the
#: rosinality Glow k = 15 stopped with QD(D_R^NN) 0.038; on four, 0.0197 (Round 9).
HOLD_DRAWS = 4
#: Share of a held row's unexplained rise at the last step - its NLL's change on the evaluation's noise beyond
#: the change the step asked of it (nats, rises only, at most TARGET_CAP sigma_R: mostly the step's second-order
#: effect, which the first-order solve does not see) - taken off its next target, so that the next step also
#: asks for the rise it will see again. The look-alikes move with the forget images: on the rosinality Glow
#: k = 8 the first steps asked them for 0 and -11 nats (mean) and they rose +5.3 and fell only -1.9; without
#: this two stops were refused by the look-alike hold (QD 0.0375, then 0.0265). The rise also holds the part of
#: an ask a row does not realize (a row asked -a realizing -rho a), which a share s feeds back as
#: s (1 - rho) a: the whole rise (s = 1) ran away on a tiny Glow whose held rows grew to 84 at five refusals
#: (40 iterations, no stop); a half keeps the loop's gain under 1 for any rho >= 0. The held rows' extra pull
#: competes with the mean row's: only while the look-alikes' quantile drop (on the same noise, after the last
#: step) is above HOLD_FEEDFORWARD_FROM of the look-alike hold's bound (docs/benchmarks.md "Round 16": on the
#: RealNVP k = 15, whose look-alikes stay far inside it, always on took 11 iterations instead of 9).
HOLD_FEEDFORWARD = 0.5
#: The look-alikes' quantile drop, as a share of the look-alike hold's bound, above which HOLD_FEEDFORWARD acts.
HOLD_FEEDFORWARD_FROM = 0.5
#: Remember images of the mean row's displacement term per step: the base gradient's images are cut into
#: batches of about this size, taken in turn (one batch fixed for the run is learnt, its mean falls while the rest's
#: stays: the embedded Glow k = 15 stalled at a drift of +0.23%, docs/benchmarks.md "Round 9"; a fresh batch
#: each step needs its gradient under the base model too, twice the cost).
MEAN_ROWS = 256
#: Weight of the previous steps' average in the mean row's displacement term (an exponential average over
#: steps, each on the next batch: the term changes little from step to step, while one batch's estimate is
#: noisy; at 0.5 the embedded Glow k = 15 stopped after 12 steps, not 21, k = 4 after 8, not 9: Round 9).
MEAN_CHANGE_AVERAGING = 0.5
#: Remember images (at most; drawn once, the drift guard's refresh subset among them) of the base model's mean-NLL
#: gradient, the mean row's control variate, and of its displacement batches (memory, on the model's device: that
#: gradient and one per batch, up to BASE_GRADIENT_ROWS / MEAN_ROWS of them, and the images dequantized, float32:
#: 0.8 GB at 4,096 images of 128x128x3). The mean row brings back the
#: images it is computed on, and little else: on 1,024 of the embedded Glow's 1,345 remember images the k = 15
#: run took 10 steps and ended at held-out BPD +0.58%, on all of them 8 steps and +0.53%; on 512 its drift guard's
#: mean bottomed at +0.55% and the run never stopped (docs/benchmarks.md "Round 11").
BASE_GRADIENT_ROWS = 4096
#: Largest change a forget row asks for in one step, in sigma_R (nearer the band: the whole gap).
TARGET_CAP = 2.0
#: Where a forget row is asked to go: d = FORGET_AIM * epsilon (kept in the inner half of the stopping band). The
#: solved step lands within a few hundredths of sigma_R of what it asks (on its check draws), so it needs no
#: overshoot past the threshold; every sigma_R of forgetting costs remember-set collateral, so it aims a quarter
#: epsilon short of the threshold, inside Eq. 10's band |d| < epsilon, three quarters of epsilon above the band's
#: lower edge. On the embedded Glow k = 15, held-out BPD +0.53% aiming at the band's middle (+epsilon / 2), +0.49%
#: at the threshold, +0.475% here (docs/benchmarks.md "Round 11").
FORGET_AIM = -0.25
#: Largest predicted RMS change of the remember images' NLL in one step, in sigma_R (sqrt(v^T F v) <= it).
STEP_RMS = 1.0
#: The solved step's default bound on the remember mean's relative rise at a stop (Adam's step: 0.3%).
SOLVED_MAX_REMEMBER_DRIFT = 0.001
#: The stop's bound on the whole remember set's KS normality p-value (its NLL under the stepped weights, on the
#: evaluation's noise, as ``evaluate --check``'s ``remember.normality_p`` reads it, whose default bound is 0.001):
#: a stop below it (or below the base model's own p, when that is lower) is refused, at most MAX_HOLD_REFUSALS
#: times, and the remember images that rose most join the held rows, as at a stop the remember set's quantile
#: hold refuses. The solved steps move single remember images' NLL far more than the metric predicts (the
#: rosinality Glow k = 8, over a run: the mean still, each image by 6 nats RMS, 0.36 sigma_R) and the shape
#: follows: that base model's own p is 0.0077, its tamed p 0.0005-0.0013 in four of five variants without the
#: hold (docs/benchmarks.md "Round 11").
NORMALITY_HOLD_P = 0.002
#: The metric's relative damping for the solved step (Adam's curvature step uses DAMPING = 0.1: its update is
#: Adam's direction, reshaped; the solve needs the metric's own directions). A sharper metric places the
#: forgetting where the remember set is flatter: the embedded Glow k = 15's first step raised the remember mean by
#: 2.1% at 1e-3, 1.3% at 1e-4, 0.9% at 1e-5. Across the zoo (docs/benchmarks.md "Round 13") 3e-4 took no more
#: iterations than 1e-3 on any cell and fewer on five (82 against 88 on the 16 small-model cells), with lower
#: worst cases (held-out BPD +0.46% against +0.49%, QD(D_R^NN) 0.0163 against 0.0176); 1e-4 took one more on the
#: RealNVP k = 15, 1e-5 ten more there, 1e-2 three more on the embedded Glow k = 15.
SOLVE_METRIC_DAMPING = 3e-4
#: Remember images of the solved step's metric (Adam's curvature step: METRIC_IMAGES = 512). The solve's
#: trajectory depends little on it: on the embedded Glow k = 15 the same iterations and held-out BPD to 0.01% on
#: 256, 512 and 1,024 images (docs/benchmarks.md "Round 10"); on 64, across the zoo's hardest cells, the same
#: or fewer iterations and every bound kept (embedded k = 15: 8 iterations, held-out +0.49% against +0.475% on
#: 256; rosinality Glow k = 8: 7 against 9; the whole zoo: docs/benchmarks.md "Round 12") for a quarter of the
#: pass (on the RealNVP, one thread: 2.8 s for the K-FAC pass on 256 images against 0.7 s on 64).
SOLVE_METRIC_IMAGES = 64


def memory_needed(rows: int, values: int, images: int, image_values: int) -> int:
    """Bytes the solved step holds at its peak (float32 model), an upper bound: the ``rows`` rows' gradients over
    ``values`` trained values while they are concatenated (twice, 4 bytes each) and, one Kronecker block at a
    time, preconditioned (at most 8 bytes more: the largest block's share of the values), the base
    gradient, one per mean-row batch and the step's few vectors (4 bytes each), and the mean row's ``images``
    dequantized images of ``image_values`` values each."""
    batches = math.ceil(images / MEAN_ROWS)
    return rows * values * 16 + (batches + 5) * values * 4 + images * image_values * 4


def memory_shortfall(data: TamingData, values: int, device: torch.device) -> str | None:
    """Why a solved-step run's rows' gradients would not fit in the memory free on ``device`` (:func:`memory_needed`
    of the forget images, the look-alikes, the remember mean and one refused stop's tail rows over ``values``
    trained values, and of the mean row's images), or None when they fit or the free memory is unknown."""
    free = free_memory(device)
    lookalikes = 0 if data.lookalikes is None else int(data.lookalikes.numel())
    forget = int(data.forget.shape[0])
    rows = forget + lookalikes + 1 + TAIL_ROWS
    images = min(int(data.remember.shape[0]), BASE_GRADIENT_ROWS)  # (as many as :meth:`SolvedTaming._mean_rows`)
    need = memory_needed(rows, values, images, int(data.forget[0].numel()))
    if free is None or need <= free:
        return None
    return (f"step solve needs about {need / 2**30:.1f} GiB on {device} for the gradients of its {rows} rows "
            f"({forget} forget images, {lookalikes} look-alikes, the remember mean and {TAIL_ROWS} held rows) over "
            f"{values:,} trained values, and {free / 2**30:.1f} GiB are free")


def normality_bound(base_nll: Tensor | None) -> float | None:
    """The normality hold's bound on the tamed remember set's KS p: :data:`NORMALITY_HOLD_P`, or the base model's
    own p on its remember NLLs ``base_nll`` [R] (nats) when that is lower; None without them."""
    if base_nll is None:
        return None
    return min(NORMALITY_HOLD_P, ks_normality(base_nll.numpy())["pvalue"])


class SolvedTaming(TamingMethod):
    """The taming method with the solved step (module docstring): the same data, stopping band, guards, holds and
    report figures as :class:`~flowtame.methods.taming.TamingMethod`, its loss terms unused. The engine calls
    :meth:`own_step` instead of a forward/backward and Adam's step; :attr:`metric` (the remember curvature
    metric, damping :data:`SOLVE_METRIC_DAMPING` on :data:`SOLVE_METRIC_IMAGES` images) is set by the tame job."""

    takes_own_step = True
    confirm_gap = 1
    #: The stop's bound on the remember mean's relative rise (``max_remember_drift`` unless the config says
    #: otherwise): the mean row aims at no rise, but each step adds a second-order rise it only corrects at the
    #: next, and at taming's 0.3% the embedded Glow k = 15 stopped at +0.22% with held-out BPD +0.61%.
    default_max_remember_drift = SOLVED_MAX_REMEMBER_DRIFT
    metric_damping = SOLVE_METRIC_DAMPING
    metric_images = SOLVE_METRIC_IMAGES
    #: the anchor's rows on the evaluation's noise [P,C,S,S] and their NLL now [P] (nats), per measurement; set
    #: by :meth:`_build_anchor_pool`, which the base class's constructor calls
    pool_check: Tensor | None
    pool_nll: Tensor | None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.base_model is None:
            raise ValueError("the solved step needs the frozen base model")
        if self.anchor_pool is not None and self.data.evaluation_inputs is None:
            raise ValueError("the solved step holds the anchor's rows on the evaluation's noise: TamingData needs "
                             "evaluation_inputs")
        #: the remember set's mean-NLL gradient under the base model (name -> shape; on at most
        #: :data:`BASE_GRADIENT_ROWS` images), from the first step, with its batches of :data:`MEAN_ROWS` images
        #: [B,C,S,S] (dequantized) and each batch's gradient: the mean row's batches, taken in turn
        self.base_gradient: dict[str, Tensor] | None = None
        self.base_batches: list[Tensor] = []
        self.base_batch_gradients: list[dict[str, Tensor]] = []
        #: mean rows made so far (the next one uses batch ``mean_steps % len(base_batches)``)
        self.mean_steps = 0
        #: The forget images' NLL [F] (nats, check draws) of the latest measurement (None: none yet)
        self.forget_nll_now: Tensor | None = None
        #: The step's trust: :data:`STEP_RMS` and :data:`TARGET_CAP` are scaled by it; quartered at each roll-back
        self.trust = 1.0
        #: The mean row's displacement term (name -> shape, nats): the average over steps of a batch's mean-NLL
        #: gradient now minus under the base model (None: none yet, or the weights were rolled back)
        self.mean_change: dict[str, Tensor] | None = None
        #: stops refused for the remember set's normality (:meth:`whole_set_agrees`)
        self.normality_refusals = 0
        #: the bound of that hold: :data:`NORMALITY_HOLD_P`, or the base model's own KS p when lower (a remember
        #: set that already looked less normal is held to its own shape); None without the base pass
        self.normality_bound = normality_bound(self.data.base_remember_nll)
        #: the held rows' unexplained rise at the last step (nats, float64 [P'] >= 0, the rows of the anchor pool
        #: then; rows added since have none): :data:`HOLD_FEEDFORWARD`; None before the first step or after a
        #: roll-back
        self.pool_leak: Tensor | None = None
        self._flat: set[str] | None = None

    @property
    def transforms_update(self) -> bool:
        return False

    @property
    def flat_names(self) -> set[str]:
        """Trained values outside the metric's Kronecker blocks whose every base Fisher entry is below the damping
        (relative): the base model does not feel them (a prior convolving zeros, say), so the metric prices them
        at the damping alone and the solve would move them freely, while the first step can make them matter
        (measured on an untrained tiny Glow: remember BPD 5.3 -> 1226 at the second step). They are not stepped.
        None on the trained zoo models (embedded Glow, RealNVP)."""
        if self._flat is None:
            self._flat = {n for n, inverse in self.metric.diagonal.items()
                          if float(inverse.min()) > 0.5 / self.metric.damping}
        return self._flat

    def _build_anchor_pool(self) -> None:
        super()._build_anchor_pool()
        self._build_pool_check()

    def _build_pool_check(self) -> None:
        pool, inputs = self.anchor_pool, self.data.evaluation_inputs
        self.pool_check = None if pool is None or inputs is None else inputs(pool.cpu())
        self.pool_nll = None

    # ------------------------------------------------------------------ measurement and the stop
    @torch.no_grad()
    def measure(self, model: MultiScaleFlow) -> Tensor:
        """mu_R, sigma_R on the refresh subset, each forget image's d on the check draws (:attr:`confirmed_d`)
        and the anchor rows' NLL on the evaluation's noise; returns the forget NLL [F] (nats)."""
        self.refresh(model)
        forget_nll = self.check_nll(model)
        self.confirmed_d = threshold_distance(forget_nll, self.mu_r, self.sigma_r, self.delta)
        self.latest_d.copy_(self.confirmed_d)
        self._measure_pool(model)
        return forget_nll

    def _base_measurement(self) -> Tensor | None:
        """:meth:`measure` of the base weights (before the first step), from the tame job's base passes on the
        same keyed noise instead of a pass of its own: the refresh subset's, the forget images' and the anchor
        rows' NLL under the base model. None when the data do not carry them (the measurement is then taken)."""
        d = self.data
        if d.base_forget_nll is None or d.base_remember_nll is None or d.refresh_rows is None:
            return None
        self.refresh_nll = d.base_remember_nll[d.refresh_rows.cpu()].to(d.device, d.refresh.dtype)
        self.normal.update(self.refresh_nll)
        forget_nll = d.base_forget_nll.to(d.device, d.refresh.dtype)
        self.confirmed_d = threshold_distance(forget_nll, self.mu_r, self.sigma_r, self.delta)
        self.latest_d.copy_(self.confirmed_d)
        if self.pool_check is not None and self.anchor_pool is not None:
            self.pool_nll = d.base_remember_nll[self.anchor_pool.cpu()].to(d.device)
        return forget_nll

    def _measure_pool(self, model: MultiScaleFlow) -> None:
        """:attr:`pool_nll`: the anchor rows' NLL [P] (nats, float64) on the evaluation's noise, if it has rows."""
        if self.pool_check is not None:
            self.pool_nll = batched_nll(model, self.pool_check, self.data.data_spec).double()

    def after_step(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        """On the stepped weights' measurement (:meth:`own_step`'s): when every forget image is in the band, the
        guards and holds judge the stop (the drift guard, the look-alikes, then the whole remember set), as a
        confirmation does."""
        forget_nll = self.forget_nll_now
        assert self.confirmed_d is not None and forget_nll is not None
        if not bool(self.reached(self.confirmed_d).all()):
            return False
        self.confirmations += 1
        self.last_confirm = iteration
        done = self.remember_kept() and self.lookalikes_kept(model) \
            and self.whole_set_agrees(model, forget_nll, self.refresh_nll)
        if done:
            self.keep_final_forget_nll()
        elif self.pool_nll is None:  # a hold (the remember set's quantile or normality hold) added tail rows
            self._measure_pool(model)
        return done

    def whole_set_agrees(self, model: MultiScaleFlow, forget_nll: Tensor, refresh_nll: Tensor | None = None) -> bool:
        """The base class's whole-set judgement, then the remember set's normality: a stop whose whole remember
        set's KS p (:func:`~flowtame.likelihood.statistics.ks_normality`, as ``evaluate`` computes it) is below
        :attr:`normality_bound` is refused (at most ``MAX_HOLD_REFUSALS`` times), the remember images that rose
        most join the held rows (:meth:`widen_anchor_pool`) and the remember normal is the whole set's from then
        on, as at the remember set's quantile hold's refusal."""
        if not super().whole_set_agrees(model, forget_nll, refresh_nll):
            return False
        nll = self.final_remember_nll
        if nll is None or self.normality_bound is None:  # (no whole-set pass: nothing to judge)
            return True
        if ks_normality(nll.numpy())["pvalue"] >= self.normality_bound \
                or self.normality_refusals >= MAX_HOLD_REFUSALS:
            return True
        self.normality_refusals += 1
        self.final_remember_nll = None
        self.widen_anchor_pool(nll)
        self.normal.remeasure(nll.mean().to(forget_nll), nll.std().to(forget_nll))
        return False

    # ------------------------------------------------------------------ the step
    def own_step(self, model: MultiScaleFlow, iteration: int) -> dict[str, Tensor]:
        """Solve for this iteration's step, apply it to ``model``'s trained values and measure the result;
        returns the figures to log (``loss``: the rows' summed squared targets in sigma_R^2 before the step;
        ``grad_norm``: the applied step's norm; the d's and the remember BPD after it, so that the engine's
        blow-up guard judges the step it took)."""
        at_base = iteration == 0  # no step accepted yet (a roll-back restores the base weights): the base model's
        if self.forget_nll_now is None:
            measured = self._base_measurement() if at_base else None
            self.forget_nll_now = measured if measured is not None else self.measure(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad and n not in self.flat_names]
        was_training = model.training
        model.eval()
        try:
            if self.base_gradient is None:
                self._base_gradients(names)
            targets = self._targets()
            solved = constrained_step(self.metric, self._jacobian(model, names, at_base), targets)
        finally:
            model.train(was_training)
        forget_rows = self.forget_nll_now.numel()  # (the targets: forget rows, held rows, the mean row)
        pool_before = None if self.pool_nll is None else self.pool_nll.clone()
        sigma = self.sigma_r.double()
        energy = (solved.weights @ solved.gram @ solved.weights).clamp_min(0)
        rms = (self.metric.scale * energy).sqrt()  # >= sqrt(v^T F v): the remember images' RMS NLL change
        shrink = torch.clamp(self.trust * STEP_RMS * sigma / rms.clamp_min(1e-30), max=1.0)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, change in solved.step.items():
                params[n].add_((shrink * change).to(params[n].dtype))
        step_norm = shrink * torch.cat([c.reshape(-1) for c in solved.step.values()]).norm()
        self.forget_nll_now = self.measure(model)
        self.pool_leak = None
        if pool_before is not None and self.pool_nll is not None and self._lookalikes_strained():
            asked = targets[forget_rows:forget_rows + pool_before.numel()] * shrink
            rise = self.pool_nll.double() - pool_before.double() - asked
            self.pool_leak = torch.minimum(rise.clamp_min(0), self.trust * TARGET_CAP * sigma.to(rise))
        now = self.latest_d
        return {"loss": (targets / sigma).square().sum(), "grad_norm": step_norm, "step_rms": shrink * rms / sigma,
                "shrink": shrink, "remember_bpd": self.mu_r / self.nats_per_bpd, "max_abs_d": now.abs().max(),
                "min_d": now.min(), "max_d": now.max(), "mean_d": now.mean(), "mu_r": self.mu_r,
                "sigma_r": self.sigma_r}

    def _lookalikes_strained(self) -> bool:
        """Whether the look-alikes' quantile drop on the evaluation's noise (the held pool's first rows, as just
        measured, against the refreshed mu_R, sigma_R) is above :data:`HOLD_FEEDFORWARD_FROM` of the look-alike
        hold's bound (False without the hold)."""
        hold = self.lookalike_hold
        if hold is None or self.pool_nll is None or hold.rows is None:
            return False
        nll = self.pool_nll[:hold.rows.numel()].cpu().numpy()  # (a sync per step: the stop's checks make one too)
        return hold.drop(nll, NormalFit(float(self.mu_r), float(self.sigma_r))) > HOLD_FEEDFORWARD_FROM * hold.bound

    def _base_gradients(self, names: list[str]) -> None:
        """The mean row's fixed batches and their gradients under the base model: :attr:`base_batches` (the
        remember images of :meth:`_mean_rows`, dequantized, in batches of :data:`MEAN_ROWS`; noise drawn from the
        run's seed (+1) alone, so a resumed run rebuilds them), :attr:`base_batch_gradients` and their mean,
        :attr:`base_gradient`."""
        d = self.data
        generator = torch.Generator(device=d.device).manual_seed(int(self.config.seed) + 1)
        pixels = take_rows(d.remember, self._mean_rows(), d.device)
        x = dequantized(pixels, uniform_noise(generator, pixels.shape, d.device), d.data_spec.n_bits)
        assert self.base_model is not None
        self.base_batches = list(x.tensor_split(math.ceil(x.shape[0] / MEAN_ROWS)))  # equal sizes (+-1)
        self.base_batch_gradients = [mean_nll_gradient(self.base_model, batch, d.data_spec, names)
                                     for batch in self.base_batches]
        total = {n: torch.zeros_like(g) for n, g in self.base_batch_gradients[0].items()}
        for gradient, batch in zip(self.base_batch_gradients, self.base_batches, strict=True):
            for n in total:
                total[n] += gradient[n] * (batch.shape[0] / x.shape[0])
        self.base_gradient = total

    @property
    def forget_aim(self) -> float:
        """The forget rows' target d (sigma_R): :data:`FORGET_AIM` epsilons, moved into the stopping band's inner
        half when a band set by hand (``stop_margin``, ``upper_edge``) leaves it nearer an edge."""
        quarter = (self.upper_edge - self.lower_edge) / 4
        return min(max(FORGET_AIM * self.epsilon, self.lower_edge + quarter), self.upper_edge - quarter)

    def _mean_rows(self) -> Tensor:
        """The remember rows (long [B], in a random order from the run's seed) of the mean row: all of them,
        or :data:`BASE_GRADIENT_ROWS` of them - the drift guard's refresh subset first, so that the guard measures
        images the mean row brings back, then rows drawn at random."""
        seed = int(self.config.seed)
        order = torch.randperm(self.data.remember.shape[0], generator=torch.Generator().manual_seed(seed + 1))
        if order.numel() <= BASE_GRADIENT_ROWS or self.data.refresh_rows is None:
            return order[:BASE_GRADIENT_ROWS]
        refresh = torch.zeros(order.numel(), dtype=torch.bool)
        refresh[self.data.refresh_rows.cpu()] = True
        chosen = torch.cat([order[refresh[order]], order[~refresh[order]]])[:BASE_GRADIENT_ROWS]
        return chosen[torch.randperm(chosen.numel(), generator=torch.Generator().manual_seed(seed + 2))]

    def _targets(self) -> Tensor:
        """The rows' wanted NLL changes (nats, float64) [F + P + 1]: each forget image to :attr:`forget_aim` (at
        most :data:`TARGET_CAP` sigma_R), each anchor row back to its base NLL less :data:`HOLD_FEEDFORWARD` of
        its last unexplained rise (:attr:`pool_leak`), the remember mean back to N_B's."""
        assert self.confirmed_d is not None
        sigma = self.sigma_r.double()
        cap = self.trust * TARGET_CAP * sigma
        forget = ((self.forget_aim - self.confirmed_d.double()) * sigma).clamp(-cap, cap)
        parts = [forget]
        if self.pool_nll is not None:
            base = self.data.base_remember_nll
            assert base is not None and self.anchor_pool is not None
            held = base[self.anchor_pool.cpu()].to(forget) - self.pool_nll.to(forget)
            if self.pool_leak is not None:  # (rows a hold added since the last step: no rise seen yet)
                leak = self.pool_leak.to(forget)[:held.numel()]
                held = torch.cat([held[:leak.numel()] - HOLD_FEEDFORWARD * leak, held[leak.numel():]])
            parts.append(held)
        parts.append((self.data.base_mean.double() - self.mu_r.double()).reshape(1).to(forget))
        return torch.cat(parts)

    def _fresh(self, pixels: Tensor) -> Tensor:
        """``pixels`` (uint8, on the data's device) dequantized with fresh noise from the method's generator."""
        return dequantized(pixels, uniform_noise(self.generator, pixels.shape, pixels.device),
                           self.data.data_spec.n_bits)

    def _jacobian(self, model: MultiScaleFlow, names: list[str], at_base: bool = False) -> dict[str, Tensor]:
        """The rows' NLL gradients (name -> [F + P + 1, *shape], nats): each forget image's averaged over
        :data:`FORGET_DRAWS` fresh draws, each anchor row's over :data:`HOLD_DRAWS`, and the mean row: the
        gradient of the next of :attr:`base_batches`' mean NLL, minus the same batch's under the base model (its
        noise cancels; zero ``at_base``, when the weights are the base model's; averaged with the previous
        steps', :attr:`mean_change`), plus the remember set's under
        the base model (:attr:`base_gradient`)."""
        d, spec = self.data, self.data.data_spec
        forget = self._averaged_row_gradients(model, d.forget, FORGET_DRAWS, names)
        pool: list[dict[str, Tensor]] = []
        if self.pool_nll is not None and self.anchor_pool is not None and self.anchor_pool.numel() > 0:
            pool = [self._averaged_row_gradients(model, take_rows(d.remember, self.anchor_pool, d.device),
                                                 HOLD_DRAWS, names)]
        assert self.base_gradient is not None
        i = self.mean_steps % len(self.base_batches)  # the fixed batches in turn
        if at_base:  # the weights are the base model's: no displacement
            change = {n: torch.zeros_like(self.base_gradient[n]) for n in names}
        else:
            now = mean_nll_gradient(model, self.base_batches[i], spec, names)
            change = {n: now[n] - self.base_batch_gradients[i][n] for n in names}
        self.mean_steps += 1
        if self.mean_change is not None:
            w = MEAN_CHANGE_AVERAGING
            change = {n: w * self.mean_change[n] + (1 - w) * g for n, g in change.items()}
        self.mean_change = change
        out = {}
        for n in names:
            mean = change[n] + self.base_gradient[n]
            out[n] = torch.cat([forget[n], *[g[n] for g in pool], mean[None]])
        return out

    def _averaged_row_gradients(self, model: MultiScaleFlow, pixels: Tensor, draws: int, names: list[str]
                                ) -> dict[str, Tensor]:
        """Each image's NLL gradient (name -> [N, *shape], nats) averaged over ``draws`` fresh noise draws of
        ``pixels`` (uint8 [N,C,S,S]): :func:`per_sample_gradients` of each image's mean NLL over its draws."""
        n_rows = pixels.shape[0]
        groups = self._fresh(pixels.repeat(draws, 1, 1, 1)).unflatten(0, (draws, n_rows)).transpose(0, 1)
        out: dict[str, Tensor] = {}
        start = 0
        for chunk in per_sample_gradients(model, groups, self.data.data_spec, vectorized=True, chunk_size=None,
                                          names=names):
            for n, g in chunk.items():
                if n not in out:  # (filled chunk by chunk: N rows of memory, not twice that)
                    out[n] = torch.empty(n_rows, *g.shape[1:], dtype=g.dtype, device=g.device)
                out[n][start:start + g.shape[0]] = g
            start += next(iter(chunk.values())).shape[0]
        return out

    def rolled_back(self, model: MultiScaleFlow) -> None:
        """After the engine restored the last good weights (the step blew the remember NLL up): a quarter of the
        trust, the mean row's average (:attr:`mean_change`) and the held rows' last rise (:attr:`pool_leak`)
        dropped, and the measurement of the restored weights."""
        self.trust /= 4
        self.mean_change = None
        self.pool_leak = None
        self.forget_nll_now = self.measure(model)

    def diverged(self, logged: dict[str, float]) -> str | None:
        """A reason to roll back the step just taken: a non-finite measurement of the stepped weights (its loss
        and norm are the solve's, finite whatever the step did), else the remember-jump guard."""
        for key in ("remember_bpd", "min_d", "max_d", "mu_r", "sigma_r"):
            if not math.isfinite(logged[key]):
                return f"the stepped weights' {key} became non-finite ({logged[key]})"
        return super().diverged(logged)

    def divergence_advice(self) -> str:
        return ("the solved step's first-order model does not hold on this model even at 1/64 of its step: use "
                "--step adam")

    def state_tensors(self) -> dict[str, Tensor]:
        change = {} if self.mean_change is None else {f"mean_change.{n}": g for n, g in self.mean_change.items()}
        leak = {} if self.pool_leak is None else {"pool_leak": self.pool_leak}
        return {**super().state_tensors(), **change, **leak}

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "trust": self.trust, "mean_steps": self.mean_steps,
                "normality_refusals": self.normality_refusals}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.trust = meta.get("trust", 1.0)
        self.mean_steps = meta.get("mean_steps", 0)
        self.normality_refusals = meta.get("normality_refusals", 0)
        prefix = "mean_change."
        change = {n[len(prefix):]: g.clone() for n, g in tensors.items() if n.startswith(prefix)}
        self.mean_change = change or None
        self.pool_leak = tensors["pool_leak"].clone() if "pool_leak" in tensors else None
        self.forget_nll_now = None  # measured again on the resumed weights before the first step
