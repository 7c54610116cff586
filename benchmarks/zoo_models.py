"""The tuning zoo (issue 23): base models of different families, sizes and training recipes for benchmarks/zoo.py.

Every model sees 16x16 one-channel digits at 5 bits. Each is built once and cached under ``--cache``
(default /work/cache/zoo, or $FLOWTAME_ZOO); an existing file is reused, never rebuilt:

- ``embedded-glow``: the embedded Glow (``embedded:glow-digits``), nothing to build;
- ``tuning-glow``: the Glow in shared/fixtures/tuning/ (rosinality/glow-pytorch's code and recipe), converted
  with ``flowtame convert``;
- ``wide-glow``: a wide flowtame Glow (width 512, 3 blocks x 8 flows, additive, LU) trained at a high learning
  rate without decay and stopped early - the slightly noisy model people actually have;
- ``affine-glow``: a flowtame Glow with affine coupling;
- ``realnvp``: a small multi-scale RealNVP (the recipe of docs/benchmarks.md's RealNVP experiment).

The trained ones run ``flowtame train`` (a subprocess, one after the other; its ``--json`` summary is kept
beside the checkpoint as NAME.train.json). After building, each model is described once (parameters, train and
holdout BPD with ``compute_nll``, seed 0; cached as NAME.info.json) and one table is printed:

    python benchmarks/zoo_models.py                      # build what is missing, print the table
    python benchmarks/zoo_models.py --models realnvp     # one model
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowtame.data.embedded import resolve_model_path
from flowtame.data.images import open_images
from flowtame.io.checkpoint import load_checkpoint
from flowtame.likelihood.nll import compute_nll

DEFAULT_CACHE = Path(os.environ.get("FLOWTAME_ZOO", "/work/cache/zoo"))
#: The shared fixture's rosinality Glow (``training.json`` beside it holds its recipe).
TUNING_FIXTURE = Path(os.environ.get("FLOWTAME_TUNING_FIXTURE", "/work/shared/fixtures/tuning/model.pt"))
TRAIN_DATA = "embedded:digits:train"
#: The digits of one split and class as a source for open_images; ``{split}`` is train or test.
EMBEDDED_DIGITS = "embedded:digits:{split}:{digit}"
#: The same 1,797 digits the way the tuning Glow saw them (bilinear 8x8 -> 16x16), as PNG files under the cache.
BILINEAR_FOLDER = "digits-bilinear"
IMAGE_ARGS = ["--image-size", "16", "--channels", "1", "--n-bits", "5"]

#: name -> how it is made: "embedded" (a model name), "convert" (flowtame convert args) or "train"
#: (flowtame train args after DATA/-o), with a one-line recipe for the table.
ZOO: dict[str, dict[str, Any]] = {
    "embedded-glow": {
        "embedded": "embedded:glow-digits",
        "recipe": "flowtame Glow 2x8, width 128, additive, LU; Adam 1e-3, 2,500 steps of 32, decay 1,000",
    },
    "tuning-glow": {
        "convert": [str(TUNING_FIXTURE), "--from", "rosinality-glow", *IMAGE_ARGS],
        "data": BILINEAR_FOLDER,
        "recipe": "rosinality Glow 3x6, width 512, affine, LU; Adam 1e-4, warm-up 200, 2,792 steps of 32 "
                  "(13 min), bilinear-upsampled digits, its own 80/20 split",
    },
    "wide-glow": {
        "train": ["--arch", "glow", *IMAGE_ARGS, "--n-flow", "8", "--n-block", "3", "--hidden", "512",
                  "--additive", "--lu", "--steps", "500", "--batch-size", "32", "--lr", "1e-3", "--warmup", "50",
                  "--decay", "0", "--seed", "0"],
        "recipe": "flowtame Glow 3x8, width 512, additive, LU; Adam 1e-3 (high for this size), warm-up 50, "
                  "no decay, stopped after 500 steps of 32",
    },
    "affine-glow": {
        "train": ["--arch", "glow", *IMAGE_ARGS, "--n-flow", "8", "--n-block", "2", "--hidden", "128",
                  "--affine", "--lu", "--steps", "800", "--batch-size", "32", "--lr", "1e-3", "--warmup", "100",
                  "--decay", "300", "--seed", "0"],
        "recipe": "flowtame Glow 2x8, width 128, affine, LU; Adam 1e-3, warm-up 100, 800 steps of 32, "
                  "decay 300",
    },
    "realnvp": {
        "train": ["--arch", "realnvp", *IMAGE_ARGS, "--hidden", "32", "--n-res-blocks", "1", "--steps", "1500",
                  "--batch-size", "64", "--decay", "500", "--seed", "0"],
        "recipe": "flowtame RealNVP, 2 scales, width 32, 1 res block; Adam 1e-3, warm-up 200, 1,500 steps "
                  "of 64, decay 500",
    },
}


def model_path(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Where zoo model ``name`` lives (the embedded one: the package's asset)."""
    entry = ZOO[name]
    if "embedded" in entry:
        return resolve_model_path(entry["embedded"])
    return cache / f"{name}.safetensors"


def digits_source(name: str, cache: Path = DEFAULT_CACHE) -> str:
    """The template (``{split}``, ``{digit}``) of the digit sources zoo model ``name`` is evaluated on: the
    embedded digits, or for the tuning Glow the bilinear copy of them (written on first use). Both use the
    embedded train/test split: the tuning Glow's own split (scikit-learn's train_test_split, seed 0) needs
    scikit-learn, so some of its training images are in the test split here."""
    if ZOO[name].get("data") != BILINEAR_FOLDER:
        return EMBEDDED_DIGITS
    root = cache / BILINEAR_FOLDER
    if not (root / "done").exists():
        write_bilinear_digits(root)
    return str(root / "{split}" / "{digit}")


def write_bilinear_digits(root: Path) -> None:
    """The embedded digits as the tuning Glow's training code prepared them (fixtures/tuning/training.json):
    gray levels 0..16 scaled to 0..255, bilinear 8x8 -> 16x16 (align_corners False), written as uint8
    ``floor`` so that flowtame's 5-bit quantization (floor(x / 8)) gives exactly floor(x255 / 8)."""
    from PIL import Image

    from flowtame.data.embedded import asset_path

    with np.load(asset_path("digits.npz")) as arrays:
        images, labels, train = arrays["images"], arrays["labels"], arrays["train"]
    levels = np.rint(images.astype(np.float64) * 16 / 255)  # the asset stores round(v * 255 / 16)
    x255 = torch.from_numpy(levels * 255 / 16).float()[:, None]
    up = torch.nn.functional.interpolate(x255, size=(16, 16), mode="bilinear", align_corners=False)
    pixels = up.floor().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    for i, (image, label, is_train) in enumerate(zip(pixels, labels, train, strict=True)):
        folder = root / ("train" if is_train else "test") / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    (root / "done").write_text("written by benchmarks/zoo_models.py\n")


def flowtame_command() -> list[str]:
    """The flowtame CLI of this interpreter (the worktree's package when PYTHONPATH points at it)."""
    return [sys.executable, "-c", "from flowtame.cli import main; main()"]


def build(name: str, cache: Path = DEFAULT_CACHE, threads: int | None = None) -> Path:
    """Build zoo model ``name`` into ``cache`` unless it is there already; returns its path. ``threads``:
    torch threads of the training process (OMP_NUM_THREADS; None: torch's default)."""
    entry, path = ZOO[name], model_path(name, cache)
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    if "convert" in entry:
        command = [*flowtame_command(), "convert", *entry["convert"], "-o", str(path)]
    else:
        command = [*flowtame_command(), "train", TRAIN_DATA, "-o", str(path), *entry["train"],
                   "--json", str(cache / f"{name}.train.json")]
    print(f"building {name}: {shlex.join(command[3:])}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    subprocess.run(command, check=True, env=env)
    print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def describe(name: str, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Parameters, train and holdout BPD (mean over images, noise seed 0) and training wall time of a built
    model; cached as NAME.info.json beside it (keyed by the checkpoint's sha256)."""
    path = model_path(name, cache)
    info_path = cache / f"{name}.info.json"
    ckpt = load_checkpoint(path)
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("sha256") == ckpt.sha256:
            return info
    template, bpd = digits_source(name, cache), {}
    for split, label in (("train", "train"), ("test", "holdout")):
        values = [compute_nll(ckpt.model, open_images(template.format(split=split, digit=digit), ckpt.data_spec),
                              seed=0, device="cpu").bpd for digit in range(10)]
        bpd[label] = float(np.concatenate(values).mean())
    training = ckpt.provenance.get("training") or {}
    if "convert" in ZOO[name]:  # trained elsewhere: its own record beside the converted file
        record = Path(ZOO[name]["convert"][0]).with_name("training.json")
        training = {"wall_seconds": json.loads(record.read_text())["training"]["wall_s"]} if record.exists() else {}
    info = {"name": name, "path": str(path), "sha256": ckpt.sha256, "architecture": ckpt.architecture,
            "parameters": ckpt.num_parameters, "recipe": ZOO[name]["recipe"],
            "train_bpd": bpd["train"], "holdout_bpd": bpd["holdout"],
            "train_wall_s": training.get("wall_seconds"), "data": template}
    cache.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=1))
    return info


def print_table(infos: list[dict[str, Any]]) -> None:
    print(f"\n{'model':14s} {'arch':8s} {'params':>10s} {'train BPD':>9s} {'hold BPD':>8s} {'train s':>7s}  recipe")
    for i in infos:
        wall = f"{i['train_wall_s']:7.0f}" if i["train_wall_s"] else f"{'-':>7s}"
        print(f"{i['name']:14s} {i['architecture']:8s} {i['parameters']:10,d} {i['train_bpd']:9.4f} "
              f"{i['holdout_bpd']:8.4f} {wall}  {i['recipe']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        build(name, args.cache, args.threads)
    print_table([describe(name, args.cache) for name in args.models])


if __name__ == "__main__":
    main()
