"""Debiasing (paper Sec. 4.2): rebalance how often a flow generates each of several groups of images.

The job, as a library call (``flowtame debias`` only adds files, flags and a live view):

1. **Measure.** ``samples`` latents are drawn once from ``seed`` at ``temperature`` (standard-normal noise
   times the temperature, :meth:`MultiScaleFlow.sample_noise`) and kept: every measurement decodes that same
   noise with the current model, so a change of frequency is the model's doing, not the draw's. Each sample
   is snapped to the centre of its quantization bin and assigned to the group its classifier scores
   highest (a forced choice, like the paper's attribute classifier). A group's frequency is its share of
   the samples assigned to some group (with "other" images given, the classifier has an extra class whose
   samples are not counted), with a Wilson 95% interval (:func:`wilson_interval`).
2. **Classify.** By default a multinomial logistic regression on the *base* model's latents
   (:class:`LatentLogisticClassifier`): every group image is encoded at its bin centres, the latents of all
   levels are flattened and concatenated, standardized, and a linear map to the groups is fitted by L-BFGS
   with weight decay and class-balanced weights on a seeded split; its held-out accuracy is reported.
   Samples are encoded by the base model too, so the feature map never changes while the model does.
   Or a TorchScript module of the user's (:class:`TorchScriptClassifier`).
3. **Tame toward the targets** with :class:`DebiasMethod` through the shared
   :class:`~flowtame.engine.loop.Engine`: ``L = α L_G + (1-α) L_R`` where ``L_R`` is taming's remember loss
   (Eq. 11, N_B fitted once over the remember set) and ``L_G`` weighs each group by how far its measured
   frequency is from its target: under-represented groups' NLL is descended, over-represented groups' NLL is
   pushed up until a soft threshold ``μ_R + δ_soft σ_R`` (see :class:`DebiasMethod`). Frequencies are
   re-measured every ``measure_every`` iterations, and the learning rate is scaled with the largest remaining
   gap; the run stops when every group is within ``tolerance``.
4. **Report** frequencies before, during and after (and before/after on an independent check draw the
   stopping rule never saw), the classifier, the remember-set preservation figures of
   :func:`flowtame.likelihood.evaluation.summarize_evaluation`, and write the same provenance as ``tame``.

See docs/debias.md for the measured behaviour and the report's fields.

Units: NLL in nats per image unless marked BPD; frequencies are fractions of the samples in [0, 1].
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtame.data.images import ImageSet, dequantization_noise
from flowtame.data.quantization import DataSpec, nats_per_bpd, quantize
from flowtame.engine.devices import (
    check_precision,
    distinct_indices,
    loop_generator,
    random_indices,
    resolve_device,
    take_rows,
    trainable_copy,
    training_rows,
    uniform_noise,
)
from flowtame.engine.loop import EngineConfig, EngineResult, run_for_report, start_engine, state_saver
from flowtame.errors import DataError, InputError, config_error
from flowtame.flows.base import MultiScaleFlow
from flowtame.io import config as io_config
from flowtame.io.checkpoint import Checkpoint, make_provenance, report_header
from flowtame.io.fileio import json_safe, sha256_file
from flowtame.likelihood.evaluation import Tolerances, summarize_evaluation
from flowtame.likelihood.nll import batched_nll, dequantized, nll_nats, pixel_nll
from flowtame.likelihood.statistics import subset_correction
from flowtame.likelihood.threshold import forget_threshold
from flowtame.methods.objective import remember_loss
from flowtame.methods.remember import RememberNormal

REPORT_SCHEMA_VERSION = 1
#: Group names: letters, digits and ``_ . -`` (they become JSON keys and column labels).
GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Targets may be given with this much slack in their sum (they must add up to 1).
TARGET_SUM_SLACK = 1e-6
#: Samples are decoded and classified this many at a time.
MEASURE_BATCH = 256
CLASSIFIER_KINDS = ("latent-logistic", "torchscript")


# ----------------------------------------------------------------------------------------------------------
# Groups and targets


def parse_groups(items: Sequence[str]) -> dict[str, str]:
    """``["NAME=SOURCE", ...]`` -> {name: source} in the order given; at least two distinct groups.

    SOURCE is anything :func:`flowtame.data.images.open_images` opens; it may itself contain ``=``.
    Raises InputError for a missing ``=``, a bad or repeated name, or fewer than two groups.
    """
    groups: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not source:
            raise InputError(f"group {item!r}: expected NAME=PATH (e.g. male=./male)", keys=("group",))
        if not GROUP_NAME.match(name):
            raise InputError(f"group {item!r}: a group name may hold only letters, digits, '_', '.' and '-'",
                             keys=("group",))
        if name in groups:
            raise InputError(f"group {name}: given twice", keys=("group",))
        groups[name] = source
    if len(groups) < 2:
        raise InputError(f"debiasing needs at least two groups (NAME=PATH), got {len(groups)}", keys=("group",))
    return groups


def parse_targets(items: Sequence[str], group_names: Sequence[str]) -> dict[str, float]:
    """``["NAME=FRACTION", ...]`` -> a target fraction for every group, in ``group_names`` order.

    Targets are given for every group, or for all but one (that one gets ``1 - sum``); each must lie in
    (0, 1) and all must add up to 1. Raises InputError (exit 2) naming the problem.
    """
    given: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"target {item!r}: expected NAME=FRACTION (e.g. male=0.5)", keys=("target",))
        if name not in group_names:
            raise InputError(f"target {item!r}: no group named {name!r} (groups: {', '.join(group_names)})",
                             keys=("target",))
        if name in given:
            raise InputError(f"target {name}: given twice", keys=("target",))
        try:
            fraction = float(value)
        except ValueError:
            raise InputError(f"target {item!r}: {value!r} is not a number", keys=("target",)) from None
        if not 0 < fraction < 1:
            raise InputError(f"target {item!r}: a target fraction must lie strictly between 0 and 1",
                             keys=("target",))
        given[name] = fraction
    missing = [name for name in group_names if name not in given]
    total = sum(given.values())
    if len(missing) > 1:
        raise InputError(f"targets: give a target for every group but at most one (missing: "
                         f"{', '.join(missing)})", keys=("target",))
    if len(missing) == 1:
        rest = 1.0 - total
        if not 0 < rest < 1:
            raise InputError(f"targets: the targets given add up to {total:g}, leaving {rest:g} for "
                             f"{missing[0]!r}; targets must lie in (0, 1) and add up to 1", keys=("target",))
        given[missing[0]] = rest
    elif abs(total - 1.0) > TARGET_SUM_SLACK:
        raise InputError(f"targets: the targets add up to {total:g}; they must add up to 1", keys=("target",))
    return {name: given[name] for name in group_names}


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
    concatenated, float32 [B, D]."""
    rows = []
    for start in range(0, images.shape[0], batch_size):
        latents, _ = model.encode(images[start:start + batch_size])
        rows.append(torch.cat([z.flatten(1) for z in latents], 1).float())
    return torch.cat(rows)


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
    def assign(self, model: MultiScaleFlow) -> Tensor:
        """Class of every sample, long [N] on the CPU (0..G-1 a group, G other); the model runs in eval mode."""
        was_training = model.training
        model.eval()
        try:
            out = []
            for start in range(0, self.samples, MEASURE_BATCH):
                x = model.decode_noise([eps[start:start + MEASURE_BATCH] for eps in self.noise])
                out.append(self.classifier.logits(bin_centres(x, self.n_bits)).argmax(1).cpu())
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
    gamma: float = 0.6
    soft_delta: float = 2.0
    gap_scale: float = 0.2
    min_lr_factor: float = 0.25
    check_draw: bool = True
    refresh_size: int = 512
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
        if not 0 < self.held_out_fraction < 1 or not self.classifier_weight_decay >= 0:
            problems.append("held_out_fraction must lie in (0, 1) and classifier_weight_decay be non-negative")
        if problems:
            raise config_error("debiasing", problems, vars(self))


def config_keys() -> set[str]:
    """The keys of a debias config file or layer: :class:`DebiasConfig`'s fields."""
    return {f.name for f in dataclasses.fields(DebiasConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML debias config (:func:`flowtame.io.config.read_config_file`): :func:`config_keys`, with dashes
    or underscores; unknown keys are an error."""
    return io_config.read_config_file(path, config_keys())


def make_config(*layers: Mapping[str, Any]) -> DebiasConfig:
    """Merge key dicts left to right (later wins; None values are skipped) into a DebiasConfig."""
    try:
        return DebiasConfig(**io_config.merge_layers(*layers))
    except TypeError as exc:
        raise InputError(f"bad debiasing configuration: {exc}") from None


@dataclass
class DebiasData:
    """What :class:`DebiasMethod` reads while training.

    ``groups``: uint8 [N_g, C, H, W] per group (on the device); ``remember``: uint8 [R, C, H, W] (CPU, pinned
    on CUDA); ``refresh``: float [S, C, H, W], a fixed remember subset dequantized with fixed noise;
    ``base_mean``, ``base_std``: N_B in nats over the whole remember set; ``subset_correction``: (mean offset
    nats, std ratio) mapping refresh-subset statistics to whole-set ones.
    """

    data_spec: DataSpec
    groups: list[Tensor]
    remember: Tensor
    refresh: Tensor
    base_mean: Tensor
    base_std: Tensor
    subset_correction: tuple[float, float]


def prepare_data(base_model: nn.Module, group_pixels: Sequence[Tensor], remember_pixels: Tensor,
                 remember_keys: Sequence[str], data_spec: DataSpec, config: DebiasConfig, generator: torch.Generator,
                 device: torch.device) -> tuple[DebiasData, np.ndarray]:
    """:class:`DebiasData` for a run, and the base model's remember NLL (nats, float64 [R], one keyed noise
    draw of ``config.eval_seed``; N_B is its normal fit). The refresh subset (``config.refresh_size`` remember
    images) is drawn with ``generator``."""
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
        subset_correction=subset_correction(base_remember_nll, refresh_idx.numpy()))
    return data, base_remember_nll


class DebiasMethod:
    """Taming toward target frequencies (paper Sec. 4.2), for :class:`~flowtame.engine.loop.Engine`.

    Loss of an iteration, from ONE forward/backward over [batch of each group; remember batch] with fresh
    dequantization noise:

    ``L = α L_G + (1-α) L_R``, ``L_G = Σ_g max(w_g, 0) A_g + max(-w_g, 0) H_g`` where
    ``A_g`` = mean NLL of group g's batch in BPD (descending it raises the group's likelihood),
    ``H_g`` = mean ``max(τ - NLL, 0)`` in BPD with the soft threshold ``τ = μ_R + δ_soft σ_R`` (ascending NLL
    until τ, the mirror of A_g with the same gradient scale, 1 per BPD), and
    ``w_g = clip((target_g - frequency_g) / gap_scale, -1, 1)`` from the latest measurement (positive:
    under-represented). ``L_R`` is taming's remember loss with N_B fixed and N_T's value refreshed.

    ``after_step`` re-measures the frequencies every ``measure_every`` iterations (and refreshes μ_R, σ_R on
    the fixed subset, with the base model's subset correction), updates the weights and ``lr_factor`` (the
    engine's learning-rate multiplier, ``clip(max_g |gap_g| / gap_scale, min_lr_factor, 1)``: Adam's steps do
    not shrink with the loss weights, so the step size itself is made proportional to the remaining gap, or
    the frequencies overshoot and oscillate), and reports convergence when every group is within
    ``tolerance`` of its target.
    """

    name = "debias"

    def __init__(self, data: DebiasData, meter: FrequencyMeter, group_names: Sequence[str],
                 targets: Mapping[str, float], config: DebiasConfig, generator: torch.Generator,
                 initial: Mapping[str, Any]):
        self.data = data
        self.meter = meter
        self.group_names = list(group_names)
        self.targets = torch.tensor([targets[n] for n in self.group_names], dtype=torch.float64)
        self.config = config
        self.generator = generator
        self.nats_per_bpd = nats_per_bpd(data.data_spec.num_dims)
        #: N_T: mu_R, sigma_R of the model being changed (refresh with subset correction, resume state).
        self.normal = RememberNormal(data.base_mean, data.base_std, data.subset_correction)
        measured = frequencies_of(initial)
        self._set_frequencies(torch.tensor([measured[n] for n in self.group_names], dtype=torch.float64))
        self.trajectory: list[dict[str, Any]] = [
            {"iteration": 0, **initial, "remember_mean_bpd": float(self.normal.mu) / self.nats_per_bpd}]

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
        return gap.clamp(-1, 1).float().to(self.data.base_mean.device)

    def _lr_factor(self, frequencies: Tensor) -> float:
        """The engine's learning-rate multiplier: ``clip(max_g |target_g - frequency_g| / gap_scale,
        min_lr_factor, 1)`` (NaN frequencies: 1) — steps shrink as the frequencies near their targets."""
        gap = float(torch.nan_to_num((self.targets - frequencies).abs(), nan=float("inf")).max())
        return min(1.0, max(self.config.min_lr_factor, gap / self.config.gap_scale))

    def _batch(self) -> tuple[Tensor, list[int]]:
        """(inputs [G*B + B, C, H, W] with fresh noise, rows per group then remember)."""
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
        return dequantized(pixels, noise, d.data_spec.n_bits), rows

    def loss(self, model: nn.Module, iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        x, rows = self._batch()
        nll = nll_nats(model, x, self.data.data_spec)
        *group_nll, nll_remember = nll.split(rows)
        threshold = forget_threshold(self.normal.mu, self.normal.sigma, self.config.soft_delta)
        loss_groups = nll.new_zeros(())
        for weight, values in zip(self.weights, group_nll, strict=True):
            raise_term = values.mean() / self.nats_per_bpd
            lower_term = torch.relu(threshold - values).mean() / self.nats_per_bpd
            loss_groups = loss_groups + torch.relu(weight) * raise_term + torch.relu(-weight) * lower_term
        batch_mean, batch_std = nll_remember.mean(), nll_remember.std()
        tamed_mean = self.normal.mu + (batch_mean - batch_mean.detach())
        tamed_std = self.normal.sigma + (batch_std - batch_std.detach())
        loss_remember, remember_bpd, kl = remember_loss(nll_remember, self.data.base_mean, self.data.base_std,
                                                        tamed_mean, tamed_std, gamma=self.config.gamma,
                                                        nats_per_bpd=self.nats_per_bpd)
        loss = self.config.alpha * loss_groups + (1 - self.config.alpha) * loss_remember
        metrics = {"loss_groups": loss_groups, "loss_remember": loss_remember, "remember_bpd": remember_bpd,
                   "kl": kl, "max_gap": self.max_gap}
        for name, values in zip(self.group_names, group_nll, strict=True):
            metrics[f"bpd/{name}"] = values.mean() / self.nats_per_bpd
        return loss, metrics

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Re-estimate μ_R, σ_R (nats) of the current model on the fixed refresh subset, corrected."""
        self.normal.update(batched_nll(model, self.data.refresh, self.data.data_spec))

    def after_step(self, model: nn.Module, iteration: int, logged: dict[str, float]) -> bool:
        if (iteration + 1) % self.config.measure_every:
            return False
        table = frequency_table(self.meter.assign(model), self.group_names)
        measured = frequencies_of(table)
        self.refresh(model)
        self.trajectory.append({"iteration": iteration + 1, **table,
                                "remember_mean_bpd": float(self.normal.mu) / self.nats_per_bpd})
        self._set_frequencies(torch.tensor([measured[n] for n in self.group_names], dtype=torch.float64))
        logged["max_gap"] = float(self.max_gap)
        return within_tolerance(measured, dict(zip(self.group_names, self.targets.tolist(), strict=True)),
                                self.config.tolerance)

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.normal.state_tensors(), "frequencies": self.frequencies}

    def state_meta(self) -> dict[str, Any]:
        return {**self.normal.state_meta(), "trajectory": self.trajectory}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.normal.load_state(tensors, meta)
        self._set_frequencies(tensors["frequencies"].cpu().double())
        self.trajectory = meta["trajectory"]


# ----------------------------------------------------------------------------------------------------------
# The job


@dataclass
class DebiasOutcome:
    """The debiased checkpoint (not yet written) and its report."""

    checkpoint: Checkpoint
    report: dict[str, Any]
    #: Writes the finished run's resumable state (to ``state_path``), for when its outputs cannot be written.
    save_state: Callable[[], None] | None = None


def _load_groups(groups: Mapping[str, ImageSet]) -> tuple[list[Tensor], list[list[str]]]:
    pixels, keys = [], []
    for image_set in groups.values():
        p, k = image_set.load_tensor()
        pixels.append(p)
        keys.append(k)
    return pixels, keys


def _check_disjoint(groups: Mapping[str, ImageSet], group_keys: Sequence[Sequence[str]]) -> None:
    """InputError when one image (same preprocessed pixels) is in two groups: debiasing would push it both ways."""
    owner: dict[str, str] = {}
    for (name, image_set), keys in zip(groups.items(), group_keys, strict=True):
        for index, key in enumerate(keys):
            if owner.setdefault(key, name) != name:
                raise InputError(f"{image_set.paths[index]}: in group {name!r} and (the same pixels) in group "
                                 f"{owner[key]!r}; a group's images must be in no other group")


def _preservation(base_model: nn.Module, model: nn.Module, group_names: Sequence[str],
                  group_pixels: Sequence[Tensor], group_keys: Sequence[Sequence[str]], remember_pixels: Tensor,
                  remember_keys: Sequence[str], base_remember_nll: np.ndarray, data_spec: DataSpec,
                  config: DebiasConfig, device: torch.device) -> dict[str, Any]:
    """The evaluation block of :func:`summarize_evaluation` for base vs debiased ("tamed"), one noise draw
    of ``config.eval_seed`` per image, paired between the models.

    Sets: ``remember`` and ``group:NAME`` for each group (role ``group``). summarize_evaluation requires a
    ``forget`` set; all group images together are passed as that and the block is dropped from the result
    (it repeats the groups' figures). Checks: remember QD, remember mean-BPD increase and normality as in
    ``evaluate``; the forgotten-fraction and held-out checks do not apply (groups are moved on purpose) and
    are off.
    """
    table: dict[tuple[str, str], np.ndarray] = {
        ("base", "remember"): base_remember_nll,
        ("tamed", "remember"): pixel_nll(model, remember_pixels, remember_keys, data_spec, config.eval_seed,
                                         device)}
    for name, pixels, keys in zip(group_names, group_pixels, group_keys, strict=True):
        for model_name, m in (("base", base_model), ("tamed", model)):
            table[(model_name, f"group:{name}")] = pixel_nll(m, pixels, keys, data_spec, config.eval_seed, device)
    for model_name in ("base", "tamed"):
        table[(model_name, "forget")] = np.concatenate([table[(model_name, f"group:{n}")] for n in group_names])
    block = summarize_evaluation(table, data_spec.num_dims, seed=config.eval_seed, forget_draws=1,
                                 tolerances=Tolerances(min_forgotten_fraction=None, max_holdout_qd=None))
    del block["sets"]["forget"]
    for name in group_names:
        block["sets"][f"group:{name}"]["role"] = "group"
    return block


def _other_images(other_set: ImageSet, group_keys: Sequence[Sequence[str]]) -> tuple[Tensor, int]:
    """The other images (uint8 [N_o, C, H, W]) without those that are also group images; and how many
    were left out for that reason."""
    pixels, keys = other_set.load_tensor()
    in_groups = {key for keys_of_group in group_keys for key in keys_of_group}
    keep = [i for i, key in enumerate(keys) if key not in in_groups]
    if len(keep) < 2:
        raise DataError(f"{other_set.name}: fewer than 2 images that are in no group; the 'other' class needs "
                        "at least 2")
    return pixels[keep], len(keys) - len(keep)


@dataclass
class _DebiasSets:
    """The loaded images (uint8 [N, C, H, W] each): every group's with its keys, the remember set with its keys,
    the classifier's classes (the groups, then the other images when given) and how many other images were
    left out as group images."""

    group_pixels: list[Tensor]
    group_keys: list[list[str]]
    remember: Tensor
    remember_keys: list[str]
    class_pixels: list[Tensor]
    other_excluded: int


def _load_debias_sets(groups: Mapping[str, ImageSet], remember_set: ImageSet | None,
                      other_set: ImageSet | None) -> _DebiasSets:
    """Load and check the groups (at least 2 images each, disjoint), the remember set (default: the groups'
    images together) and the other images."""
    group_pixels, group_keys = _load_groups(groups)
    for (name, image_set), pixels in zip(groups.items(), group_pixels, strict=True):
        if pixels.shape[0] < 2:
            raise DataError(f"{image_set.name}: group {name!r} has {pixels.shape[0]} image(s); a group needs at "
                            "least 2 (the classifier trains on some and checks on others)")
    _check_disjoint(groups, group_keys)
    if remember_set is not None:
        remember_pixels, remember_keys = remember_set.load_tensor()
    else:
        remember_pixels, remember_keys = torch.cat(group_pixels), [k for keys in group_keys for k in keys]
    if remember_pixels.shape[0] < 2:
        raise DataError(f"{remember_set.name if remember_set else 'the groups'}: the remember set needs at "
                        "least 2 images")
    class_pixels = list(group_pixels)
    other_excluded = 0
    if other_set is not None:
        other_pixels, other_excluded = _other_images(other_set, group_keys)
        class_pixels.append(other_pixels)
    return _DebiasSets(group_pixels, group_keys, remember_pixels, list(remember_keys), class_pixels,
                       other_excluded)


def _group_classifier(base_model: nn.Module, class_pixels: Sequence[Tensor], n_bits: int, config: DebiasConfig,
                      classifier_path: str | Path | None, dev: torch.device) -> GroupClassifier:
    """The latent logistic classifier fitted on ``class_pixels``, or the TorchScript one at ``classifier_path``."""
    if classifier_path is None:
        return fit_latent_classifier(
            base_model, class_pixels, n_bits, held_out_fraction=config.held_out_fraction,
            weight_decay=config.classifier_weight_decay, max_iter=config.classifier_max_iter, seed=config.seed)
    return load_torchscript_classifier(classifier_path, class_pixels, n_bits, dev)


def _debias_report(base: Checkpoint, groups: Mapping[str, ImageSet], targets: Mapping[str, float],
                   config: DebiasConfig, dev: torch.device, sets: _DebiasSets, remember_set: ImageSet | None,
                   other_set: ImageSet | None, classifier: GroupClassifier,
                   before: dict[str, Any]) -> dict[str, Any]:
    """The report up to the run: settings, sets, classifier, measurement and the base model's frequencies."""
    names = list(groups)
    return {
        **report_header(REPORT_SCHEMA_VERSION, {"command": "debias"}, config, dev, base),
        "groups": [{"name": n, "source": s.name, "n": int(p.shape[0]), "target": targets[n],
                    "skipped_files": len(s.skipped)}
                   for (n, s), p in zip(groups.items(), sets.group_pixels, strict=True)],
        "targets": dict(targets),
        "remember": {"source": remember_set.name if remember_set else "union of the groups",
                     "n": int(sets.remember.shape[0])},
        "other": None if other_set is None else {"source": other_set.name,
                                                 "n": int(sets.class_pixels[-1].shape[0]),
                                                 "excluded_group_images": sets.other_excluded},
        "classifier": {**classifier.describe(), "classes": [*names, *(["(other)"] if other_set else [])]},
        "measurement": {"samples": config.samples, "temperature": config.temperature, "seed": config.seed,
                        "tolerance": config.tolerance, "interval": "Wilson 95%"},
        "frequencies": {"before": before},
    }


def debias(base: Checkpoint, groups: Mapping[str, ImageSet], targets: Mapping[str, float], config: DebiasConfig,
           *, remember_set: ImageSet | None = None, other_set: ImageSet | None = None,
           classifier_path: str | Path | None = None, device: str = "auto", state_path: str | Path | None = None,
           resume: bool = False, callback: Callable[[int, dict[str, float]], None] | None = None,
           command: str | None = None) -> DebiasOutcome:
    """Tame ``base`` until the frequency of each group among its samples is within tolerance of its target.

    ``groups``: name -> image set (two or more); ``targets``: name -> fraction for every group (see
    :func:`parse_targets`); ``remember_set``: the images whose NLL distribution must stay as it was (default:
    all the groups' images together); ``other_set``: images of none of the groups (those that are group
    images are left out): the classifier gets an extra class for them, and samples it assigns there are not
    counted, so frequencies are relative among the groups; ``classifier_path``: a TorchScript classifier
    instead of the latent logistic regression. ``command`` goes into the provenance (pass one without
    paths). The base model is never modified. Raises InterruptedRun on Ctrl-C with ``partial_report``
    attached and the resume state written to ``state_path``.
    Steps: load the sets, fit the classifier and measure the base model, build the method and its engine,
    run, measure and report (:func:`_debiased_outcome`).
    """
    names = list(groups)
    if len(names) < 2:
        raise InputError("debiasing needs at least two groups")
    if list(targets) != names:
        raise InputError("debias() needs one target per group, in the groups' order (see parse_targets)")
    data_spec = base.data_spec
    if data_spec is None:
        raise InputError(f"{base.path}: debiasing needs an image model")
    dev = resolve_device(device)
    check_precision(dev, config.precision)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    sets = _load_debias_sets(groups, remember_set, other_set)

    base_model = base.model.to(dev).eval()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    classifier = _group_classifier(base_model, sets.class_pixels, data_spec.n_bits, config, classifier_path, dev)
    seconds["classifier"] = time.perf_counter() - clock
    clock = time.perf_counter()
    meter = FrequencyMeter.draw(base_model, config.samples, config.temperature, config.seed, classifier,
                                data_spec.n_bits)
    before = frequency_table(meter.assign(base_model), names)
    seconds["measurement"] = time.perf_counter() - clock
    if before["assigned"] == 0:
        raise InputError(f"none of the {config.samples} samples of the base model was assigned to a group; "
                         "use more samples or another temperature", keys=("samples", "temperature"))

    data, base_remember_nll = prepare_data(base_model, sets.group_pixels, sets.remember, sets.remember_keys,
                                           data_spec, config, generator, dev)
    model = trainable_copy(base, dev)
    batches = loop_generator(generator, dev, config.seed)
    method = DebiasMethod(data, meter, names, targets, config, batches, before)
    engine = start_engine(model, method, EngineConfig(
        lr=config.lr, warmup=config.warmup, max_iters=config.max_iters, grad_clip=config.grad_clip,
        precision=config.precision, trajectory_every=config.measure_every),
        batches=batches, callback=callback, state_path=state_path, resume=resume)

    report = _debias_report(base, groups, targets, config, dev, sets, remember_set, other_set, classifier, before)
    already = within_tolerance(frequencies_of(before), targets, config.tolerance)
    result = None if already else run_for_report(
        engine, state_path, report,
        lambda: {"trajectory": method.trajectory, "engine_trajectory": engine.trajectory})
    model.eval()
    return _debiased_outcome(base, base_model, model, method, result, report, sets, targets, config, classifier,
                             base_remember_nll, seconds, dev, command=command,
                             save_state=state_saver(engine, state_path))


def _debiased_outcome(base: Checkpoint, base_model: nn.Module, model: nn.Module, method: DebiasMethod,
                      result: EngineResult | None, report: dict[str, Any], sets: _DebiasSets,
                      targets: Mapping[str, float], config: DebiasConfig, classifier: GroupClassifier,
                      base_remember_nll: np.ndarray, seconds: dict[str, float], dev: torch.device, *,
                      command: str | None, save_state: Callable[[], None] | None) -> DebiasOutcome:
    """After the run (``result`` None when the base model was already within tolerance): the frequencies after,
    the check draw, the preservation evaluation, the report's results and the checkpoint with provenance."""
    data_spec = base.data_spec
    assert data_spec is not None
    names = method.group_names
    before = report["frequencies"]["before"]
    iterations = result.iterations if result else 0
    last = method.trajectory[-1]
    if last["iteration"] == iterations:  # measured at the last iteration already (same model, same draw)
        after = {key: last[key] for key in before}
    else:
        after = frequency_table(method.meter.assign(model), names)
    converged = within_tolerance(frequencies_of(after), targets, config.tolerance)
    if config.check_draw:
        clock = time.perf_counter()
        check = FrequencyMeter.draw(base_model, config.samples, config.temperature, config.seed + 1, classifier,
                                    data_spec.n_bits)
        report["frequencies"]["check_draw"] = {
            "seed": config.seed + 1,
            "before": frequency_table(check.assign(base_model), names),
            "after": frequency_table(check.assign(model), names)}
        seconds["check_draw"] = time.perf_counter() - clock
    wall = result.wall_seconds if result else 0.0
    report["frequencies"]["after"] = after
    clock = time.perf_counter()
    evaluation = _preservation(base_model, model, names, sets.group_pixels, sets.group_keys, sets.remember,
                               sets.remember_keys, base_remember_nll, data_spec, config, dev)
    seconds["evaluation"] = time.perf_counter() - clock
    report.update(
        iterations=iterations, converged=converged, interrupted=False, wall_seconds=wall,
        seconds_per_iteration=wall / max(iterations, 1), lr_reductions=result.lr_reductions if result else 0,
        seconds={"taming": wall, **seconds},
        trajectory=method.trajectory, engine_trajectory=result.trajectory if result else [],
        evaluation=evaluation)
    tamed_normal = evaluation["threshold"]["tamed"]
    provenance = make_provenance(
        parent_sha256=base.sha256, command=command if command is not None else "flowtame.jobs.debias.debias()",
        method="debias", hyperparameters=asdict(config), targets=dict(targets),
        group_digests={n: sorted(keys) for n, keys in zip(names, sets.group_keys, strict=True)},
        digest_kind="sha256 of the preprocessed uint8 pixels", classifier=classifier.kind,
        frequencies_before=json_safe(frequencies_of(before)), frequencies_after=json_safe(frequencies_of(after)),
        mu_r_nats=tamed_normal["mu_nats"], sigma_r_nats=tamed_normal["sigma_nats"],
        converged=converged, iterations=iterations)
    debiased = Checkpoint(model=model, architecture=base.architecture, spec=base.spec, data_spec=data_spec,
                          provenance=provenance)
    return DebiasOutcome(checkpoint=debiased, report=report, save_state=save_state)
