"""The taming losses against hand-computed values, and their gradients against finite differences."""

import math

import numpy as np
import pytest
import torch

from flowtame.data.quantization import bpd_to_nats, nats_per_bpd, nats_to_bpd
from flowtame.likelihood.threshold import default_epsilon, forget_threshold, threshold_distance
from flowtame.methods.objective import forget_loss, kl_normal, remember_loss, symmetric_kl


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_kl_normal_matches_closed_form_by_hand():
    # P = N(1, 2^2), Q = N(3, 1^2): log(1/2) + (4 + 4)/2 - 1/2 = -0.693147... + 4 - 0.5
    assert kl_normal(t(1.0), t(2.0), t(3.0), t(1.0)).item() == pytest.approx(math.log(0.5) + 4.0 - 0.5)
    # KL of a distribution with itself is zero, and KL is not symmetric
    assert kl_normal(t(0.3), t(1.7), t(0.3), t(1.7)).item() == pytest.approx(0.0, abs=1e-15)
    assert kl_normal(t(3.0), t(1.0), t(1.0), t(2.0)).item() == pytest.approx(math.log(2.0) + 5 / 8 - 0.5)


def test_symmetric_kl_is_sum_of_both_directions():
    a = symmetric_kl(t(1.0), t(2.0), t(3.0), t(1.0)).item()
    assert a == pytest.approx((math.log(0.5) + 4 - 0.5) + (math.log(2.0) + 5 / 8 - 0.5))


def test_kl_gradients_match_finite_differences_including_the_log_term():
    params = torch.tensor([0.4, 1.3, -0.2, 0.8], dtype=torch.float64, requires_grad=True)

    def f(p):
        return symmetric_kl(p[0], p[1], p[2], p[3])

    assert torch.autograd.gradcheck(f, (params,))
    # The reference implementation drops the gradient of log(s_q/s_p). Show ours keeps it: d/ds_q of
    # KL(P||Q) = 1/s_q - (s_p^2 + (m_p-m_q)^2)/s_q^3.
    mp, sp, mq, sq = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.4, 1.3, -0.2, 0.8))
    kl_normal(mp, sp, mq, sq).backward()
    expected = 1 / 0.8 - (1.3 ** 2 + 0.6 ** 2) / 0.8 ** 3
    assert sq.grad.item() == pytest.approx(expected, rel=1e-12)


def test_threshold_distance_by_hand():
    # mu=100, sigma=5, delta=4: threshold 120; NLL 110 is 2 sigma short
    d = threshold_distance(t([110.0, 120.0, 125.0]), t(100.0), t(5.0), 4.0)
    assert d.tolist() == pytest.approx([-2.0, 0.0, 1.0])


def test_threshold_helpers_agree_across_floats_arrays_and_tensors():
    assert forget_threshold(100.0, 5.0, 4.0) == 120.0
    assert default_epsilon(4.0) == pytest.approx(0.6)
    values = [110.0, 120.0, 125.0]
    by_array = threshold_distance(np.array(values), 100.0, 5.0, 4.0)
    by_tensor = threshold_distance(t(values), t(100.0), t(5.0), 4.0)
    np.testing.assert_array_equal(by_array, by_tensor.numpy())
    mu = t(100.0).requires_grad_()
    threshold_distance(t(values), mu, t(5.0), 4.0).sum().backward()
    assert mu.grad.item() == pytest.approx(-3 / 5.0)  # d(d)/d(mu) = -1/sigma per image


def test_unit_conversions_round_trip():
    assert nats_to_bpd(nats_per_bpd(784), 784) == pytest.approx(1.0, rel=1e-15)
    nll = np.array([500.0, 812.5])
    np.testing.assert_allclose(bpd_to_nats(nats_to_bpd(nll, 784), 784), nll, rtol=1e-15)


def test_forget_loss_sigmoid_in_bpd_matches_paper_formula():
    d_dims = 256
    per_bpd = nats_per_bpd(d_dims)
    assert per_bpd == pytest.approx(256 * math.log(2))
    nll = t([300.0, 350.0])
    mu, sigma = t(250.0), t(15.0)
    thr = 250.0 + 4 * 15.0
    expected = sum(1 / (1 + math.exp(-((n - thr) / per_bpd) ** 2)) for n in (300.0, 350.0)) / 2
    got = forget_loss(nll, mu, sigma, delta=4.0, kind="sigmoid", unit="bpd", nats_per_bpd=per_bpd)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # in nats the same gap saturates the sigmoid: the trap the design notes measured
    sat = forget_loss(nll, mu, sigma, delta=4.0, kind="sigmoid", unit="nats", nats_per_bpd=per_bpd)
    assert sat.item() == pytest.approx(1.0, abs=1e-12)


def test_forget_loss_squared_in_sigma_units_by_hand():
    nll = t([250.0, 310.0, 320.0])  # d = -4, 0, +0.667
    got = forget_loss(nll, t(250.0), t(15.0), delta=4.0, kind="squared", unit="sigma", nats_per_bpd=1.0)
    d = [-4.0, 0.0, 10 / 15]
    assert got.item() == pytest.approx(sum(x ** 2 for x in d) / 3, rel=1e-12)
    got = forget_loss(nll, t(250.0), t(15.0), delta=4.0, kind="huber", unit="sigma", nats_per_bpd=1.0,
                      huber_width=1.0)
    # |d| >= 1: |d| - 1/2; |d| < 1: d^2 / 2
    assert got.item() == pytest.approx((3.5 + 0.0 + (10 / 15) ** 2 / 2) / 3, rel=1e-12)
    weighted = forget_loss(nll, t(250.0), t(15.0), delta=4.0, kind="huber", unit="sigma", nats_per_bpd=1.0,
                           huber_width=1.0, weight=t([4.0, 1.0, 0.5]))
    # each image's term scaled before the mean: a straggler's pull grows without weakening the others'
    assert weighted.item() == pytest.approx((4 * 3.5 + 0.0 + 0.5 * (10 / 15) ** 2 / 2) / 3, rel=1e-12)


def test_forget_losses_are_minimal_at_the_threshold_and_push_towards_it():
    for kind, unit in (("squared", "sigma"), ("sigmoid", "bpd"), ("huber", "bpd")):
        nll = t([200.0, 330.0]).requires_grad_(True)
        loss = forget_loss(nll, t(250.0), t(15.0), delta=4.0, kind=kind, unit=unit, nats_per_bpd=177.4)
        loss.backward()
        assert nll.grad[0] < 0  # below the threshold: gradient descent raises NLL
        assert nll.grad[1] > 0  # beyond it: pulled back


def test_remember_loss_by_hand():
    per_bpd = 100.0
    nll = t([90.0, 110.0, 100.0, 120.0])
    loss, nll_term, kl = remember_loss(nll, t(100.0), t(10.0), t(105.0), t(12.0), gamma=0.6, nats_per_bpd=per_bpd)
    kl_expected = (math.log(12 / 10) + (100 + 25) / (2 * 144) - 0.5) + (math.log(10 / 12) + (144 + 25) / 200 - 0.5)
    assert nll_term.item() == pytest.approx(105.0 / per_bpd)
    assert kl.item() == pytest.approx(kl_expected)
    assert loss.item() == pytest.approx(0.4 * 1.05 + 0.6 * kl_expected)


def test_forget_loss_rejects_unknown_choices():
    with pytest.raises(ValueError):
        forget_loss(t([1.0]), t(0.0), t(1.0), delta=4.0, kind="hinge", unit="sigma", nats_per_bpd=1.0)
