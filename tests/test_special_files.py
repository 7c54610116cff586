"""Data sources read only regular files: a FIFO, a symlink to a FIFO, a socket or a device in an image folder is
skipped and counted like an unreadable file, never opened for reading, so no command blocks on it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtame.data.embedded import asset_path
from flowtame.data.images import open_images
from flowtame.data.quantization import DataSpec
from flowtame.errors import DataError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, save_checkpoint

SPEC = DataSpec(image_size=8, channels=1, n_bits=5)
SPECIAL = {"pipe.png": "a FIFO", "link.png": "a FIFO", "sock.png": "a socket", "zero.png": "a character device"}


@pytest.fixture
def odd_folder(tmp_path):
    """Five digit PNGs plus a FIFO, a symlink to it, a Unix socket and a symlink to /dev/zero."""
    folder = tmp_path / "images"
    folder.mkdir()
    with np.load(asset_path("digits.npz")) as arrays:
        digits = arrays["images"][:5]
    for i, digit in enumerate(digits):
        Image.fromarray(digit).save(folder / f"{i}.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "link.png").symlink_to("pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    yield folder
    server.close()
    _release(folder / "pipe.png")


def _release(fifo: Path) -> None:
    """Unblock a reader stuck on ``fifo`` (open it for writing, close it: the reader sees end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting


def _finishes(function, seconds: float = 60.0):
    """Run ``function`` in a thread; its result, or a test failure when it has not returned in ``seconds``."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_special_files_in_a_folder_are_skipped_and_counted_never_read(odd_folder):
    image_set = open_images(odd_folder, SPEC)
    pixels, keys = _finishes(image_set.load_tensor)
    assert pixels.shape == (5, 1, 8, 8) and len(keys) == 5
    reasons = {Path(path).name: reason for path, reason in image_set.skipped}
    assert reasons.keys() == SPECIAL.keys()
    for name, kind in SPECIAL.items():
        assert reasons[name] == f"not a regular file ({kind}; never read)"


def test_a_fifo_as_the_source_or_in_a_list_does_not_block(odd_folder, tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        _finishes(lambda: open_images(odd_folder / "pipe.png", SPEC, strict=True).load_tensor())
    listed = tmp_path / "list.txt"
    listed.write_text("images/0.png\nimages/link.png\n")
    image_set = open_images(listed, SPEC)
    _finishes(image_set.load_tensor)
    assert [Path(p).name for p, _ in image_set.skipped] == ["link.png"]
    os.mkfifo(tmp_path / "fifo-list.txt")
    with pytest.raises(DataError, match="not a regular file"):
        _finishes(lambda: open_images(tmp_path / "fifo-list.txt", SPEC))
    _release(tmp_path / "fifo-list.txt")


def _tiny_base(folder: Path) -> Path:
    torch.manual_seed(0)
    spec = GlowSpec(channels=1, image_size=8, n_flow=1, n_block=2, hidden=8)
    path = folder / "tiny.safetensors"
    save_checkpoint(path, Checkpoint(build_glow(spec).eval(), "glow", spec, SPEC))
    return path


def _flowtame(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["flowtame", *map(str, args)], capture_output=True, text=True, timeout=timeout)


needs_script = pytest.mark.skipif(shutil.which("flowtame") is None, reason="the flowtame console script is not "
                                  "installed")


@needs_script
def test_stats_finishes_and_reports_the_fifo_skipped(odd_folder, tmp_path):
    done = _flowtame("stats", _tiny_base(tmp_path), odd_folder)
    assert done.returncode == 0, done.stderr
    assert f"{odd_folder / 'pipe.png'}: skipped: not a regular file (a FIFO; never read)" in done.stderr
    assert "5 image(s), 4 skipped" in done.stderr


@needs_script
@pytest.mark.slow
def test_tame_and_evaluate_finish_with_a_fifo_in_the_forget_folder(odd_folder, tmp_path):
    base = _tiny_base(tmp_path)
    out = tmp_path / "tamed.safetensors"
    done = _flowtame("tame", base, "--forget", odd_folder, "--remember", "embedded:digits:test:1", "-o", out,
                     "--max-iters", "2", "--batch-size", "4", "--forget-draws", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "not a regular file (a FIFO; never read)" in done.stderr
    done = _flowtame("evaluate", base, out, "--forget", odd_folder, "--remember", "embedded:digits:test:1")
    assert done.returncode == 0, done.stderr
    assert "not a regular file (a FIFO; never read)" in done.stderr
