"""The baselines (neggrad, selective-amnesia): objectives by hand, the Fisher, the EWC penalty, the stop rule,
resume, and whole runs through ``tame()`` and the CLI on a tiny Glow with a few embedded digits."""

import dataclasses
import functools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowtame.data.images import dequantization_noise, open_images
from flowtame.data.quantization import DataSpec, nats_per_bpd
from flowtame.engine.loop import Engine, EngineConfig
from flowtame.errors import CheckpointError, InputError
from flowtame.flows.base import coupling_output_parameters
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from flowtame.jobs.tame import TameConfig, make_config, read_config_file, tame
from flowtame.likelihood.nll import batched_nll, dequantized, nll_nats, pixel_nll
from flowtame.likelihood.protocol import write_pngs
from flowtame.methods import baselines
from flowtame.methods.baselines import (
    NegGrad,
    SelectiveAmnesia,
    SelectiveAmnesiaSettings,
    diagonal_fisher,
    per_sample_gradients,
)
from flowtame.methods.taming import METHODS, TamingData, TamingMethod

DATA_SPEC = DataSpec(image_size=8, channels=1, n_bits=5)
REMEMBER = "embedded:digits:test:0"
# Adam's step (the taming method's default is the solved step, tests/test_solved.py): these tests are about its loop
FAST = {"max_iters": 30, "lr": 1e-3, "warmup": 5, "sa_fisher_samples": 16, "batch_size": 4, "step": "adam"}


def tiny_glow(seed: int = 0, **spec_kw) -> tuple[torch.nn.Module, GlowSpec]:
    """A tiny Glow whose ActNorm layers were initialized on a batch of digits (as a trained model's are)."""
    torch.manual_seed(seed)
    spec = GlowSpec(**{"channels": 1, "image_size": 8, "n_flow": 2, "n_block": 2, "hidden": 16, **spec_kw})
    model = build_glow(spec)
    pixels, _ = open_images(REMEMBER, DATA_SPEC).load_tensor()
    model.train()
    with torch.no_grad():
        model.log_prob(dequantized(pixels, torch.rand(pixels.shape), DATA_SPEC.n_bits))
    return model.eval(), spec


@pytest.fixture(scope="module")
def base() -> Checkpoint:
    model, spec = tiny_glow()
    return Checkpoint(model=model, architecture="glow", spec=spec, data_spec=DATA_SPEC)


@pytest.fixture(scope="module")
def forget_folder(tmp_path_factory):
    """Three images of digit 3 as PNG files: a small forget set."""
    folder = tmp_path_factory.mktemp("forget")
    write_pngs(open_images("embedded:digits:test:3", DATA_SPEC), [0, 1, 2], folder)
    return folder


def make_method(name: str, model: torch.nn.Module, *, seed: int = 0, **config_kw):
    """A method on the first 3 test 3s (forget) and the test 0s (remember), built as tame() builds it."""
    forget, _ = open_images("embedded:digits:test:3", DATA_SPEC).load_tensor()
    remember, _ = open_images(REMEMBER, DATA_SPEC).load_tensor()
    forget = forget[:3]
    refresh = dequantized(remember, torch.rand(remember.shape, generator=torch.Generator().manual_seed(1)),
                          DATA_SPEC.n_bits)
    with torch.no_grad():
        nll = nll_nats(model, refresh, DATA_SPEC)
    data = TamingData(data_spec=DATA_SPEC, forget=forget, forget_request=torch.zeros(3, dtype=torch.long),
                      forget_check_noise=torch.rand(forget.shape), remember=remember, refresh=refresh,
                      base_mean=nll.mean(), base_std=nll.std())
    config = make_config({"method": name, **FAST, **config_kw})
    return METHODS[name](data, config, delta=config.delta, epsilon=config.epsilon,
                         generator=torch.Generator().manual_seed(seed), base_model=model)


def confirm_at(monkeypatch, method, d: list[float]) -> None:
    """Make the method's check pass measure forget NLLs whose d against its current mu_R, sigma_R is ``d``."""
    def check_nll(_model):
        return method.mu_r + (method.delta + torch.tensor(d)) * method.sigma_r

    monkeypatch.setattr(method, "check_nll", check_nll)


def test_methods_register_on_import():
    assert METHODS["neggrad"] is NegGrad and METHODS["selective-amnesia"] is SelectiveAmnesia
    assert TameConfig(method="selective-amnesia").method == "selective-amnesia"
    # importing the methods package registers every method; TameConfig no longer imports the baselines
    code = ("from flowtame.methods.taming import METHODS; import sys; "
            "print(sorted(METHODS), 'flowtame.jobs.tame' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['neggrad', 'selective-amnesia', 'taming'] False"


def test_selective_amnesia_settings_flat_keys_section_and_flags(tmp_path):
    """The SA settings live with the method; the flat sa_* keys (and flags) and a selective_amnesia section
    both set them, later layers win per setting."""
    cfg = tmp_path / "sa.yaml"
    cfg.write_text("method: selective-amnesia\nselective-amnesia:\n  ewc_lambda: 5\n  fisher-samples: 32\n"
                   "sa_replay_weight: 0.5\n")
    config = make_config(read_config_file(cfg), {"sa_fisher_samples": 64, "sa_lambda": None})
    assert config.method_settings["selective_amnesia"] == SelectiveAmnesiaSettings(
        ewc_lambda=5, replay_weight=0.5, fisher_samples=64, surrogate="uniform")
    assert make_config({}).method_settings == {"selective_amnesia": SelectiveAmnesiaSettings()}
    assert "sa_lambda" not in {f.name for f in dataclasses.fields(TameConfig)}
    with pytest.raises(InputError, match="sa_lambda and sa_replay_weight >= 0") as caught:
        make_config({"sa_lambda": -1.0})
    assert "sa_lambda" in caught.value.keys
    cfg.write_text("selective_amnesia:\n  lambda: 5\n")
    with pytest.raises(InputError, match="selective_amnesia: unknown key"):
        make_config(read_config_file(cfg))


# ---------------------------------------------------------------------------------------------- objectives
def test_neggrad_objective_by_hand():
    model, _ = tiny_glow()
    method = make_method("neggrad", model, alpha=0.25)
    method.mu_r, method.sigma_r = torch.tensor(100.0), torch.tensor(5.0)  # threshold 100 + 4*5 = 120 nats
    per_bpd = nats_per_bpd(64)
    nll_forget = torch.tensor([110.0, 130.0, 117.0], requires_grad=True)  # 10 short, past, 3 short
    nll_remember = torch.tensor([90.0, 100.0, 95.0, 99.0])
    loss, metrics = method.objective(model, nll_forget, nll_remember)
    hinge = (10.0 + 0.0 + 3.0) / 3 / per_bpd
    remember_bpd = 96.0 / per_bpd
    assert metrics["loss_forget"].item() == pytest.approx(hinge, rel=1e-6)
    assert metrics["remember_bpd"].item() == pytest.approx(remember_bpd, rel=1e-6)
    assert loss.item() == pytest.approx(0.25 * hinge + 0.75 * remember_bpd, rel=1e-6)
    loss.backward()
    # the gradient of alpha * (-mean NLL in BPD) for images short of the threshold, zero past it
    assert nll_forget.grad.tolist() == pytest.approx([-0.25 / 3 / per_bpd, 0.0, -0.25 / 3 / per_bpd])


def test_selective_amnesia_objective_by_hand():
    model, _ = tiny_glow()
    method = make_method("selective-amnesia", model, alpha=0.5, sa_lambda=7.0, sa_replay_weight=0.3)
    method.mu_r, method.sigma_r = torch.tensor(100.0), torch.tensor(5.0)
    per_bpd = nats_per_bpd(64)
    nll_forget = torch.tensor([115.0, 125.0])
    surrogate, replay = [400.0, 420.0, 380.0, 440.0], [90.0, 110.0, 100.0, 104.0]  # batch_size rows each
    nll_rows = torch.tensor(surrogate + replay)
    loss, metrics = method.objective(model, nll_forget, nll_rows)
    assert metrics["ewc"].item() == 0.0  # at theta*
    hinge = 5.0 / 2 / per_bpd
    sa = 410.0 / per_bpd + 0.3 * 101.0 / per_bpd
    assert metrics["surrogate_bpd"].item() == pytest.approx(410.0 / per_bpd, rel=1e-6)
    assert metrics["remember_bpd"].item() == pytest.approx(101.0 / per_bpd, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * hinge + 0.5 * sa, rel=1e-6)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    loss2, metrics2 = method.objective(model, nll_forget, nll_rows)
    assert metrics2["ewc"].item() > 0
    # SA's objective in nats, converted to BPD as a whole: the EWC term (nats) is divided by D ln 2 too
    assert loss2.item() == pytest.approx(0.5 * hinge + 0.5 * (sa + 7.0 * metrics2["ewc"].item() / per_bpd),
                                         rel=1e-6)


def test_selective_amnesia_batch_is_forget_surrogate_replay():
    model, _ = tiny_glow()
    method = make_method("selective-amnesia", model)
    x, forget_idx, n_forget, n_rest = method._batch()
    assert n_rest == x.shape[0] - n_forget
    assert n_forget == 3 and forget_idx.tolist() == [0, 1, 2]
    assert x.shape == (3 + 2 * method.batch_size, 1, 8, 8)
    surrogate, replay = x[3:3 + method.batch_size], x[3 + method.batch_size:]
    assert surrogate.min() >= -0.5 and surrogate.max() < 0.5  # uniform noise in the model's input range
    pool = method.replay_pool.flatten(1)
    assert all((pool == row).all(1).any() for row in replay.flatten(1))  # replay rows come from the pool
    assert method.replay_pool.shape == (16, 1, 8, 8)


def test_surrogate_folder(forget_folder):
    model, _ = tiny_glow()
    method = make_method("selective-amnesia", model, sa_surrogate=str(forget_folder))
    assert method.surrogate.shape == (3, 1, 8, 8) and method.surrogate.dtype == torch.uint8
    x, _, _, _ = method._batch()
    images = dequantized(method.surrogate, torch.zeros(3, 1, 8, 8), DATA_SPEC.n_bits)
    bins = torch.floor((x[3:3 + method.batch_size] + 0.5) * 32) / 32 - 0.5  # undo the noise
    assert all((images.flatten(1) == row).all(1).any() for row in bins.flatten(1))


# ---------------------------------------------------------------------------------------------- Fisher and EWC
def hand_fisher(model, x):
    """mean over inputs of the squared autograd gradient of NLL (nats), one input at a time."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(x.shape[0]):
        nll = nll_nats(model, x[i:i + 1], DATA_SPEC).sum()
        grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                total[name] += g.square() / x.shape[0]
    return total


def test_fisher_vectorized_equals_loop_equals_hand_computed():
    model, _ = tiny_glow(affine=True, conv_lu=(True, False, True, False))  # both 1x1 convs, affine coupling
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3)) - 0.5
    vectorized = diagonal_fisher(model, x, DATA_SPEC, chunk_size=2)  # chunks of 2, 2, 1
    loop = diagonal_fisher(model, x, DATA_SPEC, vectorized=False)
    hand = hand_fisher(model, x)
    assert set(vectorized) == set(hand) == set(loop)
    for name in hand:
        scale = hand[name].abs().max().item() + 1e-20
        assert (vectorized[name] - hand[name]).abs().max().item() <= 1e-4 * scale, name
        assert (loop[name] - hand[name]).abs().max().item() <= 1e-4 * scale, name
    assert sum(f.sum() for f in hand.values()) > 0
    assert not model.training  # mode restored


@pytest.mark.parametrize("vectorized", [True, False])
def test_grouped_per_sample_gradients_are_each_groups_mean_nll_gradient(vectorized):
    """x [N,D,C,S,S]: each sample's gradient is that of the mean NLL over its D inputs, by autograd one group at
    a time (float64), in chunks of 2 samples (2, 1: the chunk offsets exercised)."""
    model, _ = tiny_glow(affine=True, conv_lu=(True, False, True, False))
    model = model.double()
    groups = torch.rand(3, 4, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.5
    chunks = list(per_sample_gradients(model, groups, DATA_SPEC, vectorized=vectorized, chunk_size=2))
    assert [next(iter(c.values())).shape[0] for c in chunks] == [2, 1]
    ours = {n: torch.cat([c[n] for c in chunks]) for n in chunks[0]}
    params = dict(model.named_parameters())
    for i, group in enumerate(groups):
        hand = torch.autograd.grad(nll_nats(model, group, DATA_SPEC).mean(), list(params.values()),
                                   allow_unused=True)
        for name, g in zip(params, hand, strict=True):
            expected = torch.zeros_like(params[name]) if g is None else g
            torch.testing.assert_close(ours[name][i], expected, rtol=1e-9, atol=1e-12)
    ungrouped = {n: torch.cat([c[n] for c in per_sample_gradients(model, groups.flatten(0, 1), DATA_SPEC,
                                                                     vectorized=vectorized, chunk_size=None)])
                 for n in params}
    for name in params:  # an ungrouped call: each input its own sample
        torch.testing.assert_close(ours[name], ungrouped[name].unflatten(0, (3, 4)).mean(1))


def test_per_sample_chunks_hold_their_gradients_and_inputs_within_the_caps(monkeypatch):
    """A chunk's samples: gradients within FISHER_CHUNK_VALUES, inputs within as many as that many gradients, or
    within FISHER_CHUNK_INPUT_VALUES values where that allows more (small images)."""
    model, _ = tiny_glow(affine=True)
    n_values = sum(p.numel() for p in model.parameters())
    groups = torch.rand(12, 4, 1, 8, 8, generator=torch.Generator().manual_seed(6)) - 0.5

    def sizes(values_cap: int, inputs_cap: int) -> list[int]:
        monkeypatch.setattr(baselines, "FISHER_CHUNK_VALUES", values_cap)
        monkeypatch.setattr(baselines, "FISHER_CHUNK_INPUT_VALUES", inputs_cap)
        return [next(iter(c.values())).shape[0]
                for c in per_sample_gradients(model, groups, DATA_SPEC, vectorized=True, chunk_size=None)]

    assert sizes(8 * n_values, 0) == [2] * 6  # 8 gradients' worth of inputs: 2 samples of 4 draws
    assert sizes(8 * n_values, 5 * 4 * 64) == [5, 5, 2]  # small inputs: up to 8 samples, 5 by their values
    assert sizes(3 * n_values, 1 << 20) == [3] * 4  # gradients bound
    assert sizes(n_values, 1 << 20) == [1] * 12  # one sample a chunk (plain autograd)


def test_ewc_penalty_zero_at_anchor_and_formula_after_perturbation():
    model, _ = tiny_glow()
    method = make_method("selective-amnesia", model)
    assert method.ewc_penalty(model).item() == 0.0
    torch.testing.assert_close(method.fisher, hand_fisher(model, method.replay_pool), rtol=1e-4, atol=1e-9)
    tamed = build_glow(GlowSpec(channels=1, image_size=8, n_flow=2, n_block=2, hidden=16))
    tamed.load_state_dict(model.state_dict())
    shifts = {}
    with torch.no_grad():
        for name, p in tamed.named_parameters():
            before = p.clone()
            p.add_(0.01 * torch.randn_like(p))
            shifts[name] = p - before  # the shift float32 actually applied
    expected = sum((method.fisher[n] * shifts[n].square()).sum() for n in shifts)
    penalty = method.ewc_penalty(tamed)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()  # d/dθ F (θ - θ*)² = 2 F (θ - θ*)
    for name, p in tamed.named_parameters():
        torch.testing.assert_close(p.grad, 2 * method.fisher[name] * shifts[name], rtol=1e-4, atol=1e-12)


# ---------------------------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("name", ["neggrad", "selective-amnesia"])
def test_stop_rule_every_image_forgotten_past_the_threshold_counts(name, monkeypatch):
    model, _ = tiny_glow()
    method = make_method(name, model)
    taming = make_method("taming", model)
    for m in (method, taming):
        monkeypatch.setattr(m, "refresh", lambda _model: None)
    eps = method.epsilon
    # (confirmed d on the check noise, baseline done, taming done); the training forward's screen passes
    cases = [([0.1, 7.0, -0.5 * eps], True, False), ([-2.0 * eps, 7.0, 0.0], False, False),
             ([0.1, -0.1, 0.2], True, True)]
    for it, (d, baseline_done, taming_done) in enumerate(cases):
        for m, expected in ((method, baseline_done), (taming, taming_done)):
            confirm_at(monkeypatch, m, d)
            assert m.after_step(model, 10 * (it + 1), {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is expected
    assert method.confirmations == 3
    # the screen: an image short of -epsilon in the training forward means no confirmation pass
    assert method.after_step(model, 100, {"min_d": -2 * eps}) is False and method.confirmations == 3


@pytest.mark.parametrize("name", ["taming", "neggrad", "selective-amnesia"])
def test_stop_margin_raises_the_lower_edge_of_the_band(name, monkeypatch):
    """An image confirmed at d = -0.55 is within |d| < epsilon = 0.6 but 0.05 from being counted as not
    forgotten by the evaluation (d > -epsilon): margin 0.1 keeps the run going, margin 0 (the default) stops."""
    model, _ = tiny_glow()
    for margin, done in ((0.1, False), (0.0, True)):
        method = make_method(name, model, stop_margin=margin)
        assert method.epsilon == pytest.approx(0.6) and method.stop_margin == margin
        monkeypatch.setattr(method, "refresh", lambda _model: None)
        confirm_at(monkeypatch, method, [-0.55, 0.1, 0.3])
        assert method.after_step(model, 10, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is done
        # the screen applies the same edge: a smoothed training d of -0.55 asks for no confirmation
        screen = {"min_d": -0.55, "max_d": 0.55, "max_abs_d": 0.55}
        assert method.screen_passes(screen) is done
    assert TameConfig().stop_margin == 0.0
    with pytest.raises(InputError, match=r"stop_margin must lie in \[0, epsilon\)"):
        TameConfig(stop_margin=0.6)


def test_taming_check_averages_the_nll_over_its_fixed_draws():
    model, _ = tiny_glow()
    method = make_method("taming", model)
    draws = torch.rand((3, *method.data.forget.shape), generator=torch.Generator().manual_seed(7))
    method.data.forget_check_noise = draws
    with torch.no_grad():
        nll = torch.stack([nll_nats(model, dequantized(method.data.forget, noise, DATA_SPEC.n_bits), DATA_SPEC)
                           for noise in draws]).mean(0)
    torch.testing.assert_close(method.check_nll(model), nll, rtol=1e-6, atol=1e-4)


def test_a_stop_keeps_its_check_draws_as_the_reports_forget_nll_bit_for_bit():
    """The stop's check pass (K keyed draws) is the evaluation's forget NLL: kept, it equals pixel_nll's second
    pass exactly (same noise, same weights, the draws summed in float64 in the same order)."""
    model, _ = tiny_glow()
    method = make_method("taming", model)
    pixels, keys = open_images("embedded:digits:test:3", DATA_SPEC).load_tensor()
    keys = keys[:3]
    method.data.forget_check_noise = torch.stack([dequantization_noise(keys, 0, (1, 8, 8), draw)
                                                  for draw in range(8)])
    method.check_nll(model)
    assert method.final_forget_nll is None  # kept only at a stop
    method.keep_final_forget_nll()
    expected = pixel_nll(model, pixels[:3], keys, DATA_SPEC, 0, torch.device("cpu"), draws=8)
    assert method.final_forget_nll.dtype == torch.float64
    np.testing.assert_array_equal(method.final_forget_nll.numpy(), expected)


def test_a_converged_tame_reports_the_stops_own_forget_nll(base, forget_folder, monkeypatch):
    """tame() reuses the stop's check draws for the tamed forget NLL (no second pass over D_F) and they are what
    a fresh pixel_nll of the tamed model gives."""
    import flowtame.jobs.tame as tame_job

    measured = []  # (model, images) of every pixel_nll call of the job
    measure = tame_job.pixel_nll

    def counted(model, *args, **kwargs):
        measured.append((model, (args[0] if args else kwargs["pixels"]).shape[0]))
        return measure(model, *args, **kwargs)

    monkeypatch.setattr(tame_job, "pixel_nll", counted)
    forget = open_images(forget_folder, DATA_SPEC)
    pixels, keys = forget.load_tensor()
    outcome = tame(base, [forget], open_images(REMEMBER, DATA_SPEC), make_config(FAST, {"max_iters": 200}),
                   device="cpu")
    assert outcome.report["converged"]
    tamed = outcome.checkpoint.model
    assert (base.model, len(keys)) in measured and (tamed, len(keys)) not in measured
    again = pixel_nll(tamed, pixels, keys, DATA_SPEC, 0, torch.device("cpu"), draws=8)
    np.testing.assert_array_equal(outcome.nll[("tamed", "forget")], again)


def test_taming_screen_smooths_each_images_training_d(monkeypatch):
    """The screen's d of an image is an exponential average of its training-forward d (weight 0.3 on the new)."""
    import flowtame.methods.taming as methods

    model, _ = tiny_glow()
    method = make_method("taming", model, anchor=0)  # the fake NLLs below are the tamed model's only
    mu, sigma, delta = float(method.mu_r), float(method.sigma_r), method.delta
    remember = torch.linspace(mu - sigma, mu + sigma, 4)

    def fake_nll(d_values):
        return lambda _model, x, _spec: torch.cat([mu + (delta + torch.tensor(d_values)) * sigma, remember])

    assert methods.SCREEN_WEIGHT == 0.3
    monkeypatch.setattr(methods, "nll_nats", fake_nll([2.0, -1.0, 0.0]))
    method.loss(model, 0)
    torch.testing.assert_close(method.latest_d, torch.tensor([2.0, -1.0, 0.0]))  # first sight: taken as is
    monkeypatch.setattr(methods, "nll_nats", fake_nll([0.0, 0.0, 1.0]))
    _, metrics = method.loss(model, 1)
    torch.testing.assert_close(method.latest_d, torch.tensor([1.4, -0.7, 0.3]))
    assert float(metrics["max_abs_d"]) == pytest.approx(1.4)


def test_unseen_forget_images_fail_the_screen():
    model, _ = tiny_glow()
    assert make_method("neggrad", model).latest_d.isneginf().all()


# ---------------------------------------------------------------------------------------------- resume
def run_engine(name: str, iters: int, state_in=None, state_out=None, **config_kw):
    """(trained tiny Glow, method) after ``iters`` iterations of method ``name`` (:func:`make_method`'s data and
    ``config_kw``), resumed from the engine state file ``state_in`` and saved to ``state_out`` when given."""
    model, _ = tiny_glow()
    method = make_method(name, model, **config_kw)
    trained, _ = tiny_glow()
    engine = Engine(trained, method, EngineConfig(lr=1e-3, warmup=2, max_iters=iters),
                    generators={"batches": method.generator})
    if state_in:
        engine.load_state(state_in)
    engine.run()
    if state_out:
        engine.save_state(state_out)
    return trained, method


@pytest.mark.parametrize("name", ["neggrad", "selective-amnesia"])
def test_resume_round_trips_bit_for_bit(name, tmp_path):
    run = functools.partial(run_engine, name)
    straight, _ = run(6)
    run(3, state_out=tmp_path / "state.safetensors")
    resumed, method = run(6, state_in=tmp_path / "state.safetensors")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    json.dumps(method.state_meta())


def test_resume_refuses_a_different_fisher():
    model, _ = tiny_glow()
    method = make_method("selective-amnesia", model)
    other = make_method("selective-amnesia", model, seed=1)  # another replay pool, another Fisher
    with pytest.raises(CheckpointError, match="resume"):
        other.load_state(method.state_tensors(), method.state_meta())
    same = make_method("selective-amnesia", model)
    same.load_state(method.state_tensors(), method.state_meta())
    assert same.refreshes == method.refreshes


# ---------------------------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("name", ["neggrad", "selective-amnesia"])
def test_tame_runs_each_baseline(name, base, forget_folder):
    forget = open_images(forget_folder, DATA_SPEC)
    outcome = tame(base, [forget], open_images(REMEMBER, DATA_SPEC), make_config({"method": name, **FAST}),
                   device="cpu")
    report = outcome.report
    assert report["method"] == name and outcome.checkpoint.provenance["method"] == name
    assert report["config"]["precondition"] == "none"  # the baselines' own default: Adam's update, as published
    assert isinstance(report["converged"], bool)
    assert report["converged"] == (report["iterations"] < FAST["max_iters"])
    if report["converged"]:  # the stop rule's criterion, checked on the evaluation noise and full remember set
        assert report["requests"][0]["forgotten_fraction"] == 1.0
    assert all(math.isfinite(p["loss"]) for p in report["trajectory"])
    assert not all(torch.equal(a, b) for a, b in zip(base.model.parameters(),
                                                      outcome.checkpoint.model.parameters(), strict=True))


@pytest.mark.parametrize("method, freeze, expected", [("taming", None, "coupling-outputs"),
                                                       ("taming", "none", "none"), ("neggrad", None, "none")])
def test_freeze_holds_exactly_the_coupling_outputs_fixed(method, freeze, expected, base, forget_folder):
    config = make_config({"method": method, **FAST, "max_iters": 4, "freeze": freeze})
    assert config.freeze == expected  # taming holds the outputs by default, the baselines run as published
    outcome = tame(base, [open_images(forget_folder, DATA_SPEC)], open_images(REMEMBER, DATA_SPEC), config,
                   device="cpu")
    outputs = set(coupling_output_parameters(base.model))
    before, after = dict(base.model.named_parameters()), dict(outcome.checkpoint.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    frozen = outcome.report["frozen"]
    assert frozen["rule"] == expected
    if expected == "coupling-outputs":
        assert changed and not changed & outputs
        assert frozen["tensors"] == len(outputs) and frozen["values"] == sum(before[n].numel() for n in outputs)
    else:
        assert outputs <= changed and frozen == {"rule": "none", "tensors": 0, "values": 0}


def test_unknown_freeze_rule_is_a_config_error():
    with pytest.raises(InputError, match="freeze must be one of coupling-outputs, none"):
        TameConfig(freeze="everything")


@pytest.mark.parametrize("name", ["neggrad", "selective-amnesia"])
def test_cli_tame_with_method(name, base, forget_folder, run_cli, tmp_path):
    model_path = tmp_path / "base.safetensors"
    save_checkpoint(model_path, base)
    out, report_path = tmp_path / "tamed.safetensors", tmp_path / "report.json"
    result = run_cli("tame", model_path, "--forget", forget_folder, "--remember", REMEMBER, "-o", out,
                     "--report", report_path, "--method", name, "--max-iters", "20", "--lr", "1e-3",
                     "--warmup", "5", "--batch-size", "4", "--sa-fisher-samples", "8", "--quiet")
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["method"] == name and report["config"]["method"] == name
    assert report["converged"] == (report["iterations"] < 20)
    assert load_checkpoint(out).provenance["method"] == name


def test_taming_is_not_replaced():
    assert METHODS["taming"] is TamingMethod


@pytest.mark.parametrize("name, guard", [("taming", 0.003), ("neggrad", 0.05)])
def test_stop_is_refused_while_the_remember_set_drifted_up(name, guard, monkeypatch):
    """d is relative to the tamed model's own mu_R: a model whose every NLL rose passes it, so the
    confirmation also requires mu_R to be within max_remember_drift (taming 0.3%, the baselines 5%) of
    N_B's mean."""
    model, _ = tiny_glow()
    method = make_method(name, model)
    assert method.max_remember_drift == guard
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    confirm_at(monkeypatch, method, [0.1, -0.1, 0.2])
    base_mean = method.data.base_mean
    method.mu_r = base_mean * (1 + 1.2 * guard)
    assert method.remember_drift() == pytest.approx(1.2 * guard, rel=1e-4)
    assert method.after_step(model, 10, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is False
    assert method.drift_refusals == 1
    method.mu_r = base_mean * (1 + 0.8 * guard)
    assert method.after_step(model, 20, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is True
    assert method.drift_refusals == 1 and method.confirmations == 2
    off = make_method(name, model, max_remember_drift=0)  # 0 turns the guard off
    assert off.max_remember_drift is None


@pytest.mark.parametrize("name", ["taming", "neggrad"])
def test_stop_is_refused_until_the_whole_remember_set_agrees(name, monkeypatch):
    """A confirmation that passes against the refresh subset's mu_R, sigma_R is re-judged against the whole
    remember set's normal (the report's): an image at d = -0.55 on the subset's statistics reads d < -0.6
    on the whole set's when those put the threshold 0.1 sigma higher, so the run goes on; once they agree it
    stops and keeps the whole-set NLL for the report."""
    model, _ = tiny_glow()
    method = make_method(name, model)
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    confirm_at(monkeypatch, method, [-0.55, 0.1, 0.3])
    mu, sigma = float(method.mu_r), float(method.sigma_r)
    unit = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # mean 0, ddof-1 std sqrt(2)
    whole = {"nll": (mu + 0.1 * sigma) + unit * sigma / math.sqrt(2)}  # whole-set mean 0.1 sigma higher
    method.data.whole_remember_nll = lambda _model: whole["nll"]
    assert method.after_step(model, 10, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is False
    assert method.whole_set_refusals == 1 and method.final_remember_nll is None
    # the refusal re-measured mu_R, sigma_R on the whole set (the subset correction with them) and the
    # screen now sees the whole set's d
    assert float(method.mu_r) == pytest.approx(mu + 0.1 * sigma, rel=1e-5)
    assert float(method.sigma_r) == pytest.approx(sigma, rel=1e-5)
    assert method.mean_offset == pytest.approx(0.1 * sigma, rel=1e-4)  # refresh is stubbed: subset stats = N_B's
    assert method.std_ratio == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(method.latest_d, torch.tensor([-0.65, 0.0, 0.2]), rtol=0, atol=1e-4)
    method.mu_r, method.sigma_r = torch.tensor(mu), torch.tensor(sigma)  # back to the subset's figures
    whole["nll"] = mu + unit * sigma / math.sqrt(2)  # the same normal as the subset's
    assert method.after_step(model, 20, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}) is True
    assert method.whole_set_refusals == 1 and method.final_remember_nll is whole["nll"]


def test_a_remember_blow_up_is_a_divergence_for_taming_only():
    model, _ = tiny_glow()
    taming, neggrad = make_method("taming", model), make_method("neggrad", model)
    base_bpd = float(taming.data.base_mean) / taming.nats_per_bpd
    assert taming.base_bpd == pytest.approx(base_bpd)
    assert taming.diverged({"remember_bpd": base_bpd * 1.10}) is None  # a large but plausible move
    reason = taming.diverged({"remember_bpd": base_bpd * 1.30})
    assert reason and f"(base {base_bpd:.3f})" in reason
    assert neggrad.diverged({"remember_bpd": base_bpd * 10}) is None  # baselines run as published
    off = make_method("taming", model, max_remember_jump=0)  # 0 turns it off (as --preset paper does)
    assert off.max_remember_jump is None and off.diverged({"remember_bpd": base_bpd * 10}) is None
    from flowtame.jobs.tame import make_config, preset

    paper = make_config(preset("paper"))
    assert paper.max_remember_jump is None and paper.max_remember_drift is None


def test_settling_decays_the_learning_rate_near_the_threshold_and_recovers_away_from_it(monkeypatch):
    model, _ = tiny_glow()
    method = make_method("taming", model, settle_decay=0.5)
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    eps = method.epsilon
    # within epsilon of the band (no confirmation), then an image 3 epsilon short of the threshold
    near = {"min_d": -1.5 * eps, "max_d": 0.0, "max_abs_d": 1.5 * eps}
    far = {"min_d": -3 * eps, "max_d": 0.0, "max_abs_d": 3 * eps}
    factors = []
    for logged in (near, near, near, far, far, far, far, *[near] * 10):
        method.after_step(model, 1, logged)
        factors.append(method.lr_factor)
    assert factors[:7] == [0.5, 0.25, 0.125, 0.25, 0.5, 1.0, 1.0]  # a straggler is not left at a crawl
    assert factors[-1] == pytest.approx(0.05)  # the floor, MIN_SETTLE_FACTOR


def test_a_stragglers_forget_weight_grows_per_refused_confirmation_to_a_bound(monkeypatch):
    from flowtame.methods.taming import MAX_FORGET_WEIGHT, STRAGGLER_GROWTH

    model, _ = tiny_glow()
    method = make_method("taming", model)
    assert method.anchor_weight > 0  # the default anchor: the balance a straggler stalls against
    monkeypatch.setattr(method, "refresh", lambda _model: None)
    eps = method.epsilon
    passing = {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0}  # the screen passes: every image close on training noise
    confirm_at(monkeypatch, method, [0.1, -0.2, -1.3 * eps])  # the check finds the third one short
    assert method.after_step(model, 10, passing) is False
    assert method.forget_weight.tolist() == pytest.approx([1.0, 1.0, STRAGGLER_GROWTH])
    lr_factor = method.lr_factor
    for i in range(2, 40):
        assert method.after_step(model, 10 * i, passing) is False
    assert method.confirmations == 39
    assert method.forget_weight.tolist() == pytest.approx([1.0, 1.0, MAX_FORGET_WEIGHT])  # bounded
    assert method.lr_factor <= lr_factor  # the settling is unchanged: a stronger pull, not a larger step
    far = {"min_d": -3 * eps, "max_d": 3 * eps, "max_abs_d": 3 * eps}
    method.after_step(model, 5, far)  # no confirmation: nothing grows
    confirm_at(monkeypatch, method, [0.1, -0.2, -0.1])  # in the band now: the weight is kept, the run stops
    assert method.after_step(model, 500, passing) is True
    assert method.forget_weight[2] == pytest.approx(MAX_FORGET_WEIGHT)
    # the weight enters the loss: a heavier straggler pulls its forget term harder
    method.forget_weight.fill_(1.0)
    _, light = method.loss(model, 0)
    method.forget_weight.fill_(MAX_FORGET_WEIGHT)
    _, heavy = method.loss(model, 0)
    assert heavy["loss_forget"].item() > light["loss_forget"].item()
    unanchored = make_method("taming", model, anchor=0)  # no anchor, no balance to outweigh: weights stay 1
    monkeypatch.setattr(unanchored, "refresh", lambda _model: None)
    confirm_at(monkeypatch, unanchored, [0.1, -0.2, -1.3 * eps])
    unanchored.after_step(model, 10, passing)
    assert unanchored.confirmations == 1 and unanchored.forget_weight.tolist() == [1.0, 1.0, 1.0]


def test_the_whole_set_pass_takes_the_refresh_subsets_rows_from_the_confirmations_refresh(monkeypatch):
    """At a confirmation the refresh subset was just measured under the same weights on the evaluation's noise:
    the whole-set pass measures only the other rows and gives what a full pass gives."""

    from flowtame.jobs.tame import _load_sets, _whole_remember_nll

    model, _ = tiny_glow()
    sets = _load_sets([open_images("embedded:digits:test:3", DATA_SPEC)], open_images(REMEMBER, DATA_SPEC))
    measured = []

    def remember_nll(m, **kwargs):
        measured.append(len(kwargs.get("keys", sets.remember_keys)))
        return pixel_nll(m, **{"pixels": sets.remember, "keys": sets.remember_keys, "data_spec": DATA_SPEC,
                               "seed": 0, "device": torch.device("cpu"), **kwargs})

    rows = torch.tensor([0, 2, 5, 11])
    noise = dequantization_noise([sets.remember_keys[i] for i in rows], 0, (1, 8, 8))
    fresh = batched_nll(model, dequantized(sets.remember[rows], noise, DATA_SPEC.n_bits), DATA_SPEC)
    full = _whole_remember_nll(sets, remember_nll, model)
    reused = _whole_remember_nll(sets, remember_nll, model, known=(rows, fresh))
    assert measured == [len(sets.remember_keys), len(sets.remember_keys) - 4]
    assert torch.equal(reused[rows], fresh.double())
    torch.testing.assert_close(reused, full, rtol=1e-6, atol=0)
    # the method hands the confirmation's own refresh to the whole-set pass when it knows the subset's rows
    method = make_method("taming", model)
    method.data.refresh_rows = torch.arange(method.data.refresh.shape[0])
    seen = {}

    def whole(_model, known=None):
        seen["known"] = known
        return batched_nll(model, method.data.refresh, DATA_SPEC).double()

    method.data.whole_remember_nll = whole
    confirm_at(monkeypatch, method, [0.1, -0.1, 0.2])
    method.after_step(model, 10, {"min_d": 0.0, "max_d": 0.0, "max_abs_d": 0.0})
    assert seen["known"][0] is method.data.refresh_rows and seen["known"][1] is method.refresh_nll
