"""Statistics of per-image NLL: normal fits, normality tests, likelihood quantiles and the quantile drop.

NumPy/SciPy only (no torch), so every figure here can be checked by hand. Notation (see the design notes,
``taming.md``): ``μ_R, σ_R`` are the mean and standard deviation (ddof=1) of the NLL over the remember set
under one model; δ is the forget threshold in σ units.

- Likelihood quantile (Eq. 14): ``q(x) = 1 - Φ((NLL(x) - μ_R) / σ_R)``; for a set, the mean over the set.
- Signed distance to the threshold (Eq. 8): ``d(x) = (NLL(x) - (μ_R + δ σ_R)) / σ_R``, in σ units.
- Quantile drop (Eq. 15): ``QD(S) = q_base(S) - q_tamed(S)``, each model with its own ``μ_R, σ_R``.
- ``KL(P‖Q) = log(s_q/s_p) + (s_p² + (m_p - m_q)²) / (2 s_q²) - 1/2`` for univariate normals.

NLL values may be in nats or BPD as long as a fit and the values it is applied to share the unit;
q and d are unit-free. :func:`summarize_nll` takes nats and reports both units.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from flowtame.data.quantization import nats_to_bpd
from flowtame.likelihood import threshold as _threshold

#: Percentiles reported by :func:`summarize_nll` (keys are their string form).
SUMMARY_PERCENTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)
#: The fewest values D'Agostino's K² test accepts (its skewness test needs 8).
DAGOSTINO_MIN_N = 8
#: Bootstrap resamples are drawn in chunks of at most this many indices (8 MiB of int64), so memory stays
#: bounded whatever the set's size and n_boot.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class NormalFit:
    """A univariate normal N(mean, std²) fitted to NLL values (same unit as the values: nats or BPD)."""

    mean: float
    std: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _as_1d(values: ArrayLike, name: str = "values") -> np.ndarray:
    """values -> float64 array of shape [N]; rejects other ranks and non-finite entries."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} NaN or infinite value(s)")
    return array


def _check_fit(fit: NormalFit) -> None:
    if not (math.isfinite(fit.mean) and math.isfinite(fit.std) and fit.std > 0):
        raise ValueError(f"a normal fit needs a finite mean and a positive std, got {fit}")


def fit_normal(values: ArrayLike) -> NormalFit:
    """Mean and standard deviation (ddof=1, like ``torch.std``) of ``values`` [N], N >= 2."""
    array = _as_1d(values)
    if array.size < 2:
        raise ValueError(f"a normal fit needs at least 2 values, got {array.size}")
    return NormalFit(mean=float(array.mean()), std=float(array.std(ddof=1)))


def ks_normality(values: ArrayLike) -> dict[str, float]:
    """One-sample Kolmogorov–Smirnov test of ``values`` [N] against the normal fitted to them.

    Returns ``{"statistic", "pvalue"}``; the statistic is ``sup_x |F_N(x) - Φ((x - μ)/σ)|``. As in the paper,
    the parameters are estimated from the same sample, which makes the p-value conservative (too high) —
    a small p is therefore strong evidence against normality.
    """
    array = _as_1d(values)
    fit = fit_normal(array)
    if fit.std == 0:
        return {"statistic": 1.0, "pvalue": 0.0}
    result = stats.kstest(array, "norm", args=(fit.mean, fit.std))
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue)}


def dagostino(values: ArrayLike) -> dict[str, float] | None:
    """D'Agostino–Pearson K² normality test of ``values`` [N]; ``None`` when N < 8.

    For 8 <= N < 20 the kurtosis part is an approximation (SciPy warns; the warning is silenced here).
    """
    array = _as_1d(values)
    if array.size < DAGOSTINO_MIN_N:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.normaltest(array)
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue)}


def _describe(values: np.ndarray) -> dict:
    quantiles = np.percentile(values, SUMMARY_PERCENTILES)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else None,
        "min": float(values.min()),
        "max": float(values.max()),
        "quantiles": {str(p): float(v) for p, v in zip(SUMMARY_PERCENTILES, quantiles, strict=True)},
    }


def summarize_nll(nll_nats: ArrayLike, num_dims: int) -> dict:
    """Describe per-image NLL ``nll_nats`` [N] (nats) of images with ``num_dims`` values each.

    Returns ``{"n", "nats": {...}, "bpd": {...}, "ks_normality", "dagostino"}`` where each unit block holds
    ``mean``, ``std`` (ddof=1; None when N = 1), ``min``, ``max`` and ``quantiles`` keyed "1", "5", "25",
    "50", "75", "95", "99" (percent). ``ks_normality`` is :func:`ks_normality` (None when N < 2) and
    ``dagostino`` is :func:`dagostino` (None when N < 8). BPD = nats / (num_dims · ln 2).
    """
    nats = _as_1d(nll_nats, "nll_nats")
    if nats.size == 0:
        raise ValueError("cannot summarize an empty set of NLL values")
    if num_dims < 1:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    bpd = nats_to_bpd(nats, num_dims)
    return {
        "n": int(nats.size),
        "nats": _describe(nats),
        "bpd": _describe(bpd),
        "ks_normality": ks_normality(nats) if nats.size >= 2 else None,
        "dagostino": dagostino(nats),
    }


def likelihood_quantile(nll: ArrayLike, fit: NormalFit) -> np.ndarray:
    """Per-image likelihood quantile ``q = 1 - Φ((nll - μ)/σ)`` [N] (Eq. 14), via ``norm.sf`` for precision.

    ``nll`` [N] and ``fit`` must share a unit. q near 1: far more likely than the remember set; q <= 1 - Φ(δ):
    beyond the forget threshold.
    """
    _check_fit(fit)
    return stats.norm.sf(_as_1d(nll, "nll"), loc=fit.mean, scale=fit.std)


def threshold_distance(nll: ArrayLike, fit: NormalFit, delta: float) -> np.ndarray:
    """Signed distance ``d = (nll - (μ + δσ)) / σ`` [N] to the forget threshold, in σ units (Eq. 8).

    d > 0: beyond the threshold (less likely than it); an image counts as forgotten when ``d > -ε``.
    """
    _check_fit(fit)
    return _threshold.threshold_distance(_as_1d(nll, "nll"), fit.mean, fit.std, delta)


def forgotten_fraction(nll: ArrayLike, fit: NormalFit, delta: float, epsilon: float) -> float:
    """Fraction of images [N] with ``d > -ε`` (at or beyond the threshold, within the margin)."""
    distance = threshold_distance(nll, fit, delta)
    if distance.size == 0:
        raise ValueError("cannot compute the forgotten fraction of an empty set")
    return float(np.mean(distance > -epsilon))


def bootstrap_mean_interval(values: ArrayLike, *, n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` [N] (resampling N entries with replacement).

    Vectorized: resamples are drawn as index matrices in chunks of bounded size (so memory does not grow
    with ``n_boot * N``), from ``numpy.random.default_rng(seed)``; the same seed gives the same interval.
    """
    array = _as_1d(values)
    if array.size == 0:
        raise ValueError("cannot bootstrap an empty set")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // array.size)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows_per_chunk):
        rows = min(rows_per_chunk, n_boot - start)
        indices = rng.integers(0, array.size, size=(rows, array.size))
        means[start:start + rows] = array[indices].mean(axis=1)
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def quantile_drop(nll_base: ArrayLike, nll_tamed: ArrayLike, fit_base: NormalFit, fit_tamed: NormalFit, *,
                  n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Quantile drop of one set of N images, paired: ``nll_base[i]`` and ``nll_tamed[i]`` are the same image.

    ``q_base = mean q(nll_base; fit_base)``, ``q_tamed = mean q(nll_tamed; fit_tamed)``,
    ``qd = q_base - q_tamed`` (Eq. 15). ``ci_low, ci_high``: 95% percentile bootstrap interval of qd from
    ``n_boot`` paired resamples of the images (both models' values of an image move together); the remember
    fits are held fixed. Returns ``{"q_base", "q_tamed", "qd", "ci_low", "ci_high"}``.
    """
    base = _as_1d(nll_base, "nll_base")
    tamed = _as_1d(nll_tamed, "nll_tamed")
    if base.shape != tamed.shape:
        raise ValueError(f"paired NLL arrays differ in length: {base.size} (base) vs {tamed.size} (tamed)")
    q_base = likelihood_quantile(base, fit_base)
    q_tamed = likelihood_quantile(tamed, fit_tamed)
    ci_low, ci_high = bootstrap_mean_interval(q_base - q_tamed, n_boot=n_boot, seed=seed)
    mean_base, mean_tamed = float(q_base.mean()), float(q_tamed.mean())
    return {"q_base": mean_base, "q_tamed": mean_tamed, "qd": mean_base - mean_tamed,
            "ci_low": ci_low, "ci_high": ci_high}


def ks_two_sample(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """Two-sample Kolmogorov–Smirnov test: ``statistic = sup_x |F_a(x) - F_b(x)|``, two-sided p-value."""
    first, second = _as_1d(a, "a"), _as_1d(b, "b")
    if first.size == 0 or second.size == 0:
        raise ValueError("a two-sample KS test needs two non-empty samples")
    result = stats.ks_2samp(first, second)
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue)}


def kl_normal(p: NormalFit, q: NormalFit) -> float:
    """``KL(P‖Q)`` in nats for univariate normals P = N(m_p, s_p²), Q = N(m_q, s_q²)."""
    _check_fit(p)
    _check_fit(q)
    return (math.log(q.std / p.std) + (p.std ** 2 + (p.mean - q.mean) ** 2) / (2.0 * q.std ** 2) - 0.5)


def subset_correction(base_nll: np.ndarray, subset: np.ndarray) -> tuple[float, float]:
    """(mean offset, std ratio) mapping refresh-subset statistics to whole-set ones, from the base model.

    Base and tamed NLLs on the same images are strongly correlated, so correcting the tamed subset
    estimate by the base model's (whole - subset) difference removes most of the subset's sampling error.
    """
    sub = base_nll[subset]
    return float(base_nll.mean() - sub.mean()), float(base_nll.std(ddof=1) / sub.std(ddof=1))
