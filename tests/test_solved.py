"""The solved step (``step: solve``, flowtame/methods/solved.py): its pieces against autograd, an end-to-end run
on a tiny Glow that stops in the band in a few iterations, its settings' checks and a resume that gives the
straight run's weights."""

from __future__ import annotations

import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from test_baselines import DATA_SPEC, REMEMBER, base, forget_folder, tiny_glow  # noqa: F401 (fixtures)

from flowtame.data.images import open_images
from flowtame.engine.devices import uniform_noise
from flowtame.engine.loop import Engine, EngineConfig
from flowtame.errors import InputError, InterruptedRun
from flowtame.jobs.tame import make_config, tame
from flowtame.likelihood.nll import dequantized, nll_nats
from flowtame.methods import baselines, curvature, solved
from flowtame.methods.baselines import mean_nll_gradient, per_sample_gradients
from flowtame.methods.solved import STEP_RMS, TARGET_CAP, SolvedTaming
from flowtame.methods.taming import TamingMethod

QUICK = {"step": "solve", "max_iters": 20, "refresh_size": 32, "lookalikes": 4}


def _sets(forget_folder):  # noqa: F811
    return [open_images(forget_folder, DATA_SPEC)], open_images(REMEMBER, DATA_SPEC)


def test_the_chunked_mean_nll_gradient_is_autograds_of_the_batchs_mean_nll():
    model, _ = tiny_glow()
    model = model.double()
    pixels, _ = open_images(REMEMBER, DATA_SPEC).load_tensor()
    x = dequantized(pixels[:10], torch.rand(pixels[:10].shape, generator=torch.Generator().manual_seed(3)),
                    DATA_SPEC.n_bits).double()
    names = [n for n, _ in model.named_parameters()][:6]
    ours = mean_nll_gradient(model, x, DATA_SPEC, names, chunk=3)  # chunks of 3, 3, 3, 1 images
    params = dict(model.named_parameters())
    expected = torch.autograd.grad(nll_nats(model, x, DATA_SPEC).mean(), [params[n] for n in names])
    for n, g in zip(names, expected, strict=True):
        torch.testing.assert_close(ours[n], g, rtol=1e-6, atol=1e-9)  # (nll_nats ends in float32)


def test_a_solved_run_stops_in_the_band_within_a_few_iterations_and_keeps_its_guards(base, forget_folder):  # noqa: F811
    forget, remember = _sets(forget_folder)
    outcome = tame(base, forget, remember, make_config(QUICK), device="cpu")
    report = outcome.report
    assert report["config"]["step"] == "solve" and report["converged"] is True
    assert report["iterations"] <= 15 and report["lr_reductions"] == 0  # no step rolled back
    eps = report["config"]["epsilon"]
    request = report["requests"][0]
    assert -eps < request["d_min"] and request["d_max"] < 2 * eps and request["forgotten_fraction"] == 1.0
    assert report["calibration"] is None  # no learning rate to calibrate
    steps = [row for row in report["trajectory"] if "step_rms" in row]
    assert steps and all(row["step_rms"] <= STEP_RMS + 1e-6 for row in steps)
    normal, drift = report["remember_normal"], report["config"]["max_remember_drift"]
    assert normal["tamed"]["mean_nats"] <= normal["base"]["mean_nats"] * (1 + drift)


def test_normality_refusals_widen_the_held_rows_and_the_run_goes_on_to_a_stop(base, forget_folder, monkeypatch):  # noqa: F811
    """The real refusal path: with a bound no remember set meets, each stop the other checks accept is refused, 16
    rows join the held rows (their evaluation inputs and NLLs re-measured for the next step), and after
    MAX_HOLD_REFUSALS refusals the stop is accepted."""
    from flowtame.methods.lookalikes import MAX_HOLD_REFUSALS

    monkeypatch.setattr(solved, "normality_bound", lambda base_nll: 1.0)  # (p <= 1: every judged stop refused)
    pools = []
    real_jacobian = SolvedTaming._jacobian

    def spy(self, model, names, *args):
        out = real_jacobian(self, model, names, *args)
        pools.append((self.anchor_pool.numel(), self.pool_check.shape[0], self.pool_nll.shape[0],
                      next(iter(out.values())).shape[0]))
        return out

    monkeypatch.setattr(SolvedTaming, "_jacobian", spy)
    forget, remember = _sets(forget_folder)
    report = tame(base, forget, remember, make_config(QUICK, {"max_iters": 40}), device="cpu").report
    assert report["converged"] is True and report["normality_refusals"] == MAX_HOLD_REFUSALS
    others = report["sets"]["remember_n"] - QUICK["lookalikes"]  # (a small set: the tail rows run out)
    assert report["tail_rows"] == min(16 * MAX_HOLD_REFUSALS, others) and report["tail_rows"] > 16
    n_forget = report["requests"][0]["n"]
    for pool, checks, nlls, rows in pools:  # every step holds the whole (widened) pool, measured for it
        assert pool == checks == nlls and rows == n_forget + pool + 1
    assert pools[0][0] == QUICK["lookalikes"] and pools[-1][0] == QUICK["lookalikes"] + report["tail_rows"]


@pytest.mark.parametrize("strained", [True, False])
def test_each_held_rows_next_target_takes_off_a_share_of_its_last_unexplained_rise(strained, base,  # noqa: F811
                                                                                   forget_folder, monkeypatch):  # noqa: F811
    """While the look-alikes are strained (their quantile drop above HOLD_FEEDFORWARD_FROM of their hold's bound;
    here forced either way), a held row's target is its way back to its base NLL less HOLD_FEEDFORWARD of what it
    rose at the last step beyond what that step asked of it (on the evaluation's noise; rises only, at most
    TARGET_CAP sigma_R); rows a hold added since (every stop refused here, so the pool grows) have no rise yet.
    Unstrained, the target is the way back alone. Re-derived from what the run measured: each step's targets,
    shrink and the held rows' NLL before and after it."""
    monkeypatch.setattr(solved, "normality_bound", lambda base_nll: 1.0)  # (every judged stop refused: 16 rows join)
    monkeypatch.setattr(solved, "HOLD_FEEDFORWARD_FROM", -math.inf if strained else math.inf)
    steps = []
    real_targets, real_step = SolvedTaming._targets, SolvedTaming.own_step

    def targets(self):
        out = real_targets(self)
        base_nll = self.data.base_remember_nll[self.anchor_pool.cpu()].double()
        steps.append({"targets": out.clone(), "forget": self.confirmed_d.numel(), "before": self.pool_nll.clone(),
                      "back": base_nll - self.pool_nll.double(), "cap": TARGET_CAP * float(self.sigma_r)})
        return out

    def own_step(self, model, iteration):
        logged = real_step(self, model, iteration)
        steps[-1] |= {"shrink": float(logged["shrink"]), "after": self.pool_nll.clone()}
        return logged

    monkeypatch.setattr(SolvedTaming, "_targets", targets)
    monkeypatch.setattr(SolvedTaming, "own_step", own_step)
    forget, remember = _sets(forget_folder)
    report = tame(base, forget, remember, make_config(QUICK, {"max_iters": 12}), device="cpu").report
    assert report["lr_reductions"] == 0 and report["normality_refusals"] >= 1
    assert torch.equal(steps[0]["targets"][steps[0]["forget"]:-1], steps[0]["back"])  # nothing seen yet
    fed, grown = 0, 0
    for last, now in zip(steps, steps[1:], strict=False):
        rows, f = last["before"].numel(), last["forget"]
        asked = last["targets"][f:f + rows] * last["shrink"]
        rise = (last["after"].double() - last["before"].double() - asked).clamp(0, last["cap"])
        rise = rise if strained else torch.zeros_like(rise)
        held = now["targets"][now["forget"]:-1]
        expected = torch.cat([now["back"][:rows] - solved.HOLD_FEEDFORWARD * rise, now["back"][rows:]])
        torch.testing.assert_close(held, expected, rtol=1e-6, atol=1e-6)
        fed += int((rise > 0).sum())
        grown += int(held.numel() > rows)
    assert (fed > 0) == strained and grown > 0  # (the feed-forward acted, and rows joined without a rise of their own)


def test_the_look_alikes_strain_is_their_holds_own_quantile_drop_from_the_held_rows_measurement(base,  # noqa: F811
                                                                                                forget_folder,  # noqa: F811
                                                                                                monkeypatch):
    """The feed-forward's gate reads the look-alikes' quantile drop off the held pool's first rows (measured after
    each step): the same figure the look-alike hold gets from its own pass over its check images."""
    from flowtame.likelihood.nll import batched_nll
    from flowtame.likelihood.statistics import NormalFit
    from flowtame.methods.lookalikes import quantile_drop

    seen = []
    real_step = SolvedTaming.own_step

    def own_step(self, model, iteration):
        logged = real_step(self, model, iteration)
        hold, now = self.lookalike_hold, NormalFit(float(self.mu_r), float(self.sigma_r))
        own = quantile_drop(hold.base_nll, batched_nll(model, hold.check, self.data.data_spec).numpy(),
                            hold.base_fit, now)
        monkeypatch.setattr(solved, "HOLD_FEEDFORWARD_FROM", own / hold.bound - 1e-4)  # (to 2e-6 in QD: BLAS rounding)
        just_under = self._lookalikes_strained()
        monkeypatch.setattr(solved, "HOLD_FEEDFORWARD_FROM", own / hold.bound + 1e-4)
        seen.append((just_under, self._lookalikes_strained()))
        return logged

    monkeypatch.setattr(SolvedTaming, "own_step", own_step)
    forget, remember = _sets(forget_folder)
    tame(base, forget, remember, make_config({**QUICK, "max_iters": 3}), device="cpu")
    assert seen and all(under and not over for under, over in seen)


def test_a_solved_run_whose_rows_would_not_fit_in_memory_is_refused_or_falls_back_before_it_starts(base, forget_folder,  # noqa: F811
                                                                                      monkeypatch):
    """The rows' gradients are sized against the device's free memory before anything is computed: too little
    is one InputError about ``step`` with the figures when the step was asked for, Adam's step with a warning when
    it was the default; unknown free memory is no refusal."""
    from flowtame.engine.devices import free_memory

    assert free_memory(torch.device("cpu")) is None or free_memory(torch.device("cpu")) > 0
    assert solved.memory_needed(10, 1000, 300, 64) == 10 * 1000 * 16 + (2 + 5) * 1000 * 4 + 300 * 64 * 4
    forget, remember = _sets(forget_folder)
    monkeypatch.setattr(solved, "free_memory", lambda device: 1000)
    expected = (r"step solve needs about 0\.0 GiB on cpu for the gradients of its \d+ rows \(\d+ forget images, "
                r"4 look-alikes, the remember mean and 16 held rows\)")
    with pytest.raises(InputError, match=expected) as error:
        tame(base, forget, remember, make_config(QUICK), device="cpu")
    assert error.value.keys == ("step",) and "use step adam" in str(error.value)
    defaulted = {key: value for key, value in QUICK.items() if key != "step"}
    with pytest.warns(UserWarning, match=r"step solve needs about .* GiB are free: taking Adam's step"):
        report = tame(base, forget, remember, make_config(defaulted, {"max_iters": 1}), device="cpu").report
    config = report["config"]  # (the default step falls back to Adam's, with Adam's drift bound)
    assert config["step"] == "adam" and config["max_remember_drift"] == TamingMethod.default_max_remember_drift
    monkeypatch.setattr(solved, "free_memory", lambda device: None)
    report = tame(base, forget, remember, make_config(defaulted, {"max_iters": 1}), device="cpu").report
    assert report["iterations"] == 1 and report["config"]["step"] == "solve"


def test_each_forget_and_held_row_is_its_gradient_averaged_over_the_draws(base, forget_folder, monkeypatch):  # noqa: F811
    """Each forget row is the image's NLL gradient averaged over FORGET_DRAWS fresh draws, each held look-alike row
    over HOLD_DRAWS, in chunks of rows (here of 2 forget rows of 8 draws, 4 held rows of 4 draws: the offsets
    are exercised)."""
    n_values = sum(p.numel() for p in base.model.parameters())
    monkeypatch.setattr(baselines, "FISHER_CHUNK_VALUES", 16 * n_values)
    monkeypatch.setattr(baselines, "FISHER_CHUNK_INPUT_VALUES", 16 * base.data_spec.num_dims)
    checks, held = [], []
    original = SolvedTaming._jacobian

    def spy(self, model, names, *args):
        state = self.generator.get_state()
        out = original(self, model, names, *args)
        d, k = self.data, self.data.forget.shape[0]
        generator = torch.Generator().set_state(state)

        def expected(pixels, draws):
            noise = uniform_noise(generator, (draws * pixels.shape[0], *pixels.shape[1:]), d.device)
            x = dequantized(pixels.repeat(draws, 1, 1, 1), noise, d.data_spec.n_bits)
            every = list(per_sample_gradients(model, x, d.data_spec, vectorized=False, chunk_size=None,
                                              names=names))
            return {n: torch.cat([c[n] for c in every]).reshape(draws, pixels.shape[0], *c0.shape[1:]).mean(0)
                    for n, c0 in every[0].items()}

        forget = expected(d.forget, solved.FORGET_DRAWS)
        pool = None
        if self.pool_nll is not None:
            pool = expected(d.remember[self.anchor_pool.cpu()], solved.HOLD_DRAWS)
            held.append(len(self.anchor_pool))
        for n in names:
            checks.append((out[n][:k], forget[n]))
            if pool is not None:
                checks.append((out[n][k:k + len(self.anchor_pool)], pool[n]))
        return out

    monkeypatch.setattr(SolvedTaming, "_jacobian", spy)
    forget, remember = _sets(forget_folder)
    tame(base, forget, remember, make_config({**QUICK, "max_iters": 2}), device="cpu")
    assert held and held[0] == QUICK["lookalikes"]
    for ours, expected_rows in checks:
        torch.testing.assert_close(ours, expected_rows, rtol=1e-4, atol=1e-5)


def test_the_mean_rows_displacement_term_takes_the_base_batches_in_turn_averaged_over_steps(
        base, forget_folder, monkeypatch):  # noqa: F811
    """The base gradient is its batches' mean; each step's displacement is the next batch's gradient now minus its
    kept gradient under the base model (zero, and not computed, before the first step), averaged with the previous
    steps' (weight MEAN_CHANGE_AVERAGING); a roll-back forgets the average."""
    monkeypatch.setattr(solved, "MEAN_CHANGE_AVERAGING", 0.3)  # (w and 1 - w told apart)
    monkeypatch.setattr(solved, "MEAN_ROWS", 10)  # several batches, fewer than the steps
    calls, seen, used, counts = [], [], [], []
    real_gradient, real_jacobian = solved.mean_nll_gradient, SolvedTaming._jacobian

    def recording_gradient(model, x, *args, **kwargs):
        calls.append((model, x, real_gradient(model, x, *args, **kwargs)))
        return calls[-1][2]

    def spy(self, model, names, *args):
        before, i, made = self.mean_change, self.mean_steps, len(calls)
        out = real_jacobian(self, model, names, *args)
        batches = self.base_batches
        assert len(batches) >= 3 and sum(b.shape[0] for b in batches) == min(solved.BASE_GRADIENT_ROWS,
                                                                                  self.data.remember.shape[0])
        assert max(b.shape[0] for b in batches) - min(b.shape[0] for b in batches) <= 1  # equal sizes (+-1)
        for n in names:  # the base gradient: the batches' gradients under the base model, weighted by size
            whole = sum(g[n] * b.shape[0] for g, b in zip(self.base_batch_gradients, batches, strict=True)) / sum(
                b.shape[0] for b in batches)
            torch.testing.assert_close(self.base_gradient[n], whole)
        used.append(i % len(batches))
        counts.append(len(batches))
        if args and args[0]:  # before the first step the weights are the base model's: no displacement, no gradient
            assert all(c[0] is not model for c in calls[made:])
            raw = {n: torch.zeros_like(g) for n, g in self.base_gradient.items()}
        else:
            model_now, x, now = calls[-1]
            assert model_now is model and x is batches[i % len(batches)]
            raw = {n: now[n] - self.base_batch_gradients[i % len(batches)][n] for n in names}
        w = solved.MEAN_CHANGE_AVERAGING
        expected = raw if before is None else {n: w * before[n] + (1 - w) * raw[n] for n in names}
        seen.append(before is not None)
        for n in names:
            torch.testing.assert_close(self.mean_change[n], expected[n])
            torch.testing.assert_close(out[n][-1], expected[n] + self.base_gradient[n])  # the row uses it
        return out

    real_after_step = SolvedTaming.after_step
    monkeypatch.setattr(solved, "mean_nll_gradient", recording_gradient)
    monkeypatch.setattr(SolvedTaming, "_jacobian", spy)
    monkeypatch.setattr(SolvedTaming, "after_step", lambda *args: real_after_step(*args) and False)  # never stops
    forget, remember = _sets(forget_folder)
    tame(base, forget, remember, make_config({**QUICK, "max_iters": 5}), device="cpu")
    assert seen[0] is False and all(seen[1:]) and len(seen) > counts[0]
    assert used == [i % counts[0] for i in range(len(used))]  # the batches in turn, and round again
    trained = calls[-1][0]
    assert len([c for c in calls if c[0] is not trained]) == counts[0]  # under the base model: once per batch
    method = type("M", (), {"trust": 1.0, "mean_change": {}, "measure": lambda self, model: None})()
    SolvedTaming.rolled_back(method, None)
    assert method.mean_change is None and method.trust == 0.25


def test_the_mean_rows_batches_draw_their_own_noise_not_the_drift_guards(base, forget_folder, monkeypatch):  # noqa: F811
    """The drift guard measures the refresh subset on the evaluation's keyed noise; the mean row that brings the
    remember mean back holds those images too, but on draws of its own. Fit on the guard's draws, the row
    brought back the very noise the guard reads and the run stopped early (docs/benchmarks.md "Round 14":
    embedded Glow k = 15 held-out BPD +1.15%, evaluate --check failing)."""
    seen = []
    real_jacobian = SolvedTaming._jacobian

    def spy(self, model, names, *args):
        d = self.data
        x = torch.cat(self.base_batches)  # in _mean_rows' order
        where = {int(row): i for i, row in enumerate(self._mean_rows())}
        pairs = [(where[int(row)], j) for j, row in enumerate(d.refresh_rows.cpu()) if int(row) in where]
        mine, guards = x[[i for i, _ in pairs]], d.refresh[[j for _, j in pairs]]
        gap = (mine - guards).abs().flatten(1).amax(1)
        seen.append((len(pairs), d.refresh.shape[0], gap))
        return real_jacobian(self, model, names, *args)

    monkeypatch.setattr(SolvedTaming, "_jacobian", spy)
    forget, remember = _sets(forget_folder)
    tame(base, forget, remember, make_config({**QUICK, "max_iters": 1}), device="cpu")
    held, refresh, gap = seen[0]
    assert held == refresh  # the mean row holds the whole refresh subset...
    assert bool((gap > 0).all()) and bool((gap < 2.0 ** -DATA_SPEC.n_bits).all())  # ...same pixels, other noise


def test_the_forget_rows_aim_a_quarter_epsilon_short_of_the_threshold_inside_the_bands_inner_half():
    """d = FORGET_AIM * epsilon on the default band (-epsilon, 2 epsilon) and on the holdout target's (-epsilon,
    epsilon); a band moved by hand keeps the aim a quarter of its width from either edge."""
    def aim(epsilon: float, lower: float, upper: float) -> float:
        return SolvedTaming.forget_aim.fget(SimpleNamespace(epsilon=epsilon, lower_edge=lower, upper_edge=upper))

    assert solved.FORGET_AIM == -0.25
    assert aim(0.6, -0.6, 1.2) == pytest.approx(-0.15)
    assert aim(0.6, -0.6, 0.6) == pytest.approx(-0.15)
    assert aim(0.6, -0.1, 1.2) == pytest.approx(-0.1 + 1.3 / 4)  # stop_margin 0.5: raised into the inner half
    assert aim(0.6, -2.0, -0.2) == pytest.approx(-0.2 - 1.8 / 4)


def test_a_stop_whose_remember_set_does_not_look_normal_is_refused_and_its_risers_held(monkeypatch):
    """After the base class's whole-set judgement: KS p (as evaluate computes it) below NORMALITY_HOLD_P refuses
    the stop and hands the whole-set NLLs to widen_anchor_pool, at most MAX_HOLD_REFUSALS times; a stop the base
    class refused is not judged."""
    from flowtame.likelihood.statistics import ks_normality
    from flowtame.methods.lookalikes import MAX_HOLD_REFUSALS

    generator = torch.Generator().manual_seed(0)
    normal = 200 + 15 * torch.randn(800, generator=generator, dtype=torch.float64)
    skewed = 200 + 15 * torch.empty(800, dtype=torch.float64).exponential_(generator=generator)
    assert ks_normality(normal.numpy())["pvalue"] > 0.1 and ks_normality(skewed.numpy())["pvalue"] < 1e-6
    verdict, widened = {"agrees": True, "nll": normal}, []

    def base_judgement(self, model, forget_nll, refresh_nll=None):
        self.final_remember_nll = verdict["nll"] if verdict["agrees"] else None
        return verdict["agrees"]

    monkeypatch.setattr(TamingMethod, "whole_set_agrees", base_judgement)
    method = SolvedTaming.__new__(SolvedTaming)  # (only the hold's own state)
    method.normality_refusals, method.normality_bound = 0, solved.normality_bound(normal)
    assert method.normality_bound == solved.NORMALITY_HOLD_P  # (a base set that looks normal)
    remeasured = []
    method.normal = SimpleNamespace(remeasure=lambda mean, std: remeasured.append((float(mean), float(std))))
    monkeypatch.setattr(method, "widen_anchor_pool", widened.append, raising=False)
    forget = torch.zeros(3)

    assert method.whole_set_agrees(None, forget) is True and not widened and not remeasured
    verdict["nll"] = skewed
    for refusal in range(1, MAX_HOLD_REFUSALS + 1):
        assert method.whole_set_agrees(None, forget) is False
        assert method.normality_refusals == refusal and widened[-1] is skewed and method.final_remember_nll is None
        assert remeasured[-1] == pytest.approx((float(skewed.mean()), float(skewed.std())))  # the whole set's
    assert method.whole_set_agrees(None, forget) is True  # accepted: evaluate's check will report the p
    assert method.final_remember_nll is skewed
    verdict["agrees"] = False
    assert method.whole_set_agrees(None, forget) is False and method.normality_refusals == MAX_HOLD_REFUSALS
    # a base remember set that already looks less normal than the bound is held to its own p
    assert solved.normality_bound(skewed) == pytest.approx(ks_normality(skewed.numpy())["pvalue"])
    assert solved.normality_bound(None) is None


def test_the_mean_row_covers_the_whole_remember_set_or_a_capped_draw_that_holds_the_refresh_subset(monkeypatch):
    """Every remember row when they are at most BASE_GRADIENT_ROWS; above it, that many distinct rows with the drift
    guard's refresh subset among them, the same for the same seed (a resumed run rebuilds them)."""
    def stub(rows: int, refresh: torch.Tensor, seed: int = 5):
        data = SimpleNamespace(remember=torch.zeros(rows, 1, 2, 2, dtype=torch.uint8), refresh_rows=refresh)
        return SimpleNamespace(data=data, config=SimpleNamespace(seed=seed))

    refresh = torch.tensor([3, 17, 40, 41, 99])
    every = SolvedTaming._mean_rows(stub(120, refresh))
    assert sorted(every.tolist()) == list(range(120))
    monkeypatch.setattr(solved, "BASE_GRADIENT_ROWS", 30)
    capped = SolvedTaming._mean_rows(stub(120, refresh))
    assert capped.numel() == 30 and capped.unique().numel() == 30
    assert set(refresh.tolist()) <= set(capped.tolist())
    assert not torch.equal(capped[:5].sort().values, refresh)  # shuffled, not the refresh rows in front
    torch.testing.assert_close(SolvedTaming._mean_rows(stub(120, refresh)), capped)
    assert not torch.equal(SolvedTaming._mean_rows(stub(120, refresh, seed=6)), capped)
    unknown = SolvedTaming._mean_rows(stub(120, None))  # no refresh subset: a plain capped draw
    assert unknown.numel() == 30 and unknown.unique().numel() == 30


@pytest.mark.parametrize("layer, message", [
    ({"step": "newton"}, "step must be one of adam, solve"),
    ({"step": "solve", "method": "neggrad"}, "step solve applies to the taming method only"),
    ({"step": "solve", "anchor": 0}, "needs the anchor on"),
])
def test_bad_step_settings_are_named(layer, message):
    with pytest.raises(InputError, match=message):
        make_config(layer)


def test_an_interrupted_solved_run_resumes_to_the_straight_runs_weights(base, forget_folder, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    """Interrupted after two steps (of more), resumed: the straight run's weights bit for bit; the mean row's
    batches (several here) continue in turn from where the interrupted run left them."""
    monkeypatch.setattr(solved, "MEAN_ROWS", 8)
    forget, remember = _sets(forget_folder)
    run = tame(base, forget, remember, make_config(QUICK), device="cpu")
    assert run.report["iterations"] >= 3  # (the interrupt at 2 leaves a step)
    straight = run.checkpoint.model.state_dict()
    state = tmp_path / "run.resume.safetensors"

    def stop(iteration, _logged):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(InterruptedRun):
        tame(base, forget, remember, make_config(QUICK), device="cpu", state_path=state, callback=stop)
    resumed = tame(base, forget, remember, make_config(QUICK), device="cpu", state_path=state, resume=True)
    weights = resumed.checkpoint.model.state_dict()
    assert all(torch.equal(straight[k], weights[k]) for k in straight)


def test_the_solved_method_is_built_for_step_solve_only(base, forget_folder):  # noqa: F811
    forget, remember = _sets(forget_folder)
    outcome = tame(base, forget, remember, make_config({**QUICK, "step": "adam", "max_iters": 2}), device="cpu")
    assert outcome.report["config"]["step"] == "adam" and outcome.report["calibration"] is not None
    assert SolvedTaming.takes_own_step and SolvedTaming.confirm_gap == 1


@pytest.mark.parametrize("step, damping", [("solve", solved.SOLVE_METRIC_DAMPING), ("adam", curvature.DAMPING)])
def test_each_step_builds_its_metric_on_its_own_count_of_remember_images(step, damping, base, forget_folder,  # noqa: F811
                                                                         monkeypatch):
    """The solved step's metric: SOLVE_METRIC_IMAGES rows at SOLVE_METRIC_DAMPING; Adam's curvature step's:
    METRIC_IMAGES at DAMPING. (The tiny remember set has fewer rows than either: the rows taken are counted in
    the metric's own call.)"""
    built = []
    real = curvature.KroneckerMetric.__init__

    def spy(self, model, x, data_spec, names, damping=curvature.DAMPING):
        built.append((x.shape[0], damping))
        real(self, model, x, data_spec, names, damping)

    monkeypatch.setattr(SolvedTaming, "metric_images", 5)
    monkeypatch.setattr(TamingMethod, "metric_images", 7)
    monkeypatch.setattr(curvature.KroneckerMetric, "__init__", spy)
    forget, remember = _sets(forget_folder)
    tame(base, forget, remember, make_config({**QUICK, "step": step, "max_iters": 1}), device="cpu")
    assert built == [(5 if step == "solve" else 7, damping)]


class _Nudge:
    """A method that takes its own step: adds 1e-3 to the first parameter; stops after three steps, or calls the
    second step a blow-up once (``blow_up``)."""

    name = "nudge"
    takes_own_step = True

    def __init__(self, blow_up: bool = False):
        self.blow_up, self.judged = blow_up, []

    def own_step(self, model, iteration):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        return {"loss": torch.tensor(0.0), "grad_norm": torch.tensor(1e-3), "remember_bpd": torch.tensor(1.0)}

    def diverged(self, logged):
        if self.blow_up and len(self.judged) == 1:
            self.blow_up = False
            return "a blow-up"
        return None

    def after_step(self, model, iteration, logged):
        self.judged.append(float(next(model.parameters()).detach().flatten()[0]))
        return len(self.judged) == 3

    def state_tensors(self):
        return {}

    def state_meta(self):
        return {}

    def load_state(self, tensors, meta):
        pass


def test_an_own_step_is_judged_on_its_own_weights_never_lagged_and_a_roll_back_undoes_only_it():
    model, _ = tiny_glow()
    start = float(next(model.parameters()).detach().flatten()[0])
    method = _Nudge()
    engine = Engine(model, method, EngineConfig(max_iters=10, lagged_metrics=True))  # (as on a GPU)
    assert engine._lagged() is False
    assert engine.run().iterations == 3
    assert method.judged == pytest.approx([start + 1e-3, start + 2e-3, start + 3e-3], abs=1e-6)
    model, _ = tiny_glow()
    method = _Nudge(blow_up=True)
    engine = Engine(model, method, EngineConfig(max_iters=10))
    result = engine.run()
    # the second step was rolled back to the first step's weights (a snapshot every iteration), then retaken
    assert result.iterations == 3 and result.lr_reductions == 1
    assert method.judged == pytest.approx([start + 1e-3, start + 2e-3, start + 3e-3], abs=1e-6)


def test_non_finite_stepped_weights_are_a_blow_up(base):  # noqa: F811
    from flowtame.methods import taming
    method = type("S", (), {})()  # the check needs no state before the remember-jump guard
    logged = {"remember_bpd": float("nan"), "min_d": 0.0, "max_d": 0.0, "mu_r": 1.0, "sigma_r": 1.0}
    assert "remember_bpd" in SolvedTaming.diverged(method, logged)
    assert issubclass(SolvedTaming, taming.TamingMethod)


def test_adams_settings_change_nothing_in_a_solved_run_and_are_named_in_a_warning(base, forget_folder):  # noqa: F811
    """Every key of ADAM_STEP_KEYS set away from its default: the solved run's weights are the same to the bit, and
    one warning names them (the default step, the solved step, ignores them)."""
    from flowtame.jobs.tame import ADAM_STEP_KEYS

    forget, remember = _sets(forget_folder)
    adams = {"alpha": 0.5, "gamma": 0.3, "lr": 1e-3, "step_sigma": 1.0, "anchor_shift": 1.0, "precondition": "none",
             "batch_size": 8, "refresh_every": 3, "warmup": 3, "grad_clip": 1.0, "forget_loss": "sigmoid",
             "forget_unit": "sigma", "kl_estimate": "batch", "threshold_gradient": False, "settle_decay": 0.9}
    assert sorted(adams) == sorted(ADAM_STEP_KEYS)
    quick = {key: value for key, value in QUICK.items() if key != "step"} | {"max_iters": 3}
    plain = tame(base, forget, remember, make_config(quick), device="cpu")
    with pytest.warns(UserWarning, match="alpha, gamma, lr, .*, settle_decay set: the solved step does not use"):
        changed = tame(base, forget, remember, make_config(quick, adams), device="cpu")
    assert changed.report["config"]["step"] == plain.report["config"]["step"] == "solve"
    ours, theirs = plain.checkpoint.model.state_dict(), changed.checkpoint.model.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert changed.report["iterations"] == plain.report["iterations"] > 0
    assert plain.report["unused_settings"] == changed.report["unused_settings"] == list(ADAM_STEP_KEYS)
    assert tame(base, forget, remember, make_config(quick, {"step": "adam", "max_iters": 1}),
                device="cpu").report["unused_settings"] == []


def test_the_first_measurement_is_the_base_passes_own_and_agrees_with_a_measurement(base, forget_folder,  # noqa: F811
                                                                                      monkeypatch):
    """Before the first step the weights are the base model's: the refresh subset's, the forget images' and the
    held rows' NLL come from the tame job's base passes (no measurement of its own), and equal what a measurement
    of the base weights gives."""
    firsts, measured = [], []
    real_base, real_measure = SolvedTaming._base_measurement, SolvedTaming.measure

    def base_measurement(self):
        forget_nll = real_base(self)
        mine = (self.refresh_nll.clone(), forget_nll.clone(), self.confirmed_d.clone(), self.pool_nll.clone())
        forget_measured = real_measure(self, self.base_model)  # (the same figures, measured)
        theirs = (self.refresh_nll, forget_measured, self.confirmed_d, self.pool_nll)
        firsts.append((mine, theirs))
        return forget_nll

    monkeypatch.setattr(SolvedTaming, "_base_measurement", base_measurement)
    monkeypatch.setattr(SolvedTaming, "measure", lambda self, model: measured.append(1) or real_measure(self, model))
    forget, remember = _sets(forget_folder)
    report = tame(base, forget, remember, make_config({**QUICK, "max_iters": 2}), device="cpu").report
    assert len(firsts) == 1 and len(measured) == report["iterations"]  # one measurement per step, none before
    for ours, theirs in zip(*firsts[0], strict=True):
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"method": "neggrad", "lookalikes": 0}, {"step": "solve"}])
def test_a_guard_turned_off_stays_off_whichever_step_the_run_resolves_to(base, forget_folder, overrides):  # noqa: F811
    """``max_remember_drift: 0`` (off) survives the step's resolution in tame() (the default step, a baseline's
    Adam step, an asked-for solved step): the report's config says null, not a default bound."""
    forget, remember = _sets(forget_folder)
    settings = {**{k: v for k, v in QUICK.items() if k != "step"}, "max_iters": 1, "max_remember_drift": 0,
                **overrides}
    config = tame(base, forget, remember, make_config(settings), device="cpu").report["config"]
    assert config["max_remember_drift"] is None
    assert config["step"] == ("adam" if overrides.get("method") == "neggrad" else "solve")


def test_a_resumed_run_keeps_the_step_its_state_was_written_with(base, forget_folder, monkeypatch, tmp_path):  # noqa: F811
    """A defaulted step that fell back to Adam's for want of memory is Adam's again when the run is resumed with
    memory to spare (and the state's settings, Adam's drift bound included, agree)."""
    forget, remember = _sets(forget_folder)
    state = tmp_path / "state.safetensors"
    defaulted = {key: value for key, value in QUICK.items() if key != "step"}
    settings = make_config(defaulted, {"max_iters": 4})

    def stop(iteration, _logged):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(solved, "free_memory", lambda device: 1000)
    with pytest.warns(UserWarning, match="taking Adam's step"), pytest.raises(InterruptedRun) as stopped:
        tame(base, forget, remember, settings, device="cpu", state_path=state, callback=stop)
    assert stopped.value.partial_report["config"]["step"] == "adam"
    monkeypatch.setattr(solved, "free_memory", lambda device: None)
    resumed = tame(base, forget, remember, settings, device="cpu", state_path=state, resume=True).report
    assert resumed["config"]["step"] == "adam" and resumed["iterations"] == 4
    assert resumed["config"]["max_remember_drift"] == TamingMethod.default_max_remember_drift
