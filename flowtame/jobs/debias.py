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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowtame.data.images import ImageSet
from flowtame.data.quantization import DataSpec
from flowtame.engine.devices import (
    loop_generator,
    seeded_run,
    trainable_copy,
)
from flowtame.engine.loop import (
    EngineConfig,
    EngineResult,
    keep_finished_run,
    keys_digest,
    run_for_report,
    start_engine,
    state_saver,
)
from flowtame.errors import DataError, InputError
from flowtame.flows.base import MultiScaleFlow
from flowtame.io import config as io_config
from flowtame.io.checkpoint import Checkpoint, make_provenance, report_header
from flowtame.io.fileio import json_safe, sha256_file
from flowtame.likelihood.evaluation import Tolerances, summarize_evaluation
from flowtame.likelihood.nll import pixel_nll
from flowtame.methods.calibration import calibrate_lr
from flowtame.methods.debias import (
    DebiasConfig,
    DebiasMethod,
    FrequencyMeter,
    GroupClassifier,
    fit_latent_classifier,
    frequencies_of,
    frequency_table,
    load_torchscript_classifier,
    prepare_data,
    within_tolerance,
)
from flowtame.methods.remember import drift_within

REPORT_SCHEMA_VERSION = 1
#: Group names: letters, digits and ``_ . -`` (they become JSON keys and column labels).
GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: The report's ``remember.source`` when no remember set was given (the groups' images together).
UNION_OF_GROUPS = "union of the groups"
#: Targets may be given with this much slack in their sum (they must add up to 1).
TARGET_SUM_SLACK = 1e-6


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
# Settings (DebiasConfig lives with its method, flowtame.methods.debias)


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


def _preservation(base_model: MultiScaleFlow, model: MultiScaleFlow, group_names: Sequence[str],
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


def _group_classifier(base_model: MultiScaleFlow, class_pixels: Sequence[Tensor], n_bits: int, config: DebiasConfig,
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
        "remember": {"source": remember_set.name if remember_set else UNION_OF_GROUPS,
                     "n": int(sets.remember.shape[0])},
        "other": None if other_set is None else {"source": other_set.name,
                                                 "n": int(sets.class_pixels[-1].shape[0]),
                                                 "excluded_group_images": sets.other_excluded},
        "classifier": {**classifier.describe(), "classes": [*names, *(["(other)"] if other_set else [])]},
        "measurement": {"samples": config.samples, "temperature": config.temperature, "seed": config.seed,
                        "tolerance": config.tolerance, "interval": "Wilson 95%"},
        "frequencies": {"before": before},
    }


#: DebiasConfig keys a resumed run may change: ``max_iters`` only says where the loop ends.
RESUMABLE_CHANGES = ("max_iters",)


def debias_resume_settings(config: DebiasConfig, targets: Mapping[str, float], sets: _DebiasSets,
                           other_set: ImageSet | None, classifier_path: str | Path | None) -> dict[str, Any]:
    """What a resumed debias run must share with the run that wrote its state: the config (but
    :data:`RESUMABLE_CHANGES`), the groups' targets in order, digests of each group's, the remember set's and
    the other set's image keys (:func:`~flowtame.engine.loop.keys_digest`) and of the classifier file's bytes."""
    settings: dict[str, Any] = {key: value for key, value in asdict(config).items() if key not in RESUMABLE_CHANGES}
    settings["targets"] = [[name, float(value)] for name, value in targets.items()]
    settings["groups"] = [keys_digest(keys) for keys in sets.group_keys]
    settings["remember"] = keys_digest(sets.remember_keys)
    settings["other"] = None if other_set is None else keys_digest(other_set.keys)
    settings["classifier"] = (None if classifier_path is None
                              else sha256_file(classifier_path)[:16])
    return settings


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
    data_spec = base.image_data("debiasing")
    dev, generator = seeded_run(device, config.precision, config.seed)
    sets = _load_debias_sets(groups, remember_set, other_set)

    base_model = base.model.to(dev).eval()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    classifier = _group_classifier(base_model, sets.class_pixels, data_spec.n_bits, config, classifier_path, dev)
    seconds["classifier"] = time.perf_counter() - clock
    clock = time.perf_counter()
    meter = FrequencyMeter.draw(base_model, config.samples, config.temperature, config.seed, classifier,
                                data_spec.n_bits)
    labels = meter.assign(base_model)
    before = frequency_table(labels, names)
    seconds["measurement"] = time.perf_counter() - clock
    if before["assigned"] == 0:
        raise InputError(f"none of the {config.samples} samples of the base model was assigned to a group; "
                         "use more samples or another temperature", keys=("samples", "temperature"))

    data, base_remember_nll = prepare_data(base_model, sets.group_pixels, sets.remember, sets.remember_keys,
                                           data_spec, config, generator, dev, group_keys=sets.group_keys)
    model = trainable_copy(base, dev)
    batches = loop_generator(generator, dev, config.seed)
    method = DebiasMethod(data, meter, names, targets, config, batches, before, base_model=base_model,
                          initial_screen=frequency_table(labels[:config.screen_samples or None], names))
    if config.step_sigma is not None:  # tame's calibration: lr is a cap, fitted to how sharp the model is
        clock = time.perf_counter()
        method.calibration = calibrate_lr(model, data.refresh, data_spec, lr_cap=config.lr,
                                          step_sigma=config.step_sigma, sigma=float(data.base_std))
        seconds["calibration"] = time.perf_counter() - clock
    engine = start_engine(model, method, EngineConfig(
        lr=method.calibration.lr if method.calibration is not None else config.lr, warmup=config.warmup,
        max_iters=config.max_iters, grad_clip=config.grad_clip,
        precision=config.precision, trajectory_every=config.measure_every),
        batches=batches, callback=callback, state_path=state_path, resume=resume,
        settings=debias_resume_settings(config, targets, sets, other_set, classifier_path))

    report = _debias_report(base, groups, targets, config, dev, sets, remember_set, other_set, classifier, before)
    report["calibration"] = method.calibration.to_dict() if method.calibration is not None else None
    already = within_tolerance(frequencies_of(before), targets, config.tolerance)
    result = None if already else run_for_report(
        engine, state_path, report,
        lambda: {"trajectory": method.trajectory, "engine_trajectory": engine.trajectory})
    model.eval()
    save_state = state_saver(engine, state_path)
    with keep_finished_run(save_state, state_path):
        return _debiased_outcome(base, base_model, model, method, result, report, sets, targets, config,
                                 classifier, base_remember_nll, seconds, dev, command=command, save_state=save_state)


def _debiased_outcome(base: Checkpoint, base_model: MultiScaleFlow, model: MultiScaleFlow, method: DebiasMethod,
                      result: EngineResult | None, report: dict[str, Any], sets: _DebiasSets,
                      targets: Mapping[str, float], config: DebiasConfig, classifier: GroupClassifier,
                      base_remember_nll: np.ndarray, seconds: dict[str, float], dev: torch.device, *,
                      command: str | None, save_state: Callable[[], None] | None) -> DebiasOutcome:
    """After the run (``result`` None when the base model was already within tolerance): the frequencies after,
    the check draw, the preservation evaluation, the report's results and the checkpoint with provenance."""
    data_spec = base.image_data("debiasing")
    names = method.group_names
    before = report["frequencies"]["before"]
    iterations = result.iterations if result else 0
    last = method.trajectory[-1]
    if last["iteration"] == iterations and last["samples"] == method.meter.samples:  # measured in full already
        after = {key: last[key] for key in before}
    else:
        after = frequency_table(method.meter.assign(model), names)
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
    drift = evaluation["sets"]["remember"]["bpd_change_relative"]  # the whole set's, as the guard's bound means
    kept = drift_within(drift, config.max_remember_drift)
    converged = within_tolerance(frequencies_of(after), targets, config.tolerance) and kept
    report.update(
        remember_drift={"bound": config.max_remember_drift, "final": drift, "within_bound": kept,
                        "stop_refusals": method.drift_refusals},
        verdict=method.verdict.to_dict() if method.verdict is not None and not converged else None,
        verdict_message=method.gave_up if not converged else None,
        measurements={"full_draw": method.full_measurements,
                      "screen": len(method.trajectory) - 1 - method.full_measurements,
                      "refreshes": method.normal.refreshes, "overshoots": method.overshoots},
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
