"""A device that runs out of memory is one line and exit 2, wherever it happens: inside the training loop (the
engine names the iteration and writes the latest resume point: resuming continues the run), after it (the
finished run is kept) or before it (the command line's own catch; nothing is written)."""

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


def test_allocation_failures_become_one_line_and_other_errors_are_left_alone():
    cuda = out_of_memory(torch.OutOfMemoryError(CUDA_TEXT), torch.device("cuda:0"), "in iteration 3")
    assert isinstance(cuda, OutOfMemory) and cuda.exit_code == 2 and cuda.keys == ()
    assert str(cuda).startswith("out of memory on cuda:0 in iteration 3: could not allocate 2.00 GiB; free memory")
    cpu = out_of_memory(RuntimeError(CPU_TEXT), saved="the state is saved to s")
    assert str(cpu).startswith("out of memory: could not allocate 1099511627776 bytes; the state is saved to s; ")
    assert cpu.keys == ("resume",) and "\n" not in str(cuda) + str(cpu)
    for unsized in (RuntimeError("MPS backend out of memory"), MemoryError(),
                    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")):
        assert str(out_of_memory(unsized, "mps")).startswith("out of memory on mps: an allocation failed; free")
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(ValueError("out of memory")) is None


def _tame(run_cli, tiny_base, tmp_path, *extra):
    return run_cli("tame", tiny_base, "--forget", "embedded:digits:test:3", "--remember", "embedded:digits:test:1",
                   "-o", tmp_path / "tamed.safetensors", "--report", tmp_path / "report.json", "--max-iters", "3",
                   "--refresh-size", "16", "--lookalikes", "4", "--device", "cpu", "--quiet", *extra)


@pytest.mark.parametrize("where", ["loop", "after", "setup"])
def test_tame_out_of_memory_is_one_line_exit_2_and_keeps_what_it_can(run_cli, tiny_base, tmp_path, monkeypatch,
                                                                      where):
    calls = {"n": 0}
    original = SolvedTaming.own_step

    def own_step(self, model, iteration):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError(CUDA_TEXT)
        return original(self, model, iteration)

    def fail(*args, **kwargs):
        raise RuntimeError(CPU_TEXT)

    if where == "loop":
        monkeypatch.setattr(SolvedTaming, "own_step", own_step)
    elif where == "after":
        monkeypatch.setattr("flowtame.jobs.tame._tamed_outcome", fail)
    else:
        monkeypatch.setattr("flowtame.jobs.tame.remember_metric", fail)
    result = _tame(run_cli, tiny_base, tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    state = tmp_path / "tamed.safetensors.resume.safetensors"
    expected = {"loop": rf"out of memory on cpu in iteration 2: could not allocate 2\.00 GiB; the state of "
                        rf"iteration 1 is saved to {re.escape(str(state))}, continue by resuming; free memory",
                "after": r"out of memory after training, while measuring and evaluating: could not allocate "
                         rf"1099511627776 bytes; the finished run is kept in {re.escape(str(state))}: rerun",
                "setup": r"out of memory: could not allocate 1099511627776 bytes; free memory"}[where]
    assert re.match("flowtame: error: " + expected, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if where == "setup" else [state.name])
    if where != "setup":  # resuming (memory free again) finishes the run
        monkeypatch.undo()
        resumed = _tame(run_cli, tiny_base, tmp_path, "--resume")
        assert resumed.exit_code == 0, resumed.stderr
        assert (tmp_path / "tamed.safetensors").is_file() and (tmp_path / "report.json").is_file()
