"""The exact likelihood engine: per-image discrete NLL (nats) and bits per dimension (BPD) of a flow.

The whole NLL API (every NLL flowtame computes goes through these four; unit conversions are
:func:`flowtame.data.quantization.nats_to_bpd` / ``bpd_to_nats`` / ``nats_per_bpd``):

- :func:`nll_nats`: one batch of model inputs -> NLL in nats [B], differentiable (training losses).
- :func:`batched_nll`: the same without gradients, in batches (refresh sets, check draws).
- :func:`pixel_nll`: a whole in-memory set (uint8 rows and their keys) -> per-image nats, float64 [N], on the
  keyed evaluation noise of a seed (the job's remember and forget NLLs).
- :func:`compute_nll`: a whole streamed :class:`~flowtame.data.images.ImageSet` -> :class:`NLLResult`
  (per-image nats and BPD, keys, skipped files, throughput; optional per-image CSV).

With ``data_spec=None`` the first two return the continuous NLL ``-log p(x)`` of vector data (toy flows).

For an image with uint8 pixels p, quantized values x = quantize(p, n_bits) and dequantization noise
u ~ U(0, 1)^D drawn from (seed, key) (:func:`flowtame.data.images.dequantization_noise`), the discrete NLL in nats is
``-log p_model(x + u / n_bins) + D log(n_bins)`` and BPD = NLL / (D ln 2)
(:mod:`flowtame.data.quantization` holds the formulas). One seed gives paired figures across models.

:func:`compute_nll` streams an image set through a DataLoader in batches under ``torch.inference_mode``
(memory does not grow with the number of images, apart from the N results) and writes per-image rows to a
CSV as they come. Batching changes nothing but float rounding: an image's noise depends only on (seed, key).
Under torchrun the pass is split over the ranks (docs/scaling-out.md), with the same per-image noise.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import Tensor, nn

from flowtame.data.images import ImageBatch, ImageSet, dequantization_noise
from flowtame.data.quantization import DataSpec, discrete_nll, nats_to_bpd, quantize
from flowtame.engine import distributed
from flowtame.engine.devices import autocast_context, check_precision, out_of_memory, place_model, resolve_device
from flowtame.errors import InputError
from flowtame.flows.base import MultiScaleFlow
from flowtame.io.fileio import atomic_path

PER_IMAGE_CSV_COLUMNS = ("source", "path", "key", "nll_nats", "bpd")
ProgressCallback = Callable[[int, int], None]


@dataclass
class NLLResult:
    """Per-image likelihoods of one image set under one model.

    ``nll`` float64 [N] in nats and ``bpd`` float64 [N] in bits per dimension, aligned with ``keys`` and
    ``paths`` (the N good images, in source order); ``skipped`` lists (path, reason) of the files left out;
    ``images_per_second`` is N over the wall time of the pass (decoding included).
    """

    name: str
    nll: np.ndarray
    bpd: np.ndarray
    keys: list[str]
    paths: list[str]
    skipped: list[tuple[str, str]]
    images_per_second: float
    num_dims: int
    seed: int

    def __len__(self) -> int:
        return len(self.nll)


def nll_nats(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec | None = None) -> Tensor:
    """NLL in nats [B] of one batch of model inputs; differentiable (training).

    With ``data_spec``: the discrete NLL (float32) of dequantized images ``x`` [B, C, S, S]. Without: the
    continuous NLL ``-log p(x)`` of vectors ``x`` [B, dim], in the model's dtype.
    """
    if data_spec is None:
        return -model.log_prob(x)
    return discrete_nll(model.log_prob(x).float(), data_spec.num_dims, data_spec.n_bits)


def default_num_workers(image_set: ImageSet, device: torch.device, batch_size: int) -> int:
    """DataLoader workers worth starting: none for in-memory sets or sets of about one batch; on CUDA up to
    8 (the CPU is otherwise idle); on the CPU only the cores that torch's own threads leave free, up to 4."""
    if image_set.in_memory or image_set.num_files <= 2 * batch_size:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return min(8, max(cpus - 1, 0))
    return max(0, min(4, cpus - torch.get_num_threads()))


class _CsvSink:
    """Writes per-image rows (:data:`PER_IMAGE_CSV_COLUMNS`) to an open text stream."""

    def __init__(self, stream: TextIO | None, source: str):
        self._writer = csv.writer(stream) if stream is not None else None
        self._source = source

    def write(self, paths: list[str], keys: list[str], nll: np.ndarray, bpd: np.ndarray) -> None:
        if self._writer is None:
            return
        self._writer.writerows((self._source, path, key, repr(float(n)), repr(float(b)))
                               for path, key, n, b in zip(paths, keys, nll, bpd, strict=True))


@contextlib.contextmanager
def per_image_csv_file(path: str | Path) -> Iterator[TextIO]:
    """A new per-image CSV at ``path`` with its header row written; renamed into place when the block succeeds
    (atomic: a failure leaves no file). Pass the stream to :func:`compute_nll` for each set it should hold."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerow(PER_IMAGE_CSV_COLUMNS)
        yield stream


@contextlib.contextmanager
def _csv_stream(target: str | Path | TextIO | None) -> Iterator[TextIO | None]:
    """A path -> :func:`per_image_csv_file`; a stream (rows only) or None -> itself."""
    if isinstance(target, (str, Path)):
        with per_image_csv_file(target) as stream:
            yield stream
    else:
        yield target


def compute_nll(
    model: MultiScaleFlow,
    image_set: ImageSet,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    num_workers: int | None = None,
    progress: ProgressCallback | None = None,
    per_image_csv: str | Path | TextIO | None = None,
    draws: int = 1,
) -> NLLResult:
    """Exact per-image NLL (nats) and BPD of every good image of ``image_set`` under ``model``.

    ``draws`` > 1 averages each image's NLL over that many keyed noise draws (draw 0 is the single-draw
    noise; :func:`flowtame.data.images.dequantization_noise`): a lower-variance estimate of the image's expected
    NLL, used for the few forget images whose distance to the threshold decides taming's stopping test.

    The model is moved to ``device`` (``auto|cpu|cuda|cuda:N``, see :func:`flowtame.engine.devices.resolve_device`)
    and evaluated in eval mode (its training flag is restored afterwards) at ``precision``
    (fp32, or bf16/fp16 autocast on CUDA). ``batch_size`` files are read at a time, and on the CPU a wide
    model's forward passes take fewer of them at once (:func:`eval_batch_size`; the same NLLs up to float
    rounding). Images are decoded in ``num_workers`` DataLoader processes
    (None: :func:`default_num_workers`), pinned and copied asynchronously on CUDA. ``progress(files_done,
    files_total)`` is called after each batch. ``per_image_csv``: a path (written atomically, with a header)
    or an open text stream (rows only, for several sets in one file), columns :data:`PER_IMAGE_CSV_COLUMNS`.
    Under torchrun (:mod:`flowtame.engine.distributed`) every rank must call it alike: each evaluates its
    contiguous shard once and every rank returns the whole result in one-process order; only rank 0 reports
    progress and writes rows.
    Raises InputError when the model's input shape is not the set's, DataError for bad sources.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    if draws < 1:
        raise InputError(f"the number of noise draws must be positive, got {draws}")
    spec = image_set.data_spec
    expected = (spec.channels, spec.image_size, spec.image_size)
    if tuple(model.event_shape) != expected:
        raise InputError(f"{image_set.name}: images are prepared as {'x'.join(map(str, expected))} but the "
                         f"model expects {'x'.join(map(str, model.event_shape))}")
    device = resolve_device(device)
    check_precision(device, precision)
    workers = default_num_workers(image_set, device, batch_size) if num_workers is None else num_workers
    context = distributed.current()
    was_training = model.training
    place_model(model, device).eval()
    start = time.perf_counter()
    try:
        if context.active:
            nll, keys, paths = _sharded_pass(model, image_set, context, seed=seed, batch_size=batch_size,
                                             device=device, precision=precision, num_workers=workers,
                                             progress=progress, per_image_csv=per_image_csv, draws=draws)
        else:
            with _csv_stream(per_image_csv) as out:
                nll, keys, paths, _ = _pass(model, image_set, None, _CsvSink(out, image_set.name), seed=seed,
                                         batch_size=batch_size, device=device, precision=precision,
                                         num_workers=workers, progress=progress, draws=draws)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    if progress is not None and context.is_main:
        progress(image_set.num_files, image_set.num_files)
    return NLLResult(
        name=image_set.name,
        nll=nll,
        bpd=nats_to_bpd(nll, spec.num_dims),
        keys=keys,
        paths=paths,
        skipped=list(image_set.skipped),
        images_per_second=len(keys) / elapsed if elapsed > 0 else float("inf"),
        num_dims=spec.num_dims,
        seed=seed,
    )


def _pass(model: MultiScaleFlow, image_set: ImageSet, positions: range | None, sink: _CsvSink, *, seed: int,
          batch_size: int, device: torch.device, precision: str, num_workers: int,
          progress: ProgressCallback | None, draws: int) -> tuple[np.ndarray, list[str], list[str], list[int]]:
    """One streamed likelihood pass over ``positions`` of ``image_set`` (None: all of it) -> (nats float64 [n],
    keys [n], paths [n], file positions [n]) of its good images in order, rows written to ``sink`` as they
    come. Read ``batch_size`` files at a time; each batch's forward passes are sized by :func:`in_chunks`."""
    total = image_set.num_files if positions is None else len(positions)
    spec = image_set.data_spec
    nll = np.empty(total, dtype=np.float64)
    keys: list[str] = []
    paths: list[str] = []
    indices: list[int] = []
    batches = image_set.iter_batches(batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
                                     noise_seed=seed, positions=positions)
    with torch.inference_mode(), autocast_context(device, precision):
        for batch in batches:
            batch_nll = _batch_nll(model, batch, spec, seed, draws, device, batch_size)
            nll[len(keys):len(keys) + len(batch_nll)] = batch_nll
            sink.write(batch.paths, batch.keys, batch_nll, nats_to_bpd(batch_nll, spec.num_dims))
            keys.extend(batch.keys)
            paths.extend(batch.paths)
            indices.extend(batch.indices)
            if progress is not None:
                progress(batch.files_done, total)
    return nll[:len(keys)].copy(), keys, paths, indices


def _batch_nll(model: MultiScaleFlow, batch: ImageBatch, spec: DataSpec, seed: int, draws: int, device: torch.device,
               batch_size: int) -> np.ndarray:
    """:func:`_keyed_nll` (nats, float64 [B]) of one streamed batch (its pixels, keys and draw-0 noise), in the
    chunks :func:`in_chunks` sizes."""
    pixels = batch.pixels.to(device, non_blocking=True)
    noise = None if batch.noise is None else batch.noise.to(device, non_blocking=True)
    return torch.cat(in_chunks(model, pixels.shape[0], device, batch_size, lambda i, j: _keyed_nll(
        model, pixels[i:j], batch.keys[i:j], spec, seed, draws,
        first_noise=None if noise is None else noise[i:j]))).cpu().numpy()


def _sharded_pass(model: MultiScaleFlow, image_set: ImageSet, context: distributed.DistContext, *,
                  per_image_csv: str | Path | TextIO | None, **options) -> tuple[np.ndarray, list[str], list[str]]:
    """:func:`_pass` under torchrun: this rank reads its contiguous shard (:func:`~flowtame.engine.distributed.
    shard_range`) of the pass, so each image is evaluated once, on the noise of its own key (the same as in
    one process); the shards are all-gathered in rank order (= the one-process order) and recorded on the set
    when it was its first pass. Only rank 0 reports progress (its own shard) and writes the per-image rows.
    A failure on any rank raises on every rank (:meth:`~flowtame.engine.distributed.DistContext.agree`)."""
    first_pass = not image_set.validated
    n = image_set.num_files if first_pass else len(image_set)
    positions = context.shard(n)
    if not context.is_main:
        options["progress"] = None
    failure: BaseException | None = None
    local: tuple = (np.empty(0), [], [], [], [])
    try:
        local = (*_pass(model, image_set, positions, _CsvSink(None, image_set.name), **options),
                 list(image_set.shard_skipped))
    except Exception as exc:  # reported to every rank by agree(), then re-raised here
        # a failed allocation as its one line (what could not be allocated, and the advice), not torch's text
        failure = out_of_memory(exc, options.get("device")) or exc
    context.agree(failure)
    shards = context.all_gather(local)
    nll = np.concatenate([shard[0] for shard in shards]).astype(np.float64)
    keys = [key for shard in shards for key in shard[1]]
    paths = [path for shard in shards for path in shard[2]]
    if first_pass:
        image_set.adopt_first_pass([index for shard in shards for index in shard[3]], keys,
                                   [skip for shard in shards for skip in shard[4]])
    if context.is_main:
        with _csv_stream(per_image_csv) as out:
            _CsvSink(out, image_set.name).write(paths, keys, nll, nats_to_bpd(nll, image_set.data_spec.num_dims))
    return nll, keys, paths


def dequantized(pixels: Tensor, noise: Tensor, n_bits: int) -> Tensor:
    """uint8 pixels [B,...] + noise in [0,1) of the same shape -> model input x + u, float32."""
    return quantize(pixels, n_bits) + noise / (2 ** n_bits)


#: On the CPU a no-gradient pass takes at most as many rows at once as keep the model's largest layer output
#: within this many bytes (float32: 2M values), about what one core's share of the cache holds. Measured on the
#: 2-core EPYC VM, 1 thread (benchmarks/tame_profile.py --forward-batches; docs/benchmarks.md "Round 4c"): the
#: width-512 Glows' forward is 20-30% faster per image at 64-128 rows (128 KiB per row) than at 256, the
#: width-128 ones' fastest at 256 (32 KiB). The zoo's NLLs were the same to the bit at every batch size;
#: kernels that are not batch-independent change them by float rounding only.
CPU_ACTIVATION_BYTES = 8 * 2**20
#: Bytes per row of each model's largest layer output, measured on its first no-gradient pass on the CPU.
_ROW_BYTES: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _largest_output(model: nn.Module, rows: int, found: list[float]) -> Iterator[None]:
    """Forward hooks on every submodule of ``model`` that append the bytes per row (of ``rows``) of the largest
    tensor any of them outputs to ``found``."""
    largest = [0.0]

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(t):
                largest[0] = max(largest[0], t.numel() * t.element_size() / rows)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        found.append(largest[0])


def eval_batch_size(model: object, device: torch.device, batch_size: int) -> int:
    """The rows a no-gradient pass of ``model`` on ``device`` takes at once: ``batch_size``, on the CPU capped
    so that the model's largest layer output stays within :data:`CPU_ACTIVATION_BYTES` (once measured)."""
    row_bytes = _ROW_BYTES.get(model) if device.type == "cpu" and isinstance(model, nn.Module) else None
    if not row_bytes:
        return batch_size
    return max(1, min(batch_size, int(CPU_ACTIVATION_BYTES // row_bytes)))


def in_chunks(model: object, n: int, device: torch.device, batch_size: int,
              run: Callable[[int, int], Tensor]) -> list[Tensor]:
    """``run(start, stop)`` over rows [0, n) in chunks of :func:`eval_batch_size`; on the CPU the model's first
    chunk (``batch_size`` rows, as before any measurement) also measures its largest layer output per row."""
    out: list[Tensor] = []
    start = 0
    while start < n:
        measure = device.type == "cpu" and isinstance(model, nn.Module) and model not in _ROW_BYTES
        stop = min(n, start + eval_batch_size(model, device, batch_size))
        if measure:
            found: list[float] = []
            with _largest_output(model, stop - start, found):  # type: ignore[arg-type]
                out.append(run(start, stop))
            if found[0] > 0:
                _ROW_BYTES[model] = found[0]  # type: ignore[index]
        else:
            out.append(run(start, stop))
        start = stop
    return out


@torch.no_grad()
def batched_nll(model: MultiScaleFlow, x: Tensor, data_spec: DataSpec | None = None, batch_size: int = 256) -> Tensor:
    """:func:`nll_nats` [N] of model inputs ``x`` [N, ...] without gradients, ``batch_size`` rows at a time
    (:func:`eval_batch_size`: fewer on the CPU for a wide model).

    Under torchrun every rank must call it alike: each evaluates its contiguous shard of the rows and every
    rank returns all N values (:meth:`~flowtame.engine.distributed.DistContext.map_rows`)."""

    def rows_nll(rows: Tensor) -> Tensor:
        return torch.cat(in_chunks(model, rows.shape[0], rows.device, batch_size,
                                   lambda i, j: nll_nats(model, rows[i:j], data_spec)))

    return distributed.current().map_rows(rows_nll, x)


def _keyed_nll(model: MultiScaleFlow, pixels: Tensor, keys: Sequence[str], data_spec: DataSpec, seed: int, draws: int,
               first_noise: Tensor | None = None) -> Tensor:
    """NLL (nats, float64 [B]) of uint8 ``pixels`` [B, ...] on ``model``'s device, averaged over ``draws`` keyed
    noise draws of ``seed`` (draw 0 is ``first_noise`` when given: the same noise, already at hand)."""
    device = pixels.device
    total: Tensor | None = None
    for draw in range(draws):
        noise = first_noise if draw == 0 and first_noise is not None else \
            dequantization_noise(keys, seed, tuple(pixels.shape[1:]), draw).to(device)
        nll = nll_nats(model, dequantized(pixels, noise, data_spec.n_bits), data_spec).double()
        total = nll if total is None else total + nll
    assert total is not None
    return total / draws


def pixel_nll(model: MultiScaleFlow, pixels: Tensor, keys: Sequence[str], data_spec: DataSpec, seed: int,
              device: torch.device, batch_size: int = 256, draws: int = 1) -> np.ndarray:
    """Discrete NLL (nats, float64 [N]) of uint8 images [N, C, S, S] with the keyed evaluation noise of ``seed``.

    The model is used as it is (device, train/eval mode); ``draws`` > 1 averages over that many keyed draws,
    as :func:`compute_nll` does. Under torchrun every rank must call it alike: each evaluates its contiguous
    shard of the images (on the same keyed noise) and every rank returns all N values.
    """
    context = distributed.current()
    part = context.shard(pixels.shape[0])
    first = part.start
    with torch.no_grad():
        local = in_chunks(model, part.stop - first, device, batch_size, lambda i, j: _keyed_nll(
            model, pixels[first + i:first + j].to(device), keys[first + i:first + j], data_spec, seed, draws).cpu())
    mine = torch.cat(local) if local else torch.empty(0, dtype=torch.float64)
    return context.gather_rows(mine, pixels.shape[0]).numpy()
