"""Several processes (``torchrun``) on one job: who this process is, and the few collectives the passes need.

A process started by ``torchrun`` finds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment;
:func:`distributed_context` then joins the process group (NCCL on CUDA with device ``cuda:LOCAL_RANK``, Gloo
on the CPU) and tears it down on the way out. Without those variables (or with ``WORLD_SIZE=1``) nothing is
initialized and :func:`current` says rank 0 of 1: one process behaves exactly as without this module.

Training (the engine, :mod:`flowtame.engine.loop`) evaluates each batch's rows shard by shard through
DistributedDataParallel with :meth:`DistContext.map_rows`, which gathers every row's value on every rank and
carries the gradient that DDP's average turns into the one-process gradient; the ranks agree on stops and
logged figures with the small control collectives :meth:`DistContext.gather_flags` and
:meth:`DistContext.broadcast_floats` (a Gloo group on the CPU, also under NCCL).

Errors: a rank that fails inside a sharded pass tells the others through :meth:`DistContext.agree` (an
all-gather of its error line), so every rank raises at the same point: the failing rank its own error, the
others a :class:`PeerFailure` carrying the first failing rank's line; rank 0 prints one line, the other ranks
print nothing for an error rank 0 already reported, and all exit non-zero. A rank that dies outright (killed,
out of memory) is caught by torchrun's elastic agent, which stops the remaining ranks; during training the
others' next collective fails and they raise :class:`RankLost` after saving the resumable state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flowtame.errors import FlowtameError

#: How long a collective waits for the other ranks before failing (a rank stuck elsewhere).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class PeerFailure(FlowtameError):
    """Another rank failed; ``exit_code`` is that rank's and the message its error line, prefixed by its rank."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` (0 of 1 without torchrun), ``local_rank`` on
    its machine, and the ``device`` its rank uses (``cuda:LOCAL_RANK`` under NCCL, else None: the job's own)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    #: The group of the small control collectives (stop flags, logged figures): a Gloo group on the CPU, so
    #: they never wait on the GPU; None = the default group (already Gloo on the CPU).
    control: Any = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        """True on the rank that prints, shows progress and writes files (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when several ranks take part (a process group is up)."""
        return self.world_size > 1

    def shard(self, n: int) -> range:
        """This rank's positions among ``n`` items (:func:`shard_range`)."""
        return shard_range(n, self.rank, self.world_size)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for one process."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def agree(self, failure: BaseException | None) -> None:
        """Collective: raise on every rank when any rank failed (``failure`` is this rank's exception or None).

        The failing rank re-raises its own exception; the others raise :class:`PeerFailure` with the lowest failing
        rank's line and exit code. With one process a failure is simply re-raised.
        """
        if not self.active:
            if failure is not None:
                raise failure
            return
        mine = None if failure is None else (str(failure) or type(failure).__name__,
                                             getattr(failure, "exit_code", 1))
        reports = self.all_gather(mine)
        if failure is not None:
            raise failure
        for rank, report in enumerate(reports):
            if report is not None:
                line, code = report
                raise PeerFailure(f"rank {rank}: {line}", code if isinstance(code, int) else 1)

    def gather_rows(self, local: Tensor, n: int) -> Tensor:
        """Collective: this rank's rows ``local`` [len(shard(n)), ...] of an ``n``-row result -> all ``n`` rows
        in rank order (= the one-process order), the same on every rank; ``local`` itself for one process.
        Shards differ in length by at most one: each is padded to the longest for the all-gather, then cut.
        CPU tensors travel over the control group (Gloo), device tensors over the default group."""
        if not self.active:
            return local
        longest = -(-n // self.world_size)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.control if local.device.type == "cpu" else None)
        return torch.cat([part[:len(self.shard_of(n, rank))] for rank, part in enumerate(parts)])

    def shard_of(self, n: int, rank: int) -> range:
        """Rank ``rank``'s positions among ``n`` items."""
        return shard_range(n, rank, self.world_size)

    def map_rows(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn`` (per-row values [m, ...] of rows [m, ...]) over all ``N`` rows of ``x``, each rank computing
        only its contiguous shard; the result [N, ...] holds every rank's values, identical on every rank.

        Under gradient it carries this rank's rows' gradient, scaled by the world size: a loss computed from
        the result has the one-process value on every rank, and DistributedDataParallel's average of the
        ranks' gradients is the one-process gradient (each row's d loss / d value is taken at the gathered,
        global values; every rank holds the same, so the average of ``W * sum over its rows`` is the sum over
        all rows). A rank with no rows (N < W) evaluates ``fn`` on the first row and keeps none of it, so its
        backward still reaches every parameter. One process: ``fn(x)``.
        """
        if not self.active:
            return fn(x)
        n = x.shape[0]
        part = self.shard(n)
        local = fn(x[part.start:part.stop]) if len(part) else fn(x[:1])[:0]
        gathered = self.gather_rows(local.detach(), n)
        if not local.requires_grad:
            return gathered
        carried = gathered[part.start:part.stop] + self.world_size * (local - local.detach())
        return torch.cat([gathered[:part.start], carried, gathered[part.stop:]])

    def broadcast_floats(self, values: list[float]) -> list[float]:
        """Collective: rank 0's ``values`` on every rank (float64, over the control group)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(tensor, src=0, group=self.control)
        return tensor.tolist()

    def gather_flags(self, flags: list[bool]) -> list[list[bool]]:
        """Collective: every rank's ``flags``, in rank order (over the control group); ``[flags]`` for one."""
        if not self.active:
            return [flags]
        mine = torch.tensor(flags, dtype=torch.uint8)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.control)
        return [[bool(v) for v in part.tolist()] for part in parts]


class RankLost(FlowtameError):
    """A collective failed during training: another rank died (killed, out of memory) or its connection
    broke. The message says where the run's resumable state was saved; exit code 1."""

    exit_code = 1


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous positions of rank ``rank`` among ``n`` items split over ``world_size`` ranks.

    The first ``n % world_size`` ranks get one item more; every position belongs to exactly one rank and no
    item is repeated (ranks beyond ``n`` get an empty range), so concatenating the shards in rank order
    gives back ``range(n)``.
    """
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(f"bad shard: n={n}, rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


_CURRENT = DistContext()


def current() -> DistContext:
    """The context of this process (rank 0 of 1 outside :func:`distributed_context` or without torchrun)."""
    return _CURRENT


def _from_environment() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else None
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


@contextlib.contextmanager
def distributed_context() -> Iterator[DistContext]:
    """Join the torchrun job described by the environment for the duration of the block, then leave it.

    NCCL with ``torch.cuda.set_device(LOCAL_RANK)`` when CUDA is available, Gloo otherwise. Without torchrun
    (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) it yields rank 0 of 1 and initializes nothing.
    """
    global _CURRENT
    context = _from_environment()
    if not context.active:
        yield context
        return
    if context.device is not None:
        torch.cuda.set_device(context.device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=context.device)
        context = dataclasses.replace(context, control=dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT))
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    previous, _CURRENT = _CURRENT, context
    finished = False
    try:
        yield context
        finished = True
    finally:
        _CURRENT = previous
        gc.collect()  # objects bound to the group (a DistributedDataParallel in a reference cycle) go first
        if finished:  # every rank is done with the group before any rank closes it (not after an error: a
            dist.barrier(group=context.control)  # rank that failed alone would wait for the others forever)
        dist.destroy_process_group()
