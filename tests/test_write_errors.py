"""Writes that fail (no space, read-only, permission, name too long): one line naming the file, exit 2, no
temporary file left, and tame/debias/train keep a resumable state so the run's work is not lost.

We run as root, so a read-only folder proves nothing (root writes anyway). The failures are made real where that
is possible as root — a file name longer than the file system allows, a tiny tmpfs when ``mount`` is permitted —
and injected in-process elsewhere (the low-level write raises the error the OS / safetensors raises).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from flowtame.data.quantization import DataSpec
from flowtame.errors import OutputWriteError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from flowtame.io.fileio import write_json_atomic, write_text_atomic

FORGET, REMEMBER = "embedded:digits:test:3", "embedded:digits:test:1"
REAL_SAVE_FILE = safetensors.torch.save_file
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"  # as on a full tmpfs


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _full_disk_for(monkeypatch, name: str) -> None:
    """safetensors fails as on a full disk when it writes the temporary file of output ``name``."""

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{name}.") and ".resume." not in Path(filename).name:
            Path(filename).write_bytes(b"\0" * 100)  # a partial write before the device filled up
            raise SafetensorError(ENOSPC_TEXT)
        return REAL_SAVE_FILE(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on the device"),
                                          (errno.EROFS, "read-only file system"),
                                          (errno.EACCES, "permission denied"),
                                          (errno.ENAMETOOLONG, "file name too long")])
def test_os_errors_of_a_write_become_one_line_naming_the_file(tmp_path, monkeypatch, code, reason):
    target = tmp_path / "report.json"
    target.write_text("old")

    def failing_write_text(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(OutputWriteError) as caught:
        write_json_atomic(target, {"a": 1})
    assert str(caught.value) == f"{target}: cannot write ({reason})"
    monkeypatch.undo()
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, tiny_base):
    _full_disk_for(monkeypatch, "out.safetensors")
    with pytest.raises(OutputWriteError, match=r"out\.safetensors: cannot write \(no space left on the device\)"):
        save_checkpoint(tmp_path / "out.safetensors", load_checkpoint(tiny_base))
    assert list(tmp_path.iterdir()) == []


def test_a_short_safetensors_write_never_replaces_the_target(tmp_path, monkeypatch, tiny_base):
    """safetensors can lose the error of its last buffered write (seen writing to /dev/full): the size check
    catches the short file."""
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")

    def short_write(tensors, filename, metadata=None):
        REAL_SAVE_FILE(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) - 10)

    monkeypatch.setattr(safetensors.torch, "save_file", short_write)
    with pytest.raises(OutputWriteError, match="came out short"):
        save_checkpoint(target, load_checkpoint(tiny_base), force=True)
    assert target.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_every_writer_goes_through_atomic_path():
    """No module writes a file except through flowtame.fileio (grep for the write calls)."""
    root = Path(__file__).resolve().parents[1] / "flowtame"
    patterns = ("save_file(", "savefig(", ".save(", "write_text(", "write_bytes(", "json.dump(", "np.save(",
                ', "w"', ", 'w'", '"wb"', "'wb'", "tofile(")
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "fileio.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.split("#")[0]
            writes = any(p in text for p in patterns) and "``" not in text and "torch.save(model" not in text
            if writes and "atomic_path" not in text and "tmp" not in text:  # docs and messages aside
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []


def test_a_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path, run_cli):
    too_long = tmp_path / ("r" * 300 + ".json")
    result = run_cli("info", "embedded:glow-digits", "--json", too_long)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"flowtame: error: {too_long}: cannot write (file name too long)"
    with pytest.raises(OutputWriteError, match="file name too long"):
        write_text_atomic(tmp_path / ("x" * 300), "text")
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(shutil.which("flowtame") is None, reason="the flowtame console script is not installed")
def test_console_script_name_too_long_is_one_line_and_exit_2(tmp_path):
    """The real OS error (ENAMETOOLONG works as root), through the installed console script."""
    too_long = tmp_path / ("s" * 300 + ".json")
    done = subprocess.run(["flowtame", "stats", "embedded:glow-digits", "embedded:digits:test:1", "--json",
                           str(too_long)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"flowtame: error: {too_long}: cannot write (file name too long)"]


def _tame(base, out, *extra, iterations=4):
    return ["tame", base, "--forget", FORGET, "--remember", REMEMBER, "-o", out, "--report", f"{out}.json",
            "--max-iters", str(iterations), "--batch-size", "4", "--refresh-size", "16", "--forget-draws", "1",
            "--warmup", "0", "--device", "cpu", "--quiet", "--step", "adam", *extra]  # (Adam's settings: its step)


def _weights(path):
    return load_checkpoint(path).model.state_dict()


def test_tame_keeps_a_resumable_state_when_the_checkpoint_cannot_be_written(tmp_path, run_cli, monkeypatch,
                                                                            tiny_base):
    straight = tmp_path / "straight.safetensors"
    assert run_cli(*_tame(tiny_base, straight)).exit_code == 0
    out = tmp_path / "tamed.safetensors"
    _full_disk_for(monkeypatch, "tamed.safetensors")
    failed = run_cli(*_tame(tiny_base, out))
    assert failed.exit_code == 2 and "Traceback" not in failed.stderr
    line, = failed.stderr.strip().splitlines()
    assert f"{out}: cannot write (no space left on the device)" in line and "--resume" in line
    state = tmp_path / "tamed.safetensors.resume.safetensors"
    assert state.is_file() and not out.exists() and _leftovers(tmp_path) == []
    monkeypatch.undo()
    resumed = run_cli(*_tame(tiny_base, out, "--resume"))
    assert resumed.exit_code == 0, resumed.stderr
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(Path(f"{out}.json").read_text())["iterations"] == 4 and not state.exists()


def test_debias_keeps_a_resumable_state_when_the_report_cannot_be_written(tmp_path, run_cli, monkeypatch,
                                                                         tiny_base):
    def args(out, *extra):
        return ["debias", tiny_base, "--group", "zero=embedded:digits:all:0", "--group", "one=embedded:digits:all:1",
                "--target", "zero=0.3", "-o", out, "--report", f"{out}.json", "--samples", "64", "--max-iters", "6",
                "--measure-every", "2", "--batch-size", "4", "--quiet", *extra]

    straight = tmp_path / "straight.safetensors"
    assert run_cli(*args(straight)).exit_code == 0
    out = tmp_path / "debiased.safetensors"
    real_write_text = Path.write_text

    def full_for_the_report(self, *a, **k):
        if self.name.startswith(".debiased.safetensors.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_for_the_report)
    failed = run_cli(*args(out))
    assert failed.exit_code == 2
    line, = failed.stderr.strip().splitlines()
    assert f"{out}.json: cannot write (no space left on the device)" in line and "--resume" in line
    assert (tmp_path / "debiased.safetensors.resume.safetensors").is_file() and _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert run_cli(*args(out, "--resume")).exit_code == 0
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["trajectory"] == json.loads(Path(f"{straight}.json").read_text())["trajectory"]


def test_train_keeps_its_state_when_the_checkpoint_cannot_be_written(tmp_path, monkeypatch):
    from flowtame.errors import FlowtameError
    from flowtame.jobs.train import resume_state_path, train_model

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spec = GlowSpec(channels=1, image_size=8, n_flow=1, n_block=2, hidden=8)

    def train(path, **kwargs):
        return train_model(images, "glow", spec, DataSpec(8, 1, 5), steps=4, batch_size=4, lr=1e-3, seed=0,
                           device="cpu", checkpoint_path=path, **kwargs)

    straight = train(tmp_path / "straight.safetensors")
    out = tmp_path / "model.safetensors"
    _full_disk_for(monkeypatch, "model.safetensors")
    with pytest.raises(FlowtameError, match=r"no space left on the device\); the run is kept in .*resuming"):
        train(out)
    assert resume_state_path(out).is_file() and not out.exists() and _leftovers(tmp_path) == []
    monkeypatch.undo()
    resumed = train(out, resume=True)
    a, b = straight.checkpoint.model.state_dict(), resumed.checkpoint.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (a real full disk), when this process may mount one (root in most containers)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_is_one_line_and_exit_2(tiny_fs, run_cli):
    """A real ENOSPC (safetensors' own error on a full tmpfs), end to end through the command: the tamed
    checkpoint does not fit, nor does the resumable state beside it, and the line says both."""
    big = tiny_fs.parent / "big.safetensors"
    spec = GlowSpec(channels=1, image_size=8, n_flow=2, n_block=2, hidden=64)  # ~200 KB: larger than the disk
    save_checkpoint(big, Checkpoint(build_glow(spec).eval(), "glow", spec, DataSpec(8, 1, 5)))
    with pytest.raises(OutputWriteError, match="no space left on the device"):
        save_checkpoint(tiny_fs / "direct.safetensors", load_checkpoint(big))
    out = tiny_fs / "tamed.safetensors"
    result = run_cli(*_tame(big, out, iterations=1))
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"flowtame: error: {out}: cannot write (no space left on the device)")
    assert "resumable state could not be written either" in line
    assert list(tiny_fs.iterdir()) == []
