"""Debiasing as a method (paper Sec. 4.2): group frequencies, group classifiers, the frequency meter and
:class:`DebiasMethod`, the loss-and-stopping policy the engine runs; the job (load, measure, run, report) is
:func:`flowtame.jobs.debias.debias`, whose module docstring describes the whole procedure.

Units: NLL in nats per image unless marked BPD; frequencies are fractions of the samples in [0, 1].
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowtame.data.images import dequantization_noise
from flowtame.data.quantization import DataSpec, nats_per_bpd, quantize
from flowtame.engine.devices import distinct_indices, random_indices, take_rows, training_rows, uniform_noise
from flowtame.errors import DataError, InputError, config_error
from flowtame.flows.base import MultiScaleFlow
from flowtame.io.fileio import sha256_file
from flowtame.likelihood.nll import batched_nll, dequantized, in_chunks, nll_nats, pixel_nll
from flowtame.likelihood.statistics import subset_correction
from flowtame.likelihood.threshold import forget_threshold
from flowtame.methods.objective import anchor_loss, remember_loss
from flowtame.methods.remember import RememberNormal
from flowtame.methods.taming import DEFAULT_MAX_REMEMBER_DRIFT

#: After an overshoot halved debias's step size, each measurement without one multiplies it by this (up to 1).
REGROWTH = 1.25
#: Each measurement adds this times the gaps over ``gap_scale`` to the loss weights' integral part (reset at an
#: overshoot): with weights proportional to the gap alone, the anchor's restoring pull holds a share short of its
#: target (a proportional controller against a spring); the integral removes that steady offset.
INTEGRAL_GAIN = 0.5
#: After this many stops refused by the remember-drift guard the run gives up (unconverged, with the figures):
#: the target is reachable here only at a remember cost above ``max_remember_drift``.
DRIFT_REFUSALS_TO_GIVE_UP = 3
#: The measurement interval never falls below this many iterations (a screen costs a few iterations' time on the
#: width-512 Glows); when the share would still move too far in it, the step is scaled down instead.
MIN_MEASURE_INTERVAL = 2
#: The overshoot control never scales the step below this (a share that moves that fast is re-measured anyway).
MIN_STEP_SCALE = 1 / 16
#: debias's own weight of the per-image anchor (``tame``'s may differ): at 0.2 (``tame``'s value then) the zoo's
#: RealNVP reached its +10-point target only with the other digits' mean NLL up 1.2% (the remember-drift guard gave
#: up); at 1.0 it converged in 50 iterations at +0.5%, and the embedded and affine Glows reached theirs in as many
#: or fewer iterations with a quarter to a fifth of the drift (docs/debias.md, round 3).
DEBIAS_ANCHOR = 1.0
#: Samples are decoded and classified (and the latent classifier's images encoded) at most this many at a time;
#: fewer for a wide model on the CPU (:func:`~flowtame.likelihood.nll.in_chunks`).
MEASURE_BATCH = 256
CLASSIFIER_KINDS = ("latent-logistic", "torchscript")


# ----------------------------------------------------------------------------------------------------------
# Frequencies


def wilson_interval(count: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``count / n`` at ``confidence`` (two-sided).

    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with p = count/n, z the normal quantile.
    """
    if n < 1 or not 0 <= count <= n:
        raise ValueError(f"need 0 <= count <= n and n >= 1, got count={count}, n={n}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = count / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def frequency_table(assignments: np.ndarray | Tensor, group_names: Sequence[str]) -> dict[str, Any]:
    """Class index per sample [N] (0..G-1 a group, G "other") -> the frequencies of the groups.

    Returns ``{"samples": N, "assigned": n, "other": N - n, "groups": {name: {count, frequency, ci_low,
    ci_high}}}``: a group's frequency is its share of the n samples assigned to some group, with a Wilson 95%
    interval; with n = 0 every frequency is NaN and its interval [0, 1].
    """
    labels = np.asarray(torch.as_tensor(assignments).cpu(), dtype=np.int64)
    counts = np.bincount(labels, minlength=len(group_names) + 1)[:len(group_names)]
    assigned = int(counts.sum())
    rows = {}
    for name, count in zip(group_names, counts.tolist(), strict=True):
        low, high = wilson_interval(count, assigned) if assigned else (0.0, 1.0)
        rows[name] = {"count": int(count), "frequency": count / assigned if assigned else float("nan"),
                      "ci_low": low, "ci_high": high}
    return {"samples": int(labels.size), "assigned": assigned, "other": int(labels.size) - assigned,
            "groups": rows}


def frequencies_of(table: Mapping[str, Any]) -> dict[str, float]:
    """{name: frequency} from a :func:`frequency_table`."""
    return {name: row["frequency"] for name, row in table["groups"].items()}


def within_tolerance(frequencies: Mapping[str, float], targets: Mapping[str, float], tolerance: float) -> bool:
    """True when every group's frequency is within ``tolerance`` (absolute, in fraction units) of its target
    (never when a frequency is NaN)."""
    return all(abs(frequencies[name] - target) <= tolerance for name, target in targets.items())


# ----------------------------------------------------------------------------------------------------------
# Can the target be reached?


@dataclass(frozen=True)
class ReachVerdict:
    """Why a run stops early: at the measured progress rate the target cannot be reached within the budget.

    ``rate``: the group's measured move toward its target, frequency per iteration (least-squares slope over
    the latest measurements), ``rate_se`` its standard error and ``rate_high`` = rate + z·se (the optimistic
    bound the verdict uses); ``gap``: how far the latest measurement is outside the tolerance band (frequency);
    ``budget_left``: iterations left; ``reachable``: rate_high·budget_left, the most the run could still move;
    ``needed``: gap / rate (iterations at the measured rate; None when it is not moving toward the target).
    ``reason``: ``"pace"`` (:func:`reach_verdict`) or ``"remember drift"`` (:func:`drift_verdict`, which also
    sets ``remember_drift``, the relative rise of the remember mean NLL, and ``max_remember_drift``, its bound).
    """

    group: str
    iteration: int
    share: float
    target: float
    rate: float
    rate_se: float
    rate_high: float
    gap: float
    budget_left: int
    reachable: float
    needed: int | None
    points: int
    reason: str = "pace"
    remember_drift: float | None = None
    max_remember_drift: float | None = None

    def message(self) -> str:
        """The one line a user reads: the verdict, the figures behind it and what to change."""
        pace = f"{100 * self.rate * 100:+.2f} ± {100 * self.rate_se * 100:.2f} points per 100 iterations"
        if self.reason == "remember drift":
            return (f"cannot reach the target within the remember bound: {self.group} is at {self.share:.3f} "
                    f"against {self.target:.3f} after {self.iteration} iterations and no longer moves toward it "
                    f"({pace}, {self.points} measurements), while the remember set's mean NLL is up "
                    f"{100 * (self.remember_drift or 0):.2f}% (bound {100 * (self.max_remember_drift or 0):.2f}%) "
                    "and not coming back, so a stop at the target would be refused; ask for a nearer target, or "
                    "allow more (--max-remember-drift) at the remember set's cost")
        advice = (f"it would need about {self.needed} more iterations at this rate: raise --max-iters, or ask for "
                  "a nearer target" if self.needed is not None else
                  "the frequency is not moving toward the target: ask for a nearer target, or allow larger steps "
                  "(a larger --lr, or --step-sigma 0 to use --lr as given) at the remember set's risk")
        return (f"cannot reach the target: {self.group} is at {self.share:.3f} against {self.target:.3f} after "
                f"{self.iteration} iterations and moves {pace} ({self.points} measurements); even at "
                f"{100 * self.rate_high * 100:+.2f} the {self.budget_left} iterations left would move it "
                f"{self.reachable:+.3f} of the {self.gap:.3f} needed; {advice}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def jitter(share: float, assigned: int) -> float:
    """Two binomial standard errors of a share measured on ``assigned`` samples (p(1-p) floored at 1/(4n)):
    moves of the fixed draw's share smaller than this are not taken as a trend (infinite with no sample)."""
    if assigned < 1 or share != share:
        return float("inf")
    return 2.0 * (max(share * (1 - share), 0.25 / assigned) / assigned) ** 0.5


def progress_rate(iterations: Sequence[int], progress: Sequence[float], floor: float) -> tuple[float, float]:
    """Least-squares slope of ``progress`` [n] over ``iterations`` [n] and its standard error (per iteration).

    The residual standard deviation (n - 2 degrees of freedom) is floored at ``floor`` (the measurement's
    resolution, e.g. one sample's share), so that a trajectory that happens to be straight is not taken as
    exact. Needs n >= 3 distinct iterations.
    """
    x = np.asarray(iterations, dtype=np.float64)
    y = np.asarray(progress, dtype=np.float64)
    if x.size < 3:
        raise ValueError("a progress rate needs at least 3 measurements")
    centred = x - x.mean()
    sxx = float(centred @ centred)
    slope = float(centred @ (y - y.mean())) / sxx
    residual = y - y.mean() - slope * centred
    sd = max(float(np.sqrt(residual @ residual / (x.size - 2))), floor)
    return slope, sd / np.sqrt(sxx)


def _latest_pace(group: str, iterations: Sequence[int], shares: Sequence[float], target: float, *, tolerance: float,
                 max_iters: int, z: float, min_points: int, floor: float) -> ReachVerdict | None:
    """The pace figures both verdicts judge (a :class:`ReachVerdict`, reason ``"pace"``) over the latest
    ``2 * min_points`` of ``group``'s shares [n] measured at ``iterations`` [n]; None with fewer than
    ``min_points`` measurements or with the latest share already within ``tolerance`` of ``target``."""
    if len(shares) < min_points:
        return None
    its, values = list(iterations)[-2 * min_points:], list(shares)[-2 * min_points:]
    gap = abs(target - values[-1]) - tolerance
    if gap <= 0:
        return None
    direction = 1.0 if target >= values[0] else -1.0
    rate, se = progress_rate(its, [direction * (v - values[0]) for v in values], floor)
    left = max_iters - its[-1]
    high = rate + z * se
    return ReachVerdict(group=group, iteration=int(its[-1]), share=float(values[-1]), target=float(target),
                        rate=rate, rate_se=se, rate_high=high, gap=gap, budget_left=int(left),
                        reachable=high * left, needed=int(np.ceil(gap / rate)) if rate > 0 else None,
                        points=len(its))


def reach_verdict(group: str, iterations: Sequence[int], shares: Sequence[float], target: float, *,
                  tolerance: float, max_iters: int, z: float, min_points: int, floor: float) -> ReachVerdict | None:
    """A :class:`ReachVerdict` when ``group``'s shares [n] measured at ``iterations`` [n] (past the warm-up)
    say its target cannot be reached within ``max_iters``; None while it still can (or too few points).

    Uses the latest ``2 * min_points`` measurements at most (the current pace, not the warm-up's). The
    projection is optimistic on purpose: the rate's upper bound (``z`` standard errors above the slope) held
    for every iteration left, although the learning rate shrinks as the gap closes; so a verdict means the
    target is out of reach even if the model kept its best plausible pace.
    """
    pace = _latest_pace(group, iterations, shares, target, tolerance=tolerance, max_iters=max_iters, z=z,
                        min_points=min_points, floor=floor)
    return pace if pace is not None and pace.reachable < pace.gap else None


def drift_verdict(group: str, iterations: Sequence[int], shares: Sequence[float], drifts: Sequence[float],
                  target: float, *, bound: float, tolerance: float, max_iters: int, z: float, min_points: int,
                  floor: float) -> ReachVerdict | None:
    """A :class:`ReachVerdict` (reason ``"remember drift"``) when the remember drift [n] (relative rise of the
    remember mean NLL, measured with the shares [n] at ``iterations`` [n]) is past ``bound`` and has not fallen
    over the latest ``2 * min_points`` measurements, while ``group``'s share, still outside the tolerance band,
    shows no move toward its target beyond its noise (slope - ``z`` standard errors <= 0). Such a run cannot
    stop: the guard refuses a stop while the drift is past its bound, and what would bring the drift back (the
    share arriving, its weights relaxing) is not happening. A share still moving is left alone: its drift may
    fall back once it arrives (the zoo's wide Glow, 80% zeros: +0.92% on the way, +0.22% at the stop)."""
    pace = _latest_pace(group, iterations, shares, target, tolerance=tolerance, max_iters=max_iters, z=z,
                        min_points=min_points, floor=floor)
    drift = list(drifts)[-2 * min_points:]
    if pace is None or drift[-1] <= bound or pace.rate - z * pace.rate_se > 0:
        return None
    if progress_rate(list(iterations)[-2 * min_points:], drift, 0.0)[0] < 0:
        return None
    return replace(pace, reason="remember drift", remember_drift=float(drift[-1]), max_remember_drift=bound)


# ----------------------------------------------------------------------------------------------------------
# Classifiers


def bin_centres(x: Tensor, n_bits: int) -> Tensor:
    """Model-space values [B, ...] (samples or dequantized images) -> the centres of their n_bits bins.

    Values are clamped to [-0.5, 0.5); NaN becomes -0.5. Quantized images map to ``x + 0.5 / 2**n_bits``.
    """
    n_bins = 2 ** n_bits
    bins = torch.floor((torch.nan_to_num(x, nan=-0.5) + 0.5) * n_bins).clamp(0, n_bins - 1)
    return (bins + 0.5) / n_bins - 0.5


class GroupClassifier(Protocol):
    """Maps images in the model's input range, float [B, C, H, W] at bin centres, to logits [B, K]: one per
    group, then one for "other" when the classifier has that class (K = G + 1)."""

    kind: str

    def logits(self, images: Tensor) -> Tensor:
        """Group scores [B, G] (argmax = the assigned group)."""

    def describe(self) -> dict[str, Any]:
        """What the report says about the classifier (kind, accuracy, ...)."""


@torch.no_grad()
def latent_features(model: MultiScaleFlow, images: Tensor, batch_size: int = MEASURE_BATCH) -> Tensor:
    """Images [B, C, H, W] in model space -> the model's latents of every level, flattened and
    concatenated, float32 [B, D]; at most ``batch_size`` images a forward (:func:`in_chunks` sizes)."""

    def rows(start: int, stop: int) -> Tensor:
        latents, _ = model.encode(images[start:stop])
        return torch.cat([z.flatten(1) for z in latents], 1).float()

    return torch.cat(in_chunks(model, images.shape[0], images.device, batch_size, rows))


class LatentLogisticClassifier:
    """Multinomial logistic regression on the standardized latents of a frozen (base) flow.

    ``logits(x) = ((features(x) - mean) / std) @ weight + bias`` with ``weight`` [D, G], ``bias`` [G];
    ``mean``, ``std`` [D] from the training split (``std`` floored at ``1e-3`` of its median, so that
    latent values the training images barely use cannot dominate the scores of samples).
    """

    kind = "latent-logistic"

    def __init__(self, model: MultiScaleFlow, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor,
                 info: dict[str, Any]):
        self.model = model
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias
        self.info = info

    def logits(self, images: Tensor) -> Tensor:
        return ((latent_features(self.model, images) - self.mean) / self.std) @ self.weight + self.bias

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.info}


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float,
                 max_iter: int) -> tuple[Tensor, Tensor]:
    """Fit ``features @ W + b`` (features float [N, D], labels long [N]) by L-BFGS, float64.

    Loss: class-balanced cross-entropy (each class weighs as much as any other, whatever its size) plus
    ``weight_decay * sum(W²)``. Returns (W [D, G], b [G]) as float32. Deterministic on the CPU.
    """
    x = features.double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    class_weight = counts.sum() / (num_classes * counts.clamp_min(1))
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels, weight=class_weight.to(x.device))
        loss = loss + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


def held_out_split(labels: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices (train, held_out) with ``fraction`` of each class held out (at least one per class, and at
    least one left to train on), drawn with ``generator``; both sorted."""
    train, held = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_held = min(max(1, round(fraction * members.numel())), members.numel() - 1)
        held.append(members[:n_held])
        train.append(members[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def fit_latent_classifier(base_model: MultiScaleFlow, class_pixels: Sequence[Tensor], n_bits: int, *,
                          held_out_fraction: float, weight_decay: float, max_iter: int, seed: int
                          ) -> LatentLogisticClassifier:
    """Fit :class:`LatentLogisticClassifier` on images of each class (uint8 [N_k, C, H, W] each): the groups
    in order, then the "other" images when there are any.

    Images are encoded by ``base_model`` at their bin centres; ``held_out_fraction`` of each class (seeded
    by ``seed``) is held out and the classifier's accuracy on it reported (overall, and the recall of each
    class); the classifier used is the one fitted on the rest. Raises DataError when a class has fewer than
    2 images.
    """
    for index, pixels in enumerate(class_pixels):
        if pixels.shape[0] < 2:
            raise DataError(f"class {index + 1} of the classifier has {pixels.shape[0]} image(s); it needs at "
                            "least 2 (one to train on, one to check it)")
    device = next(base_model.parameters()).device
    images = torch.cat([bin_centres(quantize(p, n_bits), n_bits) for p in class_pixels]).to(device)
    labels = torch.cat([torch.full((p.shape[0],), g, dtype=torch.long) for g, p in enumerate(class_pixels)])
    features = latent_features(base_model, images).cpu()
    train, held = held_out_split(labels, held_out_fraction, torch.Generator().manual_seed(seed))
    mean = features[train].mean(0)
    std = features[train].std(0)
    std = std.clamp_min(1e-3 * float(std.median()) + 1e-12)
    standardized = (features - mean) / std
    weight, bias = fit_logistic(standardized[train], labels[train], len(class_pixels),
                                weight_decay=weight_decay, max_iter=max_iter)

    def accuracy(indices: Tensor) -> float:
        predicted = (standardized[indices] @ weight + bias).argmax(1)
        return float((predicted == labels[indices]).double().mean())

    held_predicted = (standardized[held] @ weight + bias).argmax(1)
    held_recall = [float((held_predicted[labels[held] == k] == k).double().mean())
                   for k in range(len(class_pixels))]

    info = {"features": "base-model latents of every level at bin centres, flattened, concatenated, "
                        "standardized", "num_features": int(features.shape[1]),
            "n_train": int(train.numel()), "n_held_out": int(held.numel()),
            "train_accuracy": accuracy(train), "held_out_accuracy": accuracy(held),
            "held_out_recall": held_recall,
            "weight_decay": weight_decay, "class_weights": "balanced"}
    return LatentLogisticClassifier(base_model, mean.to(device), std.to(device), weight.to(device),
                                    bias.to(device), info)


class TorchScriptClassifier:
    """A user's TorchScript module: images [B, C, H, W] in [-0.5, 0.5) (bin centres) -> logits [B, K], one
    per group in order, then one for "other" when other images are given."""

    kind = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule, path: Path, num_classes: int):
        self.module = module
        self.path = path
        self.num_classes = num_classes
        self.info: dict[str, Any] = {}

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        try:
            out = self.module(images)
        except Exception as exc:  # noqa: BLE001 - whatever the user's module raises is an input problem
            raise InputError(f"{self.path}: the classifier failed on a batch of images "
                             f"{list(images.shape)} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                             ) from None
        if not torch.is_tensor(out) or tuple(out.shape) != (images.shape[0], self.num_classes):
            shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise InputError(f"{self.path}: the classifier must return logits of shape [B, {self.num_classes}] "
                             f"(one per group in the groups' order, then 'other' if other images are given) for "
                             f"images [B, C, H, W]; got {shape}", keys=("classifier",))
        return out.float()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.info}


def load_torchscript_classifier(path: str | Path, class_pixels: Sequence[Tensor], n_bits: int,
                                device: torch.device) -> TorchScriptClassifier:
    """Load a TorchScript classifier and check it on images of each class (uint8 [N_k, C, H, W] each: the
    groups, then the other images if any).

    Its accuracy on all those images (no split: it was trained elsewhere) goes to ``info``. Raises
    InputError when the file does not load or its outputs are not logits [B, number of classes].
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such classifier file")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, but it is the format asked for
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for files that are not TorchScript
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a TorchScript module torch.jit.load can read ({reason})") from None
    module.eval()
    classifier = TorchScriptClassifier(module, path, len(class_pixels))
    correct = total = 0
    for label, pixels in enumerate(class_pixels):
        for start in range(0, pixels.shape[0], MEASURE_BATCH):
            images = bin_centres(quantize(pixels[start:start + MEASURE_BATCH], n_bits), n_bits).to(device)
            correct += int((classifier.logits(images).argmax(1) == label).sum())
            total += images.shape[0]
    classifier.info = {"sha256": sha256_file(path), "accuracy": correct / total, "n_checked": total}
    return classifier


class FrequencyMeter:
    """Decodes one fixed noise draw with a model and assigns each sample to the class its classifier scores
    highest (a group, or "other").

    ``noise``: standardized latents (one tensor per level, [N, *latent_shape]) times the temperature,
    drawn once on the CPU from ``seed``.
    """

    def __init__(self, noise: list[Tensor], classifier: GroupClassifier, n_bits: int):
        self.noise = noise
        self.classifier = classifier
        self.n_bits = n_bits

    @classmethod
    def draw(cls, model: MultiScaleFlow, samples: int, temperature: float, seed: int,
             classifier: GroupClassifier, n_bits: int) -> FrequencyMeter:
        noise = model.sample_noise(samples, temperature, torch.Generator().manual_seed(seed))
        return cls(noise, classifier, n_bits)

    @property
    def samples(self) -> int:
        return self.noise[0].shape[0]

    @torch.no_grad()
    def assign(self, model: MultiScaleFlow, limit: int | None = None) -> Tensor:
        """Class of every sample, long [N] on the CPU (0..G-1 a group, G other); the model runs in eval mode.

        ``limit``: only the draw's first ``limit`` samples (the screen: same noise, a fraction of the cost)."""
        count = self.samples if limit is None else min(limit, self.samples)

        def classes(start: int, stop: int) -> Tensor:
            x = model.decode_noise([eps[start:stop] for eps in self.noise])
            return self.classifier.logits(bin_centres(x, self.n_bits)).argmax(1).cpu()

        was_training = model.training
        model.eval()
        try:
            out = in_chunks(model, count, self.noise[0].device, MEASURE_BATCH, classes)
        finally:
            model.train(was_training)
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# The method


@dataclass
class DebiasConfig:
    """Every numeric knob of ``flowtame debias`` (paths and targets are arguments, not config).

    ``tolerance``: absolute, in frequency units. ``soft_delta``: the soft threshold of over-represented
    groups, in remember standard deviations σ_R. ``gap_scale``: a group this far (or farther) from its
    target gets the full weight 1; nearer, proportionally less; and the learning rate is scaled by the
    largest gap over ``gap_scale``, clipped to [``min_lr_factor``, 1]. ``check_draw``: after the run, measure
    base and debiased model again on an independent draw (seed ``seed + 1``) that the stopping rule never saw.
    ``step_sigma``: ``tame``'s learning-rate calibration (:func:`flowtame.methods.calibration.calibrate_lr`):
    ``lr`` is a cap, lowered so that one step moves the remember mean NLL by at most ``step_sigma`` σ_R to
    first order (None or 0: ``lr`` as given). ``screen_samples``: measurements decode only this prefix of the
    fixed draw while it says the targets are farther than the tolerance plus its own 95% half width; the full
    draw is decoded when they may be within reach (every stop is judged on the full draw; 0: always the full
    draw). ``refresh_every``: μ_R, σ_R are re-estimated at a measurement when this many iterations passed since
    the last refresh, or earlier when the remember batches say the value went stale. ``verdict``: stop early
    when the measured progress rate says the targets cannot be reached within ``max_iters``
    (:func:`reach_verdict`, after ``verdict_points`` measurements past the warm-up, optimistic by
    ``verdict_z`` standard errors). ``anchor``, ``gamma``: ``tame``'s remember term
    (:func:`flowtame.methods.objective.remember_loss`): the per-image anchor to the base model replaces the mean
    remember NLL (which lowers every NLL, i.e. keeps training the model), the symmetric KL weighs ``gamma``
    (0: off); ``anchor`` 0 with ``gamma`` 0.6 is the paper's term. ``max_remember_drift``: as ``tame``'s, a run
    stops as converged only while the remember set's mean NLL rose by at most this fraction over the base
    model's (0 or None: no bound). ``measure_fraction``: the overshoot control: the next measurement comes before
    the lead group's share, at its measured rate, could move more than this fraction of its remaining gap
    (between ``MIN_MEASURE_INTERVAL`` and ``measure_every`` iterations; the step is scaled down when even the
    shortest interval would move it farther).
    """

    tolerance: float = 0.02
    samples: int = 1024
    temperature: float = 0.5
    measure_every: int = 10
    max_iters: int = 400
    lr: float = 2e-5
    warmup: int = 20
    batch_size: int = 16
    alpha: float = 0.6
    gamma: float = 0.0
    anchor: float = DEBIAS_ANCHOR
    max_remember_drift: float | None = DEFAULT_MAX_REMEMBER_DRIFT
    measure_fraction: float = 0.5
    soft_delta: float = 2.0
    gap_scale: float = 0.2
    min_lr_factor: float = 0.25
    step_sigma: float | None = 0.5
    check_draw: bool = True
    refresh_size: int = 512
    refresh_every: int = 30
    screen_samples: int = 256
    verdict: bool = True
    verdict_points: int = 4
    verdict_z: float = 2.0
    held_out_fraction: float = 0.2
    classifier_weight_decay: float = 1e-2
    classifier_max_iter: int = 300
    grad_clip: float | None = None
    seed: int = 0
    eval_seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.tolerance < 0.5:
            problems.append("tolerance must lie in (0, 0.5)")
        if self.samples < 1 or self.measure_every < 1 or self.max_iters < 1:
            problems.append("samples, measure_every and max_iters must be at least 1")
        if not self.temperature > 0:
            problems.append("temperature must be positive")
        if not self.lr > 0 or self.warmup < 0 or self.batch_size < 2:
            problems.append("lr must be positive, warmup non-negative, batch_size at least 2")
        if not 0 <= self.alpha <= 1 or not 0 <= self.gamma <= 1:
            problems.append("alpha and gamma must lie in [0, 1]")
        if not self.gap_scale > 0 or self.refresh_size < 2:
            problems.append("gap_scale must be positive and refresh_size at least 2")
        if not 0 < self.min_lr_factor <= 1:
            problems.append("min_lr_factor must lie in (0, 1]")
        if self.step_sigma == 0:
            self.step_sigma = None  # 0 turns the calibration off: lr is used as given
        if self.step_sigma is not None and not self.step_sigma > 0:
            problems.append("step_sigma must be positive (0 turns the calibration off)")
        if self.screen_samples < 0 or self.refresh_every < 1:
            problems.append("screen_samples must be non-negative and refresh_every at least 1")
        if self.anchor < 0:
            problems.append("anchor must be at least 0 (0 turns the anchor off)")
        if self.max_remember_drift == 0:
            self.max_remember_drift = None  # 0 turns the guard off, as in tame
        if self.max_remember_drift is not None and not self.max_remember_drift > 0:
            problems.append("max_remember_drift must be positive (0 turns the guard off)")
        if not 0 < self.measure_fraction <= 1:
            problems.append("measure_fraction must lie in (0, 1]")
        if self.verdict_points < 3 or not self.verdict_z >= 0:
            problems.append("verdict_points must be at least 3 and verdict_z non-negative")
        if not 0 < self.held_out_fraction < 1 or not self.classifier_weight_decay >= 0:
            problems.append("held_out_fraction must lie in (0, 1) and classifier_weight_decay be non-negative")
        if problems:
            raise config_error("debiasing", problems, vars(self))


@dataclass
class DebiasData:
    """What :class:`DebiasMethod` reads while training.

    ``groups``: uint8 [N_g, C, H, W] per group (on the device); ``remember``: uint8 [R, C, H, W] (CPU, pinned
    on CUDA); ``refresh``: float [S, C, H, W], a fixed remember subset dequantized with fixed noise;
    ``base_mean``, ``base_std``: N_B in nats over the whole remember set; ``subset_correction``: (mean offset
    nats, std ratio) mapping refresh-subset statistics to whole-set ones. ``anchored``: float [R] (where
    ``remember`` lives), 1 for the remember images the anchor holds, 0 for those that are also group images (the
    group term moves them on purpose); None when every remember image is a group image (the anchor then holds
    them all, and resists the move: give a remember set beyond the groups).
    """

    data_spec: DataSpec
    groups: list[Tensor]
    remember: Tensor
    refresh: Tensor
    base_mean: Tensor
    base_std: Tensor
    subset_correction: tuple[float, float]
    anchored: Tensor | None = None


def prepare_data(base_model: MultiScaleFlow, group_pixels: Sequence[Tensor], remember_pixels: Tensor,
                 remember_keys: Sequence[str], data_spec: DataSpec, config: DebiasConfig, generator: torch.Generator,
                 device: torch.device, group_keys: Sequence[Sequence[str]] = ()) -> tuple[DebiasData, np.ndarray]:
    """:class:`DebiasData` for a run, and the base model's remember NLL (nats, float64 [R], one keyed noise
    draw of ``config.eval_seed``; N_B is its normal fit). The refresh subset (``config.refresh_size`` remember
    images) is drawn with ``generator``; remember images whose key is in ``group_keys`` are not anchored."""
    in_groups = {key for keys in group_keys for key in keys}
    anchored = torch.tensor([key not in in_groups for key in remember_keys], dtype=torch.float32)
    base_remember_nll = pixel_nll(base_model, remember_pixels, remember_keys, data_spec, config.eval_seed, device)
    n_refresh = min(config.refresh_size, remember_pixels.shape[0])
    refresh_idx = torch.randperm(remember_pixels.shape[0], generator=generator)[:n_refresh].sort().values
    refresh_noise = dequantization_noise([remember_keys[i] for i in refresh_idx.tolist()], config.eval_seed,
                                         tuple(remember_pixels.shape[1:]))
    data = DebiasData(
        data_spec=data_spec,
        groups=[p.to(device) for p in group_pixels],
        remember=training_rows(remember_pixels, device),
        refresh=dequantized(remember_pixels[refresh_idx], refresh_noise, data_spec.n_bits).to(device),
        base_mean=torch.tensor(float(base_remember_nll.mean()), device=device),
        base_std=torch.tensor(float(base_remember_nll.std(ddof=1)), device=device),
        subset_correction=subset_correction(base_remember_nll, refresh_idx.numpy()),
        anchored=training_rows(anchored, device) if bool(anchored.any()) else None)
    return data, base_remember_nll


class DebiasMethod:
    """Taming toward target frequencies (paper Sec. 4.2), for :class:`~flowtame.engine.loop.Engine`.

    Loss of an iteration, from ONE forward/backward over [batch of each group; remember batch] with fresh
    dequantization noise:

    ``L = α L_G + (1-α) L_R``, ``L_G = Σ_g max(w_g, 0) A_g + max(-w_g, 0) H_g`` where
    ``A_g`` = mean NLL of group g's batch in BPD (descending it raises the group's likelihood),
    ``H_g`` = mean ``max(τ - NLL, 0)`` in BPD with the soft threshold ``τ = μ_R + δ_soft σ_R`` (ascending NLL
    until τ, the mirror of A_g with the same gradient scale, 1 per BPD), and
    ``w_g = clip((target_g - frequency_g) / gap_scale + I_g, -1, 1)`` from the latest measurement (positive:
    under-represented), ``I_g`` the clipped sum over measurements of :data:`INTEGRAL_GAIN` times the same ratio,
    reset to 0 at an overshoot. ``L_R`` is taming's remember loss (:func:`~flowtame.methods.objective.remember_loss`)
    with N_B fixed and N_T's value refreshed; with ``anchor`` > 0 its first term is the per-image anchor of the
    remember batch to ``base_model`` (:func:`~flowtame.methods.objective.anchor_loss`, the base model's NLLs of
    the same dequantized images), as in ``tame``; remember rows that are group images count 0 in its mean (the
    group term moves them on purpose; ``DebiasData.anchored``).

    ``after_step`` re-measures the frequencies every ``measure_every`` iterations (and refreshes μ_R, σ_R on
    the fixed subset, with the base model's subset correction), updates the weights and ``lr_factor`` (the
    engine's learning-rate multiplier, ``clip(max_g |gap_g| / gap_scale, min_lr_factor, 1)``: Adam's steps do
    not shrink with the loss weights, so the step size itself is made proportional to the remaining gap, or
    the frequencies overshoot and oscillate; and halved each time the lead group's share crosses its target
    all the same, grown back by :data:`REGROWTH` at each measurement without a crossing), and reports
    convergence when every group is within ``tolerance`` of its target on the full draw and the remember mean NLL
    (refreshed then) rose by at most ``max_remember_drift`` (else the stop is refused and counted). The next
    measurement is planned from the lead group's observed rate (:meth:`_plan_next`): the overshoot control.
    """

    name = "debias"

    def __init__(self, data: DebiasData, meter: FrequencyMeter, group_names: Sequence[str],
                 targets: Mapping[str, float], config: DebiasConfig, generator: torch.Generator,
                 initial: Mapping[str, Any], *, base_model: MultiScaleFlow | None = None,
                 initial_screen: Mapping[str, Any] | None = None):
        self.data = data
        self.base_model = base_model
        #: Weight of the per-image anchor to the base model in the remember term (0: the mean NLL term A).
        self.anchor_weight = float(config.anchor)
        if self.anchor_weight > 0 and base_model is None:
            raise ValueError("the anchor term needs the frozen base model")
        self.meter = meter
        self.group_names = list(group_names)
        self.targets = torch.tensor([targets[n] for n in self.group_names], dtype=torch.float64)
        self.config = config
        self.generator = generator
        self.nats_per_bpd = nats_per_bpd(data.data_spec.num_dims)
        #: N_T: mu_R, sigma_R of the model being changed (refresh with subset correction, resume state).
        self.normal = RememberNormal(data.base_mean, data.base_std, data.subset_correction)
        #: Times the lead group's share crossed its target (from one side to the other, outside the tolerance),
        #: the iteration of the latest crossing (the verdict's series starts there) and the step-size scale they
        #: set: halved at each crossing, grown by :data:`REGROWTH` (up to 1) at each measurement without one.
        self.overshoots = 0
        self.last_crossing = 0
        self.step_scale = 1.0
        #: I_g [G] (float64, CPU): the loss weights' integral part.
        self.integral = torch.zeros(len(self.group_names), dtype=torch.float64)
        measured = frequencies_of(initial)
        self._set_frequencies(torch.tensor([measured[n] for n in self.group_names], dtype=torch.float64))
        self.trajectory: list[dict[str, Any]] = [
            {"iteration": 0, **initial, "remember_mean_bpd": float(self.normal.mu) / self.nats_per_bpd}]
        #: The group the early verdict follows: the one farthest from its target at the start.
        gaps = (self.targets - torch.tensor([measured[n] for n in self.group_names], dtype=torch.float64)).abs()
        self.lead = self.group_names[int(torch.nan_to_num(gaps, nan=0.0).argmax())]
        lead_index = self.group_names.index(self.lead)
        #: +1 when the lead group's share must rise to its target, -1 when it must fall.
        self.lead_direction = 1.0 if float(self.targets[lead_index]) >= measured[self.lead] else -1.0
        #: The overshoot control's state: the iteration of the next and of the latest measurement and the lead
        #: group's screen-prefix share then (the rate is read on the same samples every time).
        self.next_measure = config.measure_every
        self.last_measure = 0
        self.last_screen_share = frequencies_of(initial_screen or initial)[self.lead]
        #: Stops refused because the remember mean NLL rose by more than ``max_remember_drift``.
        self.drift_refusals = 0
        #: Decode the whole draw at the next measurement (else its screen prefix only).
        self.full_next = self._within_reach(initial, initial["assigned"] * self.screen_fraction)
        self.last_refresh = 0
        self.full_measurements = 0
        #: Set when the measured progress says the targets cannot be reached: the engine stops (unconverged).
        self.verdict: ReachVerdict | None = None
        self.gave_up: str | None = None
        self.calibration: Any = None  # set by the job when the learning rate was calibrated

    @property
    def screen_fraction(self) -> float:
        """The share of the draw a screen measurement decodes (1 when screening is off)."""
        screen = self.config.screen_samples
        return 1.0 if not screen or screen >= self.meter.samples else screen / self.meter.samples

    def _within_reach(self, table: Mapping[str, Any], assigned: float) -> bool:
        """Whether every group of ``table`` may be within tolerance of its target once measured on the full draw:
        its share within the tolerance plus the 95% half width of a share measured on ``assigned`` samples."""
        if self.screen_fraction == 1.0:
            return True
        for name, target in zip(self.group_names, self.targets.tolist(), strict=True):
            share = table["groups"][name]["frequency"]
            if assigned < 1 or share != share:  # nothing assigned or NaN: measure in full
                return True
            half = 1.96 * (max(share * (1 - share), 0.25 / assigned) / assigned) ** 0.5
            if abs(share - target) > self.config.tolerance + half:
                return False
        return True

    def _set_frequencies(self, frequencies: Tensor) -> None:
        """Adopt measured frequencies [G] (float64, CPU): the loss weights, the learning-rate factor and the
        largest gap to a target (a device scalar the loss logs without a host copy; NaN counts as 1)."""
        self.frequencies = frequencies
        self.weights = self._weights(frequencies)
        self.lr_factor = self._lr_factor(frequencies)
        gap = torch.nan_to_num((frequencies - self.targets).abs(), nan=1.0).max()
        self.max_gap = gap.float().to(self.data.base_mean.device)

    def _weights(self, frequencies: Tensor) -> Tensor:
        """w_g [G] (float32, on the device) from measured frequencies [G] (NaN, no sample assigned: 0)."""
        gap = torch.nan_to_num((self.targets - frequencies) / self.config.gap_scale)
        return (gap + self.integral).clamp(-1, 1).float().to(self.data.base_mean.device)

    def _lr_factor(self, frequencies: Tensor) -> float:
        """The engine's learning-rate multiplier: ``clip(max_g |target_g - frequency_g| / gap_scale,
        min_lr_factor, 1)`` (NaN frequencies: 1) — steps shrink as the frequencies near their targets — halved for
        every overshoot (:meth:`_count_crossing`)."""
        gap = float(torch.nan_to_num((self.targets - frequencies).abs(), nan=float("inf")).max())
        return min(1.0, max(self.config.min_lr_factor, gap / self.config.gap_scale)) * self.step_scale

    def _count_crossing(self, measured: Mapping[str, float], iteration: int) -> None:
        """Halve the step size (count an overshoot) when the lead group's share went from one side of its target
        to the other since the previous measurement and landed outside the tolerance: the steps were too large
        for how strongly this model's samples respond, and the loop would swing around the target. Without a
        crossing the scale grows back by :data:`REGROWTH` (at most to 1), so that it does not stall short of the
        band (the sign rule of Rprop, per measurement)."""
        index = self.group_names.index(self.lead)
        target = float(self.targets[index])
        before, now = float(self.frequencies[index]) - target, measured[self.lead] - target
        if before * now < 0 and abs(now) > self.config.tolerance:
            self.overshoots += 1
            self.last_crossing = iteration
            self.step_scale *= 0.5
            self.integral.zero_()
        else:
            self.step_scale = min(1.0, self.step_scale * REGROWTH)

    def _batch(self) -> tuple[Tensor, list[int], Tensor | None]:
        """(inputs [G*B + B, C, H, W] with fresh noise, rows per group then remember, the remember rows' anchor
        mask [B] (float, 1 = anchored; None: every row))."""
        d, size = self.data, self.config.batch_size
        parts, rows = [], []
        for pixels in d.groups:
            index = distinct_indices(self.generator, size, pixels.shape[0])
            parts.append(pixels[index.to(pixels.device)])
            rows.append(index.numel())
        remember_index = random_indices(self.generator, d.remember.shape[0], size)
        parts.append(take_rows(d.remember, remember_index, d.base_mean.device))
        rows.append(size)
        pixels = torch.cat(parts)
        noise = uniform_noise(self.generator, pixels.shape, pixels.device)
        mask = None if d.anchored is None else take_rows(d.anchored, remember_index, d.base_mean.device)
        return dequantized(pixels, noise, d.data_spec.n_bits), rows, mask

    def loss(self, model: MultiScaleFlow, iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        x, rows, mask = self._batch()
        nll = nll_nats(model, x, self.data.data_spec)
        *group_nll, nll_remember = nll.split(rows)
        threshold = forget_threshold(self.normal.mu, self.normal.sigma, self.config.soft_delta)
        loss_groups = nll.new_zeros(())
        for weight, values in zip(self.weights, group_nll, strict=True):
            raise_term = values.mean() / self.nats_per_bpd
            lower_term = torch.relu(threshold - values).mean() / self.nats_per_bpd
            loss_groups = loss_groups + torch.relu(weight) * raise_term + torch.relu(-weight) * lower_term
        batch_mean, batch_std = nll_remember.mean(), nll_remember.std()
        self.normal.track(batch_mean, batch_std)  # tells when the refreshed mu_R, sigma_R went stale
        tamed_mean, tamed_std = self.normal.estimate(batch_mean, batch_std)
        anchor_term = None
        if self.anchor_weight > 0:
            assert self.base_model is not None
            # no gradient; under torchrun each rank evaluates only its shard of the rows
            base_nll = batched_nll(self.base_model, x[-rows[-1]:], self.data.data_spec)
            held = nll_remember if mask is None else nll_remember * mask  # group images: no pull (0 - 0)
            anchor_term = self.anchor_weight * anchor_loss(held, base_nll if mask is None else base_nll * mask,
                                                           self.data.base_std)
        loss_remember, remember_bpd, kl = remember_loss(nll_remember, self.data.base_mean, self.data.base_std,
                                                        tamed_mean, tamed_std, gamma=self.config.gamma,
                                                        nats_per_bpd=self.nats_per_bpd, anchor=anchor_term)
        loss = self.config.alpha * loss_groups + (1 - self.config.alpha) * loss_remember
        metrics = {"loss_groups": loss_groups, "loss_remember": loss_remember, "remember_bpd": remember_bpd,
                   "kl": kl, "max_gap": self.max_gap}
        if anchor_term is not None:
            metrics["anchor"] = anchor_term.detach() / self.anchor_weight
        for name, values in zip(self.group_names, group_nll, strict=True):
            metrics[f"bpd/{name}"] = values.mean() / self.nats_per_bpd
        return loss, metrics

    @torch.no_grad()
    def refresh(self, model: MultiScaleFlow) -> None:
        """Re-estimate μ_R, σ_R (nats) of the current model on the fixed refresh subset, corrected."""
        self.normal.update(batched_nll(model, self.data.refresh, self.data.data_spec))

    def _measure(self, model: MultiScaleFlow) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """(frequency table, its screen-prefix table, whether the full draw was decoded) for the current model."""
        screen = int(round(self.screen_fraction * self.meter.samples))
        if screen == self.meter.samples or not self.full_next:
            table = frequency_table(self.meter.assign(model, screen), self.group_names)
            return table, table, screen == self.meter.samples
        labels = self.meter.assign(model)
        return frequency_table(labels, self.group_names), frequency_table(labels[:screen], self.group_names), True

    def after_step(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        """At the planned measuring iteration (:meth:`_plan_next`; every ``measure_every`` at most): measure
        (screen or full draw), refresh μ_R, σ_R when due (and before any stop), update weights and step size;
        converged when a full measurement is within tolerance and the remember drift within its bound
        (:meth:`_remember_kept`); sets :attr:`gave_up` when :func:`reach_verdict` says the targets are out of
        reach."""
        done = iteration + 1
        if done < self.next_measure:
            return False
        table, screened, full = self._measure(model)
        self.full_measurements += int(full)
        measured = frequencies_of(table)
        targets = dict(zip(self.group_names, self.targets.tolist(), strict=True))
        at_target = full and within_tolerance(measured, targets, self.config.tolerance)
        guarded = at_target and self.config.max_remember_drift is not None
        if guarded or done - self.last_refresh >= self.config.refresh_every or self.normal.stale():
            self.refresh(model)
            self.last_refresh = done
        converged = at_target and self._remember_kept()
        self._count_crossing(measured, done)
        used_factor = self.lr_factor
        if self.last_crossing != done:  # an overshoot just reset the integral
            self._integrate(measured, targets)
        self.trajectory.append({"iteration": done, **table, "full_draw": full,
                                "screen": frequencies_of(screened) if screened is not table else None,
                                "remember_mean_bpd": float(self.normal.mu) / self.nats_per_bpd,
                                "remember_drift": self.normal.drift(), "stop_refused": at_target and not converged})
        self._set_frequencies(torch.tensor([measured[n] for n in self.group_names], dtype=torch.float64))
        self._plan_next(frequencies_of(screened)[self.lead], screened["assigned"], done, used_factor)
        logged["max_gap"] = float(self.max_gap)
        self.full_next = self._within_reach(screened, screened["assigned"])
        if at_target and not converged and self.drift_refusals >= DRIFT_REFUSALS_TO_GIVE_UP:
            self.gave_up = (
                f"cannot reach the target within the remember bound: {self.lead} is at {measured[self.lead]:.3f} "
                f"(within {self.config.tolerance:g} of its target) after {done} iterations, but the remember "
                f"set's mean NLL is up {100 * self.normal.drift():.2f}% against the bound "
                f"{100 * (self.config.max_remember_drift or 0):.2f}% ({self.drift_refusals} stops refused); ask "
                "for a nearer target, or allow more (--max-remember-drift) at the remember set's cost")
        elif not converged and self.config.verdict:
            self._judge_reach(screened["assigned"])
        return converged

    def _integrate(self, measured: Mapping[str, float], targets: Mapping[str, float]) -> None:
        """Add :data:`INTEGRAL_GAIN` times each group's gap over ``gap_scale`` to :attr:`integral` (clipped to
        [-1, 1]); gaps within the tolerance add nothing (no wind-up while the share sits in the band)."""
        gaps = torch.nan_to_num(torch.tensor([targets[n] - measured[n] for n in self.group_names],
                                             dtype=torch.float64))
        gaps = torch.where(gaps.abs() > self.config.tolerance, gaps, torch.zeros_like(gaps))
        self.integral = (self.integral + INTEGRAL_GAIN * gaps / self.config.gap_scale).clamp(-1, 1)

    def _remember_kept(self) -> bool:
        """False (and counted) when the remember mean NLL (latest refresh, corrected to the whole set) rose by more
        than ``max_remember_drift`` over the base model's: a stop there would carry that collateral silently."""
        if self.normal.within(self.config.max_remember_drift):
            return True
        self.drift_refusals += 1
        return False

    def _warm(self, iterations: float) -> float:
        """The engine's warm-up factor of the learning rate after ``iterations`` iterations."""
        return min(1.0, max(iterations, 1.0) / self.config.warmup) if self.config.warmup > 0 else 1.0

    def _plan_next(self, screen_share: float, assigned: int, done: int, used_factor: float) -> None:
        """The overshoot control: from the lead group's move toward its target on the screen prefix since the
        previous measurement (``screen_share`` now, of ``assigned`` samples, measured at ``done``, with the
        learning-rate factor ``used_factor`` in between), less the jitter a share of that many samples shows from
        one measurement to the next (:func:`jitter`: the model's small changes flip samples both ways), predict
        its rate (share per iteration, proportional to the learning rate: the new factor and warm-up)
        and measure next after as many iterations as keep the predicted move under ``measure_fraction`` of the
        remaining gap (at least the tolerance), between :data:`MIN_MEASURE_INTERVAL` and ``measure_every``; when
        even the shortest interval would move it farther, scale the step down to fit (at least
        :data:`MIN_STEP_SCALE`)."""
        index = self.group_names.index(self.lead)
        toward = 1.0 if float(self.targets[index]) >= self.last_screen_share else -1.0
        moved = toward * (screen_share - self.last_screen_share) - jitter(screen_share, assigned)
        span = done - self.last_measure
        self.last_screen_share, self.last_measure = screen_share, done
        interval = self.config.measure_every
        if moved > 0 and span > 0 and used_factor > 0:  # NaN shares compare False: no plan
            per_lr = moved / span / (used_factor * self._warm(done - span / 2))
            rate = per_lr * self.lr_factor * self._warm(done + 1)
            allowed = self.config.measure_fraction * max(abs(float(self.targets[index] - self.frequencies[index])),
                                                         self.config.tolerance)
            interval = int(min(self.config.measure_every, max(MIN_MEASURE_INTERVAL, allowed // rate)))
            if rate * interval > allowed:
                self.step_scale = max(MIN_STEP_SCALE, self.step_scale * allowed / (rate * interval))
                self.lr_factor = self._lr_factor(self.frequencies)
            self.trajectory[-1]["predicted_rate"] = rate
        self.trajectory[-1]["step_scale"] = self.step_scale
        self.next_measure = done + interval

    def _judge_reach(self, assigned: int) -> None:
        """Set :attr:`verdict` and :attr:`gave_up` when the lead group's screen shares since the warm-up say its
        target is out of reach (:func:`reach_verdict`; ``assigned``: the screen's assigned samples)."""
        index = self.group_names.index(self.lead)
        if self.lead_direction * float(self.targets[index] - self.frequencies[index]) < 0:
            # past the target: an overshoot the weights and the step control bring back, not a lost cause
            self.verdict, self.gave_up = None, None
            self.trajectory[-1]["past_target"] = True
            return
        start = max(self.config.warmup, self.last_crossing)
        series = [t for t in self.trajectory[1:] if t["iteration"] >= start]
        shares = [(t["screen"] or frequencies_of(t))[self.lead] for t in series]
        if not series or assigned < 1 or any(share != share for share in shares):
            return
        its = [t["iteration"] for t in series]
        target = float(self.targets[self.group_names.index(self.lead)])
        config = self.config
        self.verdict = reach_verdict(self.lead, its, shares, target, tolerance=config.tolerance,
                                     max_iters=config.max_iters, z=config.verdict_z,
                                     min_points=config.verdict_points, floor=1.0 / assigned)
        bound = config.max_remember_drift
        if self.verdict is None and bound is not None:
            self.verdict = drift_verdict(self.lead, its, shares, [t["remember_drift"] for t in series], target,
                                         bound=bound, tolerance=config.tolerance, max_iters=config.max_iters,
                                         z=config.verdict_z, min_points=config.verdict_points, floor=1.0 / assigned)
        if self.verdict is None:
            self.gave_up = None
            return
        self.gave_up = self.verdict.message()
        if self.verdict.reason == "pace" and bound is not None and self.normal.drift() > bound:
            # the collateral is already past the guard's bound: the target is out of reach within it, too
            self.gave_up += (f"; the remember set's mean NLL is already up {100 * self.normal.drift():.2f}% (bound "
                             f"{100 * bound:.2f}%), so a stop at the target would be refused as well")

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.normal.state_tensors(), "frequencies": self.frequencies, "integral": self.integral}

    def state_meta(self) -> dict[str, Any]:
        return {**self.normal.state_meta(), "trajectory": self.trajectory, "full_next": self.full_next,
                "last_refresh": self.last_refresh, "full_measurements": self.full_measurements,
                "overshoots": self.overshoots, "last_crossing": self.last_crossing, "step_scale": self.step_scale,
                "next_measure": self.next_measure, "last_measure": self.last_measure,
                "last_screen_share": self.last_screen_share, "drift_refusals": self.drift_refusals}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.normal.load_state(tensors, meta)
        self.overshoots, self.last_crossing = meta["overshoots"], meta["last_crossing"]
        self.step_scale = meta["step_scale"]
        self.next_measure, self.last_measure = meta["next_measure"], meta["last_measure"]
        self.last_screen_share, self.drift_refusals = meta["last_screen_share"], meta["drift_refusals"]
        self.integral = tensors["integral"].cpu().double()
        self._set_frequencies(tensors["frequencies"].cpu().double())
        self.trajectory = meta["trajectory"]
        self.full_next = meta["full_next"]
        self.last_refresh = meta["last_refresh"]
        self.full_measurements = meta["full_measurements"]
