"""Training base models from scratch by maximum likelihood (what ``flowtame train`` runs).

The loss of a step is the mean discrete NLL of a batch in bits per dimension: a batch of ``batch_size``
images (epochs of seeded random permutations, the incomplete tail of each epoch dropped) is quantized to
``n_bits``, dequantized with fresh uniform noise ``u ~ U(0, 1/n_bins)`` and scored with
``BPD = (-log p(x + u) + D log n_bins) / (D ln 2)``. Every random draw (weight initialisation, batch order,
noise) comes from ``seed``, so CPU runs are bit-for-bit repeatable.

The loop is :class:`flowtame.engine.loop.Engine`'s (Adam, linear learning-rate warm-up, gradient-norm clipping,
Ctrl-C with a resumable state, bit-identical resume), with an optional linear decay of the learning rate over
the last steps (set through the engine's ``lr_scale`` before every step); a non-finite loss stops training with
:class:`~flowtame.errors.TrainingDivergedError` and nothing is written for that step. ActNorm layers
initialise themselves from the first batch (the model is in train mode).

Files, when ``checkpoint_path`` is given: the model as a flowtame checkpoint (at the end and every
``checkpoint_every`` steps, atomically), and beside it the resumable state
``<checkpoint_path>.resume.safetensors`` (weights, Adam moments, step, generator state; safetensors with JSON
metadata, never a pickle), which ``resume=True`` continues from, also after the run finished to train for
more steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowtame.data.quantization import DataSpec, nats_to_bpd
from flowtame.engine import distributed
from flowtame.engine.devices import resolve_device
from flowtame.engine.loop import Engine, EngineConfig, keep_run_after_failed_write, state_saver
from flowtame.errors import (
    CheckpointError,
    InputError,
    InterruptedRun,
    OutputWriteError,
    TrainingDivergedError,
    signal_number,
)
from flowtame.figures.sampling import make_grid, sample_images, save_png
from flowtame.flows import ARCHITECTURES, MultiScaleFlow, build_model, make_spec
from flowtame.io.checkpoint import Checkpoint, make_provenance, save_checkpoint
from flowtame.io.fileio import check_output_path
from flowtame.likelihood.nll import dequantized, nll_nats

#: The reported training BPD is the mean batch loss over at most this many final steps.
BPD_WINDOW = 100
#: Samples per grid written every ``sample_every`` steps (a square grid of 8 x 8).
GRID_SAMPLES = 64
#: Temperature of those samples (standard deviations of the latent noise).
GRID_TEMPERATURE = 0.7
#: The engine's trajectory (the run's loss history) keeps one point every this many steps.
HISTORY_EVERY = 10


@dataclass(frozen=True)
class TrainSettings:
    """What decides the trained weights (recorded in the checkpoint's provenance as ``training``).

    ``lr`` is Adam's peak learning rate, reached linearly over ``warmup_steps`` steps and decayed linearly
    towards 0 over the last ``decay_steps`` of the ``steps`` (0: constant after warm-up; see
    :func:`lr_factor`); ``grad_clip`` bounds the gradient's global L2 norm (None: no clipping) of the loss,
    which is in BPD.
    """

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    grad_clip: float | None
    seed: int
    decay_steps: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise InputError(f"steps must be non-negative, got {self.steps}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise InputError(f"learning rate must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise InputError(f"warm-up steps must be non-negative, got {self.warmup_steps}")
        if not 0 <= self.decay_steps <= self.steps:
            raise InputError(f"decay steps must be between 0 and steps ({self.steps}), got {self.decay_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"gradient clip must be positive (None: no clipping), got {self.grad_clip}")


@dataclass(frozen=True)
class TrainProgress:
    """One finished step, as the progress callback sees it: ``loss_bpd`` is that step's batch loss (BPD)."""

    step: int
    steps: int
    loss_bpd: float
    lr: float
    grad_norm: float
    elapsed_s: float


@dataclass
class TrainResult:
    """A finished run.

    - ``checkpoint``: the trained model (eval mode, on the training device), with path and sha256 when saved;
    - ``train_bpd``: mean training-batch BPD over the last ``min(steps, BPD_WINDOW)`` steps;
    - ``history``: one point per ``HISTORY_EVERY`` steps: step, loss_bpd, lr, grad_norm (pre-clip), elapsed_s;
    - ``state_path``: the resumable state beside the checkpoint (None when nothing was saved).
    """

    checkpoint: Checkpoint
    settings: TrainSettings
    steps: int
    train_bpd: float
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    state_path: Path | None = None

    def report(self, source: str, n_images: int) -> dict[str, Any]:
        """The run's summary (``flowtame train --json``): output, settings, data, train BPD, history;
        ``source`` names the training images and ``n_images`` counts them."""
        ckpt = self.checkpoint
        return {
            "output": str(ckpt.path), "sha256": ckpt.sha256, "state_path": str(self.state_path),
            "architecture": ckpt.architecture, "hyperparameters": ckpt.spec.to_dict(),
            "data": ckpt.data_spec.to_dict() if ckpt.data_spec else None, "source": source, "n_images": n_images,
            "parameters": ckpt.num_parameters, "training": asdict(self.settings), "steps_done": self.steps,
            "train_bpd": self.train_bpd, "wall_seconds": self.wall_seconds, "history": self.history,
        }


def resume_state_path(checkpoint_path: str | Path) -> Path:
    """Where the resumable state of a run that writes ``checkpoint_path`` lives: beside it."""
    path = Path(checkpoint_path)
    return path.with_name(path.name + ".resume.safetensors")


def lr_factor(step: int, steps: int, decay_steps: int) -> float:
    """Decay factor of the learning rate at 0-based ``step``: ``min(1, (steps - step) / decay_steps)``.

    1 before the last ``decay_steps`` steps (always 1 when ``decay_steps`` is 0), then falling linearly to
    ``1 / decay_steps`` at the last step. It multiplies the warm-up schedule.
    """
    return min(1.0, (steps - step) / decay_steps) if decay_steps > 0 else 1.0


def images_digest(images: Tensor) -> str:
    """sha256 of a uint8 image tensor's shape and bytes (identifies the training data in provenance)."""
    digest = hashlib.sha256(json.dumps(list(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class MaximumLikelihood:
    """The engine method of base training: minimise the batch-mean BPD on fresh dequantization noise.

    ``images`` (uint8 [N, C, H, W]) stay on the CPU; each step draws its batch indices and its noise on the
    CPU from ``generator`` (so a seed gives the same run on every device) and moves the batch to ``device``.
    ``fingerprint`` holds the settings a resumed run must share with the run that wrote the state.
    """

    name = "train"

    def __init__(self, images: Tensor, data_spec: DataSpec, batch_size: int, generator: torch.Generator,
                 device: torch.device, fingerprint: dict[str, Any]):
        self.images = images
        self.data_spec = data_spec
        self.batch_size = batch_size
        self.generator = generator
        self.device = device
        self.fingerprint = fingerprint
        self.order: Tensor | None = None  # the current epoch's permutation of image indices
        self.position = 0  # images of ``order`` already used
        self.recent_bpd: list[float] = []  # the last BPD_WINDOW batch losses
        self.in_step = False  # True from a step's first draw until its callback: state not resumable then

    def next_batch(self) -> Tensor:
        """Indices [batch_size] of the next batch; a new permutation starts when the epoch cannot fill one."""
        n = self.images.shape[0]
        if self.order is None or self.position + self.batch_size > n:
            self.order = torch.randperm(n, generator=self.generator)
            self.position = 0
        indices = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def draw(self) -> Tensor:
        """The next batch of model inputs [batch_size, C, H, W]: its images with fresh noise."""
        pixels = self.images[self.next_batch()]
        noise = torch.rand(pixels.shape, generator=self.generator)
        return dequantized(pixels.to(self.device), noise.to(self.device), self.data_spec.n_bits)

    def loss(self, model: MultiScaleFlow, iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        self.in_step = True
        return nats_to_bpd(nll_nats(model, self.draw(), self.data_spec), self.data_spec.num_dims).mean(), {}

    @torch.no_grad()
    def initialize_on_first_batch(self, model: MultiScaleFlow) -> None:
        """Run the first step's batch through ``model`` (training mode, no gradient) and leave the draws as
        they were: layers with a data-dependent initialization (Glow's ActNorm) take it from the whole batch,
        as in one process. Under torchrun each rank's first training forward sees only its shard of the
        batch, so they must be initialized before."""
        state, order, position = self.generator.get_state(), self.order, self.position
        model.train()
        model.log_prob(self.draw())
        self.generator.set_state(state)
        self.order, self.position = order, position

    def after_step(self, model: MultiScaleFlow, iteration: int, logged: dict[str, float]) -> bool:
        self.recent_bpd = [*self.recent_bpd, logged["loss"]][-BPD_WINDOW:]
        return False

    def state_tensors(self) -> dict[str, Tensor]:
        return {} if self.order is None else {"order": self.order}

    def state_meta(self) -> dict[str, Any]:
        return {"position": self.position, "recent_bpd": self.recent_bpd, "fingerprint": self.fingerprint}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        saved = meta.get("fingerprint", {})
        now = self.fingerprint
        differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differing:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in differing)
            raise CheckpointError(f"the resume state was written by a run with other settings ({details}); "
                                  "resume with the same data and settings, or start afresh")
        self.order = tensors["order"].cpu() if "order" in tensors else None
        self.position = int(meta["position"])
        self.recent_bpd = [float(v) for v in meta["recent_bpd"]]


#: Hyperparameters a caller may set when training (spec fields; each applies where the architecture's spec has it).
ARCHITECTURE_OPTIONS = ("n_flow", "n_block", "hidden", "affine", "conv_lu", "n_scales", "n_res_blocks",
                        "n_couplings", "n_hidden_layers", "patch_size", "width", "layers_per_block", "heads")


def model_spec(architecture: str, channels: int, image_size: int, options: dict[str, Any]) -> Any:
    """The architecture's spec from the image shape and the hyperparameters that were given.

    ``options`` maps :data:`ARCHITECTURE_OPTIONS` to values, None for one not given (the spec's default
    applies); ``conv_lu`` is one bool for every flow step. Raises InputError (its ``keys`` the settings at
    fault) for an unknown architecture, a setting the architecture does not take, or invalid values.
    """
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(name for name, a in ARCHITECTURES.items() if a.kind == "image"))
        raise InputError(f"architecture {architecture!r}: unknown (image architectures: {known})",
                         keys=("architecture",))
    fields = {f.name for f in dataclasses.fields(ARCHITECTURES[architecture].spec_class)}
    given = {name: value for name, value in options.items() if value is not None}
    for name in given:
        if name not in fields:
            takes = [option for option in ARCHITECTURE_OPTIONS if option in fields]
            raise InputError(f"{name} does not apply to architecture {architecture} (its settings: "
                             f"{', '.join(takes) or 'none'})", keys=(name, *takes))
    lu = given.pop("conv_lu", None)
    try:
        spec = make_spec(architecture, {"channels": channels, "image_size": image_size, **given})
        if lu is not None:
            spec = make_spec(architecture, {**spec.to_dict(), "conv_lu": [lu] * len(spec.conv_lu)})
    except ValueError as exc:
        raise InputError(f"architecture {architecture}: {exc}", keys=("architecture",)) from None
    return spec


def _check_inputs(images: Tensor, architecture: str, spec: Any, data_spec: DataSpec, batch_size: int) -> None:
    if architecture not in ARCHITECTURES:
        raise InputError(f"unknown architecture {architecture!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    if ARCHITECTURES[architecture].kind != "image":
        raise InputError(f"architecture {architecture!r} is not an image flow; training needs one")
    if (spec.channels, spec.image_size) != (data_spec.channels, data_spec.image_size):
        model_shape = f"{spec.channels}x{spec.image_size}x{spec.image_size}"
        data_shape = f"{data_spec.channels}x{data_spec.image_size}x{data_spec.image_size}"
        raise InputError(f"the model is for {model_shape} images but the data spec says {data_shape}")
    if images.dtype != torch.uint8:
        raise InputError(f"training images must be uint8 pixels, got {images.dtype}")
    expected = (data_spec.channels, data_spec.image_size, data_spec.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise InputError(f"training images must have shape [N, {', '.join(map(str, expected))}], "
                         f"got {list(images.shape)}")
    if batch_size > images.shape[0]:
        raise InputError(f"batch size {batch_size} is larger than the {images.shape[0]} training images; "
                         f"use a batch size of at most {images.shape[0]}")


def _check_finite(model: MultiScaleFlow, step: int) -> None:
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingDivergedError(f"training diverged: weight {name!r} is NaN or infinite after step "
                                        f"{step}; nothing was written for this step")


@torch.no_grad()
def write_sample_grid(checkpoint: Checkpoint, path: str | Path, *, n: int = GRID_SAMPLES,
                      temperature: float = GRID_TEMPERATURE, seed: int = 0) -> Path:
    """Decode ``n`` samples at ``temperature`` from a fixed noise draw (``seed``) into a square PNG grid.

    The model's train/eval mode is restored afterwards; no global random state is touched.
    """
    model = checkpoint.model
    was_training = model.training
    model.eval()
    try:
        images = sample_images([checkpoint], n, temperature, seed)[0]  # uint8 [n, C, H, W]
    finally:
        model.train(was_training)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    blank = np.full((rows * cols - n, *images.shape[1:]), 255, dtype=np.uint8)
    tiles = np.concatenate([images, blank]).reshape(rows, cols, *images.shape[1:])
    return save_png(path, make_grid(tiles), force=True)


def train_model(
    images: Tensor, architecture: str, spec: Any, data_spec: DataSpec, *, steps: int = 2000, batch_size: int = 64,
    lr: float = 1e-3, warmup_steps: int = 200, grad_clip: float | None = 50.0, seed: int = 0, decay_steps: int = 0,
    device: str | torch.device = "cpu", checkpoint_path: str | Path | None = None, checkpoint_every: int = 0,
    resume: bool = False, force: bool = False, sample_every: int = 0, sample_dir: str | Path | None = None,
    callback: Callable[[TrainProgress], None] | None = None, command: str | None = None, notes: str | None = None,
) -> TrainResult:
    """Train a fresh ``architecture`` model with hyperparameters ``spec`` on uint8 ``images`` [N, C, H, W].

    ``data_spec`` gives the image size, channels and n_bits the model is for (the images must already have
    that size and channel count). ``steps`` optimizer steps of ``batch_size`` images; ``lr``,
    ``warmup_steps``, ``grad_clip``, ``seed`` and ``decay_steps`` as in :class:`TrainSettings`; ``device``
    is ``auto|cpu|cuda|cuda:N``.

    With ``checkpoint_path``: the checkpoint is written there at the end and every ``checkpoint_every`` steps
    (0: only at the end), with the resumable state beside it (:func:`resume_state_path`); an existing file
    needs ``force`` (or ``resume``). ``resume=True`` continues from that state to the same weights an
    uninterrupted run reaches (bit-identical on the CPU); the data and settings must be the same, ``steps``
    may be larger (continuing a finished run then equals one longer run only without ``decay_steps``).
    ``sample_every`` > 0 writes an 8x8 grid of temperature-0.7 samples (fixed noise from ``seed``) as
    ``sample_dir/step-NNNNNN.png``. ``callback`` receives a :class:`TrainProgress` per step.
    ``command`` and ``notes`` go into the checkpoint's provenance.

    Raises InputError for inconsistent inputs, TrainingDivergedError when the loss or a weight becomes NaN or
    infinite (nothing is written for that step), InterruptedRun on Ctrl-C (or a KeyboardInterrupt raised
    by ``callback``) after saving the resumable state when there is a ``checkpoint_path``.
    """
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                             grad_clip=grad_clip, seed=seed, decay_steps=decay_steps)
    _check_inputs(images, architecture, spec, data_spec, batch_size)
    _check_run_options(checkpoint_path, checkpoint_every, sample_every, sample_dir, resume)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    state_path = resume_state_path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint_path is not None:
        check_output_path(checkpoint_path, force or resume)
    dev = resolve_device(device)

    data_sha256 = images_digest(images)
    fingerprint = _fingerprint(architecture, spec, data_spec, int(images.shape[0]), data_sha256, settings)
    model = _fresh_model(architecture, spec, seed).to(dev)
    generator = torch.Generator().manual_seed(seed)
    method = MaximumLikelihood(images.detach().cpu(), data_spec, batch_size, generator, dev, fingerprint)
    checkpoint = Checkpoint(model=model, architecture=architecture, spec=spec, data_spec=data_spec)
    training_meta = {**asdict(settings), "device": str(dev), "n_images": int(images.shape[0]),
                     "data_sha256": data_sha256, "torch_version": torch.__version__}
    writer = _CheckpointWriter(checkpoint, checkpoint_path, state_path, method, training_meta,
                               command if command is not None else "flowtame.jobs.train.train_model(...)", notes)

    def on_step(step: int, logged: dict[str, float]) -> None:
        method.in_step = False
        engine.lr_scale = lr_factor(step, steps, decay_steps)  # for the next step (0-based index ``step``)
        if checkpoint_path is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            writer.write(engine, step, logged["elapsed"])
        if sample_every and step % sample_every == 0 and distributed.current().is_main:
            try:
                write_sample_grid(checkpoint, Path(str(sample_dir)) / f"step-{step:06d}.png", seed=seed)
            except OutputWriteError as exc:  # like a periodic checkpoint's: the run stays resumable
                raise keep_run_after_failed_write(exc, state_saver(engine, state_path), state_path) from None
        if callback is not None:
            callback(TrainProgress(step=step, steps=steps, loss_bpd=logged["loss"], lr=logged["lr"],
                                   grad_norm=logged["grad_norm"], elapsed_s=logged["elapsed"]))

    if distributed.current().active and not resume:
        method.initialize_on_first_batch(model)
    engine = Engine(model, method, EngineConfig(
        lr=lr, warmup=warmup_steps, max_iters=steps, grad_clip=grad_clip, max_nan_retries=0,
        snapshot_every=steps + 1, trajectory_every=HISTORY_EVERY),
        generators={"train": generator}, callback=on_step)
    if resume:
        assert state_path is not None  # _check_run_options: resume needs a checkpoint_path
        engine.load_state(state_path)
        if engine.iteration > steps:
            raise InputError(f"{state_path}: the run is already at step {engine.iteration}, "
                             f"beyond steps={steps}")
    engine.lr_scale = lr_factor(engine.iteration, steps, decay_steps)
    _run_training(engine, method, state_path, steps)
    model.eval()
    if checkpoint_path is not None:
        writer.write(engine, engine.iteration, engine.elapsed)
    else:
        _check_finite(model, engine.iteration)
    history = [{"step": p["iteration"], "loss_bpd": p["loss"], "lr": p["lr"], "grad_norm": p["grad_norm"],
                "elapsed_s": p["elapsed"]} for p in engine.trajectory]
    train_bpd = float(np.mean(method.recent_bpd)) if method.recent_bpd else float("nan")
    return TrainResult(checkpoint=checkpoint, settings=settings, steps=engine.iteration, train_bpd=train_bpd,
                       wall_seconds=engine.elapsed, history=history, state_path=state_path)


def _fingerprint(architecture: str, spec: Any, data_spec: DataSpec, n_images: int, data_sha256: str,
                 settings: TrainSettings) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the state (JSON round-tripped)."""
    return json.loads(json.dumps({
        "architecture": architecture, "hyperparameters": spec.to_dict(), "data": data_spec.to_dict(),
        "n_images": n_images, "data_sha256": data_sha256,
        **{k: v for k, v in asdict(settings).items() if k != "steps"},
    }))


def _fresh_model(architecture: str, spec: Any, seed: int) -> MultiScaleFlow:
    """A new model whose initial weights ``seed`` decides; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(architecture, spec)


def _check_run_options(checkpoint_path: str | Path | None, checkpoint_every: int, sample_every: int,
                       sample_dir: str | Path | None, resume: bool) -> None:
    """InputError for checkpointing, sampling and resume options that do not fit together."""
    if checkpoint_every < 0 or sample_every < 0:
        raise InputError("checkpoint_every and sample_every must be non-negative (0 = never)",
                         keys=("checkpoint_every", "sample_every"))
    if sample_every and sample_dir is None:
        raise InputError("sample_every needs a sample_dir to write the grids to", keys=("sample_dir",))
    if resume and checkpoint_path is None:
        raise InputError("resume needs the checkpoint_path whose resumable state to continue from")


@dataclass
class _CheckpointWriter:
    """Writes the checkpoint being trained and its resumable state (both atomic) at a step."""

    checkpoint: Checkpoint
    path: Path | None
    state_path: Path | None
    method: MaximumLikelihood
    training: dict[str, Any]  # the settings and data facts recorded in the provenance
    command: str
    notes: str | None

    def write(self, engine: Engine, step: int, wall_seconds: float) -> None:
        """Checkpoint (provenance: settings, step, train BPD so far) and resumable state at ``step``."""
        assert self.path is not None and self.state_path is not None
        _check_finite(self.checkpoint.model, step)
        recent = self.method.recent_bpd
        self.checkpoint.provenance = make_provenance(
            command=self.command, notes=self.notes,
            training={**self.training, "step": step, "complete": step >= self.training["steps"],
                      "train_bpd": float(np.mean(recent)) if recent else None,
                      "wall_seconds": round(wall_seconds, 1)})
        engine.save_state(self.state_path)  # first: a checkpoint that cannot be written leaves the run resumable
        if not distributed.current().is_main:  # under torchrun rank 0 writes (every rank holds the same weights)
            return
        try:
            self.checkpoint.sha256 = save_checkpoint(self.path, self.checkpoint, force=True)
        except OutputWriteError as exc:
            raise keep_run_after_failed_write(exc, None, self.state_path, saved=True) from None
        self.checkpoint.path = self.path


def _run_training(engine: Engine, method: MaximumLikelihood, state_path: Path | None, steps: int) -> None:
    """Run the engine to the end; Ctrl-C -> InterruptedRun after saving the state between steps, a non-finite
    loss -> TrainingDivergedError saying what may help."""
    try:
        engine.run(state_path=state_path)
    except KeyboardInterrupt as exc:
        signum = signal_number(exc)
        if state_path is None or method.in_step:
            earlier = state_path is not None and state_path.exists()
            raise InterruptedRun(f"interrupted during step {engine.iteration + 1}; no resumable state written"
                                 + (f" (the last one in {state_path} may be continued by resuming)" if earlier
                                    else ""), signum, keys=("resume",) if earlier else ()) from None
        engine.save_state(state_path)
        raise InterruptedRun(f"interrupted after step {engine.iteration}; state saved to {state_path}, "
                             "continue by resuming", signum, keys=("resume",)) from None
    except TrainingDivergedError:
        if not method.in_step:  # a weight check of save(): its message says what happened
            raise
        raise TrainingDivergedError(
            f"training diverged at step {engine.iteration + 1} of {steps}: the loss or its gradient is NaN "
            "or infinite; nothing was written for this step (a lower learning rate, a longer warm-up or "
            "gradient clipping may help)") from None
