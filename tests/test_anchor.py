"""The per-image anchor to the base model (issue 23): its formula, its place in taming's loss, and that the
baselines and the paper's preset run without it."""

import copy

import pytest
import torch

from flowtame.data.images import open_images
from flowtame.data.quantization import nats_per_bpd
from flowtame.errors import InputError
from flowtame.io.checkpoint import Checkpoint
from flowtame.jobs.tame import make_config, preset
from flowtame.likelihood.evaluation import find_neighbours, nearest_rows
from flowtame.likelihood.nll import dequantized, nll_nats
from flowtame.methods.objective import anchor_loss, shift_loss
from tests.test_baselines import DATA_SPEC, REMEMBER, confirm_at, make_method, tiny_glow


def test_anchor_loss_is_the_mean_squared_deviation_in_base_standard_deviations():
    nll = torch.tensor([10.0, 12.0, 7.0], requires_grad=True)
    base_nll = torch.tensor([11.0, 12.0, 4.0])
    sigma = torch.tensor(2.0)
    value = anchor_loss(nll, base_nll, sigma)
    assert float(value.detach()) == pytest.approx(((-1 / 2) ** 2 + 0 + (3 / 2) ** 2) / 3)
    value.backward()
    # the pull on each image is proportional to its own deviation: 2 (nll - base) / (sigma^2 B)
    assert nll.grad.tolist() == pytest.approx([2 * -1 / 4 / 3, 0.0, 2 * 3 / 4 / 3])


def test_shift_loss_is_the_squared_mean_deviation_in_base_standard_deviations():
    nll = torch.tensor([10.0, 12.0, 7.0], requires_grad=True, dtype=torch.float64)
    base_nll = torch.tensor([11.0, 12.0, 4.0], dtype=torch.float64)
    sigma = torch.tensor(2.0, dtype=torch.float64)
    value = shift_loss(nll, base_nll, sigma)
    # deviations -1/2, 0, 3/2: their mean 1/3, squared
    assert float(value.detach()) == pytest.approx((1 / 3) ** 2)
    value.backward()
    # every image gets the same pull, 2 * mean / (sigma B): a common shift, not each image's own deviation
    assert nll.grad.tolist() == pytest.approx([2 * (1 / 3) / 2 / 3] * 3)
    # deviations that cancel cost nothing here (the anchor's mean of squares charges them)
    assert float(shift_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), sigma)) == 0.0
    assert float(anchor_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), sigma)) == pytest.approx(0.25)


def fixed_batch(method, seed: int = 3):
    """Replace the method's batch draw by one fixed batch (2 forget rows, then 4 remember rows)."""
    d = method.data
    pixels = torch.cat([d.forget[:2], d.remember[:4]])
    x = dequantized(pixels, torch.rand(pixels.shape, generator=torch.Generator().manual_seed(seed)),
                    DATA_SPEC.n_bits)
    method._batch = lambda: (x, torch.tensor([0, 1]), 2, 4)
    return x


def base_and_moved():
    """A tiny Glow and a copy with every weight moved by 0.02·N(0, 1)."""
    base, _ = tiny_glow()
    moved = copy.deepcopy(base)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return base, moved


def test_the_anchor_replaces_the_mean_nll_term_on_the_remember_rows_against_the_frozen_base():
    base, moved = base_and_moved()
    losses = {}
    for weight in (0.0, 3.0):
        method = make_method("taming", base, anchor=weight, gamma=0.25)
        x = fixed_batch(method)
        losses[weight], metrics = method.loss(moved, 0)
    with torch.no_grad():
        nll = nll_nats(moved, x[2:], DATA_SPEC)
        by_hand = ((nll - nll_nats(base, x[2:], DATA_SPEC)) / method.data.base_std).square().mean()
        mean_term = nll.mean() / nats_per_bpd(DATA_SPEC.num_dims)
    assert float(by_hand) > 1e-4  # the moved model really deviates
    assert float(metrics["anchor"]) == pytest.approx(float(by_hand), rel=1e-5)
    # L_R = (1-gamma)*A + gamma*KL becomes (1-gamma)*anchor*by_hand + gamma*KL
    expected = (1 - method.alpha) * (1 - 0.25) * (3.0 * by_hand - mean_term)
    assert float((losses[3.0] - losses[0.0]).detach()) == pytest.approx(float(expected), rel=1e-4)
    # on the base model itself the anchor is zero: the same images, the same weights
    method = make_method("taming", base, anchor=3.0, gamma=0.25)
    fixed_batch(method)
    assert float(method.loss(copy.deepcopy(base), 0)[1]["anchor"]) == pytest.approx(0.0, abs=1e-10)


def test_the_shift_term_adds_its_weight_times_the_remember_rows_squared_mean_deviation():
    base, moved = base_and_moved()
    losses = {}
    for shift in (0.0, 5.0):
        method = make_method("taming", base, anchor=1.0, anchor_shift=shift, gamma=0.25)
        method.shift_factor = 1.0  # as after the first drift refusal
        method.data.lookalikes = torch.tensor([5, 2])
        x = fixed_batch(method)
        # 2 forget rows, 3 remember rows, then 1 look-alike row the shift term must leave out
        method._batch = lambda x=x: (x, torch.tensor([0, 1]), 2, 3)
        losses[shift], metrics = method.loss(moved, 0)
    with torch.no_grad():
        by_hand = ((nll_nats(moved, x[2:5], DATA_SPEC) - nll_nats(base, x[2:5], DATA_SPEC))
                   / method.data.base_std).mean().square()
    assert float(by_hand) > 1e-6
    assert float(metrics["shift"]) == pytest.approx(float(by_hand), rel=1e-5)
    expected = (1 - method.alpha) * (1 - 0.25) * 5.0 * by_hand
    assert float((losses[5.0] - losses[0.0]).detach()) == pytest.approx(float(expected), rel=1e-4)
    # zero at the base model; off without the anchor (the paper's remember term has no base model)
    method = make_method("taming", base, anchor=1.0, anchor_shift=5.0)
    method.shift_factor = 1.0
    fixed_batch(method)
    assert float(method.loss(copy.deepcopy(base), 0)[1]["shift"]) == pytest.approx(0.0, abs=1e-12)
    assert make_method("taming", base, anchor=0.0, anchor_shift=5.0).shift_weight == 0.0
    with pytest.raises(InputError, match="anchor_shift"):
        make_config({"anchor_shift": -1.0})


def test_the_shift_term_switches_on_at_a_drift_refusal_and_grows_with_each_one(monkeypatch):
    """Off while the run goes well; a confirmation refused because the remember mean rose past
    max_remember_drift switches it on, each further refusal doubles it, up to 8x; a resumed run keeps it."""
    base, moved = base_and_moved()
    method = make_method("taming", base, anchor=1.0, anchor_shift=5.0)
    fixed_batch(method)
    assert method.shift_factor == 0.0 and "shift" not in method.loss(moved, 0)[1]
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    confirm_at(monkeypatch, method, [0.1, -0.1, 0.2])
    method.mu_r = method.data.base_mean * (1 + 2 * method.max_remember_drift)
    factors = []
    for i in range(6):
        assert method.after_step(base, 10 * (i + 1), {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is False
        factors.append(method.shift_factor)
    assert factors == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0] and method.drift_refusals == 6
    assert "shift" in method.loss(moved, 0)[1]
    resumed = make_method("taming", base, anchor=1.0, anchor_shift=5.0)
    resumed.load_state(method.state_tensors(), method.state_meta())
    assert resumed.shift_factor == 8.0
    # without the anchor nothing grows into the loss: the paper's term and the baselines stay as published
    plain = make_method("taming", base, anchor=0.0, anchor_shift=5.0)
    plain.shift_factor = 8.0
    fixed_batch(plain)
    assert "shift" not in plain.loss(moved, 0)[1]


def test_baselines_and_the_paper_preset_run_without_the_anchor():
    base, _ = tiny_glow()
    assert make_method("neggrad", base, anchor=3.0).anchor_weight == 0.0
    assert make_method("taming", base, anchor=3.0).anchor_weight == 3.0
    assert make_config(preset("paper")).anchor == 0
    with pytest.raises(InputError, match="anchor"):
        make_config({"anchor": -1.0})


def test_a_run_too_slow_for_its_budget_says_so_early_with_what_to_change():
    base, _ = tiny_glow()
    method = make_method("taming", base, max_iters=300)
    method.check_progress(1, {"mean_d": -4.0, "min_d": -4.5})
    # pace 0.01 sigma_R per iteration, farthest image (-4.5 - edge) short: ~390 more iterations > 300
    with pytest.warns(UserWarning, match=r"0\.010 sigma_R per iteration .* over the budget of 300.*--alpha"):
        method.check_progress(50, {"mean_d": -3.5, "min_d": -4.5})
    assert "about" in method.progress_warning and method.state_meta()["progress_warning"] == method.progress_warning
    # a pace that fits the budget stays quiet
    quick = make_method("taming", base, max_iters=300)
    quick.check_progress(1, {"mean_d": -4.0, "min_d": -4.5})
    quick.check_progress(50, {"mean_d": -2.0, "min_d": -2.5})
    assert quick.progress_warning is None


def test_lookalike_rows_come_from_the_forget_sets_nearest_remember_images():
    base, _ = tiny_glow()
    method = make_method("taming", base, anchor=1.0, batch_size=8)
    remember = method.data.remember
    method.data.lookalikes = torch.tensor([5, 2, 7])
    method._build_anchor_pool()
    x, _, n_forget, n_remember = method._batch()
    assert n_remember == 8 and method.lookalike_rows == 2 and x.shape[0] == n_forget + 8 + 2
    pixels = (x[n_forget + 8:] + 0.5) * 2 ** DATA_SPEC.n_bits  # undo dequantization: floor gives the bins
    bins = (remember[[5, 2, 7]].float() / 2 ** (8 - DATA_SPEC.n_bits)).floor()
    for row in pixels.floor():
        assert any(torch.equal(row, b) for b in bins)
    # without the anchor no look-alike rows are drawn
    plain = make_method("taming", base, anchor=0.0, batch_size=8)
    plain.data.lookalikes = torch.tensor([5, 2, 7])
    plain._build_anchor_pool()
    assert plain.lookalike_rows == 0 and plain._batch()[0].shape[0] == plain._batch()[2] + 8


def test_lookalikes_are_the_neighbours_evaluate_judges():
    model, spec = tiny_glow()
    base = Checkpoint(model=model, architecture="glow", spec=spec, data_spec=DATA_SPEC)
    forget, remember = open_images("embedded:digits:test:3", DATA_SPEC), open_images(REMEMBER, DATA_SPEC)
    expected = find_neighbours(base, forget, remember, 5, device="cpu").indices
    got = nearest_rows(base, forget.load_tensor()[0], remember.load_tensor()[0], 5, device=torch.device("cpu"))
    assert got.tolist() == expected.tolist()
