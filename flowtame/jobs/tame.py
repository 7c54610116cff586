"""The tame job as a library call: prepare the sets, run a method through the engine, evaluate, report.

``tame(base, forget_sets, remember_set, config)`` returns the tamed :class:`~flowtame.io.checkpoint.Checkpoint`
(not yet written) and its report; the CLI only adds files, flags and a live view.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from flowtame.data.images import ImageSet, dequantization_noise
from flowtame.data.quantization import nats_per_bpd
from flowtame.engine import distributed
from flowtame.engine.devices import (
    loop_generator,
    place_model,
    seeded_run,
    trainable_copy,
    training_rows,
)
from flowtame.engine.loop import (
    EngineConfig,
    EngineResult,
    keep_finished_run,
    keys_digest,
    run_for_report,
    saved_settings,
    start_engine,
    state_saver,
)
from flowtame.engine.warmup import BackgroundImport
from flowtame.errors import DataError, InputError, config_error
from flowtame.flows.base import MultiScaleFlow, coupling_output_parameters
from flowtame.io import config as io_config
from flowtame.io.checkpoint import Checkpoint, make_provenance, report_header
from flowtame.likelihood.evaluation import nearest_rows
from flowtame.likelihood.nll import dequantized, pixel_nll
from flowtame.likelihood.statistics import subset_correction
from flowtame.likelihood.threshold import default_epsilon, threshold_distance
from flowtame.methods.calibration import calibrate_lr
from flowtame.methods.curvature import remember_metric
from flowtame.methods.lookalikes import hold_figures
from flowtame.methods.objective import FORGET_LOSSES, FORGET_UNITS
from flowtame.methods.solved import SolvedTaming, memory_shortfall
from flowtame.methods.taming import KL_ESTIMATES, METHODS, TamingData, settings_section

REPORT_SCHEMA_VERSION = 1

#: Parameter groups ``freeze`` may hold fixed during taming (see :func:`freeze_parameters`).
FREEZE_RULES = ("coupling-outputs", "none")
#: ``precondition``: Adam's update as it is (``none``), or preconditioned by the remember NLL's curvature
#: (``kfac``, :mod:`flowtame.methods.curvature`; single-process runs: under torchrun the update stays Adam's).
#: The default (None) is the method's own: ``kfac`` for taming, ``none`` for the baselines (run as published).
PRECONDITIONS = ("kfac", "none")
#: How taming steps: adam (Adam's step on the loss, preconditioned per ``precondition``) or solve (the solved
#: step, :class:`~flowtame.methods.solved.SolvedTaming`; the taming method only).
STEPS = ("adam", "solve")
#: Where taming stops (see :func:`stopping_target`): the paper's threshold, or the held-out images' NLL band.
TARGETS = ("threshold", "holdout")


@dataclass
class TameConfig:
    """Every knob of ``flowtame tame``; each is a flag and a YAML key (flags win over the file).

    NLL statistics are in nats; ``delta`` and ``epsilon`` in remember standard deviations (sigma_R).
    ``method_settings``: the settings of the methods that have their own (section name -> the method's
    settings object, e.g. ``selective_amnesia`` -> :class:`~flowtame.methods.baselines.SelectiveAmnesiaSettings`),
    built from mappings and filled with defaults here; :func:`make_config` also accepts their flat keys.
    """

    method: str = "taming"
    # threshold: the paper's mu_R + delta*sigma_R (suppression); holdout: the held-out images' NLL band
    target: str = "threshold"
    delta: float = 4.0
    epsilon: float | None = None
    alpha: float = 0.15
    gamma: float = 0.0
    lr: float = 2e-4
    step_sigma: float | None = 2.0
    anchor: float = 0.2
    anchor_shift: float = 2.0
    # None -> the method's own: kfac for taming, none for the baselines (TamingMethod.preconditioned)
    precondition: str | None = None
    # adam: Adam's step on the loss; solve: the solved step (docs/method.md "The solved step"); None (the
    # default, resolved by tame()) -> solve for the taming method with its anchor on in one process, adam
    # otherwise (the baselines, the paper preset's anchor-free loss, runs under torchrun) and, with a warning,
    # when the solved step's rows would not fit in the device's free memory; a resumed run keeps its state's step
    step: str | None = None
    lookalikes: int = 16
    lookalike_qd: float = 0.018
    remember_qd: float = 0.001
    batch_size: int = 32
    max_iters: int = 800
    refresh_every: int = 10
    refresh_size: int = 256
    warmup: int = 20
    grad_clip: float | None = None
    forget_loss: str = "huber"
    forget_unit: str = "bpd"
    kl_estimate: str = "refreshed"
    threshold_gradient: bool = True
    settle_decay: float = 0.97
    stop_margin: float = 0.0
    # the stopping band's upper edge in epsilons: None -> 2 for the threshold target (past the threshold is
    # forgotten), 1 for the holdout target (the held-out images' band, both edges); 1 is the paper's Eq. 10
    upper_edge: float | None = None
    forget_draws: int = 8
    max_remember_drift: float | None = None
    max_remember_jump: float | None = 0.25
    freeze: str | None = None
    seed: int = 0
    eval_seed: int = 0
    precision: str = "fp32"
    trajectory_every: int = 10
    method_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epsilon is None:
            self.epsilon = default_epsilon(self.delta)
        problems = [f"{name} must be a finite number" for name, value in vars(self).items()
                    if isinstance(value, float) and not math.isfinite(value)]
        problems += self._build_method_settings()
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}")
        if self.forget_loss not in FORGET_LOSSES:
            problems.append(f"forget_loss must be one of {', '.join(FORGET_LOSSES)}")
        if self.forget_unit not in FORGET_UNITS:
            problems.append(f"forget_unit must be one of {', '.join(FORGET_UNITS)}")
        if self.target not in TARGETS:
            problems.append(f"target must be one of {', '.join(TARGETS)}")
        if self.kl_estimate not in KL_ESTIMATES:
            problems.append(f"kl_estimate must be one of {', '.join(KL_ESTIMATES)}")
        if not 0 <= self.alpha <= 1 or not 0 <= self.gamma <= 1:
            problems.append("alpha and gamma must lie in [0, 1]")
        if self.delta <= 0 or self.epsilon <= 0:
            problems.append("delta and epsilon must be positive")
        if self.lr <= 0 or self.batch_size < 2 or self.max_iters < 1 or self.refresh_every < 1:
            problems.append("lr must be positive, batch_size >= 2, max_iters and refresh_every >= 1")
        if not 0 < self.settle_decay <= 1:
            problems.append("settle_decay must lie in (0, 1]")
        if self.refresh_size < 2:
            problems.append("refresh_size must be at least 2")
        if not 0 <= self.stop_margin < self.epsilon:
            problems.append("stop_margin must lie in [0, epsilon)")
        if self.upper_edge is None:
            self.upper_edge = 2.0 if self.target == "threshold" else 1.0
        if self.upper_edge < 1:
            problems.append("upper_edge must be at least 1 (in epsilons)")
        if self.max_remember_drift is None and self.method in METHODS:
            method = SolvedTaming if self.solving else METHODS[self.method]
            self.max_remember_drift = method.default_max_remember_drift
        for guard in ("max_remember_drift", "max_remember_jump"):
            if getattr(self, guard) == 0:
                setattr(self, guard, None)  # 0 turns the guard off
            if getattr(self, guard) is not None and getattr(self, guard) < 0:
                problems.append(f"{guard} must be positive (0 turns the guard off)")
        if self.step_sigma == 0:
            self.step_sigma = None  # 0 turns the calibration off: lr is used as given
        if self.step_sigma is not None and self.step_sigma < 0:
            problems.append("step_sigma must be positive (0 turns the calibration off)")
        if self.anchor < 0:
            problems.append("anchor must be at least 0 (0 turns the anchor off)")
        if self.anchor_shift < 0:
            problems.append("anchor_shift must be at least 0 (0 turns the shift term off)")
        if self.precondition is None and self.method in METHODS:
            self.precondition = "kfac" if METHODS[self.method].preconditioned else "none"
        if self.precondition is not None and self.precondition not in PRECONDITIONS:
            problems.append(f"precondition must be one of {', '.join(PRECONDITIONS)}")
        elif self.precondition != "none" and self.method in METHODS and not METHODS[self.method].preconditioned:
            problems.append(f"precondition {self.precondition} applies to the taming method only "
                            f"({self.method} runs as published)")
        if self.step is not None and self.step not in STEPS:
            problems.append(f"step must be one of {', '.join(STEPS)}")
        elif self.step == "solve" and self.method != "taming":
            problems.append(f"step solve applies to the taming method only ({self.method} runs as published)")
        elif self.step == "solve" and self.anchor <= 0:
            problems.append("step solve holds the look-alikes at their base NLL: it needs the anchor on (anchor > 0)")
        if self.lookalikes < 0:
            problems.append("lookalikes must be at least 0 (0: none)")
        if self.lookalike_qd < 0:
            problems.append("lookalike_qd must be at least 0 (0 turns the look-alikes' stop check off)")
        if self.remember_qd < 0:
            problems.append("remember_qd must be at least 0 (0 turns the remember set's stop check off)")
        if self.forget_draws < 1:
            problems.append("forget_draws must be at least 1")
        if self.freeze is None and self.method in METHODS:
            self.freeze = METHODS[self.method].default_freeze
        if self.freeze is not None and self.freeze not in FREEZE_RULES:
            problems.append(f"freeze must be one of {', '.join(FREEZE_RULES)}")
        if problems:
            raise config_error("taming", problems, vars(self))

    @property
    def solving(self) -> bool:
        """Whether the config asks for the solved step: ``step`` solve, or the default (None) for the taming method
        with its anchor on (:func:`tame` still takes Adam's under torchrun, and for a defaulted step whose rows
        would not fit in memory)."""
        return self.step == "solve" or (self.step is None and self.method == "taming" and self.anchor > 0)

    def _build_method_settings(self) -> list[str]:
        """Replace each section of ``method_settings`` by its method's settings object (defaults for a missing
        one); returns the problems found (the settings classes raise their own InputError for bad values)."""
        classes = _settings_classes()
        problems = [f"method_settings: no method has settings {section!r}"
                    for section in sorted(set(self.method_settings) - set(classes))]
        for section, cls in classes.items():
            value = self.method_settings.get(section, {})
            if isinstance(value, cls):
                continue
            if not isinstance(value, Mapping):
                problems.append(f"{section} must be a mapping of settings")
                continue
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                problems.append(f"{section}: unknown key(s) {', '.join(unknown)}")
                continue
            self.method_settings[section] = cls(**value)
        return problems


def _settings_classes() -> dict[str, Any]:
    """Config section -> settings class, for every registered method that has settings of its own."""
    return {settings_section(name): cls.settings_class for name, cls in METHODS.items()
            if cls.settings_class is not None}


def _flat_keys() -> dict[str, tuple[str, str]]:
    """Flat config keys of the methods' settings (e.g. ``sa_lambda``) -> (section, field)."""
    return {flat: (section, name) for section, cls in _settings_classes().items()
            for flat, name in getattr(cls, "FLAT_KEYS", {}).items()}


def config_keys() -> set[str]:
    """Every key a tame config file or layer may hold: TameConfig's fields, the methods' sections and their
    flat keys."""
    return ({f.name for f in dataclasses.fields(TameConfig)} - {"method_settings"}) | set(_settings_classes()) \
        | set(_flat_keys())


def _nest_method_keys(layer: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A config layer split into its TameConfig keys and its methods' settings (section -> field -> value),
    flat keys and sections alike; None values (flags not given) are dropped."""
    flat, sections = _flat_keys(), _settings_classes()
    plain: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in layer.items():
        if value is None:
            continue
        if key in flat:
            section, name = flat[key]
            nested.setdefault(section, {})[name] = value
        elif key in sections and isinstance(value, Mapping):
            nested.setdefault(key, {}).update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            plain[key] = value
    return plain, nested


def preset(name: str) -> dict[str, Any]:
    """The keys of a shipped preset (``paper``: the authors' exact loss and hyperparameters)."""
    path = resources.files("flowtame") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"unknown preset {name!r} (known: paper)")
    return yaml.safe_load(path.read_text())


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML tame config (:func:`flowtame.io.config.read_config_file`): keys of :func:`config_keys`,
    with dashes or underscores; unknown keys are an error."""
    return io_config.read_config_file(path, config_keys())


def make_config(*layers: Mapping[str, Any]) -> TameConfig:
    """Merge key dicts left to right (later wins, per key and per method setting; None values are skipped)
    into a TameConfig. A method's settings may come as flat keys (``sa_lambda``) or as its section
    (``selective_amnesia: {ewc_lambda: ...}``)."""
    merged: dict[str, Any] = {}
    settings: dict[str, dict[str, Any]] = {}
    for layer in layers:
        plain, nested = _nest_method_keys(layer)
        merged.update(plain)
        for section, values in nested.items():
            settings.setdefault(section, {}).update(values)
    try:
        return TameConfig(**merged, method_settings=settings)
    except TypeError as exc:
        raise InputError(f"bad taming configuration: {exc}") from None


@dataclass
class TameOutcome:
    """The tamed checkpoint (not yet written), its report, and the per-image NLLs (nats) it computed,
    keyed like ``(model, set)`` with model "base"|"tamed" and set "remember"|"forget", so an evaluation
    can reuse them instead of recomputing."""

    checkpoint: Checkpoint
    report: dict[str, Any]
    nll: dict[tuple[str, str], np.ndarray]
    #: Writes the finished run's resumable state (to ``state_path``), for when its outputs cannot be written.
    save_state: Callable[[], None] | None = None


def _load_forget(forget_sets: Sequence[ImageSet]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    pixels, requests, keys = [], [], []
    for index, image_set in enumerate(forget_sets):
        p, k = image_set.load_tensor()
        pixels.append(p)
        requests.append(torch.full((p.shape[0],), index, dtype=torch.long))
        keys.extend(k)
    return torch.cat(pixels), torch.cat(requests), keys


@dataclass
class _TamingSets:
    """The loaded sets: forget uint8 [F,C,H,W] with the source index [F] of each image and its keys, the
    remember set uint8 [R,C,H,W] (forget images left out) with its keys, and how many were left out."""

    forget: torch.Tensor
    forget_request: torch.Tensor
    forget_keys: list[str]
    remember: torch.Tensor
    remember_keys: list[str]
    excluded: int


def _load_sets(forget_sets: Sequence[ImageSet], remember_set: ImageSet) -> _TamingSets:
    """Load the forget and remember images; remember images that are also forget images are left out."""
    forget_pixels, forget_request, forget_keys = _load_forget(forget_sets)
    remember_pixels, remember_keys = remember_set.load_tensor()
    forget_key_set = set(forget_keys)
    keep = [i for i, k in enumerate(remember_keys) if k not in forget_key_set]
    excluded = len(remember_keys) - len(keep)
    if excluded:
        warnings.warn(f"{remember_set.name}: {excluded} remember image(s) are also forget images "
                      f"(same pixels); excluded from the remember set", stacklevel=3)
        remember_pixels = remember_pixels[keep]
        remember_keys = [remember_keys[i] for i in keep]
    if remember_pixels.shape[0] < 2:
        raise DataError(f"{remember_set.name}: the remember set needs at least 2 images")
    return _TamingSets(forget_pixels, forget_request, forget_keys, remember_pixels, remember_keys, excluded)


def _taming_data(sets: _TamingSets, base_remember_nll: np.ndarray, remember_nll: Callable[[Any], np.ndarray],
                 config: TameConfig, generator: torch.Generator, dev: torch.device, data_spec: Any,
                 base: Checkpoint) -> tuple[TamingData, tuple[float, float]]:
    """The method's data on ``dev`` (the refresh subset drawn from ``generator``) and the subset correction;
    with the anchor on, the ``config.lookalikes`` remember images nearest the forget set under ``base``."""
    def on_evaluation_noise(rows: torch.Tensor) -> torch.Tensor:
        """Remember images ``rows`` [n] dequantized with the evaluation's keyed noise, on ``dev``."""
        noise = dequantization_noise([sets.remember_keys[i] for i in rows.tolist()], config.eval_seed,
                                     tuple(sets.remember.shape[1:]))
        return dequantized(sets.remember[rows], noise, data_spec.n_bits).to(dev)

    lookalikes = lookalike_check = None
    if config.anchor > 0 and config.lookalikes > 0 and METHODS[config.method].anchored:
        lookalikes = nearest_rows(base, sets.forget, sets.remember, config.lookalikes, device=dev)
        lookalike_check = on_evaluation_noise(lookalikes)
    n_refresh = min(config.refresh_size, sets.remember.shape[0])
    refresh_idx = torch.randperm(sets.remember.shape[0], generator=generator)[:n_refresh].sort().values
    data = TamingData(
        data_spec=data_spec,
        forget=sets.forget.to(dev),
        forget_request=sets.forget_request.to(dev),
        forget_check_noise=torch.stack([
            dequantization_noise(sets.forget_keys, config.eval_seed, tuple(sets.forget.shape[1:]), draw)
            for draw in range(config.forget_draws)]).to(dev),
        remember=training_rows(sets.remember, dev),
        refresh=on_evaluation_noise(refresh_idx),
        base_mean=torch.tensor(float(base_remember_nll.mean()), device=dev),
        base_std=torch.tensor(float(base_remember_nll.std(ddof=1)), device=dev),
        whole_remember_nll=partial(_whole_remember_nll, sets, remember_nll),
        lookalikes=lookalikes,
        lookalike_check=lookalike_check,
        base_remember_nll=torch.from_numpy(base_remember_nll),
        refresh_rows=refresh_idx,
        evaluation_inputs=on_evaluation_noise,
    )
    return data, subset_correction(base_remember_nll, refresh_idx.numpy())


def _whole_remember_nll(sets: _TamingSets, remember_nll: Callable[..., np.ndarray], model: torch.nn.Module, *,
                        known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """NLL (nats, float64 [R], CPU) of the whole remember set under ``model`` on the evaluation's keyed noise
    (``remember_nll``: :func:`pixel_nll` bound to the set). ``known``: (rows [S], their NLL [S]) already measured
    under these weights on the same noise (a refresh's), not measured again."""
    if known is None:
        return torch.from_numpy(remember_nll(model))
    rows, values = known
    nll = torch.empty(sets.remember.shape[0], dtype=torch.float64)
    nll[rows] = values.detach().double().cpu()
    others = np.setdiff1d(np.arange(sets.remember.shape[0]), rows.numpy())
    if others.size:
        nll[torch.from_numpy(others)] = torch.from_numpy(remember_nll(
            model, pixels=sets.remember[others], keys=[sets.remember_keys[i] for i in others]))
    return nll


def _forget_requests(forget_sets: Sequence[ImageSet], forget_request: torch.Tensor, d_final: np.ndarray,
                     epsilon: float) -> list[dict[str, Any]]:
    """The report's per-source block: each forget source's final distances d [F] and whether it is forgotten."""
    requests = []
    for index, image_set in enumerate(forget_sets):
        mask = forget_request.numpy() == index
        requests.append({
            "name": image_set.name, "n": int(mask.sum()),
            "d_min": float(d_final[mask].min()), "d_max": float(d_final[mask].max()),
            "max_abs_d": float(np.abs(d_final[mask]).max()),
            "forgotten_fraction": float((d_final[mask] > -epsilon).mean()),
            "reached_threshold": bool((np.abs(d_final[mask]) < epsilon).all()),
        })
    return requests


def _tail_rows(method: Any) -> int:
    """How many remember images refused stops added to the anchor's rows (the remember set's quantile hold; with
    the solved step, its normality hold too; 0 for the baselines)."""
    rows = getattr(method, "tail_rows", None)
    return 0 if rows is None else int(rows.numel())


def _normal_block(mean: float, std: float, per_bpd: float) -> dict[str, float]:
    return {"mean_nats": mean, "std_nats": std, "mean_bpd": mean / per_bpd, "std_bpd": std / per_bpd}


#: TameConfig keys of Adam's step (its loss terms, learning rate, schedule and batches), unused by the solved step
ADAM_STEP_KEYS = ("alpha", "gamma", "lr", "step_sigma", "anchor_shift", "precondition", "batch_size",
                  "refresh_every", "warmup", "grad_clip", "forget_loss", "forget_unit", "kl_estimate",
                  "threshold_gradient", "settle_decay")


def _unused_adam_settings(config: TameConfig) -> list[str]:
    """The :data:`ADAM_STEP_KEYS` a solved-step ``config`` sets away from their defaults, and its ``precision``
    when not fp32 (the solved step computes in the model's own precision); none for Adam's step."""
    if config.step != "solve":
        return []
    defaults = TameConfig()
    unused = [key for key in ADAM_STEP_KEYS if getattr(config, key) != getattr(defaults, key)]
    return unused + (["precision"] if config.precision != "fp32" else [])


def _resolved_step(config: TameConfig, *, resume: bool, state_path: str | Path | None) -> tuple[TameConfig, bool]:
    """``config`` with its step resolved (``TameConfig.step``'s comment), and whether that step was asked for (by
    the config, or by the state a resumed run continues): under torchrun Adam's plain step (a warning when the
    solved step was asked for); a defaulted step is the resumed state's, else the solved step where
    :attr:`TameConfig.solving`, else Adam's."""
    if (config.precondition != "none" or config.step != "adam") and distributed.current().active:
        # one forward with gradient per iteration (DDP): Adam's step, unpreconditioned, with its own drift bound
        if config.step == "solve":  # (asked for; the default goes to Adam's step without a word)
            warnings.warn("under torchrun the step is Adam's (the solved step runs in one process)", stacklevel=3)
        return _with_step(config, "adam", precondition="none"), config.step is not None
    if config.step is not None:
        return config, True
    recorded = (saved_settings(state_path) or {}).get("step") if resume and state_path is not None else None
    if recorded in STEPS:
        return _with_step(config, str(recorded)), True
    return _with_step(config, "solve" if config.solving else "adam"), False


def _step_that_fits(config: TameConfig, data: TamingData, values: int, device: torch.device,
                    asked: bool) -> TameConfig:
    """``config`` once its solved step's rows are sized against ``device``'s free memory
    (:func:`~flowtame.methods.solved.memory_shortfall` over ``values`` trained values): too large, an ``asked``
    step is refused (InputError about ``step``), a defaulted one becomes Adam's with a warning; then a warning
    naming Adam's settings a solved run sets (:func:`_unused_adam_settings`)."""
    shortfall = memory_shortfall(data, values, device) if config.step == "solve" else None
    if shortfall is not None and asked:
        raise InputError(f"{shortfall}: use step adam, or fewer forget images per run", keys=("step",))
    if shortfall is not None:
        warnings.warn(f"{shortfall}: taking Adam's step", stacklevel=3)
        config = _with_step(config, "adam")
    unused = _unused_adam_settings(config)
    if unused:
        warnings.warn(f"{', '.join(unused)} set: the solved step does not use Adam's settings (step adam does)",
                      stacklevel=3)
    return config


def _with_step(config: TameConfig, step: str, **changes: Any) -> TameConfig:
    """A copy of the validated ``config`` taking ``step`` (and ``changes``), not validated again (a guard turned off
    stays off); with Adam's step, Adam's drift bound where the solved step's default stood."""
    out = copy.copy(config)
    if step == "adam" and config.solving and config.max_remember_drift == SolvedTaming.default_max_remember_drift:
        out.max_remember_drift = METHODS[config.method].default_max_remember_drift
    out.step = step
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def _build_method(config: TameConfig, data: TamingData, *, delta: float, epsilon: float,
                  correction: tuple[float, float], batches: torch.Generator, setup_generator: torch.Generator,
                  base_model: MultiScaleFlow) -> Any:
    """The configured method (``config.method`` in :data:`METHODS`; with ``step: solve``,
    :class:`~flowtame.methods.solved.SolvedTaming`) on ``data``, drawing from ``batches``."""
    cls = SolvedTaming if config.step == "solve" else METHODS[config.method]
    return cls(data, config, delta=delta, epsilon=epsilon, generator=batches, setup_generator=setup_generator,
               subset_correction=correction, base_model=base_model)


def tame(base: Checkpoint, forget_sets: Sequence[ImageSet], remember_set: ImageSet, config: TameConfig, *,
         device: str = "auto",
         state_path: str | Path | None = None, resume: bool = False,
         callback: Callable[[int, dict[str, float]], None] | None = None,
         target_holdout: Sequence[ImageSet] = (), command: str | None = None) -> TameOutcome:
    """Tame ``base`` so every image of every forget set reaches the threshold; returns model and report.

    With ``config.target == "holdout"`` the stopping band is the held-out images' NLL band instead
    (``target_holdout``, required then; :func:`stopping_target`). ``command``: the command line to record in
    the provenance (the caller redacts it; None: not recorded).

    The base checkpoint's model is never modified (a copy is trained). Raises InterruptedRun on Ctrl-C
    (its ``partial_report`` set and the resume state written to ``state_path``).
    Steps: load the sets, measure the base model, build the method and its engine, run, measure and report
    (:func:`_tamed_outcome`).
    """
    if not forget_sets:
        raise InputError("taming needs at least one forget source", keys=("forget",))
    data_spec = base.image_data("taming")
    config, step_asked = _resolved_step(config, resume=resume, state_path=state_path)
    dev, generator = seeded_run(device, config.precision, config.seed)
    torch_func = BackgroundImport() if config.step == "solve" or config.precondition == "kfac" else None
    sets = _load_sets(forget_sets, remember_set)

    base_model = place_model(base.model, dev).eval()
    remember_nll = partial(pixel_nll, pixels=sets.remember, keys=sets.remember_keys, data_spec=data_spec,
                           seed=config.eval_seed, device=dev)
    base_remember_nll = remember_nll(base_model)
    base_forget_nll = pixel_nll(base_model, sets.forget, sets.forget_keys, data_spec, config.eval_seed, dev,
                                draws=config.forget_draws)
    delta, epsilon, target, base_holdout_nll = stopping_target(base, base_remember_nll, target_holdout, config,
                                                               device=dev)
    data, correction = _taming_data(sets, base_remember_nll, remember_nll, config, generator, dev, data_spec, base)
    data.base_forget_nll = torch.from_numpy(base_forget_nll)

    model = trainable_copy(base, dev)
    frozen = freeze_parameters(model, config.freeze)
    batches = loop_generator(generator, dev, config.seed)
    parameters = dict(model.named_parameters())
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    config = _step_that_fits(config, data, sum(parameters[name].numel() for name in trained), dev, step_asked)
    method = _build_method(config, data, delta=delta, epsilon=epsilon, correction=correction, batches=batches,
                           setup_generator=generator, base_model=base_model)
    # (TameConfig refuses precondition kfac for a method that is not preconditioned)
    if torch_func is not None:
        torch_func.join()  # (the metric's per-image gradients are the run's first torch.func transform)
    if config.step == "solve" or config.precondition == "kfac":
        method.metric = remember_metric(base_model, data.remember, data.refresh_rows, data_spec, trained,
                                        config.seed, damping=method.metric_damping, images=method.metric_images)
    calibration = None
    if config.step_sigma is not None and config.method == "taming" and config.step == "adam":
        calibration = calibrate_lr(model, data.refresh, data_spec, lr_cap=config.lr, step_sigma=config.step_sigma,
                                   sigma=float(base_remember_nll.std(ddof=1)))
        method.calibration = calibration
    engine = start_engine(model, method, EngineConfig(
        lr=calibration.lr if calibration is not None else config.lr, warmup=config.warmup,
        max_iters=config.max_iters, grad_clip=config.grad_clip,
        precision=config.precision, trajectory_every=config.trajectory_every),
        batches=batches, callback=callback, state_path=state_path, resume=resume,
        settings=resume_settings(config, sets, target_holdout))

    report: dict[str, Any] = {
        **report_header(REPORT_SCHEMA_VERSION, {"kind": "tame", "method": config.method}, config, dev, base),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "unused_settings": list(ADAM_STEP_KEYS) if config.step == "solve" else [],
        "target": target,
        "frozen": {"rule": config.freeze, "tensors": len(frozen),
                   "values": sum(parameters[name].numel() for name in frozen)},
        "sets": {"forget": [s.name for s in forget_sets], "remember": remember_set.name,
                 "remember_n": int(sets.remember.shape[0]), "remember_excluded_duplicates": sets.excluded,
                 "skipped_files": {s.name: len(s.skipped) for s in (*forget_sets, remember_set)}},
    }
    result = run_for_report(engine, state_path, report, lambda: {"trajectory": engine.trajectory})
    model.eval()
    nll = {("base", "remember"): base_remember_nll, ("base", "forget"): base_forget_nll}
    if base_holdout_nll is not None:
        nll[("base", "holdout")] = base_holdout_nll
    save_state = state_saver(engine, state_path)
    with keep_finished_run(save_state, state_path):
        return _tamed_outcome(base, model, method, result, report, nll, sets, forget_sets, remember_nll, config,
                              command=command, delta=delta, epsilon=epsilon, dev=dev, save_state=save_state)


#: TameConfig keys a resumed run may change (:func:`resume_settings`): ``trajectory_every`` only thins the log;
#: ``max_iters`` only says where the loop ends (a run stopped at its budget may be resumed for more), and besides
#: the early pace warning at iteration 50 (:meth:`~flowtame.methods.taming.TamingMethod.check_progress`) no step,
#: loss or stop depends on it.
RESUMABLE_CHANGES = ("trajectory_every", "max_iters")


def resume_settings(config: TameConfig, sets: _TamingSets, holdout: Sequence[ImageSet]) -> dict[str, Any]:
    """What a resumed tame run must share with the run that wrote its state: the resolved config (``precondition``,
    ``upper_edge``, ``epsilon``, ``freeze``, ... as validation filled them; the run's own method's settings
    section; not :data:`RESUMABLE_CHANGES`) and digests of the images in their order (the first 16 hex digits of
    sha256 over their keys): the forget and remember images (the rows the method's state indexes) and, with
    ``target: holdout``, the held-out images that set the stopping band. Digests, not the band's measured
    values, so a run resumed on another device is not refused for a rounding difference."""
    settings = {key: value for key, value in asdict(config).items()
                if key not in RESUMABLE_CHANGES and key != "method_settings"}
    section = settings_section(config.method)
    if section in config.method_settings:
        settings[section] = asdict(config.method_settings[section])
    images = {"forget": sets.forget_keys, "remember": sets.remember_keys}
    if config.target == "holdout":
        images["holdout"] = [key for image_set in holdout for key in image_set.keys]
    for name, keys in images.items():
        settings[name] = keys_digest(keys)
    return settings


def _tamed_outcome(base: Checkpoint, model: MultiScaleFlow, method: Any, result: EngineResult,
                   report: dict[str, Any], nll: dict[tuple[str, str], np.ndarray], sets: _TamingSets,
                   forget_sets: Sequence[ImageSet], remember_nll: Callable[[Any], np.ndarray], config: TameConfig,
                   *, command: str | None, delta: float, epsilon: float, dev: torch.device,
                   save_state: Callable[[], None] | None) -> TameOutcome:
    """After the run: the tamed model's NLLs, the report's results and the tamed checkpoint with provenance.
    ``nll`` holds the base model's NLLs (remember, forget, and holdout when measured)."""
    data_spec = base.image_data("taming")
    if result.converged and method.final_remember_nll is not None:  # the stop's whole-set pass, same weights
        tamed_remember_nll = method.final_remember_nll.numpy()
    else:
        tamed_remember_nll = remember_nll(model)
    if result.converged and getattr(method, "final_forget_nll", None) is not None:  # the stop's check draws
        tamed_forget_nll = method.final_forget_nll.numpy()
    else:
        tamed_forget_nll = pixel_nll(model, sets.forget, sets.forget_keys, data_spec, config.eval_seed, dev,
                                     draws=config.forget_draws)
    base_remember_nll = nll[("base", "remember")]
    base_mean, base_std = float(base_remember_nll.mean()), float(base_remember_nll.std(ddof=1))
    mu_t, sigma_t = float(tamed_remember_nll.mean()), float(tamed_remember_nll.std(ddof=1))
    d_final = threshold_distance(tamed_forget_nll, mu_t, sigma_t, delta)
    per_bpd = nats_per_bpd(data_spec.num_dims)
    converged = bool(result.converged)
    report.update(
        iterations=result.iterations, converged=converged, interrupted=False,
        wall_seconds=result.wall_seconds,
        seconds_per_iteration=result.wall_seconds / max(result.iterations, 1),
        lr_reductions=result.lr_reductions, refreshes=method.refreshes,
        early_refreshes=getattr(method, "early_refreshes", 0), confirmations=method.confirmations,
        drift_refusals=method.drift_refusals, shift_factor=getattr(method, "shift_factor", 0.0),
        **hold_figures(getattr(method, "quantile_holds", [])), anchor_factor=getattr(method, "anchor_factor", 1.0),
        tail_rows=_tail_rows(method), normality_refusals=getattr(method, "normality_refusals", 0),
        whole_set_refusals=method.whole_set_refusals, progress_warning=getattr(method, "progress_warning", None),
        remember_normal={"base": _normal_block(base_mean, base_std, per_bpd),
                         "tamed": _normal_block(mu_t, sigma_t, per_bpd)},
        requests=_forget_requests(forget_sets, sets.forget_request, d_final, epsilon), trajectory=result.trajectory)
    provenance = make_provenance(
        command=command, parent_sha256=base.sha256, method=config.method,
        hyperparameters=asdict(config),
        forget_digests=[sorted(k for k, r in zip(sets.forget_keys, sets.forget_request.tolist(), strict=True)
                               if r == i) for i in range(len(forget_sets))],
        digest_kind="sha256 of the preprocessed uint8 pixels",
        mu_r_nats=mu_t, sigma_r_nats=sigma_t, converged=converged, iterations=result.iterations)
    tamed = Checkpoint(model=model, architecture=base.architecture, spec=base.spec, data_spec=data_spec,
                       provenance=provenance)
    table = {("base", "remember"): base_remember_nll, ("tamed", "remember"): tamed_remember_nll,
             ("base", "forget"): nll[("base", "forget")], ("tamed", "forget"): tamed_forget_nll}
    if ("base", "holdout") in nll:
        table[("base", "holdout")] = nll[("base", "holdout")]
    return TameOutcome(checkpoint=tamed, report=report, nll=table, save_state=save_state)


def freeze_parameters(model: torch.nn.Module, rule: str | None) -> list[str]:
    """Stop training the parameters ``rule`` names (``requires_grad`` off); returns their names.

    ``coupling-outputs``: the zero-initialized last layer of every coupling network. With Adam every
    weight moves by about the learning rate per step, so a layer of large fan-in (a Glow coupling's output
    convolution sums 9 x hidden inputs) shifts the coupling's output for every image at once: on the
    embedded Glow the remember BPD jumped 4-7% within the first 20 iterations and the next ~60 went to
    undoing it. Holding those layers fixed and tuning the hidden layers, actnorms, 1x1 convolutions and
    priors converged in 136-144 instead of 221-260 iterations at equal or lower held-out collateral
    (docs/benchmarks.md). ``none`` (or None): train everything (the paper).
    """
    names = coupling_output_parameters(model) if rule == "coupling-outputs" else []
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def taming_evaluation(base: Checkpoint, outcome: TameOutcome, holdout_sets: dict[str, ImageSet],
                      config: TameConfig, *, device: str = "auto") -> dict[str, Any]:
    """The same evaluation block ``flowtame evaluate`` writes, reusing the NLLs ``tame`` already computed.

    Only the holdout sets are scored here (both models, paired noise of ``config.eval_seed``).
    """
    from flowtame.likelihood.evaluation import summarize_evaluation
    from flowtame.likelihood.nll import compute_nll

    table = {key: value for key, value in outcome.nll.items() if key[1] in ("remember", "forget")}
    for name, image_set in holdout_sets.items():
        for model_name, model in (("base", base.model), ("tamed", outcome.checkpoint.model)):
            table[(model_name, name)] = compute_nll(model, image_set, seed=config.eval_seed, device=device).nll
    outcome.nll.update({key: value for key, value in table.items() if key[1] in holdout_sets})
    return summarize_evaluation(table, base.image_data("evaluation").num_dims, delta=config.delta,
                                epsilon=config.epsilon, seed=config.eval_seed, forget_draws=config.forget_draws)


def stopping_target(base: Checkpoint, base_remember_nll: np.ndarray, holdout: Sequence[ImageSet],
                    config: TameConfig, *, device: torch.device
                    ) -> tuple[float, float, dict[str, Any], np.ndarray | None]:
    """The stopping rule's (δ, ε) in σ_R units, the report's ``target`` block and the base holdout NLL.

    ``threshold``: the configured δ, ε (the paper's suppression: every forget image at μ_R + δσ_R).
    ``holdout``: "forget to the level of never-seen data": under the base model, the held-out images' NLL
    interquartile band [Q25, Q75] (one keyed draw each, ``eval_seed``) written as μ_R + (δ ± ε)σ_R
    (:func:`flowtame.likelihood.audits.holdout_target`), so the unchanged rule |d| < ε stops the run when every
    forget image's NLL sits inside the band held-out images occupy. δ, ε are fixed in σ_R units, like the
    paper's δ, and follow the tamed model's re-estimated μ_R, σ_R.
    """
    if config.target == "threshold":
        epsilon = config.epsilon
        assert epsilon is not None  # TameConfig.__post_init__ fills it
        return config.delta, epsilon, {"kind": "threshold", "delta": config.delta, "epsilon": epsilon}, None
    from flowtame.likelihood.audits import holdout_target

    if not holdout:
        raise InputError("--target holdout needs --holdout: held-out images of the forget images' kind that the "
                         "model never saw")
    data_spec = base.image_data("taming")
    holdout_nll = np.concatenate([pixel_nll(base.model, *s.load_tensor(), data_spec, config.eval_seed, device)
                                  for s in holdout])
    try:
        found = holdout_target(base_remember_nll, holdout_nll)
    except ValueError as exc:
        raise InputError(f"--target holdout: {exc}") from None
    if not config.stop_margin < found.epsilon:
        raise InputError(f"--target holdout: stop_margin {config.stop_margin} must be below the band's "
                         f"half-width {found.epsilon:.3f} sigma_R")
    return found.delta, found.epsilon, found.to_dict(), holdout_nll


def taming_audits(base: Checkpoint, outcome: TameOutcome, forget_sets: Sequence[ImageSet], remember_set: ImageSet,
                  holdout_sets: dict[str, ImageSet], config: TameConfig, *, device: str = "auto",
                  generation_samples: int = 0, temperature: float = 0.7) -> dict[str, Any]:
    """Add the audits (membership, goals; generation with ``generation_samples``) to ``outcome.report``'s
    evaluation block, after :func:`taming_evaluation`, reusing the NLLs already computed."""
    from flowtame.figures.sampling import sample_images
    from flowtame.likelihood.auditing import AuditSets, add_audits

    block = outcome.report["evaluation"]
    known = {key: value for key, value in outcome.nll.items() if key[1] in ("remember", "forget")}
    for model in ("base", "tamed"):
        known[(model, "holdout")] = np.concatenate([outcome.nll[(model, name)] for name in holdout_sets])
    samples, sampling = None, None
    if generation_samples:
        drawn = sample_images([base, outcome.checkpoint], generation_samples, temperature, config.eval_seed)
        samples = {"base": drawn[0], "tamed": drawn[1]}
        sampling = {"samples": generation_samples, "temperature": temperature, "seed": config.eval_seed}
    sets = AuditSets(forget=list(forget_sets), remember=remember_set, holdout=list(holdout_sets.values()))
    return add_audits(block, base, outcome.checkpoint, sets, samples=samples, sampling=sampling, known=known,
                      device=device)
