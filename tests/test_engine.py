"""The shared training engine: warm-up, NaN roll-back, Ctrl-C with resumable state, bit-exact resume."""

import os
import signal

import pytest
import torch
from torch import nn

from flowtame.engine.loop import Engine, EngineConfig, _learning_rate, start_engine
from flowtame.errors import CheckpointError, InputError, InterruptedRun, TrainingDivergedError


class QuadraticMethod:
    """Fit a linear layer to noisy targets drawn from the method's generator; converge below a loss."""

    name = "quadratic"

    def __init__(self, generator, target_loss=-1.0, nan_at=()):
        self.generator = generator
        self.target_loss = target_loss
        self.nan_at = set(nan_at)
        self.calls = 0

    def loss(self, model, iteration):
        self.calls += 1
        x = torch.randn(16, 3, generator=self.generator)
        y = x.sum(1, keepdim=True) + 0.01 * torch.randn(16, 1, generator=self.generator)
        loss = (model(x) - y).square().mean()
        if iteration in self.nan_at:
            self.nan_at.discard(iteration)
            loss = loss * float("nan")
        return loss, {"twice": 2 * loss}

    def after_step(self, model, iteration, logged):
        return logged["loss"] < self.target_loss

    def state_tensors(self):
        return {"calls": torch.tensor([self.calls])}

    def state_meta(self):
        return {"calls": self.calls}

    def load_state(self, tensors, meta):
        self.calls = meta["calls"]


def make(seed=0, lagged=False, **kw):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    gen = torch.Generator().manual_seed(seed)
    method = QuadraticMethod(gen, **kw.pop("method_kw", {}))
    engine = Engine(model, method, EngineConfig(lr=0.05, warmup=5, max_iters=kw.pop("max_iters", 40),
                                                trajectory_every=5, snapshot_every=1, lagged_metrics=lagged),
                    generators={"g": gen}, callback=kw.pop("callback", None))
    return model, method, engine


def test_warmup_is_linear_then_constant():
    cfg = EngineConfig(lr=1e-3, warmup=4)
    assert [_learning_rate(cfg, i, 1.0) for i in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert _learning_rate(EngineConfig(lr=1e-3, warmup=0), 0, 0.5) == pytest.approx(5e-4)


@pytest.mark.parametrize("lagged", [False, True])
def test_engine_converges_and_records_trajectory(lagged):
    model, method, engine = make(max_iters=400, lagged=lagged, method_kw={"target_loss": 1e-3})
    result = engine.run()
    assert result.converged and result.iterations < 400
    assert result.trajectory[0]["iteration"] == 1
    assert all({"loss", "twice", "lr", "grad_norm"} <= set(p) for p in result.trajectory)
    assert result.trajectory[-1]["loss"] < result.trajectory[0]["loss"]


@pytest.mark.parametrize("lagged", [False, True])
def test_resume_gives_the_bit_identical_result(tmp_path, lagged):
    model_a, _, engine_a = make(lagged=lagged)
    engine_a.run()

    def interrupt_at_17(iteration, logged):
        if iteration == 17:
            os.kill(os.getpid(), signal.SIGINT)

    state = tmp_path / "state.safetensors"
    model_b, _, engine_b = make(lagged=lagged, callback=interrupt_at_17)
    with pytest.raises(InterruptedRun, match="resuming") as caught:
        engine_b.run(state_path=state)
    assert caught.value.keys == ("resume",)  # the CLI renders it with the --resume flag
    # lagged, iteration 17's step is taken (and then judged) before the loop sees the stop request
    stopped_at = 18 if lagged else 17
    assert state.exists() and engine_b.iteration == stopped_at

    model_c, method_c, engine_c = make(seed=123, lagged=lagged)  # everything must come from the state
    engine_c.load_state(state)
    assert method_c.calls == stopped_at
    engine_c.run()
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(a, c)
    def no_time(trajectory):
        return [{k: v for k, v in point.items() if k != "elapsed"} for point in trajectory]

    assert no_time(engine_c.trajectory) == no_time(engine_a.trajectory)


@pytest.mark.parametrize("lagged", [False, True])
def test_non_finite_loss_rolls_back_and_lowers_the_learning_rate(lagged):
    model, method, engine = make(lagged=lagged, method_kw={"nan_at": (10,)})
    result = engine.run()
    assert result.lr_reductions == 1 and engine.lr_scale == 0.5
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("lagged", [False, True])
def test_persistent_nan_fails_clearly_after_bounded_retries(lagged):
    model, method, engine = make(lagged=lagged, method_kw={"nan_at": ()})
    method.loss_orig = method.loss
    method.loss = lambda m, i: (method.loss_orig(m, i)[0] * float("nan"), {})
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        engine.run()
    assert engine.lr_reductions == engine.config.max_nan_retries


@pytest.mark.parametrize("lagged", [False, True])
def test_a_blow_up_the_method_reports_rolls_back_like_a_nan(lagged):
    model, method, engine = make(max_iters=30, lagged=lagged)
    blown = []

    def diverged(logged):
        if engine.iteration == 12 and not blown:
            blown.append(engine.iteration)
            return "the remember batch's mean BPD jumped"
        return None

    method.diverged = diverged
    snapshots = []
    original = engine._restore
    engine._restore = lambda snapshot: (snapshots.append(snapshot), original(snapshot))
    result = engine.run()
    assert result.lr_reductions == 1 and engine.lr_scale == 0.5
    # rolled back to the snapshot taken after the previous step (snapshot_every=1), not the blown weights
    assert len(snapshots) == 1 and result.iterations == 30


@pytest.mark.parametrize("lagged", [False, True])
def test_persistent_blow_up_fails_clearly_naming_the_problem(lagged):
    _, method, engine = make(lagged=lagged)
    method.diverged = lambda logged: "the remember batch's mean BPD jumped to 9.000 (base 1.280)"
    with pytest.raises(TrainingDivergedError, match=r"jumped to 9.000 \(base 1.280\) at iteration 0, after 3"):
        engine.run()


def test_bad_resume_state_is_a_clear_error(tmp_path):
    _, _, engine = make()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        engine.load_state(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="unreadable resume state"):
        engine.load_state(bad)


def test_resume_without_a_state_path_is_a_clear_error():
    # the library's tame()/debias() take resume=True with state_path=None; the engine read Path(None) (TypeError)
    model, method, _ = make()
    with pytest.raises(InputError, match="resume needs the state_path"):
        start_engine(model, method, EngineConfig(lr=0.05), batches=torch.Generator(), callback=None,
                     state_path=None, resume=True)


@pytest.mark.parametrize("target_loss", [-1.0, 1e-3])  # runs to max_iters / converges early
def test_lagged_metrics_take_the_same_steps(target_loss):
    """Judging each iteration's scalars one iteration late (the CUDA default) changes when the host reads
    them, not the optimization: same weights, same stopping iteration, same trajectory."""
    runs = []
    for lagged in (False, True):
        model, method, engine = make(max_iters=400, lagged=lagged, method_kw={"target_loss": target_loss})
        result = engine.run()
        runs.append((model, result, method.calls))
    (model_a, result_a, calls_a), (model_b, result_b, calls_b) = runs
    assert result_b.iterations == result_a.iterations and result_b.converged == result_a.converged
    assert result_a.converged == (target_loss > 0)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [{k: v for k, v in p.items() if k != "elapsed"} for p in result_b.trajectory] == \
        [{k: v for k, v in p.items() if k != "elapsed"} for p in result_a.trajectory]
    # lagged, a converging run computes one more forward/backward, whose step is never taken
    assert calls_b == calls_a + (1 if result_a.converged else 0)


def test_lagged_nan_step_is_undone_from_a_judged_snapshot():
    """Lagged, the non-finite iteration is stepped before it is judged; the roll-back must restore the
    weights after the last judged step (the same snapshot as unlagged), and the run ends finite."""
    restored = []
    for lagged in (False, True):
        model, _, engine = make(lagged=lagged, method_kw={"nan_at": (10,)})
        original = engine._restore
        engine._restore = lambda snapshot, original=original: (restored.append(snapshot["model"]),
                                                                original(snapshot))
        result = engine.run()
        assert result.lr_reductions == 1 and result.iterations == 40
        assert all(torch.isfinite(p).all() for p in model.parameters())
    unlagged, lagged = restored
    assert all(torch.isfinite(v).all() and torch.equal(v, lagged[k]) for k, v in unlagged.items())


def test_mixed_precision_on_the_cpu_is_refused_not_run_in_fp32():
    """The engine applies the same precision rule as the likelihood passes (engine.devices.autocast_context)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    engine = Engine(nn.Linear(3, 1), QuadraticMethod(gen), EngineConfig(lr=0.05, max_iters=3, precision="bf16"),
                    generators={"g": gen})
    with pytest.raises(InputError, match="only supported on CUDA"):
        engine.run()
