"""Base-vs-tamed evaluation: per-set likelihood figures, the threshold, normality, neighbours and checks.

What is measured (formulas in :mod:`flowtame.likelihood.statistics`; fields and units in ``docs/report-schema.md``):

- Every image set is scored by both models with the *same* seeded dequantization noise (paired: image i
  sees identical noise under base and tamed), giving per-image NLL in nats.
- Each model's remember-set normal fit (μ_R, σ_R; ddof=1) defines its threshold ``μ_R + δσ_R``, its
  likelihood quantiles ``q`` and signed distances ``d`` (σ units).
- Per set: n; mean NLL (nats) and mean BPD under both models and the relative BPD change — absolute figures,
  because QD compares each model with its own μ_R, σ_R and so hides a uniform shift of every NLL;
  ``q_base``, ``q_tamed``, ``qd = q_base - q_tamed`` with a paired bootstrap 95% interval; the fraction
  forgotten (``d > -ε`` under the tamed model's own fit, and the same under the base model for reference);
  the two-sample KS test of base vs tamed NLL.
- KS normality (and D'Agostino K²) of the remember NLL under each model, with a warning when p < 0.05:
  q and the threshold assume that distribution is normal.
- Optionally D_R^NN ("neighbours"): the K remember images nearest to the forget set (see
  :func:`find_neighbours` for the metric), reported as its own set.
- :func:`run_checks` applies pass/fail tolerances (:class:`Tolerances`, each overridable).

Set roles are given by their names: ``forget`` and ``forget_unseen`` (images that should become unlikely),
``remember``, ``neighbours`` (derived, reserved), and any other name is a held-out set (e.g. "holdout:test").
Remember images whose key (pixel digest) is also a forget image's key are excluded from the remember set,
as ``flowtame tame`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from typing import Any

import numpy as np
import torch

from flowtame import __version__
from flowtame.data.quantization import nats_per_bpd, nats_to_bpd, quantize
from flowtame.engine.devices import resolve_device
from flowtame.errors import InputError
from flowtame.io.checkpoint import Checkpoint
from flowtame.likelihood import statistics as st
from flowtame.likelihood.nll import in_chunks
from flowtame.likelihood.threshold import default_epsilon, forget_threshold

SCHEMA_VERSION = 1
MODELS = ("base", "tamed")
FORGET_SETS = ("forget", "forget_unseen")
#: Keyed noise draws averaged into each forget image's NLL (docs/report-schema.md explains why).
FORGET_DRAWS = 8
RESERVED_SETS = ("neighbours",)
#: Remember-NLL normality p-values below this add a warning to the report.
NORMALITY_WARNING_P = 0.05
NEIGHBOUR_METRIC = ("euclidean distance between the base model's concatenated, flattened latents "
                    "(encode of each image at the centre of its quantization bins), "
                    "minimum over forget images")

#: Per-image NLL arrays keyed by (model, set name), nats, float64 [N].
NLLTable = dict[tuple[str, str], np.ndarray]


@dataclass(frozen=True)
class Tolerances:
    """Bounds applied by :func:`run_checks`; ``None`` skips a check.

    - ``min_forgotten_fraction``: the forget set's forgotten fraction must be >= this (1.0: every image).
    - ``max_remember_qd``: QD(remember) <= this.
    - ``max_holdout_qd``: QD <= this for every held-out set.
    - ``max_neighbours_qd``: QD(neighbours) <= this, when neighbours were evaluated.
    - ``max_remember_bpd_increase``: relative increase of the remember set's mean BPD,
      (tamed - base) / base, <= this (0.01 = 1%); catches the uniform shift that QD cannot see.
    - ``min_normality_p``: KS normality p-value of the remember NLL under the tamed model > this.
    """

    min_forgotten_fraction: float | None = 1.0
    max_remember_qd: float | None = 0.01
    max_holdout_qd: float | None = 0.02
    max_neighbours_qd: float | None = 0.02
    max_remember_bpd_increase: float | None = 0.01
    min_normality_p: float | None = 0.001

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class Neighbours:
    """D_R^NN: ``indices`` [K] into the remember set (nearest first) and their ``distances`` [K]."""

    indices: np.ndarray
    distances: np.ndarray
    metric: str = NEIGHBOUR_METRIC


def role_of(set_name: str) -> str:
    """forget | remember | neighbours | holdout, from a set's name."""
    if set_name in FORGET_SETS:
        return "forget"
    if set_name in ("remember", "neighbours"):
        return set_name
    return "holdout"


def _ordered_sets(names) -> list[str]:
    """Report order: forget, forget_unseen, remember, neighbours, then held-out sets as given."""
    fixed = [n for n in (*FORGET_SETS, "remember", "neighbours") if n in names]
    return fixed + [n for n in names if n not in fixed]


def _remember_keep_mask(sets: Mapping[str, Any]) -> np.ndarray:
    """Boolean [N_remember]: False for remember images whose key is also a forget image's key."""
    forget_keys = set(sets["forget"].keys)
    return np.array([key not in forget_keys for key in sets["remember"].keys], dtype=bool)


def check_models(base: Checkpoint, tamed: Checkpoint) -> None:
    """Both image models, with the same data spec (image size, channels, n_bits); else InputError."""
    for ckpt in (base, tamed):
        if ckpt.data_spec is None:
            raise InputError(f"{ckpt.path}: evaluation needs image models (no data spec)")
    if base.data_spec != tamed.data_spec:
        raise InputError(f"base ({base.data_spec}) and tamed ({tamed.data_spec}) models disagree on their "
                         "data; a tamed model must keep its base's image size, channels and n_bits")


def collect_nll(base: Checkpoint, tamed: Checkpoint, sets: Mapping[str, Any], *, seed: int = 0,
                batch_size: int = 256, device: str = "auto", precision: str = "fp32",
                num_workers: int | None = None, progress: Callable[[str, int, int], None] | None = None,
                precomputed: Mapping[tuple[str, str], np.ndarray] | None = None,
                forget_draws: int = FORGET_DRAWS) -> NLLTable:
    """Per-image NLL (nats, float64 [N]) of every set under both models, with paired noise of ``seed``.

    Forget and forget-unseen images are averaged over ``forget_draws`` noise draws, other sets use one.

    ``sets``: set name -> ImageSet (see the module docstring for the names). Entries of ``precomputed``
    (same keys as the result) are used instead of computing; each must be aligned with its set's image
    order and computed with the same ``seed``. The remember entry may have the length of the remember set
    or, when some remember images are forget images, the length after excluding them. Remember images that
    are forget images are excluded from the result. ``progress(label, files_done, files_total)``, label
    "model/set", is called after each batch of a likelihood pass.
    """
    from flowtame.likelihood.nll import compute_nll

    check_models(base, tamed)
    precomputed = dict(precomputed or {})
    unknown = sorted({f"{m}/{s}" for m, s in precomputed if m not in MODELS or s not in sets})
    if unknown:
        raise ValueError(f"precomputed NLL for unknown model/set pair(s): {', '.join(unknown)}")
    table: NLLTable = {}
    for set_name in _ordered_sets(sets):
        for model_name, ckpt in zip(MODELS, (base, tamed), strict=True):
            given = precomputed.get((model_name, set_name))
            if given is None:
                report = None if progress is None else partial(progress, f"{model_name}/{set_name}")
                given = compute_nll(ckpt.model, sets[set_name], seed=seed, batch_size=batch_size,
                                    device=device, precision=precision, num_workers=num_workers,
                                    progress=report, draws=forget_draws if set_name in FORGET_SETS else 1).nll
            table[(model_name, set_name)] = np.asarray(given, dtype=np.float64)
    # Keys are read after the likelihood passes, which are the sets' first (validating) read-through.
    keep = _remember_keep_mask(sets)
    for (model_name, set_name), values in table.items():
        expected = keep.size if set_name == "remember" else len(sets[set_name])
        if set_name == "remember" and values.shape == (int(keep.sum()),) and not keep.all():
            continue
        if values.shape != (expected,):
            raise ValueError(f"NLL of {model_name}/{set_name} has shape {values.shape}, "
                             f"expected ({expected},) (one value per image of the set)")
        if set_name == "remember":
            table[(model_name, set_name)] = values[keep]
    return table


def _bin_centre_latents(ckpt: Checkpoint, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images [B, C, S, S] -> flattened, concatenated latents [B, D] (float64, CPU) at bin centres."""
    n_bits = ckpt.image_data("evaluation").n_bits
    x = quantize(pixels, n_bits) + 0.5 / 2 ** n_bits
    with torch.no_grad():
        latents, _ = ckpt.model.encode(x.to(device))
    return torch.cat([z.flatten(1) for z in latents], 1).double().cpu()


def _latent_rows(ckpt: Checkpoint, pixels: torch.Tensor, device: torch.device, batch_size: int,
                 then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`_bin_centre_latents` of uint8 images [N, C, S, S] -> [N, D] float64 (CPU), or ``then`` of each
    chunk's latents ([n, D] -> [n, ...]) concatenated, in the forwards :func:`~flowtame.likelihood.nll.in_chunks`
    sizes (at most ``batch_size`` rows; fewer for a wide model on the CPU)."""

    def chunk(start: int, stop: int) -> torch.Tensor:
        latents = _bin_centre_latents(ckpt, pixels[start:stop], device)
        return latents if then is None else then(latents)

    return torch.cat(in_chunks(ckpt.model, pixels.shape[0], device, batch_size, chunk))


def find_neighbours(base: Checkpoint, forget, remember, k: int, *, batch_size: int = 256,
                    device: str = "auto", exclude: np.ndarray | None = None) -> Neighbours:
    """D_R^NN: the ``k`` remember images nearest to the forget set under the base model.

    Metric: Euclidean distance between the base model's latents of two images, each image encoded at the
    centre of its quantization bins (no random noise, so the choice does not depend on the evaluation seed)
    and its latents of every level flattened and concatenated ([D] per image); a remember image's distance
    is its minimum over the forget images. Ties go to the earlier image. Memory: the forget latents
    [N_F, D] plus one remember batch; the remember set is streamed, ``batch_size`` files at a time, and each
    batch's forwards are sized like the likelihood passes' (fewer rows for a wide model on the CPU,
    :func:`~flowtame.likelihood.nll.in_chunks`). ``exclude`` (bool [N_remember]) marks
    images not to consider; the returned indices count only the others (the remember set after exclusion).
    """
    candidates = len(remember) - (int(exclude.sum()) if exclude is not None else 0)
    if not 1 <= k <= candidates:
        raise InputError(f"neighbours {k}: must be between 1 and the remember set's size ({candidates})",
                         keys=("neighbours",))
    dev = resolve_device(device)
    model_was_on = next(base.model.parameters()).device
    base.model.to(dev)
    try:
        forget_latents = torch.cat([_latent_rows(base, batch.pixels, dev, batch_size)
                                    for batch in forget.iter_batches(batch_size)])
        nearest = partial(nearest_distance, reference=forget_latents, exact=False)
        distances = np.concatenate([_latent_rows(base, batch.pixels, dev, batch_size, nearest).numpy()
                                    for batch in remember.iter_batches(batch_size)])
    finally:
        base.model.to(model_was_on)
    if exclude is not None:
        distances = distances[~exclude]
    order = np.argsort(distances, kind="stable")[:k]
    return Neighbours(indices=order, distances=distances[order])


def nearest_distance(query: torch.Tensor, reference: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """Each row's Euclidean distance [M] to its nearest row of ``reference`` [R, D], for ``query`` [M, D].

    ``exact`` (the audits: :func:`~flowtame.likelihood.auditing.nearest_training_distances`): ``cdist`` without its
    matrix-product shortcut, whose cancellation put an image a few thousandths from itself in float32: a row's
    distance to an equal row is 0, and every pair's value is independent of how the rows are batched, so a
    minimum over streamed reference chunks equals the minimum over all of them. Cost: 14-30x the shortcut's at
    100-1,437 reference rows (docs/benchmarks.md).

    ``exact=False`` (ranking the remember images by their distance to the forget set: :func:`find_neighbours`,
    :func:`nearest_rows`, so ``evaluate``'s D_R^NN and tame's look-alikes): ``cdist``'s default, the matrix
    product once a side has over 25 rows. Only the order of the distances is used; on float64 latents the
    shortcut's error was ~1e-15 relative (random latents, D = 256 and 3072; a copy of a row lands up to ~4e-6
    from it instead of 0, and the ranking leaves out the forget images' own pixels), so it can only swap images
    whose distances agree to rounding. It stays so that the look-alikes, hence every measured tame run, are the
    ones chosen before; the exact mode would cost 1.3-2.2x here (15 forget rows, 1,000-1,497 remember rows)."""
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
    return torch.cdist(query, reference, compute_mode=mode).min(1).values


def nearest_rows(base: Checkpoint, forget_pixels: torch.Tensor, remember_pixels: torch.Tensor, k: int, *,
                 device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Indices (long [min(k, R)], CPU, nearest first) of the remember images (uint8 [R,C,H,W]) nearest the
    forget images (uint8 [F,C,H,W]) by :func:`find_neighbours`'s metric (bin-centre latents of the base model,
    minimum over the forget images). ``batch_size``: rows per forward (fewer for a wide model on the CPU,
    :func:`~flowtame.likelihood.nll.eval_batch_size`)."""
    forget_latents = _latent_rows(base, forget_pixels, device, batch_size)
    distances = _latent_rows(base, remember_pixels, device, batch_size,
                             partial(nearest_distance, reference=forget_latents, exact=False))
    return torch.from_numpy(np.argsort(distances.numpy(), kind="stable")[:k].copy())


def _threshold_block(fit: st.NormalFit, delta: float, num_dims: int) -> dict[str, float]:
    to_bpd = 1.0 / nats_per_bpd(num_dims)
    threshold = forget_threshold(fit.mean, fit.std, delta)
    return {"mu_nats": fit.mean, "sigma_nats": fit.std, "mu_bpd": fit.mean * to_bpd,
            "sigma_bpd": fit.std * to_bpd, "threshold_nats": threshold, "threshold_bpd": threshold * to_bpd}


def _normality_block(remember_nll: np.ndarray, model_name: str) -> dict[str, Any]:
    ks = st.ks_normality(remember_nll)
    agostino = st.dagostino(remember_nll)
    low = [name for name, test in (("KS", ks), ("D'Agostino", agostino))
           if test is not None and test["pvalue"] < NORMALITY_WARNING_P]
    warning = None
    if low:
        warning = (f"remember NLL under the {model_name} model does not look normal ({' and '.join(low)} "
                   f"p < {NORMALITY_WARNING_P}); likelihood quantiles and the threshold assume it is")
    return {"ks": ks, "dagostino": agostino, "warning": warning}


def _distance_summary(distance: np.ndarray) -> dict[str, float]:
    return {"min": float(distance.min()), "median": float(np.median(distance)), "max": float(distance.max())}


def _set_block(set_name: str, base_nll: np.ndarray, tamed_nll: np.ndarray, fits: dict[str, st.NormalFit],
               num_dims: int, delta: float, epsilon: float, n_boot: int, seed: int) -> dict[str, Any]:
    if base_nll.size == 0:
        raise InputError(f"set {set_name!r} has no images")
    drop = st.quantile_drop(base_nll, tamed_nll, fits["base"], fits["tamed"], n_boot=n_boot, seed=seed)
    base_bpd = float(nats_to_bpd(base_nll.mean(), num_dims))
    tamed_bpd = float(nats_to_bpd(tamed_nll.mean(), num_dims))
    return {
        "role": role_of(set_name),
        "n": int(base_nll.size),
        "base_mean_nll": float(base_nll.mean()),
        "tamed_mean_nll": float(tamed_nll.mean()),
        "base_mean_bpd": base_bpd,
        "tamed_mean_bpd": tamed_bpd,
        "bpd_change_relative": (tamed_bpd - base_bpd) / base_bpd,
        "q_base": drop["q_base"],
        "q_tamed": drop["q_tamed"],
        "qd": drop["qd"],
        "qd_ci_low": drop["ci_low"],
        "qd_ci_high": drop["ci_high"],
        "forgotten_fraction": st.forgotten_fraction(tamed_nll, fits["tamed"], delta, epsilon),
        "forgotten_fraction_base": st.forgotten_fraction(base_nll, fits["base"], delta, epsilon),
        "d": {"base": _distance_summary(st.threshold_distance(base_nll, fits["base"], delta)),
              "tamed": _distance_summary(st.threshold_distance(tamed_nll, fits["tamed"], delta))},
        "ks_base_vs_tamed": st.ks_two_sample(base_nll, tamed_nll),
    }


def summarize_evaluation(nll: Mapping[tuple[str, str], np.ndarray], num_dims: int, *, delta: float = 4.0,
                         epsilon: float | None = None, n_boot: int = 1000, seed: int = 0,
                         neighbours: Neighbours | None = None,
                         tolerances: Tolerances | None = None, forget_draws: int = FORGET_DRAWS) -> dict[str, Any]:
    """The evaluation block from per-image NLL alone (no models): pure, so it can be checked by hand.

    ``nll``: (model, set) -> NLL in nats [N], model "base"|"tamed", both models for every set, "forget" and
    "remember" required; base[i] and tamed[i] are the same image. ``num_dims``: D, values per image (for BPD).
    ``neighbours``: indices into the remember arrays, reported as the set "neighbours".
    ``epsilon`` defaults to 0.15·δ. ``forget_draws``: recorded, the noise draws behind the forget NLL.
    Returns the JSON-ready block documented in ``docs/report-schema.md``.
    """
    if epsilon is None:
        epsilon = default_epsilon(delta)
    if not delta > 0 or not epsilon >= 0:
        raise InputError(f"delta must be positive and epsilon non-negative, got delta={delta}, "
                         f"epsilon={epsilon}")
    set_names = list(dict.fromkeys(s for _, s in nll))
    for required in ("forget", "remember"):
        if required not in set_names:
            raise InputError(f"an evaluation needs a {required!r} set")
    if "neighbours" in set_names:
        raise InputError("'neighbours' is derived from the remember set; it cannot be given as a set")
    arrays = {}
    for set_name in set_names:
        for model_name in MODELS:
            if (model_name, set_name) not in nll:
                raise InputError(f"no {model_name}-model NLL for set {set_name!r}")
            arrays[(model_name, set_name)] = np.asarray(nll[(model_name, set_name)], dtype=np.float64)
        if arrays[("base", set_name)].shape != arrays[("tamed", set_name)].shape:
            raise InputError(f"set {set_name!r}: base and tamed NLL differ in length (not paired)")
    if arrays[("base", "remember")].size < 2:
        raise InputError("the remember set needs at least 2 images to fit μ_R, σ_R")
    fits = {m: st.fit_normal(arrays[(m, "remember")]) for m in MODELS}
    for model_name, fit in fits.items():
        if not fit.std > 0:
            raise InputError(f"every remember image has the same NLL under the {model_name} model (σ_R = 0)")
    if neighbours is not None:
        for model_name in MODELS:
            arrays[(model_name, "neighbours")] = arrays[(model_name, "remember")][neighbours.indices]
        set_names.append("neighbours")

    sets_block = {name: _set_block(name, arrays[("base", name)], arrays[("tamed", name)], fits, num_dims,
                                   delta, epsilon, n_boot, seed)
                  for name in _ordered_sets(set_names)}
    normality = {m: _normality_block(arrays[(m, "remember")], m) for m in MODELS}
    block: dict[str, Any] = {
        "num_dims": int(num_dims),
        "seed": int(seed),
        "forget_draws": int(forget_draws),
        "n_boot": int(n_boot),
        "threshold": {
            "delta": float(delta),
            "epsilon": float(epsilon),
            "quantile": float(st.likelihood_quantile([delta], st.NormalFit(0.0, 1.0))[0]),
            "base": _threshold_block(fits["base"], delta, num_dims),
            "tamed": _threshold_block(fits["tamed"], delta, num_dims),
            "kl_base_tamed": st.kl_normal(fits["base"], fits["tamed"]),
            "kl_tamed_base": st.kl_normal(fits["tamed"], fits["base"]),
        },
        "normality": normality,
        "sets": sets_block,
        "neighbours": None if neighbours is None else {
            "k": int(neighbours.indices.size),
            "metric": neighbours.metric,
            "distance_min": float(neighbours.distances.min()),
            "distance_max": float(neighbours.distances.max()),
        },
        "warnings": [n["warning"] for n in normality.values() if n["warning"]],
    }
    tolerances = tolerances or Tolerances()
    checks = run_checks(block, tolerances)
    block["tolerances"] = tolerances.to_dict()
    block["checks"] = checks
    block["passed"] = all(check["passed"] for check in checks)
    return block


def _check(name: str, value: float | None, bound: float, comparison: str) -> dict[str, Any]:
    if value is None or not math.isfinite(value):
        passed = False
    elif comparison == "<=":
        passed = value <= bound
    elif comparison == ">=":
        passed = value >= bound
    else:
        passed = value > bound
    return {"name": name, "passed": bool(passed), "value": value, "bound": bound, "comparison": comparison}


def run_checks(block: Mapping[str, Any], tolerances: Tolerances | None = None) -> list[dict[str, Any]]:
    """Apply ``tolerances`` to an evaluation block: a list of ``{name, passed, value, bound, comparison}``.

    Check names are ``<set>.<figure>``: ``forget.forgotten_fraction`` (>=), ``remember.qd`` (<=),
    ``<holdout>.qd`` (<=) for each held-out set, ``neighbours.qd`` (<=) when present,
    ``remember.bpd_increase`` (<=, the relative change of mean BPD) and ``remember.normality_p``
    (> , KS p-value under the tamed model). A bound of ``None`` skips that check.
    """
    tol = tolerances or Tolerances()
    sets = block["sets"]
    checks = []
    if tol.min_forgotten_fraction is not None:
        checks.append(_check("forget.forgotten_fraction", sets["forget"]["forgotten_fraction"],
                             tol.min_forgotten_fraction, ">="))
    if tol.max_remember_qd is not None:
        checks.append(_check("remember.qd", sets["remember"]["qd"], tol.max_remember_qd, "<="))
    if tol.max_holdout_qd is not None:
        for name, set_block in sets.items():
            if set_block["role"] == "holdout":
                checks.append(_check(f"{name}.qd", set_block["qd"], tol.max_holdout_qd, "<="))
    if tol.max_neighbours_qd is not None and "neighbours" in sets:
        checks.append(_check("neighbours.qd", sets["neighbours"]["qd"], tol.max_neighbours_qd, "<="))
    if tol.max_remember_bpd_increase is not None:
        checks.append(_check("remember.bpd_increase", sets["remember"]["bpd_change_relative"],
                             tol.max_remember_bpd_increase, "<="))
    if tol.min_normality_p is not None:
        checks.append(_check("remember.normality_p", block["normality"]["tamed"]["ks"]["pvalue"],
                             tol.min_normality_p, ">"))
    return checks


def evaluate_models(base: Checkpoint, tamed: Checkpoint, sets: Mapping[str, Any], *, delta: float = 4.0,
                    epsilon: float | None = None, seed: int = 0, neighbours: int = 0, batch_size: int = 256,
                    device: str = "auto", precision: str = "fp32", num_workers: int | None = None,
                    n_boot: int = 1000, tolerances: Tolerances | None = None,
                    precomputed: Mapping[tuple[str, str], np.ndarray] | None = None,
                    progress: Callable[[str, int, int], None] | None = None,
                    forget_draws: int = FORGET_DRAWS) -> dict[str, Any]:
    """Evaluate a tamed model against its base on named image sets; returns the evaluation block.

    ``sets``: name -> ImageSet (from :func:`flowtame.data.images.open_images`); "forget" and "remember" are
    required, "forget_unseen" is optional and any other name is a held-out set. ``delta``, ``epsilon``: the
    threshold and margin in σ_R units (ε defaults to 0.15·δ). ``seed``: the dequantization noise, the same
    for both models (paired), and the bootstrap's seed. ``neighbours=K`` > 0 adds D_R^NN
    (:func:`find_neighbours`). ``tolerances``: bounds for the checks (:class:`Tolerances`).
    ``progress``: see :func:`collect_nll`. ``forget_draws``: noise draws averaged per forget image.

    ``precomputed``: NLL a caller already has, so nothing is computed twice — a mapping
    ``(model, set) -> np.ndarray`` of NLL in nats [N] with model "base" or "tamed", e.g.
    ``precomputed[("base", "remember")] = nll``; each array aligned with its set's image order and computed
    with the same ``seed`` (see :func:`collect_nll` for the remember set's length rule). Missing entries are
    computed.

    Costs: one likelihood pass per (model, set) not precomputed, plus with ``neighbours`` one base-model
    encoding pass over the forget and remember sets. Memory stays O(N) floats (images are streamed).
    """
    nll = collect_nll(base, tamed, sets, seed=seed, batch_size=batch_size, device=device, precision=precision,
                      num_workers=num_workers, progress=progress, precomputed=precomputed,
                      forget_draws=forget_draws)
    found = None
    if neighbours:
        found = find_neighbours(base, sets["forget"], sets["remember"], neighbours, batch_size=batch_size,
                                device=device, exclude=~_remember_keep_mask(sets))
    return summarize_evaluation(nll, base.image_data("evaluation").num_dims, delta=delta, epsilon=epsilon,
                                n_boot=n_boot, seed=seed, neighbours=found, tolerances=tolerances,
                                forget_draws=forget_draws)


def build_report(base: Checkpoint, tamed: Checkpoint, block: Mapping[str, Any]) -> dict[str, Any]:
    """The ``flowtame evaluate`` JSON report: schema version, the two models (path, sha256) and the block."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "evaluation",
        "flowtame_version": __version__,
        "models": {name: {"path": str(ckpt.path) if ckpt.path else None, "sha256": ckpt.sha256}
                   for name, ckpt in zip(MODELS, (base, tamed), strict=True)},
        "evaluation": dict(block),
    }


def load_schema(name: str = "evaluation.schema.json") -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) shipped in ``flowtame/schemas``: by default the evaluate report's (the block
    alone is ``$defs/evaluation``); also ``tame-report.schema.json``, ``debias-report.schema.json``."""
    text = (resources.files("flowtame") / "schemas" / name).read_text(encoding="utf-8")
    return json.loads(text)
