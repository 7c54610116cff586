"""The step that fits the model (issue 23): the remember sensitivity, the learning-rate calibration, the tracked
N_T estimate, and a forced blow-up contained by them, on tiny Glows with a few embedded digits."""

import pytest
import torch

from flowtame.data.images import open_images
from flowtame.errors import TrainingDivergedError
from flowtame.io.checkpoint import Checkpoint
from flowtame.jobs.tame import freeze_parameters, make_config, preset, tame
from flowtame.likelihood.nll import batched_nll, dequantized, nll_nats
from flowtame.methods.calibration import calibrate_lr, remember_sensitivity
from flowtame.methods.taming import STALE_SIGMA, TRACK_WEIGHT
from tests.test_baselines import DATA_SPEC, REMEMBER, make_method, tiny_glow


def remember_inputs(seed: int = 1) -> torch.Tensor:
    pixels, _ = open_images(REMEMBER, DATA_SPEC).load_tensor()
    return dequantized(pixels, torch.rand(pixels.shape, generator=torch.Generator().manual_seed(seed)),
                       DATA_SPEC.n_bits)


def test_sensitivity_is_the_l1_norm_of_the_remember_mean_gradient_over_trainable_weights():
    model, _ = tiny_glow()
    frozen = set(freeze_parameters(model, "coupling-outputs"))
    x = remember_inputs()
    trainable = [p for n, p in model.named_parameters() if n not in frozen]
    grads = torch.autograd.grad(nll_nats(model, x, DATA_SPEC).mean(), trainable)
    by_hand = sum(float(g.abs().sum()) for g in grads)
    assert remember_sensitivity(model, x, DATA_SPEC, chunk=7) == pytest.approx(by_hand, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_the_first_order_effect_predicts_a_coherent_step():
    """Moving every trainable weight by lr in the direction that raises the remember mean changes it by about
    lr * sensitivity nats: what the calibration bounds."""
    model, _ = tiny_glow()
    x = remember_inputs()
    sensitivity = remember_sensitivity(model, x, DATA_SPEC)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(nll_nats(model, x, DATA_SPEC).mean(), params)
    before = float(batched_nll(model, x, DATA_SPEC).mean())
    lr = 1e-5
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p += lr * g.sign()
    change = float(batched_nll(model, x, DATA_SPEC).mean()) - before
    assert change == pytest.approx(lr * sensitivity, rel=0.1)


def test_calibration_picks_a_smaller_step_on_a_sharper_model():
    """Training every weight (the coupling outputs too) makes the same learning rate a larger step in NLL; the
    calibration lowers the rate so that the worst-case first-order change stays step_sigma * sigma."""
    x = remember_inputs()
    sigma = float(batched_nll(tiny_glow()[0], x, DATA_SPEC).std())
    picked = {}
    for rule in ("coupling-outputs", "none"):
        model, _ = tiny_glow()
        freeze_parameters(model, rule)
        picked[rule] = calibrate_lr(model, x, DATA_SPEC, lr_cap=1.0, step_sigma=0.5, sigma=sigma)
    held, everything = picked["coupling-outputs"], picked["none"]
    assert everything.sensitivity > held.sensitivity
    assert everything.lr < held.lr < 1.0
    for c in (held, everything):
        assert c.lr * c.sensitivity == pytest.approx(0.5 * sigma, rel=1e-9)
    # under the cap, the cap is used as it is
    model, _ = tiny_glow()
    assert calibrate_lr(model, x, DATA_SPEC, lr_cap=1e-9, step_sigma=0.5, sigma=sigma).lr == 1e-9


def test_a_stale_refresh_is_redone_early_and_counted():
    """The KL's N_T value comes from the latest refresh; when the remember batches' average moves more than
    STALE_SIGMA sigma_R away from it, the method refreshes before the schedule."""
    model, _ = tiny_glow()
    method = make_method("taming", model, refresh_every=1000)
    mu, sigma = float(method.mu_r), float(method.sigma_r)
    nll_forget = torch.full((3,), mu, requires_grad=True)
    calm = torch.full((4,), mu, requires_grad=True)
    calm = calm + torch.tensor([-1.0, 1.0, -1.0, 1.0]) * sigma  # batch mean mu, std ~1.15 sigma
    method.objective(model, nll_forget, calm)
    assert float(method.track_mean) == pytest.approx(mu, rel=1e-6)
    shifted = calm + 2 * sigma  # a batch 2 sigma_R above the refreshed mean
    method.objective(model, nll_forget, shifted)
    assert float(method.track_mean) == pytest.approx(mu + TRACK_WEIGHT * 2 * sigma, rel=1e-6)
    assert TRACK_WEIGHT * 2 > STALE_SIGMA and method.stale()
    method.screen_and_confirm(model, 3, {"max_abs_d": 10.0, "max_d": 10.0, "min_d": -10.0})
    assert method.early_refreshes == 1 and method.refreshes == 1
    assert float(method.track_mean) == float(method.mu_r) and not method.stale()


def test_roll_back_re_estimates_the_remember_statistics_on_the_restored_weights():
    model, _ = tiny_glow()
    method = make_method("taming", model)
    method.mu_r, method.sigma_r = torch.tensor(1e6), torch.tensor(1e5)  # as measured on blown-up weights
    method.rolled_back(model)
    nll = batched_nll(model, method.data.refresh, DATA_SPEC)
    assert float(method.mu_r) == pytest.approx(float(nll.mean()), rel=1e-6)
    assert float(method.track_mean) == float(method.mu_r)


@pytest.fixture(scope="module")
def tiny_base() -> Checkpoint:
    model, spec = tiny_glow()
    return Checkpoint(model=model, architecture="glow", spec=spec, data_spec=DATA_SPEC)


def test_a_forced_blow_up_is_contained_by_the_calibration(tiny_base):
    """A learning rate far too large for the model: as given it blows the remember NLL up (three roll-backs, then
    failure, naming what to change); calibrated, with the stale refresh redone early, no roll-back at all."""
    forget = open_images("embedded:digits:test:3", DATA_SPEC)
    remember = open_images(REMEMBER, DATA_SPEC)
    fast = {"max_iters": 30, "warmup": 5, "batch_size": 4, "lr": 0.3, "step": "adam"}  # (the calibration is Adam's)
    with pytest.raises(TrainingDivergedError, match="after 3 learning-rate reductions; try a smaller --lr"):
        tame(tiny_base, [forget], remember, make_config(fast, {"step_sigma": 0}), device="cpu")
    outcome = tame(tiny_base, [forget], remember, make_config(fast), device="cpu")
    calibration = outcome.report["calibration"]
    assert outcome.report["lr_reductions"] == 0
    assert calibration["lr"] < calibration["lr_cap"] == 0.3
    assert calibration["step_sigma"] == make_config({}).step_sigma
    worst_case = calibration["step_sigma"] * calibration["sigma"]
    assert calibration["lr"] * calibration["sensitivity"] == pytest.approx(worst_case, rel=1e-6)


def test_paper_preset_is_not_calibrated():
    assert make_config(preset("paper")).step_sigma is None
