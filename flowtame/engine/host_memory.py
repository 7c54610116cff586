"""Host memory freed by torch kept in the process for reuse, instead of handed back to the kernel and faulted in again.

glibc's malloc serves large blocks (over 32 MiB at most, fewer after its dynamic threshold moves) with their own
``mmap`` and unmaps them on free, and trims the top of its heap once enough of it is free; torch's CPU tensors
come from malloc, so every large activation of a training pass is a fresh mapping whose pages the kernel zeroes
and faults in one by one. On the rosinality Glow (5.9M values) a solved-step run at k = 15 spent 14 of its
93 CPU seconds in the kernel, 3.1 million page faults; kept for reuse, 4 s (docs/benchmarks.md "Round 14").
:func:`retain_freed_host_memory` tells glibc to serve blocks from its heap (on the main thread; other threads'
arenas still map requests larger than their 64 MiB heaps) and never trim it: the process keeps the memory it has
freed — about its peak, more when the heap fragments — for the next pass. A process-wide setting, so the CLI makes
it (a notebook may call it too); nothing on other C libraries or systems. The memory kept is free for this
process's next tensors but not in the kernel's ``MemAvailable``: :func:`free_heap_bytes` counts it.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["free_heap_bytes", "retain_freed_host_memory"]

#: mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: M_TRIM_THRESHOLD's value that turns trimming off (mallopt(3)).
_NEVER_TRIM = -1


def retain_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse: no block served by its own ``mmap``, the heap never
    trimmed. Returns whether it took effect (False on other systems and C libraries)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    untrimmed = mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(untrimmed)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc 2.33+): ten size_t counters, bytes unless named otherwise."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap_bytes() -> int:
    """Bytes freed to glibc's malloc and kept in this process's heaps (``mallinfo2``'s ``fordblks``, every arena):
    memory the next tensors reuse, which the kernel counts as used. 0 on other systems and C libraries (and glibc
    before 2.33)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return 0
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return int(mallinfo2().fordblks)
