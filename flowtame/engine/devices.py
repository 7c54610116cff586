"""Where computations run and at which precision.

- :func:`resolve_device` turns ``auto|cpu|cuda|cuda:N`` into a :class:`torch.device` (under torchrun with NCCL,
  ``auto`` and ``cuda`` are the rank's ``cuda:LOCAL_RANK``; otherwise ``auto`` = the first
  CUDA GPU when one is visible, else the CPU), with one clear :class:`~flowtame.errors.InputError` when a GPU
  is asked for and none is there.
- :func:`autocast_context` is the one place mixed precision is switched on: ``fp32`` everywhere, ``bf16`` or
  ``fp16`` autocast on CUDA only (on the CPU anything but ``fp32`` is refused rather than silently slow).
- :func:`place_model` moves a model to its device in the memory layout its convolutions run fastest in there.
- :func:`loop_generator`, the draws :func:`distinct_indices`, :func:`random_indices`, :func:`uniform_noise`,
  and :func:`training_rows`, :func:`take_rows` keep the training loop's random draws and image batches on the
  training device, so an iteration copies nothing from pageable host memory
  (each such copy would make the host wait for the GPU).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

import torch

from flowtame.engine.distributed import current
from flowtame.engine.host_memory import free_heap_bytes
from flowtame.errors import InputError, OutOfMemory

if TYPE_CHECKING:
    from flowtame.flows.base import MultiScaleFlow
    from flowtame.io.checkpoint import Checkpoint

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a torch.device) -> a usable :class:`torch.device`.

    Raises InputError for an unknown name, for CUDA when no GPU is visible, and for a GPU index that does
    not exist.
    """
    if isinstance(spec, torch.device):
        text = str(spec)
    else:
        text = str(spec).strip().lower()
    rank_device = current().device
    if rank_device is not None and text in ("auto", "cuda"):
        return rank_device  # under torchrun with NCCL: this rank's GPU (cuda:LOCAL_RANK)
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise InputError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r}: CUDA is not available on this machine "
                             "(no GPU visible, or torch was built without CUDA); use cpu", keys=("device",))
        index = int(index_text)
        count = torch.cuda.device_count()
        if index >= count:
            raise InputError(f"device {spec!r}: no such GPU (this machine has {count}: "
                             f"cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    raise InputError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


def place_model(model: ModuleT, device: torch.device) -> ModuleT:
    """Move ``model`` (in place, returned) to ``device``; on the CPU its 4-D weights go channels-last (NHWC).

    oneDNN's CPU convolutions run faster on NHWC weights (measured on the embedded Glow, 2 threads: a
    training step 1.15x, a no-grad forward 2x; docs/benchmarks.md). Values are unchanged up to float
    rounding; checkpoints are written contiguous whatever the layout. CUDA keeps the default layout
    until it is measured there.
    """
    model.to(device)
    if device.type == "cpu":
        # torch's stub overloads for Module.to omit memory_format, which Module.to documents and accepts.
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def check_precision(device: torch.device, precision: str) -> None:
    """Raise InputError unless ``precision`` is one of :data:`PRECISIONS` and usable on ``device``."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}", keys=("precision",))
    if precision != "fp32" and device.type != "cuda":
        raise InputError(f"precision {precision!r}: mixed precision is only supported on CUDA; "
                         f"use fp32 on {device.type}", keys=("precision",))


def seeded_run(device: str, precision: str, seed: int) -> tuple[torch.device, torch.Generator]:
    """A job's start: the resolved device (``precision`` checked on it), torch's global seed set to ``seed``,
    and a CPU generator seeded with ``seed`` for the job's own draws."""
    dev = resolve_device(device)
    check_precision(dev, precision)
    torch.manual_seed(seed)
    return dev, torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def autocast_context(device: torch.device | str, precision: str) -> Iterator[None]:
    """A context in which forward passes run at ``precision``: fp32 (no autocast) or bf16/fp16 CUDA autocast.

    Raises InputError for an unknown precision and for bf16/fp16 on a non-CUDA device.
    """
    device = device if isinstance(device, torch.device) else torch.device(device)
    check_precision(device, precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type="cuda", dtype=_AUTOCAST_DTYPES[precision]):
        yield


#: Largest share of the GPU's free memory :func:`training_rows` gives to a training set kept on the GPU.
DEVICE_ROWS_BUDGET = 0.25


def loop_generator(setup: torch.Generator, device: torch.device, seed: int) -> torch.Generator:
    """The generator of the training loop's draws (batch indices, dequantization noise): ``setup`` itself on
    the CPU, so CPU runs draw exactly what the setup's generator would; elsewhere a generator on ``device``
    seeded with ``seed``, so indices and noise are drawn where they are used."""
    if device.type == "cpu":
        return setup
    return torch.Generator(device=device).manual_seed(seed)


def distinct_indices(generator: torch.Generator, count: int, total: int) -> torch.Tensor:
    """``count`` distinct indices below ``total`` (all of them, in order, when ``total <= count``), on the
    generator's device."""
    if total <= count:
        return torch.arange(total, device=generator.device)
    return torch.randperm(total, generator=generator, device=generator.device)[:count]


def random_indices(generator: torch.Generator, high: int, count: int) -> torch.Tensor:
    """``count`` indices below ``high``, drawn with replacement on the generator's device."""
    return torch.randint(high, (count,), generator=generator, device=generator.device)


def uniform_noise(generator: torch.Generator, shape: torch.Size | tuple[int, ...],
                  device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) noise of ``shape`` drawn on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def training_rows(pixels: torch.Tensor, device: torch.device,
                  budget: float = DEVICE_ROWS_BUDGET) -> torch.Tensor:
    """Images (uint8 [N, ...]) placed where the training loop indexes them: unchanged on the CPU; on CUDA on
    the GPU when they take at most ``budget`` of its free memory (a batch is then one on-device gather),
    else in pinned host memory (a batch is then gathered on the host and copied: one wait per iteration)."""
    if device.type != "cuda":
        return pixels
    free = free_memory(device) or 0  # (known on CUDA)
    if pixels.numel() * pixels.element_size() <= budget * free:
        return pixels.to(device)
    return pixels.pin_memory()


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: on CUDA the GPU's free memory plus what torch's caching allocator
    holds unused; on the CPU the kernel's estimate of memory available without swapping (Linux ``MemAvailable``)
    plus what this process freed and kept in malloc's heaps (:func:`~flowtame.engine.host_memory.free_heap_bytes`;
    the CLI keeps freed memory); None where neither is known."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + free_heap_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return None


#: What an out-of-memory error advises (after what was saved, if anything)
MEMORY_ADVICE = ("free memory on the device, or ask for less of it (smaller batches, fewer images per run; taming's "
                 "Adam step, step adam, needs the least)")


def out_of_memory(exc: BaseException, device: torch.device | str | None = None, where: str = "", saved: str = ""
                  ) -> OutOfMemory | None:
    """:class:`~flowtame.errors.OutOfMemory` for an allocation failure ``exc`` (``torch.OutOfMemoryError`` - CUDA,
    MPS -, a RuntimeError saying "out of memory", the CPU allocator's "can't allocate memory", a CUDA library's
    ``ALLOC_FAILED``, Python's MemoryError), saying on ``device`` what could not be allocated, ``where`` (a
    phrase, e.g. "in iteration 12"), what was ``saved`` and :data:`MEMORY_ADVICE`; None for any other
    exception."""
    text = str(exc)
    if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and not (isinstance(exc, RuntimeError) and any(
            sign in text for sign in ("out of memory", "can't allocate memory", "ALLOC_FAILED"))):
        return None
    size = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B|[0-9]+ bytes)", text)
    what = f"could not allocate {size.group(1)}" if size else "an allocation failed"
    on = f" on {device}" if device is not None else ""
    return OutOfMemory(f"out of memory{on}{(' ' + where) if where else ''}: {what}; "
                       f"{(saved + '; ') if saved else ''}{MEMORY_ADVICE}", keys=("resume",) if saved else ())


def take_rows(rows: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``rows[index]`` on ``device``, gathering where ``rows`` live (index [B] may be on either side)."""
    return rows[index.to(rows.device)].to(device, non_blocking=True)


def trainable_copy(base: Checkpoint, device: torch.device) -> MultiScaleFlow:
    """A fresh model rebuilt from the checkpoint's spec with its weights, on ``device``; the base stays as is."""
    from flowtame.flows import build_model

    model = build_model(base.architecture, base.spec)
    model.load_state_dict(base.model.state_dict())
    return place_model(model, device)
