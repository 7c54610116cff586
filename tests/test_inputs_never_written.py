"""No command writes to a path that is one of its inputs — by path, symlink or hard link — whatever --force
says: exit 2, one line, and the input byte-identical."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtame.data.embedded import asset_path
from flowtame.data.quantization import DataSpec
from flowtame.errors import InputError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, save_checkpoint
from flowtame.io.fileio import check_not_an_input, sha256_file


@pytest.fixture
def files(tmp_path):
    """A tiny base checkpoint, a copy as 'tamed', a folder of digit PNGs, a list file and a YAML config."""
    torch.manual_seed(0)
    spec = GlowSpec(channels=1, image_size=8, n_flow=1, n_block=2, hidden=8)
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, Checkpoint(build_glow(spec).eval(), "glow", spec, DataSpec(8, 1, 5)))
    tamed = tmp_path / "tamed.safetensors"
    shutil.copy(base, tamed)
    images = tmp_path / "images"
    images.mkdir()
    with np.load(asset_path("digits.npz")) as arrays:
        for i, digit in enumerate(arrays["images"][:4]):
            Image.fromarray(digit).save(images / f"{i}.png")
    listing = tmp_path / "list.txt"
    listing.write_text("images/0.png\nimages/1.png\n")
    config = tmp_path / "config.yaml"
    config.write_text("max-iters: 2\n")
    return {"base": base, "tamed": tamed, "images": images, "list": listing, "config": config, "root": tmp_path}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(run_cli, files, *args) -> str:
    before = _digests(files["root"])
    result = run_cli(*args)
    assert result.exit_code == 2, (args, result.stdout, result.stderr)
    line, = result.stderr.strip().splitlines()
    assert "an input of this command" in line and "Traceback" not in result.stderr
    assert _digests(files["root"]) == before, "an input changed"
    return line


def test_tame_refuses_to_write_over_its_base_by_path_symlink_or_hard_link(run_cli, files):
    base, root = files["base"], files["root"]
    (root / "via-symlink.safetensors").symlink_to(base)
    os.link(base, root / "via-hardlink.safetensors")
    common = ["--forget", files["images"], "--remember", files["list"], "--force"]
    for output in (base, root / "via-symlink.safetensors", root / "via-hardlink.safetensors"):
        line = _refused(run_cli, files, "tame", base, "-o", output, *common)
        assert line.startswith(f"flowtame: error: {output}: is an input of this command ({base})")
    _refused(run_cli, files, "tame", base, "-o", root / "out.safetensors", "--report", files["config"],
             "--config", files["config"], *common)
    _refused(run_cli, files, "tame", base, "-o", files["images"] / "0.png", *common)  # an image of --forget
    _refused(run_cli, files, "tame", base, "-o", root / "out.safetensors", "--report", files["list"], *common)


def test_every_other_command_refuses_its_inputs_as_outputs(run_cli, files):
    base, tamed, images, listing = files["base"], files["tamed"], files["images"], files["list"]
    _refused(run_cli, files, "debias", base, "--group", f"a={images}", "--group", f"b={listing}", "--target",
             "a=0.5", "-o", base, "--force")
    _refused(run_cli, files, "debias", base, "--group", f"a={images}", "--group", f"b={listing}", "--target",
             "a=0.5", "-o", files["root"] / "out.safetensors", "--report", listing, "--force")
    _refused(run_cli, files, "train", listing, "-o", listing, "--force")
    _refused(run_cli, files, "train", images, "-o", images / "1.png", "--force")
    _refused(run_cli, files, "train", images, "-o", files["root"] / "m.safetensors", "--json", images / "2.png",
             "--force")
    _refused(run_cli, files, "convert", base, "-o", base, "--from", "rosinality-glow", "--image-size", "8",
             "--n-bits", "5", "--force")
    _refused(run_cli, files, "sample", base, tamed, "-o", tamed, "--force")
    _refused(run_cli, files, "evaluate", base, tamed, "--forget", images, "--remember", listing, "--plot", tamed,
             "--force")
    _refused(run_cli, files, "evaluate", base, tamed, "--forget", images, "--remember", listing, "--json", listing,
             "--force")
    _refused(run_cli, files, "stats", base, listing, "--json", listing, "--force")
    _refused(run_cli, files, "stats", base, images, "--plot", images / "3.png", "--force")
    _refused(run_cli, files, "stats", base, listing, "--plot", images / "0.png", "--force")  # listed image
    _refused(run_cli, files, "info", base, "--json", base)


def test_the_helper_passes_other_paths_and_skips_embedded_sources_and_stdout(files):
    check_not_an_input(files["root"] / "new.safetensors", [files["base"], files["images"], "embedded:digits", "-"])
    check_not_an_input(files["root"] / "report.json", [files["images"]])  # not an image: never read as one
    with pytest.raises(InputError, match="lies in an input"):
        check_not_an_input(files["images"] / "new.png", [files["images"]])
    with pytest.raises(InputError, match="is listed in an input"):  # an image a .txt list names
        check_not_an_input(files["images"] / "1.png", [files["list"]])
    check_not_an_input(files["images"] / "2.png", [files["list"]])  # not listed
    check_not_an_input(files["images"] / "1.png", [files["config"]])  # not a list: never read as one


@pytest.mark.skipif(shutil.which("flowtame") is None, reason="the flowtame console script is not installed")
def test_console_script_tame_base_onto_itself_with_force(files):
    base = files["base"]
    before = base.read_bytes()
    done = subprocess.run(["flowtame", "tame", str(base), "--forget", str(files["images"]), "--remember",
                           str(files["list"]), "-o", str(base), "--force"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"flowtame: error: {base}: is an input of this command ({base}); refusing to write over it (--force "
        "does not change this): choose another output path"]
    assert base.read_bytes() == before
