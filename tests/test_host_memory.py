"""Freed host memory kept for reuse (flowtame/engine/host_memory.py): glibc serves a block freed a moment ago
again instead of a fresh mapping the kernel must fault in page by page."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from flowtame.engine.host_memory import free_heap_bytes, retain_freed_host_memory

REUSE = textwrap.dedent("""
    import ctypes, resource, sys
    from flowtame.engine.host_memory import retain_freed_host_memory
    took = retain_freed_host_memory() if sys.argv[1] == "retain" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 64 << 20, []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(took, faults[1] + faults[2])
""")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", REUSE, mode], capture_output=True, text=True, check=True).stdout
    took, faults = out.split()
    return took, int(faults)


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as setting:
            return "[always]" in setting.read()
    except OSError:
        return False


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_a_freed_64_mib_block_is_served_again_without_page_faults():
    took, retained = _faults("retain")
    _, plain = _faults("plain")
    assert took == "True"
    if not _huge_pages_always():  # (with transparent huge pages on every mapping a fault brings 2 MiB)
        assert plain >= 2 * (64 << 20) // 4096 * 0.9  # glibc maps and unmaps the block each time: every page faults
    assert retained < 100  # kept: the second and third blocks reuse the first one's pages


def test_elsewhere_it_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert retain_freed_host_memory() is False
    assert free_heap_bytes() == 0


KEPT = textwrap.dedent("""
    import torch
    from flowtame.engine.devices import free_memory
    from flowtame.engine.host_memory import free_heap_bytes, retain_freed_host_memory
    retain_freed_host_memory()
    before = free_heap_bytes()
    block = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MiB from the heap, then freed: kept in the process
    del block
    kept = free_heap_bytes() - before
    with open("/proc/meminfo") as info:
        available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    print(kept, free_memory(torch.device("cpu")) - available)
""")


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_memory_freed_and_kept_in_the_heap_counts_as_free_for_the_next_tensors():
    """The pre-flight memory checks read free_memory: a retained heap's free bytes count, not only MemAvailable."""
    out = subprocess.run([sys.executable, "-c", KEPT], capture_output=True, text=True, check=True).stdout
    kept, counted = (int(v) for v in out.split())
    if kept == 0:
        pytest.skip("glibc before 2.33: no mallinfo2")
    assert kept >= 255 << 20
    assert counted >= kept - (16 << 20)  # (MemAvailable read a moment later: it moves by a few MiB)


def test_the_command_line_keeps_freed_memory_before_it_runs_a_command(monkeypatch, capsys):
    import flowtame.cli as cli

    calls = []
    monkeypatch.setattr(cli, "retain_freed_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["flowtame", "--version"])
    try:
        cli.main()
    except SystemExit as stop:
        assert stop.code in (0, None)
    assert calls == [1] and capsys.readouterr().out.startswith("flowtame ")


def test_on_cuda_what_torchs_caching_allocator_holds_unused_counts_as_free(monkeypatch):
    """The GPU's free memory (mem_get_info) leaves out blocks torch's allocator reserved and no tensor uses."""
    import torch

    from flowtame.engine.devices import free_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 6 << 30)
    assert free_memory(torch.device("cuda", 0)) == 7 << 30
