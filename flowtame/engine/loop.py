"""The training engine shared by tame, debias and the baselines.

A *method* supplies the loss of each iteration and decides when it is done; the engine owns everything
else: Adam with linear warm-up, gradient clipping, mixed precision (CUDA only, through
:func:`~flowtame.engine.devices.autocast_context`), roll-back of non-finite
(or blown-up) steps with a bounded number of learning-rate reductions, a clean stop on Ctrl-C with a resumable state
file (safetensors, never a pickle), resume to the bit-identical result on CPU, timing and a trajectory.

The engine does one forward/backward per iteration (whatever the method puts in its loss). It reads the
scalars the method asks to log back to the host once per iteration; on CUDA that read lags one iteration
behind, so the hot loop has no host sync (:meth:`Engine.run`).

Under torchrun (:mod:`flowtame.engine.distributed`) the model is wrapped in
``torch.nn.parallel.DistributedDataParallel`` and the method's loss sees a flow whose ``log_prob`` of the whole
batch is computed shard by shard (:meth:`~flowtame.engine.distributed.DistContext.map_rows`): every rank draws
the same batch, evaluates its rows, and holds every row's value, so the loss, the logged figures and every
decision are the one-process ones, and DDP's averaged gradient is the one-process gradient. Each iteration the
ranks also agree (two small collectives on the CPU) on whether to stop (any rank's Ctrl-C or SIGTERM) and on the
logged figures (rank 0's), so all act on the same iteration. A rank that dies makes the next collective fail on
the others: they write the resumable state of the latest snapshot and stop (:class:`RankLost`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import math
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from flowtame.engine import distributed
from flowtame.engine.devices import autocast_context, out_of_memory
from flowtame.engine.distributed import RankLost
from flowtame.errors import (
    CheckpointError,
    InputError,
    InterruptedRun,
    OutOfMemory,
    OutputWriteError,
    StopSignal,
    TrainingDivergedError,
    signal_number,
    stop_signals,
)
from flowtame.flows.base import MultiScaleFlow
from flowtame.io.fileio import save_safetensors_atomic

STATE_FORMAT = "flowtame-engine-state"


@dataclass
class EngineConfig:
    """Optimizer and loop settings. ``lr`` is Adam's peak learning rate, reached after ``warmup`` iterations."""

    lr: float = 5e-5
    warmup: int = 0
    max_iters: int = 800
    grad_clip: float | None = None
    max_nan_retries: int = 3
    lr_backoff: float = 0.5
    snapshot_every: int = 10
    #: Under torchrun: iterations between the in-memory resumable states written when a rank dies.
    resume_every: int = 10
    trajectory_every: int = 10
    precision: str = "fp32"
    #: Judge each iteration's scalars one iteration late, so the host never waits for the GPU
    #: (:meth:`Engine.run`); None = on CUDA only.
    lagged_metrics: bool | None = None


class Method(Protocol):
    """What the engine needs from a taming method. ``model``: the flow being trained (to ``loss``, under torchrun,
    its sharded view :class:`_ShardedFlow`, which forwards every attribute to it)."""

    name: str

    def loss(self, model: MultiScaleFlow, iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss of this iteration and named scalars to log (tensors, detached or not)."""

    def after_step(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        """Called after the optimizer step with the logged scalars as floats; True when converged.

        A method may also expose ``lr_factor`` (float): the engine multiplies the learning rate by it,
        ``diverged(logged) -> str | None``: a reason to treat this iteration like a non-finite loss (roll back
        to the last good weights and lower the learning rate), e.g. a blow-up of the remember NLL, and
        ``gave_up`` (str or None): once set, the run stops after this iteration, unconverged (e.g. debias's
        early verdict that its targets are out of reach), and ``transforms_update`` (bool): when True the engine
        calls ``transform_update(model, before)`` right after each Adam step, ``before`` the trained values
        before it (name -> tensor), so the method may replace the update (taming's curvature metric); and
        ``takes_own_step`` (bool): when True the engine calls ``own_step(model, iteration)`` instead of the
        loss, its backward and Adam: the method changes the trained values itself and returns the figures to log
        (name -> scalar tensor, ``loss`` and ``grad_norm`` among them; taming's solved step).
        """

    def state_tensors(self) -> dict[str, Tensor]:
        """Method state to save for resume (tensors)."""

    def state_meta(self) -> dict[str, Any]:
        """Method state to save for resume (JSON-serializable)."""

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what ``state_tensors``/``state_meta`` returned."""


@dataclass
class EngineResult:
    iterations: int
    converged: bool
    wall_seconds: float
    lr_reductions: int
    trajectory: list[dict[str, float]] = field(default_factory=list)


class _StopFlag:
    """Turns the first Ctrl-C, SIGTERM or SIGHUP into a request to stop at the next iteration boundary
    (``signum`` remembers which); a second one gives up at once. SIGTERM and SIGHUP stay ignored when the
    process ignores them (SIGHUP under nohup); SIGINT is always caught (a shell starts background jobs with it
    ignored, yet ``kill -INT`` should still stop them cleanly). The previous handlers come back on exit. Only in
    the main thread (elsewhere Python cannot set handlers, and Ctrl-C stays a KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = int(signal.SIGINT)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in stop_signals():
            if sig == signal.SIGINT or signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second stop request: give up at once
            raise KeyboardInterrupt if signum == signal.SIGINT else StopSignal(signum)
        self.requested = True
        self.signum = int(signum)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _by(signum: int) -> str:
    """`` by SIGTERM`` / `` by SIGHUP`` for the message of a stop; nothing for Ctrl-C."""
    return "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"


def keep_run_after_failed_write(error: OutputWriteError, save_state: Callable[[], None] | None,
                                state_path: str | Path | None, *, saved: bool = False) -> OutputWriteError:
    """The error to raise when a run's outputs cannot be written: first ``save_state()`` (the resumable
    state at ``state_path``; ``saved`` = already written), so resuming continues without losing the work."""
    if state_path is None or (save_state is None and not saved):
        return error
    try:
        if save_state is not None and not saved:
            save_state()
    except OutputWriteError as again:
        return OutputWriteError(f"{error}; the run's resumable state could not be written either ({again})")
    return OutputWriteError(f"{error}; the run is kept in {state_path}: make room (or fix the path) and rerun "
                            "the same command resuming, to continue from there without losing the work done",
                            keys=("resume",))


@contextlib.contextmanager
def keep_finished_run(save_state: Callable[[], None] | None, state_path: str | Path | None) -> Iterator[None]:
    """Around the work after a finished run (final measurements, evaluation): a stop request there (Ctrl-C,
    SIGTERM, SIGHUP) or a failed allocation first saves the finished run's resumable state, then raises
    :class:`InterruptedRun` (:class:`~flowtame.errors.OutOfMemory`) saying how to finish (resuming skips the
    training it holds)."""
    def kept() -> str:
        if save_state is None:
            return "without a state path the finished run could not be kept"
        save_state()
        return (f"the finished run is kept in {state_path}: rerun the same command resuming, to write the outputs "
                "without training again")

    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if out_of_memory(exc) is None:
            raise
        gc.collect()
        error = out_of_memory(exc, None, "after training, while measuring and evaluating", kept())
        assert error is not None
        raise OutOfMemory(str(error), keys=("resume",) if save_state is not None else ()) from None
    except KeyboardInterrupt as exc:
        where = kept()
        raise InterruptedRun(f"interrupted after training{_by(signal_number(exc))}, while measuring and "
                             f"evaluating; {where}", signal_number(exc),
                             keys=("resume",) if save_state is not None else ()) from None


def _learning_rate(config: EngineConfig, iteration: int, scale: float) -> float:
    warm = min(1.0, (iteration + 1) / config.warmup) if config.warmup > 0 else 1.0
    return config.lr * warm * scale


class Engine:
    """Runs ``method`` on ``model`` for at most ``config.max_iters`` iterations.

    ``generators`` are the torch.Generators the method draws from; their states go into the resume file.
    ``callback(iteration, logged)`` is called after every iteration (progress display). ``settings``: what a
    resumed run must share with the run that wrote the state (JSON-serializable, key -> value, a mapping value
    compared entry by entry: e.g. the job's resolved config); recorded in the state and checked by
    :meth:`load_state` (None: neither).
    """

    def __init__(self, model: MultiScaleFlow, method: Method, config: EngineConfig, *,
                 generators: dict[str, torch.Generator] | None = None,
                 callback: Callable[[int, dict[str, float]], None] | None = None,
                 settings: dict[str, Any] | None = None):
        self.model = model
        self.method = method
        self.config = config
        self.generators = generators or {}
        self.callback = callback
        self.settings = None if settings is None else json.loads(json.dumps(settings))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.context = distributed.current()
        #: What the method's loss gets: the model, or under torchrun, during :meth:`run`, its sharded DDP view
        #: (:class:`_ShardedFlow`).
        self.loss_model: Any = model
        self._resume_point: dict[str, Any] | None = None
        if self.context.active:
            # the same learning rate on every rank, whatever rounding a calibration met on each
            config = self.config = dataclasses.replace(config, lr=self.context.broadcast_floats([config.lr])[0])
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, foreach=True)
        self.iteration = 0
        self.lr_scale = 1.0
        self.lr_reductions = 0
        self.elapsed = 0.0
        self.trajectory: list[dict[str, float]] = []
        self.converged = False
        self._stop = _StopFlag()

    # ----------------------------------------------------------------- snapshots and resume
    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _clone_optimizer_state(self.optimizer.state_dict()),
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(_clone_optimizer_state(snapshot["optimizer"]))

    def _point(self, snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything :meth:`save_state` writes, as of now (``snapshot``: model and optimizer of
        :meth:`_snapshot` instead of the live ones; the rest is then copied, so later iterations leave it)."""
        point: dict[str, Any] = {
            "model": self.model.state_dict() if snapshot is None else snapshot["model"],
            "optimizer": self.optimizer.state_dict() if snapshot is None else snapshot["optimizer"],
            "rng": {name: gen.get_state() for name, gen in self.generators.items()},
            "method": self.method.state_tensors(),
            "meta": {"iteration": self.iteration, "converged": self.converged, "lr_scale": self.lr_scale,
                     "lr_reductions": self.lr_reductions, "elapsed": self.elapsed, "trajectory": self.trajectory,
                     "method_meta": self.method.state_meta()},
        }
        if snapshot is not None:
            point["method"] = {k: v.detach().clone() for k, v in point["method"].items()}
            point["meta"] = copy.deepcopy(point["meta"])
        return point

    def save_state(self, path: str | Path) -> None:
        """Write everything needed to continue (model, Adam moments, RNGs, method state) atomically; under
        torchrun only rank 0 writes (every rank holds the same state)."""
        if self.context.is_main:
            self._write_state(path, self._point())

    def _write_state(self, path: str | Path, point: dict[str, Any]) -> None:
        tensors: dict[str, Tensor] = {}
        for key, value in point["model"].items():
            tensors[f"model.{key}"] = value
        for index, state in point["optimizer"]["state"].items():
            for name, value in state.items():
                tensors[f"optim.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        for name, value in point["rng"].items():
            tensors[f"rng.{name}"] = value
        for key, value in point["method"].items():
            tensors[f"method.{key}"] = value
        meta = {"format": STATE_FORMAT, "method": self.method.name, **point["meta"],
                "config": asdict(self.config), "world_size": self.context.world_size}
        if self.settings is not None:
            meta["settings"] = self.settings
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_safetensors_atomic(path, tensors, {"engine": json.dumps(meta)})

    def load_state(self, path: str | Path) -> None:
        """Restore a state written by :meth:`save_state` (same model shape and method)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no resumable state here (nothing to resume)", keys=("resume",))
        try:
            meta = _state_meta(path)
            tensors = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable resume state ({str(exc).splitlines()[0]})") from None
        if meta.get("format") != STATE_FORMAT or meta.get("method") != self.method.name:
            raise CheckpointError(f"{path}: not a resume state of method {self.method.name!r}")
        saved_world = meta.get("world_size", 1)
        if saved_world != self.context.world_size:
            raise CheckpointError(f"{path}: saved by a run on {saved_world} process(es), this run has "
                                  f"{self.context.world_size}: resume with the same number of processes "
                                  "(torchrun --nnodes x --nproc-per-node)", keys=("resume",))
        self._check_settings(path, meta.get("settings"))
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_state)
        except RuntimeError:
            raise CheckpointError(f"{path}: the resume state does not match this model") from None
        opt = self.optimizer.state_dict()
        device = self.params[0].device if self.params else torch.device("cpu")
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                value = value.to(device) if name != "step" else value
                opt["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(opt)
        for name, gen in self.generators.items():
            gen.set_state(tensors[f"rng.{name}"])
        self.method.load_state({k[len("method."):]: v.to(device) for k, v in tensors.items()
                                if k.startswith("method.")}, meta["method_meta"])
        self.iteration = meta["iteration"]
        self.converged = bool(meta.get("converged", False))  # a finished run resumes to its outputs only
        self.lr_scale = meta["lr_scale"]
        self.lr_reductions = meta["lr_reductions"]
        self.elapsed = meta["elapsed"]
        self.trajectory = meta["trajectory"]

    def _check_settings(self, path: Path, saved: dict[str, Any] | None) -> None:
        """Refuse (CheckpointError naming each differing key with both values) a state written under other
        :attr:`settings`; a state without them (an older flowtame's) is resumed with a warning."""
        if self.settings is None:
            return
        if saved is None:
            warnings.warn(f"{path}: the resume state does not record its run's settings (written by an older "
                          "flowtame): resuming without checking that they are this run's", stacklevel=3)
            return
        differing = settings_differences(saved, self.settings)
        if differing:
            details = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, old, new in differing)
            raise CheckpointError(f"{path}: the resume state was written with other settings ({details}); resume "
                                  "with the run's settings, or start afresh without resuming",
                                  keys=tuple(key for key, _, _ in differing if "." not in key))

    # ----------------------------------------------------------------- the loop
    def _autocast(self):
        device = self.params[0].device if self.params else torch.device("cpu")
        return autocast_context(device, self.config.precision)

    @property
    def _own_step(self) -> bool:
        """Whether the method takes its own step (:meth:`Method.own_step`) instead of the loss and Adam's."""
        return bool(getattr(self.method, "takes_own_step", False))

    def _lagged(self) -> bool:
        if self.context.active:
            return False  # the ranks agree on each iteration's figures as they come (Engine.run)
        if self._own_step:
            return False  # its step is taken in _forward_backward: a lag would judge a later step's weights
        if self.config.lagged_metrics is not None:
            return self.config.lagged_metrics
        return bool(self.params) and self.params[0].device.type == "cuda"

    def _forward_backward(self) -> tuple[list[str], Tensor]:
        """One forward/backward of the method's loss; (names, values [M] on the device): loss, grad norm
        and the method's metrics, nothing read back to the host. A method that takes its own step
        (``takes_own_step``) takes it here instead (:meth:`Method.own_step`); its figures are returned alike."""
        if self._own_step:
            metrics = self.method.own_step(self.model, self.iteration)  # type: ignore[attr-defined]
            device = self.params[0].device if self.params else torch.device("cpu")
            return list(metrics), torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(())
                                               for v in metrics.values()])
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, metrics = self.method.loss(self.loss_model, self.iteration)
        loss.backward()
        if self.config.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        names = ["loss", "grad_norm", *metrics]
        values = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device),
                              *(torch.as_tensor(v, device=loss.device).detach().float().reshape(())
                                for v in metrics.values())])
        return names, values

    def _step(self) -> float:
        """Adam step at this iteration's learning rate (returned); counts the iteration. A method that takes its
        own step took it in :meth:`_forward_backward` (0 returned)."""
        if self._own_step:
            self.iteration += 1
            return 0.0
        lr = _learning_rate(self.config, self.iteration, self.lr_scale * getattr(self.method, "lr_factor", 1.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        transform = getattr(self.method, "transform_update", None)
        if transform is not None and getattr(self.method, "transforms_update", False):
            before = {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}
            self.optimizer.step()
            transform(self.model, before)
        else:
            self.optimizer.step()
        self.iteration += 1
        return lr

    def _healthy(self, logged: dict[str, float], iteration: int) -> bool:
        """False after rolling back to the last good weights (non-finite loss or gradient, or the method's
        blow-up test) and un-counting ``iteration``."""
        problem = None
        if not (math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])):
            problem = (f"loss became non-finite at iteration {iteration} "
                       f"(loss={logged['loss']}, grad norm={logged['grad_norm']})")
        else:
            blow_up = getattr(self.method, "diverged", lambda _logged: None)(logged)
            problem = f"{blow_up} at iteration {iteration}" if blow_up else None
        if problem is None:
            return True
        self._roll_back(problem)
        self.iteration = iteration
        return False

    def _record(self, logged: dict[str, float], iteration: int, start: float) -> None:
        """After iteration ``iteration``'s step: the method's stopping test, trajectory, snapshot, callback."""
        self.converged = bool(self.method.after_step(self.model, iteration, logged))
        done = iteration + 1
        self.elapsed = time.perf_counter() - start
        logged["elapsed"] = self.elapsed
        if done % self.config.trajectory_every == 0 or self.converged or done == 1 or self._gave_up():
            self.trajectory.append({"iteration": done, **logged})
        if done % self.config.snapshot_every == 0 or self._own_step:  # (own steps: a roll-back undoes one)
            self._last_good = self._snapshot()
        if done % self.config.resume_every == 0 or self._own_step:
            fresh = done % self.config.snapshot_every == 0 or self._own_step  # (_last_good is this iteration's)
            self._resume_point = self._point(self._last_good if fresh else self._snapshot())
        if self.callback is not None:
            self.callback(done, logged)

    def _gave_up(self) -> bool:
        """Whether the method says its run cannot succeed (its ``gave_up`` reason is set)."""
        return bool(getattr(self.method, "gave_up", None))

    def run(self, state_path: str | Path | None = None) -> EngineResult:
        """Iterate until the method converges or ``max_iters``; Ctrl-C saves ``state_path`` and raises.

        Unlagged (the CPU default), each iteration reads its scalars back before its step: non-finite losses
        are never applied. Lagged (the CUDA default, ``EngineConfig.lagged_metrics``), iteration i's scalars
        are copied to pinned host memory without waiting and judged during iteration i+1, after its
        forward/backward is queued and before its step, so the host never stalls the GPU; a bad step is
        then undone by the roll-back to the last good snapshot (taken only from judged steps). The method
        sees the same weights in ``after_step`` either way; its refreshed statistics reach the loss one
        iteration later when lagged.

        Under torchrun metrics are unlagged, and each iteration starts with the ranks agreeing on whether to
        stop (:meth:`_stop_agreed`) and reads the figures rank 0 logged (:meth:`_agreed`); a failed collective
        (a rank died) writes the latest snapshot's resumable state and raises :class:`RankLost`.
        """
        self.model.train()
        self._last_good = self._snapshot()
        start = time.perf_counter() - self.elapsed
        self._resume_point = self._point(self._last_good)
        if self.context.active:
            # DDP lives for the run only: it must be gone before its process group is destroyed
            self.loss_model = _ShardedFlow(self.model, self.context)
        with self._stop:
            try:
                self._iterate(state_path, start)
            except (RuntimeError, MemoryError) as exc:
                if out_of_memory(exc) is not None:
                    raise self._out_of_memory(exc, state_path) from None
                if not self.context.active or not isinstance(exc, RuntimeError):
                    raise
                raise self._lost(exc, state_path) from None
            finally:
                self.loss_model = self.model
        self.elapsed = time.perf_counter() - start
        return EngineResult(self.iteration, self.converged, self.elapsed, self.lr_reductions, self.trajectory)

    def _judge(self, staged: _Staged, start: float) -> bool:
        """Judge a stepped iteration's scalars (lagged mode): roll back, or record it."""
        logged = staged.read()
        if not self._healthy(logged, staged.iteration):
            return False
        self._record(logged, staged.iteration, start)
        return True

    def _iterate(self, state_path: str | Path | None, start: float) -> None:
        """The loop of :meth:`run` (inside its stop flag)."""
        lagged = self._lagged()
        staging = _HostStaging()
        pending: _Staged | None = None  # the latest stepped iteration whose scalars are not judged yet
        while True:
            if self._stop_agreed():  # (also when the run just converged: the work after it can take minutes)
                if pending is not None:
                    self._judge(pending, start)
                    pending = None
                self.elapsed = time.perf_counter() - start
                if state_path is not None:
                    self.save_state(state_path)
                done = ", the run converged" if self.converged else ""
                then = " (it writes the outputs without training again)" if self.converged else ""
                raise InterruptedRun(
                    f"interrupted{_by(self._stop.signum)} at iteration {self.iteration}{done}"
                    + (f"; state saved to {state_path}, continue by resuming{then}" if state_path else ""),
                    self._stop.signum, keys=("resume",) if state_path else ())
            if self.converged or self._gave_up():
                break
            if self.iteration >= self.config.max_iters:
                if pending is None:
                    break
                self._judge(pending, start)
                pending = None
                continue
            names, values = self._forward_backward()
            staged = staging.stage(names, values, self.iteration)
            if not lagged:
                logged = self._agreed(staged.read())
                if not self._healthy(logged, staged.iteration):
                    continue
                logged["lr"] = self._step()
                self._record(logged, staged.iteration, start)
                continue
            if pending is not None:
                healthy = self._judge(pending, start)
                pending = None
                if not healthy or self.converged or self._gave_up():
                    continue  # this iteration's gradients are dropped
            staged.lr = self._step()
            pending = staged

    def _stop_agreed(self) -> bool:
        """Whether to stop now: this process's stop request; under torchrun (a collective, every iteration)
        any rank's, and every rank adopts rank 0's ``converged`` (equal on every rank by construction; adopting
        it guarantees no rank leaves the loop alone)."""
        if not self.context.active:
            return self._stop.requested
        flags = self.context.gather_flags([self._stop.requested, self.converged])
        self.converged = flags[0][1]
        return any(requested for requested, _ in flags)

    def _agreed(self, logged: dict[str, float]) -> dict[str, float]:
        """The iteration's logged figures every rank acts on: rank 0's under torchrun (the loss and metrics
        come from gathered per-row values and the gradient norm from DDP's all-reduced gradient, so they are
        the same on every rank; taking rank 0's makes the guards' decisions identical by construction)."""
        if not self.context.active:
            return logged
        return dict(zip(logged, self.context.broadcast_floats(list(logged.values())), strict=True))

    def _out_of_memory(self, exc: BaseException, state_path: str | Path | None) -> OutOfMemory:
        """A failed allocation in the loop: what it held is let go and, with a state path, the latest resume point
        (a finished iteration's weights, optimizer, generators and method state, at most ``resume_every``
        iterations back; every iteration's for a method that takes its own step) is written, so the run continues
        by resuming once memory is free."""
        device = self.params[0].device if self.params else torch.device("cpu")
        saved = ""
        if state_path is not None and self._resume_point is not None and self.context.is_main:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self._write_state(state_path, self._resume_point)
            saved = (f"the state of iteration {self._resume_point['meta']['iteration']} is saved to {state_path}, "
                     "continue by resuming")
        error = out_of_memory(exc, device, f"in iteration {self.iteration + 1}", saved)
        assert error is not None
        return error

    def _lost(self, exc: RuntimeError, state_path: str | Path | None) -> RankLost:
        """A collective failed under torchrun: write the latest snapshot's resumable state (every surviving rank
        writes the same state atomically, only the recorded wall time differs, so it is kept whichever rank
        died) and say where."""
        # Gloo's lines start with its source location and end in advice: keep the first sentence of the rest
        cause = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        cause = cause.split(". ")[0].rstrip(".")
        message = f"training stopped at iteration {self.iteration}: a collective failed, another rank " \
                  f"probably died ({cause})"
        if state_path is None or self._resume_point is None:
            return RankLost(message)
        self._write_state(state_path, self._resume_point)
        return RankLost(f"{message}; the state of iteration {self._resume_point['meta']['iteration']} is saved to "
                        f"{state_path}, continue by resuming with the same number of processes", keys=("resume",))

    def _roll_back(self, problem: str) -> None:
        """Restore the last good snapshot and lower the learning rate; the method's ``rolled_back(model)``, when
        it has one, then re-measures what it estimated from the discarded weights (e.g. remember statistics)."""
        if self.lr_reductions >= self.config.max_nan_retries:
            advice = getattr(self.method, "divergence_advice", lambda: "try a smaller lr")()
            raise TrainingDivergedError(f"{problem}, after {self.lr_reductions} learning-rate reductions; {advice}",
                                        keys=("lr",))
        self._restore(self._last_good)
        self.lr_scale *= self.config.lr_backoff
        self.lr_reductions += 1
        rolled_back = getattr(self.method, "rolled_back", None)
        if rolled_back is not None:
            rolled_back(self.model)


def _state_meta(path: str | Path) -> dict[str, Any]:
    """The engine's metadata of the resume state at ``path`` (its header only; raises on an unreadable file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {})["engine"])


def saved_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings a resume state at ``path`` recorded (:attr:`Engine.settings`); None when there is no readable
    state there or it recorded none (:meth:`Engine.load_state` then says what is wrong)."""
    try:
        settings = _state_meta(path).get("settings")
    except Exception:  # (any unreadable file: load_state reports it)
        return None
    return settings if isinstance(settings, dict) else None


def settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value now) for each key whose value differs (None where one side lacks it), sorted;
    a key whose values are both mappings is compared entry by entry, as ``key.entry``."""
    differing = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differing += [(f"{key}.{entry}", a, b) for entry, a, b in settings_differences(old, new)]
        elif old != new:
            differing.append((key, old, new))
    return differing


def keys_digest(keys: Sequence[str]) -> str:
    """A short fingerprint of image keys in their order (the first 16 hex digits of sha256 over the keys, one per
    line), for a resume state's settings: the rows a method's state indexes must be the same images."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def start_engine(model: MultiScaleFlow, method: Method, config: EngineConfig, *, batches: torch.Generator,
                 callback: Callable[[int, dict[str, float]], None] | None, state_path: str | Path | None,
                 resume: bool, settings: dict[str, Any] | None = None) -> Engine:
    """A job's engine: the method draws its batches from ``batches`` (saved with the resume state); with
    ``resume`` the run continues from ``state_path``. ``settings``: see :class:`Engine` (recorded in the
    state; a resume under other settings is refused)."""
    engine = Engine(model, method, config, generators={"batches": batches}, callback=callback, settings=settings)
    if resume:
        if state_path is None:
            raise InputError("resume needs the state_path of the interrupted run", keys=("resume",))
        engine.load_state(state_path)
    return engine


def run_for_report(engine: Engine, state_path: str | Path | None, report: dict[str, Any],
                   interrupted: Callable[[], dict[str, Any]] = dict) -> EngineResult:
    """``engine.run(state_path)``; on Ctrl-C ``report`` is completed as the partial report (iterations so far,
    not converged, interrupted, wall seconds, then the keys ``interrupted()`` returns), attached to the
    :class:`InterruptedRun`, which is re-raised."""
    try:
        return engine.run(state_path=state_path)
    except InterruptedRun as exc:
        report.update(iterations=engine.iteration, converged=engine.converged, interrupted=True,
                      wall_seconds=engine.elapsed, **interrupted())
        exc.partial_report = report
        raise


def state_saver(engine: Engine, state_path: str | Path | None) -> Callable[[], None] | None:
    """Writes the finished run's resumable state to ``state_path`` when called (None without a path)."""
    return None if state_path is None else partial(engine.save_state, state_path)


class _Staged:
    """One iteration's logged scalars on their way to the host (see :class:`_HostStaging`)."""

    def __init__(self, names: list[str], host: Tensor, event: Any, iteration: int):
        self.names, self.host, self.event, self.iteration = names, host, event, iteration
        self.lr: float | None = None  # set once the iteration's step is taken

    def read(self) -> dict[str, float]:
        """The scalars as floats (waits for their copy, which the GPU finished long before when lagged)."""
        if self.event is not None:
            self.event.synchronize()
        logged = dict(zip(self.names, self.host.tolist(), strict=True))
        if self.lr is not None:
            logged["lr"] = self.lr
        return logged


class _HostStaging:
    """Copies each iteration's scalars [M] from the GPU into one of two reused pinned host buffers without
    waiting (an event marks the copy's end): at most two iterations are in flight when lagged, the one being
    judged and the one just stepped. On the CPU the values are used as they are."""

    def __init__(self) -> None:
        self.buffers: list[Tensor] = []
        self.turn = 0

    def stage(self, names: list[str], values: Tensor, iteration: int) -> _Staged:
        if values.device.type != "cuda":
            return _Staged(names, values, None, iteration)
        if not self.buffers or self.buffers[0].shape != values.shape:
            self.buffers = [torch.empty(values.shape, dtype=values.dtype, pin_memory=True) for _ in range(2)]
        host = self.buffers[self.turn]
        self.turn = 1 - self.turn
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Staged(names, host, event, iteration)


def _clone_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": {k: {n: (v.detach().clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                  for k, s in state["state"].items()},
        "param_groups": [dict(g) for g in state["param_groups"]],
    }


class _LogProb(nn.Module):
    """A flow's ``log_prob`` as a module's ``forward``: what DistributedDataParallel wraps (it hooks its
    gradient all-reduce into ``forward``)."""

    def __init__(self, flow: MultiScaleFlow):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x)


class _ShardedFlow:
    """What a method's loss sees under torchrun: ``log_prob(x)`` [B] of the whole batch ``x``, each rank
    evaluating its contiguous shard through DistributedDataParallel
    (:meth:`~flowtame.engine.distributed.DistContext.map_rows`); every other attribute is the flow's own.
    One forward with gradient per iteration, as DDP requires."""

    def __init__(self, flow: MultiScaleFlow, context: distributed.DistContext):
        from torch.nn.parallel import DistributedDataParallel

        self._flow = flow
        self._context = context
        for param in flow.parameters():
            # a weight with size-1 dims that place_model made channels-last (say [1,16,1,1]) is also contiguous,
            # but with strides autograd does not give its gradient; DDP's buckets copy the weights' strides and
            # would warn about the mismatch each run: the canonical strides, same memory order, avoid it
            if param.is_contiguous() and param.stride() != torch.empty(param.shape, device="meta").stride():
                param.data = param.data.clone(memory_format=torch.contiguous_format)
        device_ids = [context.device] if context.device is not None else None
        # buffers are synced once, at construction (every rank loads the same weights; training changes none);
        # gradients live in DDP's buckets (no copy, and no warning about channels-last weights' grad strides)
        self._ddp = DistributedDataParallel(_LogProb(flow), device_ids=device_ids, forward_sync_buffers=False,
                                            gradient_as_bucket_view=True)

    def log_prob(self, x: Tensor) -> Tensor:
        return self._context.map_rows(self._ddp, x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._flow, name)
