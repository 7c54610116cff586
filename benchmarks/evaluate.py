"""Throughput and memory of ``evaluate_models`` (base + tamed, paired) as the remember set grows.

For each ``--counts`` value (default 2,000 and 20,000 remember images), a fresh process loads a base and a
"tamed" checkpoint (the base with perturbed weights: cost does not depend on the weights), opens a forget
set of 4 images and a remember list of COUNT images (the embedded digits written as PNG files, cycled
through a ``.txt`` list), and times one ``evaluate_models`` call: both models over both sets (4 likelihood
passes), the bootstrap, the tests, and with ``--neighbours K`` one base-model encoding pass over both sets.
It reports images/second (images in the sets divided by the wall time of the call; each image is scored by
both models), model-image passes per second, and the resident-memory high-water mark (``getrusage``)
before and after the call: memory must not grow with the number of images beyond O(N) floats.

    python benchmarks/evaluate.py [--model embedded:glow-digits] [--counts 2000 20000] [--neighbours 16]
        [--batch-size 256] [--threads 2] [--n-flow 8] [--hidden 512]

When the model file does not exist, a freshly initialized Glow of the embedded model's shape (16x16
grayscale, 5 bits, n_block 3, additive, LU; ``--n-flow`` and ``--hidden`` default to the embedded model's 8
and 512, smaller values make the run feasible on a busy CPU) is used and a note says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowtame.data.embedded import asset_path, resolve_model_path
from flowtame.data.images import DIGITS_ASSET
from flowtame.data.quantization import DataSpec
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, make_provenance, save_checkpoint

FALLBACK_DATA = DataSpec(image_size=16, channels=1, n_bits=5)
FORGET_IMAGES = 4


def _peak_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_digits(folder: Path) -> list[Path]:
    """The embedded 8x8 digits as PNG files in ``folder``; returns their paths."""
    with np.load(asset_path(DIGITS_ASSET)) as arrays:
        images = arrays["images"]
    folder.mkdir(parents=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"digit{index:04d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def _checkpoints(model: str, folder: Path, n_flow: int, hidden: int) -> tuple[Path, Path, str]:
    """(base path, tamed path, description): the tamed model is the base with every weight perturbed."""
    path = resolve_model_path(model)
    if path.exists():
        base = load_checkpoint(path)
        description = f"{model} ({base.spec})"
    else:
        torch.manual_seed(0)
        spec = GlowSpec(channels=1, image_size=16, n_flow=n_flow, n_block=3, hidden=hidden, affine=False)
        base = Checkpoint(model=build_glow(spec), architecture="glow", spec=spec, data_spec=FALLBACK_DATA,
                          provenance=make_provenance(notes="benchmark"))
        description = f"fresh Glow 16x16x1, n_flow {n_flow}, n_block 3, hidden {hidden}, additive, LU"
        print(f"note: {path} does not exist (yet); using a freshly initialized Glow")
    base_path, tamed_path = folder / "base.safetensors", folder / "tamed.safetensors"
    save_checkpoint(base_path, base)
    with torch.no_grad():
        for param in base.model.parameters():
            param.mul_(1.0 + 1e-3 * torch.randn_like(param))
    save_checkpoint(tamed_path, base)
    return base_path, tamed_path, description


def _worker(args: argparse.Namespace) -> dict:
    from flowtame.data.images import open_images
    from flowtame.likelihood.evaluation import evaluate_models

    base, tamed = load_checkpoint(args.base), load_checkpoint(args.tamed)
    sets = {"forget": open_images(args.forget, base.data_spec), "remember": open_images(args.list, base.data_spec)}
    with torch.inference_mode():  # warm-up: one batch through every layer (allocator, oneDNN kernels)
        for ckpt in (base, tamed):
            ckpt.model.log_prob(torch.zeros(args.batch_size, *ckpt.model.event_shape))
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    block = evaluate_models(base, tamed, sets, device="cpu", batch_size=args.batch_size,
                            neighbours=args.neighbours)
    elapsed = time.perf_counter() - start
    images = sum(s["n"] for name, s in block["sets"].items() if name != "neighbours")
    return {"images": images, "seconds": elapsed, "rss_before_mib": rss_before, "rss_peak_mib": _peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--neighbours", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every measured process")
    parser.add_argument("--n-flow", type=int, default=8, help="steps per level of the fresh Glow (fallback)")
    parser.add_argument("--hidden", type=int, default=512, help="coupling width of the fresh Glow (fallback)")
    for hidden in ("--worker", "--base", "--tamed", "--forget", "--list"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    with tempfile.TemporaryDirectory(prefix="flowtame-bench-eval-") as tmp:
        folder = Path(tmp)
        base_path, tamed_path, description = _checkpoints(args.model, folder, args.n_flow, args.hidden)
        files = _write_digits(folder / "digits")
        forget = folder / "forget.txt"
        forget.write_text("".join(f"{p}\n" for p in files[-FORGET_IMAGES:]))
        print(f"models: {description} (tamed = perturbed copy)")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU core(s) visible, "
              f"torch {torch.__version__}, {args.threads} torch thread(s); load average before: "
              f"{os.getloadavg()[0]:.2f}")
        results = {}
        for count in args.counts:
            listing = folder / f"remember-{count}.txt"
            # The forget digits are left out so that no remember image is excluded as a forget image.
            cycle = files[:-FORGET_IMAGES]
            listing.write_text("".join(f"{cycle[i % len(cycle)]}\n" for i in range(count)))
            command = [sys.executable, __file__, "--worker", "1", "--base", str(base_path), "--tamed",
                       str(tamed_path), "--forget", str(forget), "--list", str(listing), "--neighbours",
                       str(args.neighbours), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            r = results[count] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"evaluate_models, {r['images']} images (forget {FORGET_IMAGES} + remember {count}), "
                  f"neighbours {args.neighbours}, batch {args.batch_size}: {r['seconds']:.1f} s, "
                  f"{r['images'] / r['seconds']:.0f} images/s ({2 * r['images'] / r['seconds']:.0f} model-image "
                  f"passes/s), peak RSS {r['rss_peak_mib']:.0f} MiB "
                  f"({r['rss_peak_mib'] - r['rss_before_mib']:+.0f} MiB during the call)")
        low, high = results[min(args.counts)], results[max(args.counts)]
        print(f"peak RSS, {high['images']} vs {low['images']} images: {high['rss_peak_mib']:.0f} vs "
              f"{low['rss_peak_mib']:.0f} MiB ({high['rss_peak_mib'] - low['rss_peak_mib']:+.0f} MiB)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
