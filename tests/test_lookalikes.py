"""The stop's quantile-drop guards (issue 23): the look-alikes' and the remember set's quantile drop as evaluate
computes it, a stop refused when it exceeds ``lookalike_qd`` / ``remember_qd`` at most MAX_HOLD_REFUSALS times,
and a resumed run keeping the count."""

import numpy as np
import pytest
import torch

import flowtame.methods.taming as taming
from flowtame.data.images import open_images
from flowtame.data.quantization import quantize
from flowtame.errors import InputError
from flowtame.io.checkpoint import Checkpoint
from flowtame.jobs.tame import _load_sets, _taming_data, make_config, preset
from flowtame.likelihood import statistics as st
from flowtame.likelihood.nll import batched_nll, dequantized, nll_nats, pixel_nll
from flowtame.methods.lookalikes import MAX_HOLD_REFUSALS, quantile_drop
from tests.test_anchor import base_and_moved
from tests.test_baselines import DATA_SPEC, REMEMBER, confirm_at, make_method, tiny_glow

ROWS = torch.tensor([5, 2, 7, 1])


def held_method(base, bound: float, **config_kw):
    """A taming method with look-alikes (remember rows ROWS, fixed check noise) and the guard at ``bound``."""
    method = make_method("taming", base, anchor=1.0, lookalike_qd=bound, **config_kw)
    d = method.data
    d.lookalikes = ROWS
    d.lookalike_check = dequantized(d.remember[ROWS], torch.rand((4, *d.remember.shape[1:]),
                                                                generator=torch.Generator().manual_seed(7)),
                                    DATA_SPEC.n_bits)
    d.base_remember_nll = torch.zeros(d.remember.shape[0], dtype=torch.float64)
    d.base_remember_nll[ROWS] = batched_nll(base, d.lookalike_check, DATA_SPEC).double()
    method.lookalike_hold = method._lookalike_hold(bound)
    method._build_anchor_pool()
    return method


def test_quantile_drop_is_evaluates_qd():
    rng = np.random.default_rng(0)
    base, now = rng.normal(100, 10, 16), rng.normal(103, 11, 16)
    fit_base, fit_now = st.NormalFit(99.0, 10.0), st.NormalFit(101.0, 10.5)
    assert quantile_drop(base, now, fit_base, fit_now) == pytest.approx(
        st.quantile_drop(base, now, fit_base, fit_now, n_boot=10)["qd"], abs=1e-15)


def measured_qd(method, model) -> float:
    """The look-alikes' quantile drop by hand: their NLL on the check noise under ``model`` and the base model,
    against the method's current mu_R, sigma_R and N_B."""
    d = method.data
    with torch.no_grad():
        now = nll_nats(model, d.lookalike_check, DATA_SPEC).double().numpy()
        base = nll_nats(method.base_model, d.lookalike_check, DATA_SPEC).double().numpy()
    return float(st.likelihood_quantile(base, st.NormalFit(float(d.base_mean), float(d.base_std))).mean()
                 - st.likelihood_quantile(now, st.NormalFit(float(method.mu_r), float(method.sigma_r))).mean())


@pytest.mark.parametrize("margin, stops", [(-0.002, False), (0.002, True)])
def test_a_stop_is_refused_while_the_lookalikes_drifted_past_the_bound(monkeypatch, margin, stops):
    base, moved = base_and_moved()
    probe = held_method(base, 0.01)
    qd = measured_qd(probe, moved)
    assert qd > 0.004  # the moved model really makes them less likely
    method = held_method(base, qd + margin)
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    confirm_at(monkeypatch, method, [0.1, -0.1, 0.2])
    assert method.after_step(moved, 10, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is stops
    assert method.lookalike_hold.last_qd == pytest.approx(qd, abs=1e-6)
    assert method.lookalike_hold.refusals == (0 if stops else 1)


def test_refusals_stop_at_the_bound_and_a_resumed_run_keeps_them(monkeypatch):
    """A stop past the bound is refused MAX_HOLD_REFUSALS times, then accepted with its quantile drop
    reported; a run resumed from the state keeps the count and the last drop."""
    base, _ = base_and_moved()
    method = held_method(base, 0.01)
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    confirm_at(monkeypatch, method, [0.1, -0.1, 0.2])
    # as if the look-alikes had been 5 nats more likely under the base model: under the unchanged weights
    # they now show a quantile drop far past the bound
    monkeypatch.setattr(method.lookalike_hold, "base_nll", method.lookalike_hold.base_nll - 5.0)
    for i in range(MAX_HOLD_REFUSALS):
        assert method.after_step(base, 10 * (i + 1), {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is False
        assert method.lookalike_hold.refusals == i + 1
    resumed = held_method(base, 0.01)
    resumed.load_state(method.state_tensors(), method.state_meta())
    assert resumed.lookalike_hold.refusals == MAX_HOLD_REFUSALS
    assert resumed.lookalike_hold.last_qd == method.lookalike_hold.last_qd > 0.01
    # refused that many times, the next stop is accepted, its quantile drop (still past the bound) reported
    assert method.after_step(base, 100, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is True
    assert method.lookalike_hold.refusals == MAX_HOLD_REFUSALS and method.lookalike_hold.last_qd > 0.01


def test_each_refused_stop_doubles_the_anchors_pull_up_to_its_cap(monkeypatch):
    """A stop a quantile hold refuses doubles the anchor's weight (the pull that brings the held images back),
    at most MAX_ANCHOR_FACTOR; a stop refused for another reason (an image short of the band) does not; the
    factor scales the anchor's term in the loss and a resumed run keeps it."""
    base, moved = base_and_moved()
    method = held_method(base, 0.01)
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    confirm_at(monkeypatch, method, [-5.0, -0.1, 0.2])  # an image short of the band: no hold is asked
    assert method.after_step(base, 10, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is False
    assert method.anchor_factor == 1.0
    confirm_at(monkeypatch, method, [0.1, -0.1, 0.2])
    monkeypatch.setattr(method.lookalike_hold, "base_nll", method.lookalike_hold.base_nll - 5.0)
    factors = []
    for i in range(MAX_HOLD_REFUSALS):
        assert method.after_step(base, 10 * (i + 2), {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is False
        factors.append(method.anchor_factor)
    assert factors == [min(taming.MAX_ANCHOR_FACTOR, taming.ANCHOR_GROWTH ** (i + 1))
                       for i in range(MAX_HOLD_REFUSALS)]
    assert factors[-1] == taming.MAX_ANCHOR_FACTOR
    resumed = held_method(base, 0.01)
    resumed.load_state(method.state_tensors(), method.state_meta())
    assert resumed.anchor_factor == taming.MAX_ANCHOR_FACTOR
    # the loss's anchor term is the weight x the factor x the anchor's value (the shift term off)
    nll = torch.tensor([300.0, 310.0, 305.0])
    anchor = (torch.tensor([301.0, 312.0, 305.5, 299.0]), torch.tensor([300.0, 309.0, 305.0, 300.0]))
    plain = held_method(base, 0.01)
    loss_plain = plain.objective(moved, nll[:1], anchor[0][:3], anchor=anchor)[0]
    loss_grown = resumed.objective(moved, nll[:1], anchor[0][:3], anchor=anchor)[0]
    expected = (1 - plain.alpha) * (1 - plain.gamma) * plain.anchor_weight * (taming.MAX_ANCHOR_FACTOR - 1) \
        * float(((anchor[0] - anchor[1]) / plain.data.base_std).square().mean())
    assert float(loss_grown - loss_plain) == pytest.approx(expected, rel=1e-5)


def test_the_whole_set_pass_judges_the_lookalikes_against_the_whole_sets_normal(monkeypatch):
    """The last gate: the whole remember set's NLL (as the report computes it) gives the look-alikes' exact
    quantile drop against the whole set's normal; a stop is refused there even when the cheap check passed."""
    base, _ = base_and_moved()
    method = held_method(base, 0.01)
    n = method.data.remember.shape[0]
    rows = ROWS.tolist()
    whole = torch.full((n,), float(method.data.base_mean), dtype=torch.float64) \
        + torch.linspace(-1, 1, n, dtype=torch.float64) * float(method.data.base_std)
    whole[rows] = torch.from_numpy(method.lookalike_hold.base_nll) + 0.5 * float(method.data.base_std)
    method.data.whole_remember_nll = lambda _model: whole
    forget_nll = whole.mean() + (method.delta + torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64)) * whole.std()
    assert method.whole_set_agrees(base, forget_nll) is False
    fit = st.NormalFit(float(whole.mean()), float(whole.std()))
    assert method.lookalike_hold.last_qd == pytest.approx(
        quantile_drop(method.lookalike_hold.base_nll, whole[rows].numpy(), method.lookalike_hold.base_fit, fit))
    assert method.lookalike_hold.refusals == 1 and method.whole_set_refusals == 0
    assert method.final_remember_nll is None
    # with the look-alikes back where the base model had them, the same pass lets the run stop
    whole[rows] = torch.from_numpy(method.lookalike_hold.base_nll)
    assert method.whole_set_agrees(base, forget_nll) is True


def test_the_guard_is_off_without_the_anchor_at_zero_and_in_the_paper_preset():
    base, _ = base_and_moved()
    assert held_method(base, 0.0).lookalike_hold is None
    assert make_method("taming", base, anchor=0.0, lookalike_qd=0.01)._lookalike_hold(0.01) is None
    assert make_config(preset("paper")).anchor == 0
    assert make_config({}).lookalike_qd == pytest.approx(0.018)
    with pytest.raises(InputError, match="lookalike_qd"):
        make_config({"lookalike_qd": -0.1})


def test_the_tame_job_gives_the_guard_the_whole_sets_base_nll_of_the_lookalikes():
    """The look-alikes' base NLL is the tame job's whole-set base pass at their rows (not measured again): the
    same keyed noise as their check images, so a fresh pass over those agrees to float rounding."""
    model, spec = tiny_glow()
    base = Checkpoint(model=model, architecture="glow", spec=spec, data_spec=DATA_SPEC)
    config = make_config({"lookalikes": 5})
    sets = _load_sets([open_images("embedded:digits:test:3", DATA_SPEC)], open_images(REMEMBER, DATA_SPEC))
    cpu = torch.device("cpu")
    whole = pixel_nll(model, sets.remember, sets.remember_keys, DATA_SPEC, config.eval_seed, cpu)
    data, _ = _taming_data(sets, whole, lambda _m: whole, config, torch.Generator().manual_seed(0), cpu,
                           DATA_SPEC, base)
    assert data.lookalikes is not None and data.lookalikes.numel() == 5
    assert data.base_remember_nll.tolist() == whole.tolist()
    torch.testing.assert_close(data.base_remember_nll[data.lookalikes],
                               batched_nll(model, data.lookalike_check, DATA_SPEC).double(), rtol=1e-6, atol=0)


def remember_held(base, bound: float, whole_base):
    """A taming method whose whole-set pass is on, with the base whole-set NLL ``whole_base`` [R] and the remember
    set's guard at ``bound`` (the look-alikes' guard off)."""
    method = make_method("taming", base, anchor=1.0, lookalike_qd=0.0, remember_qd=bound)
    method.data.base_remember_nll = whole_base
    method.data.base_mean, method.data.base_std = whole_base.mean().float(), whole_base.std().float()
    method.data.whole_remember_nll = lambda _model: whole_base
    method.remember_hold = method._remember_hold(bound)
    return method


def test_the_whole_set_pass_refuses_a_stop_while_the_remember_sets_shape_changed():
    """The remember set's quantile drop on the whole-set pass is evaluate's QD(remember) (each model against its
    own normal): a common shift and scaling of every NLL leaves it at 0 and the run stops; a change of shape past
    the bound refuses the stop (counted, reported, kept by a resumed run); MAX_HOLD_REFUSALS refusals, then
    the stop is accepted."""
    base, _ = base_and_moved()
    n = make_method("taming", base).data.remember.shape[0]
    whole_base = 300.0 + 20.0 * torch.linspace(-1, 1, n, dtype=torch.float64) ** 3
    method = remember_held(base, 0.001, whole_base)
    forget_at = lambda whole: whole.mean() + (method.delta + torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64)) \
        * whole.std()  # noqa: E731
    # every NLL 2% higher and 10% more spread: the same shape, no drop
    same_shape = whole_base.mean() * 1.02 + 1.1 * (whole_base - whole_base.mean())
    method.data.whole_remember_nll = lambda _model: same_shape
    assert method.whole_set_agrees(base, forget_at(same_shape)) is True
    assert abs(method.remember_hold.last_qd) < 1e-12 and method.remember_hold.refusals == 0
    # skewed the other way: the set's quantiles against its own normal drop
    reshaped = whole_base - 0.02 * (whole_base - whole_base.mean()) ** 2
    expected = st.quantile_drop(whole_base.numpy(), reshaped.numpy(),
                                st.NormalFit(float(whole_base.mean()), float(whole_base.std())),
                                st.NormalFit(float(reshaped.mean()), float(reshaped.std())), n_boot=10)["qd"]
    assert expected > 0.001
    method = remember_held(base, 0.001, whole_base)
    method.data.whole_remember_nll = lambda _model: reshaped
    for i in range(MAX_HOLD_REFUSALS):
        assert method.whole_set_agrees(base, forget_at(reshaped)) is False
        assert method.remember_hold.refusals == i + 1 and method.whole_set_refusals == 0
    assert method.remember_hold.last_qd == pytest.approx(expected, abs=1e-12)
    assert method.state_meta()["remember_qd_refusals"] == MAX_HOLD_REFUSALS
    resumed = remember_held(base, 0.001, whole_base)
    resumed.load_state(method.state_tensors(), method.state_meta())
    assert resumed.remember_hold.refusals == MAX_HOLD_REFUSALS
    assert resumed.remember_hold.last_qd == method.remember_hold.last_qd
    assert method.whole_set_agrees(base, forget_at(reshaped)) is True  # refused that many times: accepted
    assert method.final_remember_nll is reshaped


def test_the_remember_guard_is_off_at_zero_without_the_anchor_and_without_the_whole_set_pass():
    base, _ = base_and_moved()
    assert make_config({}).remember_qd == pytest.approx(0.001)
    with pytest.raises(InputError, match="remember_qd"):
        make_config({"remember_qd": -1e-3})
    whole = torch.linspace(290, 310, make_method("taming", base).data.remember.shape[0], dtype=torch.float64)
    assert remember_held(base, 0.0, whole).remember_hold is None
    assert make_method("taming", base, anchor=0.0)._remember_hold(0.001) is None
    assert make_method("taming", base)._remember_hold(0.001) is None  # no whole-set pass given


def test_a_refusal_by_the_remember_guard_adds_the_images_that_rose_most_to_the_anchors_rows(monkeypatch):
    """At a stop the remember set's guard refuses, the TAIL_ROWS remember images whose NLL rose most beyond the
    common shift join the anchor's rows (then the next ones, never twice); the batches draw them, a resumed run
    keeps them, and a refusal for another reason (an image short of the threshold) adds none."""
    base, _ = base_and_moved()
    n = make_method("taming", base).data.remember.shape[0]
    TAIL_ROWS = 4  # noqa: N806 (the test set has 30 remember images; the default is 16)
    monkeypatch.setattr(taming, "TAIL_ROWS", TAIL_ROWS)
    whole_base = 300.0 + 20.0 * torch.linspace(-1, 1, n, dtype=torch.float64) ** 3
    rising = torch.arange(n // 2 - TAIL_ROWS, n // 2 + TAIL_ROWS)  # the middle of the set (its steepest quantiles)
    moved = whole_base + 1.0  # a common shift ...
    moved[rising] += 3.0 + 0.3 * torch.arange(2 * TAIL_ROWS, dtype=torch.float64)  # ... and these rose, graded
    method = remember_held(base, 0.001, whole_base)
    method.data.whole_remember_nll = lambda _model: moved
    assert method.anchor_pool is None and method.lookalike_rows == 0
    forget_at = lambda whole, d=0.0: whole.mean() + (method.delta + torch.tensor([d, 0.1, -0.1],  # noqa: E731
                                                                                 dtype=torch.float64)) * whole.std()
    assert method.whole_set_agrees(base, forget_at(moved)) is False and method.remember_hold.refusals == 1
    assert sorted(method.anchor_pool.tolist()) == sorted(rising[TAIL_ROWS:].tolist())  # the TAIL_ROWS that rose most
    assert method.lookalike_rows == min(TAIL_ROWS, max(1, method.batch_size // 4))
    x, _, n_forget, n_remember = method._batch()
    tail = quantize(method.data.remember[method.anchor_pool], DATA_SPEC.n_bits)
    drawn = x[n_forget + n_remember:]
    assert drawn.shape[0] == method.lookalike_rows
    assert all(((row[None] - tail).abs().amax((1, 2, 3)) < 1.0 / 2 ** DATA_SPEC.n_bits).any()
               for row in drawn)  # every extra row is one of those images, dequantized
    assert method.whole_set_agrees(base, forget_at(moved)) is False
    assert sorted(method.anchor_pool.tolist()) == sorted(rising.tolist())  # the next 16, none twice
    assert method.tail_rows.device.type == "cpu"  # as the resume state saves them
    resumed = remember_held(base, 0.001, whole_base)
    resumed.load_state(method.state_tensors(), method.state_meta())
    assert resumed.anchor_pool.tolist() == method.anchor_pool.tolist()
    # an image short of the threshold refuses the stop before the guard judges: no rows added
    short = remember_held(base, 0.001, whole_base)
    short.data.whole_remember_nll = lambda _model: moved
    assert short.whole_set_agrees(base, forget_at(moved, d=-5.0)) is False
    assert short.anchor_pool is None and short.whole_set_refusals == 1


def test_the_anchor_pool_is_one_tensor_rebuilt_only_when_its_rows_change():
    """The look-alikes and the tail rows are held as one tensor on the data's device: batches index it as it is
    (no per-step concatenation or copy); a resumed state's tail rows, or a widening, rebuild it."""
    base, _ = base_and_moved()
    method = held_method(base, 0.02)
    method.load_state({**method.state_tensors(), "tail_rows": torch.tensor([9, 11])}, method.state_meta())
    pool = method.anchor_pool
    assert pool.tolist() == [*ROWS.tolist(), 9, 11] and pool.device == method.data.device
    method._batch()
    method._batch()
    assert method.anchor_pool is pool


def test_a_lookalike_refusal_on_the_whole_set_does_not_hide_the_remember_sets(monkeypatch):
    """On the whole-set pass both holds judge the stop: with the look-alikes risen AND the remember set reshaped,
    each counts its refusal and the remember set's adds the images that rose most to the anchor's rows."""
    base, _ = base_and_moved()
    monkeypatch.setattr(taming, "TAIL_ROWS", 4)
    method = make_method("taming", base, anchor=1.0, lookalike_qd=0.01, remember_qd=0.001)
    d = method.data
    n = d.remember.shape[0]
    whole_base = 300.0 + 20.0 * torch.linspace(-1, 1, n, dtype=torch.float64) ** 3
    d.base_remember_nll = whole_base
    d.base_mean, d.base_std = whole_base.mean().float(), whole_base.std().float()
    d.lookalikes, d.lookalike_check = ROWS, dequantized(d.remember[ROWS], torch.full((4, *d.remember.shape[1:]), 0.01),
                                                       DATA_SPEC.n_bits)
    moved = whole_base - 0.02 * (whole_base - whole_base.mean()) ** 2  # the remember set's shape changed ...
    moved[ROWS] += 0.5 * float(whole_base.std())  # ... and the look-alikes rose
    d.whole_remember_nll = lambda _model: moved
    method.lookalike_hold, method.remember_hold = method._lookalike_hold(0.01), method._remember_hold(0.001)
    method._build_anchor_pool()
    forget = moved.mean() + (method.delta + torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64)) * moved.std()
    assert method.whole_set_agrees(base, forget) is False
    assert method.lookalike_hold.refusals == 1 and method.remember_hold.refusals == 1
    assert method.tail_rows is not None and method.tail_rows.numel() == 4
    assert method.anchor_pool.numel() == ROWS.numel() + 4
