"""Baseline forgetting methods, run by the same engine, batches, stopping machinery and report as taming.

Importing this module registers two methods in :data:`flowtame.methods.taming.METHODS`:

- ``neggrad``: gradient ascent on the forget NLL with descent on the remember NLL (the paper's
  "forget_loss_baseline"): ``L = α·L_F + (1-α)·A(X_R)``, ``A`` the mean remember NLL of the batch in BPD.
- ``selective-amnesia``: Selective Amnesia (seed 001) adapted to an unconditional flow:
  ``L = α·L_F + (1-α)·L_SA`` with SA's own objective in the authors' units (NLL of an image in nats, the
  Fisher of that NLL), converted as a whole to BPD: ``L_SA = (S + γ_SA·R + λ·Σ_i F_i (θ_i - θ*_i)²) / (D ln 2)``,
  ``S`` the mean NLL (nats) of surrogate images (uniform noise, or a folder), ``R`` the mean NLL (nats) of
  replay samples drawn from the frozen base model, ``F_i`` the base model's diagonal Fisher (nats², see
  :func:`diagonal_fisher`). So λ means what the authors' λ means (their 100 is flowtame's default), whatever
  D. SA itself reads no remember images; the remember set only defines the threshold (μ_R, σ_R).
  The surrogate: the authors' model is conditional and their surrogate is tied to the forgotten label; an
  unconditional flow has none, so raising the likelihood of the surrogate takes probability mass from every
  image alike, and the forget term on D_F (seed 001, Eq. 1) is what targets D_F.

The forget term and the stopping rule (shared by both baselines). An ascent loss has no minimum at the
threshold, so taming's rule |d| < ε (an image *at* the threshold) need not ever hold. The baselines instead

- push each forget image with the hinge ``L_F = mean_i relu(τ - NLL_i) / (D ln 2)`` (BPD), τ = μ_R + δσ_R
  (nats): for an image short of the threshold (d < 0) its gradient is exactly that of ``-NLL_i / (D ln 2)``,
  the plain ascent; for an image past it, zero, so an image that crossed stops being pushed while the
  others catch up (the ascent is bounded, as taming.md asks). μ_R, σ_R are constants in this term (the
  hinge is the plain ascent, gated; differentiating through the threshold is taming's own choice);
- stop when every forget image is *forgotten*, ``d > -ε``: the criterion the evaluation's
  ``forgotten_fraction`` uses, so all methods are compared at equal forgetting (with taming's
  ``stop_margin``: ``d > -ε + stop_margin`` at the stop, so the evaluation's own noise agrees). As in
  taming, the d values of the training forward screen the rule and only a confirmation on fixed check
  noise, against freshly refreshed μ_R, σ_R, stops the run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from flowtame.data.quantization import DataSpec
from flowtame.engine.devices import distinct_indices, random_indices, take_rows, uniform_noise
from flowtame.errors import CheckpointError, InputError, config_error
from flowtame.flows.base import MultiScaleFlow
from flowtame.likelihood.nll import dequantized, nll_nats
from flowtame.likelihood.threshold import forget_threshold
from flowtame.methods.taming import METHODS, TamingData, TamingMethod, settings_section

#: Per-sample gradients are computed this many values at a time at most (chunk x parameters), so the
#: Fisher's memory stays near 4 bytes x this (128 MiB) whatever the model's size.
FISHER_CHUNK_VALUES = 1 << 25
#: A chunk's inputs (its samples times their draws) number at most as many as its gradients, or hold at most this
#: many values where that allows more (small inputs, whose activations stay small: 256 16x16 digits, 21 32x32 RGB
#: images): on the rosinality Glow (5.1M values: 6 samples' gradients a chunk, one sample of 8 draws' inputs) 15
#: images x 8 draws take 1.74 s in chunks of 6, 6, 3 against 2.51 s one image at a time (one thread,
#: benchmarks/row_gradients.py; docs/benchmarks.md "Round 15").
FISHER_CHUNK_INPUT_VALUES = 1 << 16


class _ForgottenStopping(TamingMethod):
    """What the baselines share: the hinge forget term (BPD) and the stop rule "every d > -ε" (see module)."""

    default_freeze = "none"  # the baselines train every parameter, as published
    default_max_remember_drift = 0.05  # only refuses a model whose every likelihood fell (see TamingMethod)
    anchored = False  # run as published: no per-image anchor to the base model
    preconditioned = False  # ... and Adam's own step, no curvature metric

    def __init__(self, data: TamingData, config: Any, **kwargs: Any):
        super().__init__(data, config, **kwargs)
        # An image not yet seen in a training batch must fail the screen (taming's +inf passes ``d > -ε``).
        self.latest_d.fill_(-math.inf)

    def forget_hinge(self, nll_forget: Tensor) -> Tensor:
        """``mean relu(μ_R + δσ_R - NLL) / (D ln 2)``: BPD short of the threshold, averaged over the batch [Bf]."""
        threshold = forget_threshold(self.mu_r, self.sigma_r, self.delta)
        return torch.relu(threshold - nll_forget).mean() / self.nats_per_bpd

    def diverged(self, logged: dict[str, float]) -> str | None:
        """Baselines run as published: no blow-up roll-back (only non-finite losses roll back)."""
        return None

    def screen_passes(self, logged: dict[str, float]) -> bool:
        return logged["min_d"] > self.lower_edge

    def reached(self, d: Tensor) -> Tensor:
        """The baselines' criterion: every forget image has d > -ε + stop_margin (past the threshold is fine)."""
        return d > self.lower_edge

    def after_step(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        """Taming's screen-and-confirm with the baselines' criterion, without settling."""
        return self.screen_and_confirm(model, iteration, logged)


class NegGrad(_ForgottenStopping):
    """Gradient ascent on D_F, descent on D_R: ``L = α·hinge_F + (1-α)·mean remember NLL`` (both BPD)."""

    name = "neggrad"

    def objective(self, model: nn.Module, nll_forget: Tensor, nll_remember: Tensor,
                  anchor: tuple[Tensor, Tensor] | None = None, forget_weight: Tensor | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """``anchor`` and ``forget_weight`` are always None here: the baselines are not :attr:`anchored`."""
        loss_forget = self.forget_hinge(nll_forget)
        remember_bpd = nll_remember.mean() / self.nats_per_bpd
        loss = self.alpha * loss_forget + (1 - self.alpha) * remember_bpd
        return loss, {"loss_forget": loss_forget, "loss_remember": remember_bpd, "remember_bpd": remember_bpd}


@dataclass(frozen=True)
class SelectiveAmnesiaSettings:
    """Selective Amnesia's own settings (``TameConfig.method_settings["selective_amnesia"]``).

    ``ewc_lambda``: EWC penalty weight; ``replay_weight``: weight of generative replay; ``fisher_samples``:
    base-model samples for the Fisher and the replay pool; ``surrogate``: ``uniform`` noise images or an image
    source. In a config file: a ``selective_amnesia:`` section with these keys, or the flat keys of
    :data:`FLAT_KEYS` (``sa_lambda`` ...; the ``--sa-*`` flags), which remain accepted.
    """

    ewc_lambda: float = 100.0
    replay_weight: float = 1.0
    fisher_samples: int = 256
    surrogate: str = "uniform"

    #: Flat config keys (and flags) -> fields.
    FLAT_KEYS: ClassVar[dict[str, str]] = {"sa_lambda": "ewc_lambda", "sa_replay_weight": "replay_weight",
                                           "sa_fisher_samples": "fisher_samples", "sa_surrogate": "surrogate"}

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.ewc_lambda) and math.isfinite(self.replay_weight)):
            problems.append("sa_lambda and sa_replay_weight must be finite numbers")
        if self.fisher_samples < 1 or self.ewc_lambda < 0 or self.replay_weight < 0:
            problems.append("sa_fisher_samples must be >= 1, sa_lambda and sa_replay_weight >= 0")
        if problems:
            raise config_error("selective-amnesia", problems, self.FLAT_KEYS)


class SelectiveAmnesia(_ForgottenStopping):
    """Selective Amnesia (seed 001) for unconditional flows, plus the bounded forget term on D_F.

    At construction (once): ``fisher_samples`` (:class:`SelectiveAmnesiaSettings`) samples of the frozen
    base model at temperature :attr:`replay_temperature` (no gradient) form the replay pool, and the diagonal
    Fisher is computed on them at θ* (the base weights) with vectorized per-sample gradients. Each iteration
    makes ONE forward and backward over ``[forget batch; surrogate batch; replay batch]`` (``batch_size`` rows
    each, fresh dequantization noise for images; the uniform surrogate is fresh noise itself): the rows that taming uses
    for the remember batch carry the surrogate and replay images here. Replay draws come from the fixed
    pool, as the authors' diffusion runs replayed a pre-generated set, so no model runs besides the one
    being trained. Resume rebuilds pool and Fisher from the same seed and checks they match the saved run.
    """

    name = "selective-amnesia"
    settings_class = SelectiveAmnesiaSettings
    #: Temperature (latent standard deviations) of the replay and Fisher samples.
    replay_temperature = 1.0

    def __init__(self, data: TamingData, config: Any, *, base_model: MultiScaleFlow | None = None, **kwargs: Any):
        super().__init__(data, config, base_model=base_model, **kwargs)
        if base_model is None:
            raise ValueError("selective-amnesia needs the frozen base model")
        settings: SelectiveAmnesiaSettings = config.method_settings[settings_section(self.name)]
        self.sa_lambda = settings.ewc_lambda
        self.replay_weight = settings.replay_weight
        self.surrogate = None if settings.surrogate == "uniform" else load_surrogate(
            settings.surrogate, data.data_spec).to(data.device)
        self.replay_pool = draw_samples(base_model, settings.fisher_samples, self.replay_temperature,
                                        self.setup_generator).to(data.device)
        self.anchor = {name: p.detach().clone() for name, p in base_model.named_parameters()}
        self.fisher = diagonal_fisher(base_model, self.replay_pool, data.data_spec)

    def _batch(self) -> tuple[Tensor, Tensor, int, int]:
        """([forget; surrogate; replay] inputs [Bf+2B,...], forget indices [Bf], Bf, 2B)."""
        d, n = self.data, self.batch_size
        gen = self.generator
        forget_idx = distinct_indices(gen, n, d.forget.shape[0]).to(d.device)
        forget_pixels = d.forget[forget_idx]
        forget_noise = uniform_noise(gen, forget_pixels.shape, d.device)
        if self.surrogate is None:
            surrogate = uniform_noise(gen, (n, *forget_pixels.shape[1:]), d.device) - 0.5
        else:
            pixels = take_rows(self.surrogate, random_indices(gen, self.surrogate.shape[0], n), d.device)
            surrogate = dequantized(pixels, uniform_noise(gen, pixels.shape, d.device), d.data_spec.n_bits)
        replay = take_rows(self.replay_pool, random_indices(gen, self.replay_pool.shape[0], n), d.device)
        x = torch.cat([dequantized(forget_pixels, forget_noise, d.data_spec.n_bits), surrogate, replay])
        return x, forget_idx, forget_idx.numel(), 2 * n

    def ewc_penalty(self, model: nn.Module) -> Tensor:
        """``Σ_i F_i (θ_i - θ*_i)²`` over every parameter, in nats (F in nats² per squared parameter unit)."""
        terms = [(self.fisher[name] * (p - self.anchor[name]).square()).sum()
                 for name, p in model.named_parameters() if name in self.fisher]
        return torch.stack(terms).sum()

    def objective(self, model: nn.Module, nll_forget: Tensor, nll_remember: Tensor,
                  anchor: tuple[Tensor, Tensor] | None = None, forget_weight: Tensor | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """``nll_remember`` [2B] holds the surrogate rows then the replay rows (see :meth:`_batch`);
        ``anchor`` and ``forget_weight`` are always None (the baselines are not :attr:`anchored`)."""
        n = self.batch_size
        surrogate_bpd = nll_remember[:n].mean() / self.nats_per_bpd
        replay_bpd = nll_remember[n:].mean() / self.nats_per_bpd
        ewc = self.ewc_penalty(model)
        loss_forget = self.forget_hinge(nll_forget)
        loss_sa = surrogate_bpd + self.replay_weight * replay_bpd + self.sa_lambda * ewc / self.nats_per_bpd
        loss = self.alpha * loss_forget + (1 - self.alpha) * loss_sa
        return loss, {"loss_forget": loss_forget, "loss_remember": loss_sa, "remember_bpd": replay_bpd,
                      "surrogate_bpd": surrogate_bpd, "ewc": ewc}

    def _fingerprint(self) -> list[float]:
        """Sums of the Fisher and of the replay pool: what resume checks it rebuilt identically."""
        return [float(sum(f.double().sum() for f in self.fisher.values())), float(self.replay_pool.double().sum())]

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "sa_fingerprint": self._fingerprint()}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        saved, rebuilt = meta["sa_fingerprint"], self._fingerprint()
        if not all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12) for a, b in zip(saved, rebuilt, strict=True)):
            raise CheckpointError(f"selective-amnesia: the Fisher / replay pool rebuilt for resume ({rebuilt}) "
                                  f"differ from the interrupted run's ({saved}); resume with the same base "
                                  "model, seed and sa_* settings")
        super().load_state(tensors, meta)


def load_surrogate(source: str, data_spec: DataSpec) -> Tensor:
    """The surrogate images of ``sa_surrogate`` SOURCE (any image source): uint8 [N, C, S, S]."""
    from flowtame.data.images import open_images

    pixels, _ = open_images(source, data_spec).load_tensor()
    if pixels.shape[0] == 0:
        raise InputError(f"sa_surrogate {source}: no images", keys=("sa_surrogate",))
    return pixels


@torch.no_grad()
def draw_samples(model: MultiScaleFlow, n: int, temperature: float, generator: torch.Generator,
                 batch_size: int = 256) -> Tensor:
    """``n`` samples [n, C, S, S] of ``model`` (model input space, continuous) with non-finite ones redrawn."""
    samples: list[Tensor] = []
    have = 0
    for _ in range(10):
        x = model.sample(min(batch_size, n - have), temperature, generator)
        x = x[torch.isfinite(x).flatten(1).all(1)]
        samples.append(x)
        have += x.shape[0]
        if have >= n:
            return torch.cat(samples)[:n]
    raise ValueError(f"the base model gave only {have} finite samples of {n} in 10 attempts")


def nll_function(model: MultiScaleFlow, data_spec: DataSpec) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """f(params, x [B,C,S,S]) -> NLL [B] of the inputs in nats, a pure function of ``params`` (for torch.func; the
    model's parameters missing from ``params`` and its buffers held at their values)."""
    fixed = {name: t.detach() for name, t in [*model.named_buffers(), *model.named_parameters()]}

    class _NLL(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = model

        def forward(self, x: Tensor) -> Tensor:
            return nll_nats(self.flow, x, data_spec)

    wrapper = _NLL()

    def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
        state = {f"flow.{k}": v for k, v in {**fixed, **params}.items()}
        return functional_call(wrapper, state, (x,))

    return f


def mean_nll_gradient(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec, names: list[str],
                      chunk: int = 256) -> dict[str, Tensor]:
    """Gradient of the mean NLL (nats) of inputs ``x`` [N,C,S,S] over the values ``names`` of ``model`` (name ->
    shape), in ``chunk``-image passes; the model's other values held, its mode (eval/train) as it is.

    Plain reverse-mode autograd on detached copies of the values (the model's own are untouched): a batch gradient
    needs no per-sample transform, and torch.func's ``grad`` took 0.43 s where this takes 0.30 s for 224 images on
    the embedded Glow (one thread; 0.24 against 0.21 s on the RealNVP)."""
    wanted = set(names)
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if n in wanted}
    nll = nll_function(model, data_spec)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    with torch.enable_grad():
        for start in range(0, x.shape[0], chunk):
            loss = nll(params, x[start:start + chunk]).sum()
            gradients = torch.autograd.grad(loss, list(params.values()), materialize_grads=True)
            for n, g in zip(params, gradients, strict=True):
                out[n] += g
    return {n: g / x.shape[0] for n, g in out.items()}


def per_sample_gradients(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec, *, vectorized: bool,
                         chunk_size: int | None, names: list[str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Per-sample gradients ∂ NLL(x_n)/∂θ (nats), chunk by chunk: name -> [chunk, *param shape], for the
    parameters ``names`` (None: every parameter; the others held, their gradients never computed).

    ``x``: [N,C,S,S] model inputs, or [N,D,C,S,S] groups of D inputs, each sample's NLL then the mean over its
    group (an image under D noise draws: one pass of N*D inputs, not D passes of N). The model runs in eval mode
    (ActNorm's data-dependent initialization only runs in training mode, so it cannot fire inside vmap; a loaded
    checkpoint is initialized). ``vectorized``: ``vmap(grad(f))`` over chunks of ``chunk_size`` samples
    (default: as many as keep a chunk's gradients within :data:`FISHER_CHUNK_VALUES` floats, and its inputs - its
    samples times D - within as many as that many gradients, or within :data:`FISHER_CHUNK_INPUT_VALUES` values
    where that allows more); otherwise, when
    vmap cannot handle a layer (a warning says so), or when a chunk holds one sample (a large model), plain
    autograd one sample at a time (:func:`mean_nll_gradient` of its group; vmap of one sample was slower on the
    rosinality Glow, docs/benchmarks.md "Round 15"; vmap over several samples is faster than this loop: 0.33
    against 0.61 s on the embedded Glow's 15 images x 8 draws, benchmarks/row_gradients.py).
    """
    groups = x if x.dim() == 5 else x.unsqueeze(1)
    wanted = None if names is None else set(names)
    params = {name: p.detach() for name, p in model.named_parameters() if wanted is None or name in wanted}
    n_params = sum(p.numel() for p in params.values())
    per_gradients = FISHER_CHUNK_VALUES // max(n_params, 1)
    small_inputs = FISHER_CHUNK_INPUT_VALUES // (groups.shape[1] * groups[0, 0].numel())
    chunk_size = chunk_size or max(1, min(groups.shape[0], max(per_gradients // groups.shape[1],
                                                                min(per_gradients, small_inputs))))
    was_training = model.training
    model.eval()
    try:
        nll = nll_function(model, data_spec)
        f = grad(lambda values, group: nll(values, group).mean())  # one sample's (mean) NLL
        batched = vmap(f, in_dims=(None, 0))
        for start in range(0, groups.shape[0], chunk_size):
            chunk = groups[start:start + chunk_size]
            if vectorized and chunk.shape[0] > 1:
                try:
                    with warnings.catch_warnings():  # torch's note that an op (TarFlow's attention) runs unbatched
                        warnings.filterwarnings("ignore", message="There is a performance drop because we have "
                                                                  "not yet implemented the batching rule")
                        gradients = batched(params, chunk)
                    yield gradients
                    continue
                except (RuntimeError, NotImplementedError) as exc:
                    warnings.warn(f"per-sample gradients: vmap cannot run this model ({str(exc).splitlines()[0]}); "
                                  "falling back to one sample at a time", stacklevel=2)
                    vectorized = False
            singles = [mean_nll_gradient(model, group, data_spec, list(params), chunk=group.shape[0])
                       for group in chunk]
            yield {name: torch.stack([g[name] for g in singles]) for name in params}
    finally:
        model.train(was_training)


def diagonal_fisher(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec, *, vectorized: bool = True,
                    chunk_size: int | None = None, names: list[str] | None = None) -> dict[str, Tensor]:
    """Diagonal Fisher ``F_i = mean_n (∂ NLL(x_n)/∂θ_i)²`` at the model's current weights: name -> param shape,
    for the parameters ``names`` (None: all).

    NLL in nats, so F is in nats² (per squared parameter unit). ``x`` [N, C, S, S]: model inputs (dequantized
    images or samples; for SA the base model's own samples). ``vectorized`` / ``chunk_size``: see
    :func:`per_sample_gradients`; memory stays about :data:`FISHER_CHUNK_VALUES` floats whatever N.
    """
    total: dict[str, Tensor] = {}
    for chunk in per_sample_gradients(model, x, data_spec, vectorized=vectorized, chunk_size=chunk_size,
                                      names=names):
        for name, g in chunk.items():
            square = g.square().sum(0)
            total[name] = total[name] + square if name in total else square
    return {name: value / x.shape[0] for name, value in total.items()}


METHODS[NegGrad.name] = NegGrad
METHODS[SelectiveAmnesia.name] = SelectiveAmnesia
