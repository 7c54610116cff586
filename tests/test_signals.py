"""SIGTERM and SIGHUP during tame, debias and train behave as Ctrl-C: the engine stops at an iteration
boundary, saves the resumable state, writes the partial report, and the command exits 128 + the signal's number
(130 SIGINT, 143 SIGTERM, 129 SIGHUP); ``--resume`` then reaches the bit-identical result on the CPU."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowtame.data.quantization import DataSpec
from flowtame.errors import InterruptedRun
from flowtame.flows.glow import GlowSpec
from flowtame.io.checkpoint import load_checkpoint

STOPS = [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)]


@pytest.fixture(autouse=True)
def _default_dispositions():
    """SIGTERM and SIGHUP at their defaults, whatever the test runner inherited (under nohup, or as a background
    job, SIGHUP is ignored — and an ignored SIGHUP must stay ignored, see the test below)."""
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)
FORGET, REMEMBER = "embedded:digits:test:3", "embedded:digits:test:1"


def _tame(base, out, *extra):
    return ["tame", str(base), "--forget", FORGET, "--remember", REMEMBER, "-o", str(out), "--report",
            f"{out}.json", "--max-iters", "8", "--batch-size", "4", "--refresh-size", "16", "--forget-draws", "1",
            "--warmup", "0", "--device", "cpu", "--quiet", "--step", "adam", *extra]  # (a run long enough to stop)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _signal_at(monkeypatch, view_class, at: int, sig: int) -> None:
    original = view_class.update

    def update(self, iteration, logged):
        original(self, iteration, logged)
        if iteration == at:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(view_class, "update", update)


@pytest.mark.parametrize("sig, code", STOPS)
def test_tame_stops_cleanly_on_a_signal_and_resumes_to_the_same_result(run_cli, tiny_base, tmp_path, monkeypatch,
                                                                        sig, code):
    import flowtame.cli.tame as tame_cli

    straight = tmp_path / "straight.safetensors"
    assert run_cli(*_tame(tiny_base, straight)).exit_code == 0
    out = tmp_path / "out.safetensors"
    _signal_at(monkeypatch, tame_cli._LiveView, 3, sig)
    first = run_cli(*_tame(tiny_base, out))
    assert first.exit_code == code and "Traceback" not in first.stderr
    line, = first.stderr.strip().splitlines()
    assert "interrupted" in line and "--resume" in line and (sig == signal.SIGINT or signal.Signals(sig).name in line)
    assert not out.exists() and (tmp_path / "out.safetensors.resume.safetensors").is_file()
    partial = json.loads(Path(f"{out}.json").read_text())
    assert partial["interrupted"] is True and partial["iterations"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the command
    monkeypatch.undo()
    assert run_cli(*_tame(tiny_base, out, "--resume")).exit_code == 0
    assert _same_weights(straight, out)


def _sigterm_when_called(monkeypatch, module, name):
    """Make ``module.name`` send this process SIGTERM before it runs as usual (a stop request arriving there)."""
    original = getattr(module, name)

    def sigterm_then_original(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, sigterm_then_original)


def test_tame_stopped_after_training_keeps_the_finished_run(run_cli, tiny_base, tmp_path, monkeypatch):
    import flowtame.jobs.tame as tame_job

    straight = tmp_path / "straight.safetensors"
    assert run_cli(*_tame(tiny_base, straight)).exit_code == 0
    _sigterm_when_called(monkeypatch, tame_job, "taming_evaluation")  # during the evaluation, after training
    out = tmp_path / "out.safetensors"
    first = run_cli(*_tame(tiny_base, out))
    assert first.exit_code == 143 and "after training" in first.stderr and "--resume" in first.stderr
    assert not out.exists() and (tmp_path / "out.safetensors.resume.safetensors").is_file()
    monkeypatch.undo()
    resumed = run_cli(*_tame(tiny_base, out, "--resume"))
    assert resumed.exit_code == 0, resumed.stderr
    assert _same_weights(straight, out)
    assert json.loads(Path(f"{out}.json").read_text())["iterations"] == 8


def _accept_at_iteration_2(monkeypatch, method_class) -> dict[str, bool]:
    """Make ``method_class`` accept its stop at iteration 2 (after judging it as usual), sending this process
    SIGTERM in that iteration while the returned switch's ``"on"`` is True."""
    original, signalled = method_class.after_step, {"on": False}

    def after_step(self, model, iteration, logged):
        original(self, model, iteration, logged)
        if iteration == 2 and signalled["on"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return iteration == 2

    monkeypatch.setattr(method_class, "after_step", after_step)
    return signalled


def test_a_stop_at_the_converging_iteration_is_honoured_and_resuming_writes_the_converged_run(run_cli, tiny_base,
                                                                                             tmp_path, monkeypatch):
    """A SIGTERM that arrives in the iteration whose stop is accepted is not dropped (the work after the loop -
    the final passes, the evaluation - can take minutes, and a scheduler's grace period is short): exit 143 with
    the converged run's state saved and a partial report that says so; resuming writes the straight run's
    weights without another iteration. (The tiny untrained model's stop is accepted by hand at iteration 2.)"""
    from flowtame.methods.solved import SolvedTaming

    signalled = _accept_at_iteration_2(monkeypatch, SolvedTaming)
    solve = ("--refresh-size", "32", "--device", "cpu", "--quiet", "--step", "solve", "--max-iters", "30")

    def args(out):
        return ("tame", str(tiny_base), "--forget", FORGET, "--remember", REMEMBER, "-o", str(out), "--report",
                f"{out}.json", *solve)

    straight, out = tmp_path / "straight.safetensors", tmp_path / "out.safetensors"
    done = run_cli(*args(straight))
    assert done.exit_code == 0, done.stderr
    assert json.loads(Path(f"{straight}.json").read_text())["iterations"] == 3
    signalled["on"] = True
    first = run_cli(*args(out))
    assert first.exit_code == 143 and "the run converged" in first.stderr and "--resume" in first.stderr
    assert not out.exists() and (tmp_path / "out.safetensors.resume.safetensors").is_file()
    partial = json.loads(Path(f"{out}.json").read_text())
    assert partial["interrupted"] is True and partial["converged"] is True and partial["iterations"] == 3
    signalled["on"] = False
    resumed = run_cli(*args(out), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert _same_weights(straight, out)
    assert json.loads(Path(f"{out}.json").read_text())["iterations"] == 3


def test_an_ignored_sighup_stays_ignored_as_under_nohup(run_cli, tiny_base, tmp_path, monkeypatch):
    import flowtame.cli.tame as tame_cli

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    out = tmp_path / "out.safetensors"
    _signal_at(monkeypatch, tame_cli._LiveView, 3, signal.SIGHUP)
    result = run_cli(*_tame(tiny_base, out))
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_debias_stops_cleanly_on_sigterm(run_cli, tiny_base, tmp_path, monkeypatch):
    import flowtame.cli.debias as debias_cli

    def args(out, *extra):
        return _debias_args(tiny_base, out, *extra)

    straight = tmp_path / "straight.safetensors"
    assert run_cli(*args(straight)).exit_code == 0
    out = tmp_path / "out.safetensors"
    _signal_at(monkeypatch, debias_cli._LiveView, 3, signal.SIGTERM)
    first = run_cli(*args(out))
    assert first.exit_code == 143 and "SIGTERM" in first.stderr and "--resume" in first.stderr
    assert json.loads(Path(f"{out}.json").read_text())["interrupted"] is True
    monkeypatch.undo()
    assert run_cli(*args(out, "--resume")).exit_code == 0
    assert _same_weights(straight, out)


def test_debias_stopped_at_its_converging_iteration_resumes_to_the_straight_runs_weights(run_cli, tiny_base,
                                                                                         tmp_path, monkeypatch):
    """debias, like tame: a SIGTERM in the iteration whose stop is accepted (by hand at iteration 2 here) exits
    143 with the converged run kept, and --resume writes the straight run's weights."""
    from flowtame.methods.debias import DebiasMethod

    signalled = _accept_at_iteration_2(monkeypatch, DebiasMethod)
    straight, out = tmp_path / "straight.safetensors", tmp_path / "out.safetensors"
    assert run_cli(*_debias_args(tiny_base, straight)).exit_code == 0
    signalled["on"] = True
    first = run_cli(*_debias_args(tiny_base, out))
    assert first.exit_code == 143 and "the run converged" in first.stderr and "--resume" in first.stderr
    assert not out.exists()
    signalled["on"] = False
    resumed = run_cli(*_debias_args(tiny_base, out, "--resume"))
    assert resumed.exit_code == 0, resumed.stderr
    assert _same_weights(straight, out)


def _debias_args(tiny_base, out, *extra):
    return ["debias", tiny_base, "--group", "zero=embedded:digits:all:0", "--group", "one=embedded:digits:all:1",
            "--target", "zero=0.3", "-o", out, "--report", f"{out}.json", "--samples", "64", "--max-iters", "6",
            "--measure-every", "2", "--batch-size", "4", "--quiet", *extra]


def test_debias_stopped_while_measuring_after_training_keeps_the_finished_run(run_cli, tiny_base, tmp_path,
                                                                              monkeypatch):
    """A SIGTERM during the final measurement and evaluation (which takes minutes on a large model) keeps the
    trained weights as resumable state; resuming writes the outputs without training again."""
    import flowtame.jobs.debias as debias_job

    straight = tmp_path / "straight.safetensors"
    assert run_cli(*_debias_args(tiny_base, straight)).exit_code == 0
    _sigterm_when_called(monkeypatch, debias_job, "_preservation")
    out = tmp_path / "out.safetensors"
    first = run_cli(*_debias_args(tiny_base, out))
    assert first.exit_code == 143 and "after training by SIGTERM" in first.stderr and "--resume" in first.stderr
    assert not out.exists() and (tmp_path / "out.safetensors.resume.safetensors").is_file()
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(debias_job.DebiasMethod, "loss", lambda *a, **k: calls.append(1))
    resumed = run_cli(*_debias_args(tiny_base, out, "--resume"))
    assert resumed.exit_code == 0, resumed.stderr
    assert calls == [] and _same_weights(straight, out)
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["iterations"] == json.loads(Path(f"{straight}.json").read_text())["iterations"]


def test_train_stops_cleanly_on_sighup(tmp_path):
    from flowtame.jobs.train import resume_state_path, train_model

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spec = GlowSpec(channels=1, image_size=8, n_flow=1, n_block=2, hidden=8)

    def train(path, **kwargs):
        return train_model(images, "glow", spec, DataSpec(8, 1, 5), steps=6, batch_size=4, lr=1e-3, seed=0,
                           device="cpu", checkpoint_path=path, **kwargs)

    straight = train(tmp_path / "straight.safetensors")

    def hang_up(progress):
        if progress.step == 2:
            os.kill(os.getpid(), signal.SIGHUP)

    out = tmp_path / "out.safetensors"
    with pytest.raises(InterruptedRun, match="SIGHUP.*resuming") as caught:
        train(out, callback=hang_up)
    assert caught.value.exit_code == 129 and resume_state_path(out).is_file()
    resumed = train(out, resume=True)
    a, b = straight.checkpoint.model.state_dict(), resumed.checkpoint.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


_SLOW_VIEW = """
import sys, time
import flowtame.cli.tame as tame_cli
from flowtame.cli import main
original = tame_cli._LiveView.update
def update(self, iteration, logged):  # a slower loop, so the signal surely lands mid-run
    original(self, iteration, logged)
    print(f"at iteration {iteration}", file=sys.stderr, flush=True)
    time.sleep(0.1)
tame_cli._LiveView.update = update
sys.argv = ["flowtame", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_sigterm_to_a_running_tame_process_saves_state_and_resume_matches(tiny_base, tmp_path):
    """A real process and a real SIGTERM (what `timeout`, CI runners and container runtimes send)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    straight = tmp_path / "straight.safetensors"
    args = [a for a in _tame(tiny_base, straight) if a != "--quiet"]
    args[args.index("--max-iters") + 1] = "40"
    done = subprocess.run([sys.executable, "-c", "from flowtame.cli import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.safetensors"
    args[args.index("-o") + 1], args[args.index("--report") + 1] = str(out), f"{out}.json"
    process = subprocess.Popen([sys.executable, "-c", _SLOW_VIEW, *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    deadline, lines = time.monotonic() + 300, []
    while time.monotonic() < deadline and selector.select(timeout=1) is not None:
        line = process.stderr.readline()
        lines.append(line)
        if line.startswith("at iteration 5"):
            process.send_signal(signal.SIGTERM)
            break
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == 143, "".join(lines) + rest
    assert "interrupted by SIGTERM" in rest and "--resume" in rest
    assert (tmp_path / "out.safetensors.resume.safetensors").is_file() and not out.exists()
    partial = json.loads(Path(f"{out}.json").read_text())
    assert partial["interrupted"] is True and 5 <= partial["iterations"] < 40
    resumed = subprocess.run([sys.executable, "-c", "from flowtame.cli import main; main()", *args, "--resume"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(straight, out)
