"""flowtame.likelihood.statistics against figures computed by hand on small arrays."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from flowtame.likelihood import statistics as st
from flowtame.likelihood.statistics import NormalFit

# Standard normal CDF values Φ(1), Φ(2) and tails 1 - Φ(k), from 30-digit arithmetic (mpmath), rounded.
PHI_1 = 0.8413447460685429
PHI_2 = 0.9772498680518208
SF = {4: 3.1671241833119921e-05, 5: 2.8665157187919391e-07, 6: 9.8658764503769814e-10, 7: 1.2798125438858350e-12}


def test_fit_normal_uses_ddof_1():
    fit = st.fit_normal([1.0, 2.0, 3.0, 4.0])
    assert fit == NormalFit(2.5, math.sqrt(5.0 / 3.0))
    with pytest.raises(ValueError, match="at least 2"):
        st.fit_normal([1.0])
    with pytest.raises(ValueError, match="NaN"):
        st.fit_normal([1.0, float("nan")])


def test_likelihood_quantile_matches_phi_table():
    q = st.likelihood_quantile([10.0, 12.0, 14.0, 8.0], NormalFit(10.0, 2.0))
    np.testing.assert_allclose(q, [0.5, 1 - PHI_1, 1 - PHI_2, PHI_1], rtol=1e-14)
    # Far tail: sf keeps relative precision where 1 - cdf would round to 0.
    # 1 - Φ(30) ≈ 4.9067139271479e-198 (asymptotic series φ(z)/z · (1 - 1/z² + 3/z⁴)).
    far = st.likelihood_quantile([10.0 + 2.0 * 30], NormalFit(10.0, 2.0))
    series = math.exp(-450) / math.sqrt(2 * math.pi) / 30 * (1 - 1 / 900 + 3 / 810000)
    assert far[0] == pytest.approx(series, rel=1e-7)
    with pytest.raises(ValueError, match="positive std"):
        st.likelihood_quantile([1.0], NormalFit(0.0, 0.0))


def test_threshold_distance_and_forgotten_fraction():
    fit = NormalFit(10.0, 2.0)
    d = st.threshold_distance([10.0, 12.0, 17.0, 18.0, 21.0], fit, delta=4.0)
    np.testing.assert_allclose(d, [-4.0, -3.0, -0.5, 0.0, 1.5])
    # d > -ε with ε = 0.6: the last three images (d = -0.5, 0, 1.5).
    assert st.forgotten_fraction([10.0, 12.0, 17.0, 18.0, 21.0], fit, 4.0, 0.6) == pytest.approx(3 / 5)
    assert st.forgotten_fraction([10.0, 12.0, 17.0, 18.0, 21.0], fit, 4.0, 0.4) == pytest.approx(2 / 5)


def test_quantile_drop_by_hand():
    base = np.array([10.0, 12.0, 14.0, 8.0])
    tamed = np.array([20.0, 22.0, 24.0, 18.0])
    fit_base, fit_tamed = NormalFit(10.0, 2.0), NormalFit(10.0, 2.0)
    q_base = (0.5 + (1 - PHI_1) + (1 - PHI_2) + PHI_1) / 4
    q_tamed = (SF[5] + SF[6] + SF[7] + SF[4]) / 4
    result = st.quantile_drop(base, tamed, fit_base, fit_tamed, n_boot=500, seed=3)
    assert result["q_base"] == pytest.approx(q_base, rel=1e-13)
    assert result["q_tamed"] == pytest.approx(q_tamed, rel=1e-12)
    assert result["qd"] == pytest.approx(q_base - q_tamed, rel=1e-13)
    assert result["ci_low"] <= result["qd"] <= result["ci_high"]


def test_quantile_drop_uses_each_models_own_fit():
    # A uniform shift of every NLL by +5 with the tamed fit shifted alike scores QD = 0 (the known trap).
    base = np.array([9.0, 10.0, 11.0, 12.5])
    result = st.quantile_drop(base, base + 5.0, NormalFit(10.0, 1.0), NormalFit(15.0, 1.0), n_boot=100)
    assert result["qd"] == pytest.approx(0.0, abs=1e-15)
    assert result["ci_low"] == pytest.approx(0.0, abs=1e-15)
    assert result["ci_high"] == pytest.approx(0.0, abs=1e-15)


def test_bootstrap_interval_is_deterministic_and_contains_qd():
    rng = np.random.default_rng(0)
    base = rng.normal(100.0, 5.0, size=200)
    tamed = base + rng.normal(3.0, 2.0, size=200)
    fit = NormalFit(100.0, 5.0)
    first = st.quantile_drop(base, tamed, fit, fit, n_boot=1000, seed=7)
    again = st.quantile_drop(base, tamed, fit, fit, n_boot=1000, seed=7)
    other = st.quantile_drop(base, tamed, fit, fit, n_boot=1000, seed=8)
    assert first == again
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])
    assert first["ci_low"] < first["qd"] < first["ci_high"]
    # The interval of a mean of 200 paired differences is about ±1.96 standard errors wide.
    diff = st.likelihood_quantile(base, fit) - st.likelihood_quantile(tamed, fit)
    half_width = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    assert (first["ci_high"] - first["ci_low"]) / 2 == pytest.approx(half_width, rel=0.15)


def test_bootstrap_chunking_does_not_change_the_interval(monkeypatch):
    values = np.arange(50, dtype=float) ** 1.5
    whole = st.bootstrap_mean_interval(values, n_boot=300, seed=1)
    monkeypatch.setattr(st, "_BOOTSTRAP_CHUNK_ELEMENTS", 7 * values.size)
    assert st.bootstrap_mean_interval(values, n_boot=300, seed=1) == whole


def _two_sample_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """sup_x |F_a(x) - F_b(x)| evaluated at every sample point (where the sup is attained)."""
    points = np.concatenate([a, b])
    return max(abs(np.mean(a <= x) - np.mean(b <= x)) for x in points)


def test_ks_two_sample_by_hand():
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([2.5, 4.0, 5.0, 6.0])
    result = st.ks_two_sample(a, b)
    # At x = 3: F_a = 1, F_b = 1/4.
    assert result["statistic"] == pytest.approx(0.75)
    assert result["statistic"] == pytest.approx(_two_sample_statistic(a, b))
    # Exact p-value: the fraction of the 35 ways to split the 7 pooled values into 3 + 4
    # whose statistic is at least the observed one.
    pooled = np.concatenate([a, b])
    splits = [_two_sample_statistic(pooled[list(c)], np.delete(pooled, list(c)))
              for c in itertools.combinations(range(7), 3)]
    exact_p = np.mean(np.array(splits) >= 0.75 - 1e-12)
    assert result["pvalue"] == pytest.approx(exact_p)


def test_ks_normality_by_hand():
    values = np.array([-1.2, -0.3, 0.1, 0.4, 0.9, 2.2])
    fit = st.fit_normal(values)
    cdf = np.array([0.5 * math.erfc(-(v - fit.mean) / (fit.std * math.sqrt(2))) for v in sorted(values)])
    n = values.size
    statistic = max(max((i + 1) / n - c, c - i / n) for i, c in enumerate(cdf))
    result = st.ks_normality(values)
    assert result["statistic"] == pytest.approx(statistic, rel=1e-12)
    assert 0.0 < result["pvalue"] <= 1.0


def test_summarize_nll_units_and_tests():
    nats = np.array([100.0, 110.0, 120.0, 130.0, 140.0])
    num_dims = 10
    summary = st.summarize_nll(nats, num_dims)
    assert summary["n"] == 5
    assert summary["nats"]["mean"] == pytest.approx(120.0)
    assert summary["nats"]["std"] == pytest.approx(np.std(nats, ddof=1))
    assert summary["nats"]["quantiles"]["50"] == pytest.approx(120.0)
    assert set(summary["nats"]["quantiles"]) == {"1", "5", "25", "50", "75", "95", "99"}
    assert summary["bpd"]["mean"] == pytest.approx(120.0 / (num_dims * math.log(2)))
    assert summary["bpd"]["max"] == pytest.approx(140.0 / (num_dims * math.log(2)))
    assert summary["dagostino"] is None
    assert set(summary["ks_normality"]) == {"statistic", "pvalue"}
    larger = st.summarize_nll(np.random.default_rng(0).normal(500, 10, 50), num_dims)
    assert set(larger["dagostino"]) == {"statistic", "pvalue"}
    assert larger["dagostino"]["pvalue"] > 0.001


def test_kl_normal_closed_form():
    assert st.kl_normal(NormalFit(0.0, 1.0), NormalFit(0.0, 1.0)) == 0.0
    # log 2 + (1 + 1) / (2 * 4) - 1/2
    assert st.kl_normal(NormalFit(0.0, 1.0), NormalFit(1.0, 2.0)) == pytest.approx(math.log(2) - 0.25)
    # Against numerical integration of p log(p/q).
    x = np.linspace(-12, 14, 200001)
    p = np.exp(-0.5 * ((x - 1.0) / 1.5) ** 2) / (1.5 * math.sqrt(2 * math.pi))
    q = np.exp(-0.5 * ((x - 0.2) / 0.7) ** 2) / (0.7 * math.sqrt(2 * math.pi))
    numeric = np.sum(p * np.log(p / q)) * (x[1] - x[0])
    assert st.kl_normal(NormalFit(1.0, 1.5), NormalFit(0.2, 0.7)) == pytest.approx(numeric, rel=1e-6)
