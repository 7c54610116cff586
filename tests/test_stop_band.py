"""The stopping band's upper edge (issue 23, round 6b): taming stops once every forget image is past the threshold
as `evaluate` judges it (d > -epsilon) and not more than ``upper_edge`` epsilons above it; the screen asks for a
confirmation once every smoothed training d is inside that band. ``--preset paper`` keeps Eq. 10's
|d| < epsilon."""

import functools

import pytest
import torch

from flowtame.errors import InputError
from flowtame.jobs.tame import TameConfig, make_config, preset
from tests.test_baselines import confirm_at, make_method, run_engine, tiny_glow

PAPER_BAND = {"upper_edge": 1.0}


def screen(low: float, high: float) -> dict[str, float]:
    """A training-forward summary whose smoothed d lie in [low, high] (sigma_R)."""
    return {"min_d": low, "max_d": high, "max_abs_d": max(abs(low), abs(high))}


def test_an_image_above_epsilon_but_under_the_upper_edge_stops_the_default_run_not_the_papers(monkeypatch):
    model, _ = tiny_glow()
    default, paper = make_method("taming", model), make_method("taming", model, **PAPER_BAND)
    eps = default.epsilon
    assert default.upper_edge == pytest.approx(2 * eps) and paper.upper_edge == pytest.approx(eps)
    for method, done in ((default, True), (paper, False)):
        monkeypatch.setattr(method, "refresh", lambda _model: None)
        confirm_at(monkeypatch, method, [0.1, 1.5 * eps, -0.5 * eps])  # one image read past epsilon
        assert method.after_step(model, 10, screen(0.0, 0.0)) is done
        assert method.confirmations == 1
    # the upper edge still guards against forgetting too much: 2.2 epsilon above the threshold is refused
    monkeypatch.setattr(default, "refresh", lambda _model: None)
    confirm_at(monkeypatch, default, [0.1, 2.2 * eps, -0.5 * eps])
    assert default.after_step(model, 20, screen(0.0, 0.0)) is False
    # the lower edge is the evaluation's, unchanged: an image at -1.1 epsilon is not forgotten
    confirm_at(monkeypatch, default, [0.1, 0.0, -1.1 * eps])
    assert default.after_step(model, 30, screen(0.0, 0.0)) is False
    assert default.reached(torch.tensor([-0.99, 1.99]) * eps).all()


def test_the_screen_confirms_only_inside_the_band(monkeypatch):
    """No slack around the band (a slack of 0.5 epsilon spent the rosinality Glow k = 1's look-alike hold at its
    frequent confirmations, docs/benchmarks.md "Round 6b"): the screen passes just inside either edge, not just
    outside; a confirmation is judged on the check draws, and a short image there grows its weight."""
    model, _ = tiny_glow()
    default, paper = make_method("taming", model), make_method("taming", model, **PAPER_BAND)
    eps = default.epsilon
    inside_low, outside_low = screen(-0.99 * eps, 0.0), screen(-1.01 * eps, 0.0)
    inside_high, outside_high = screen(0.0, 1.99 * eps), screen(0.0, 2.01 * eps)
    assert default.screen_passes(inside_low) and default.screen_passes(inside_high)
    assert not default.screen_passes(outside_low) and not default.screen_passes(outside_high)
    # the paper's screen: every smoothed d inside |d| < epsilon
    assert paper.screen_passes(screen(-0.99 * eps, 0.99 * eps)) and paper.screen_passes(inside_low)
    assert not paper.screen_passes(screen(0.0, 1.01 * eps)) and not paper.screen_passes(outside_low)
    monkeypatch.setattr(default, "refresh", lambda _model: None)
    confirm_at(monkeypatch, default, [0.1, 0.3, -1.2 * eps])  # the check reads one image short
    assert default.after_step(model, 10, inside_low) is False and default.confirmations == 1
    assert default.forget_weight.tolist() == pytest.approx([1.0, 1.0, 1.25])
    assert default.after_step(model, 15, outside_low) is False and default.confirmations == 1  # no pass: no check
    confirm_at(monkeypatch, default, [0.1, 0.3, -0.9 * eps])
    assert default.after_step(model, 20, inside_low) is True and default.confirmations == 2


def test_settling_follows_the_band_and_the_paper_keeps_its_two_epsilon_rule(monkeypatch):
    """The learning rate decays while every smoothed d is within epsilon of the band, recovers outside: with the
    paper's band that is |d| < 2 epsilon, as before; with the default band an image 2.5 epsilon above the
    threshold (inside 2 epsilon + epsilon) still settles."""
    model, _ = tiny_glow()
    for band, high, decays in (({}, 2.5, True), (PAPER_BAND, 2.5, False), (PAPER_BAND, 1.5, True)):
        method = make_method("taming", model, settle_decay=0.5, **band)
        monkeypatch.setattr(method, "refresh", lambda _model: None)
        eps = method.epsilon
        method.after_step(model, 1, screen(-1.5 * eps, high * eps))
        assert method.lr_factor == (0.5 if decays else 1.0)
        method.after_step(model, 2, screen(-2.5 * eps, 0.0))  # an image more than epsilon short of the band
        assert method.lr_factor == 1.0  # recovered


def test_the_band_keys_are_checked_and_the_paper_preset_keeps_eq_10():
    paper = make_config(preset("paper"))
    assert (paper.upper_edge, paper.stop_margin) == (1.0, 0.0)
    assert TameConfig().upper_edge == 2.0
    # the holdout target's band is the held-out images' NLL band, both edges: an image above it is not "never seen"
    assert TameConfig(target="holdout").upper_edge == 1.0
    assert TameConfig(target="holdout", upper_edge=1.5).upper_edge == 1.5
    with pytest.raises(InputError, match="upper_edge must be at least 1"):
        make_config({"upper_edge": 0.9})
    with pytest.raises(InputError, match="screen_slack"):  # removed: the screen is the band itself
        make_config({"screen_slack": 0.5})


def test_a_resumed_run_repeats_the_confirmations_bit_for_bit(tmp_path):
    """A short run near the band (delta 0.5: the images start close to the threshold), whose confirmations grow
    a straggler's weight, resumed from its middle, ends with the same weights and state."""
    run = functools.partial(run_engine, "taming", delta=0.5, epsilon=0.3)
    straight, done = run(12)
    assert done.confirmations > 0
    run(6, state_out=tmp_path / "state.safetensors")
    resumed, again = run(12, state_in=tmp_path / "state.safetensors")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert again.confirmations == done.confirmations and torch.equal(again.forget_weight, done.forget_weight)
