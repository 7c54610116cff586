"""A device that runs out of memory is one line and exit 2, wherever it happens: inside the training loop (the
engine names the iteration) or outside it (the command line's own catch); nothing is written."""

from __future__ import annotations

import re

import pytest
import torch

from flowtame.engine.devices import out_of_memory
from flowtame.errors import OutOfMemory
from flowtame.methods.solved import SolvedTaming

CUDA_TEXT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
             "1.06 GiB is free. Of the allocated memory 75.2 GiB is allocated by PyTorch")
CPU_TEXT = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")


def test_torchs_allocation_failures_become_one_line_and_other_errors_are_left_alone():
    cuda = out_of_memory(torch.OutOfMemoryError(CUDA_TEXT), torch.device("cuda:0"), "at iteration 3")
    assert isinstance(cuda, OutOfMemory) and cuda.exit_code == 2
    assert str(cuda).startswith("out of memory on cuda:0 at iteration 3: torch could not allocate 2.00 GiB; ")
    cpu = out_of_memory(RuntimeError(CPU_TEXT))
    assert str(cpu).startswith("out of memory: torch could not allocate 1099511627776 bytes; free memory")
    assert "\n" not in str(cuda) + str(cpu)
    unsized = out_of_memory(RuntimeError("MPS backend out of memory"), "mps")
    assert str(unsized).startswith("out of memory on mps: torch ran out of memory;")
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(ValueError("out of memory")) is None


@pytest.mark.parametrize("where", ["loop", "setup"])
def test_tame_out_of_memory_is_one_line_exit_2_and_writes_nothing(run_cli, tiny_base, tmp_path, monkeypatch, where):
    calls = {"n": 0}
    original = SolvedTaming.own_step

    def own_step(self, model, iteration):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError(CUDA_TEXT)
        return original(self, model, iteration)

    def metric(*args, **kwargs):
        raise RuntimeError(CPU_TEXT)

    if where == "loop":
        monkeypatch.setattr(SolvedTaming, "own_step", own_step)
    else:
        monkeypatch.setattr("flowtame.jobs.tame.remember_metric", metric)
    out = tmp_path / "tamed.safetensors"
    result = run_cli("tame", tiny_base, "--forget", "embedded:digits:test:3", "--remember", "embedded:digits:test:1",
                     "-o", out, "--report", tmp_path / "report.json", "--max-iters", "8", "--refresh-size", "16",
                     "--lookalikes", "4", "--device", "cpu", "--quiet")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    expected = (r"flowtame: error: out of memory on cpu at iteration \d+: torch could not allocate 2\.00 GiB; "
                if where == "loop" else
                r"flowtame: error: out of memory: torch could not allocate 1099511627776 bytes; ")
    assert re.match(expected, lines[-1]) and "step adam" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
