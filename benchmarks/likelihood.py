"""Throughput and memory of the likelihood engine against a one-image-per-forward loop.

On one model and one list of image files (the embedded digits written as PNG files and repeated through a
``.txt`` list to the wanted count), measures in fresh processes:

- ``compute_nll`` (batched, streaming): images/second and peak resident memory (RSS high-water mark from
  ``resource.getrusage``) over each ``--counts`` value (default 2,000 and 20,000); memory must not grow with
  the count;
- the authors' evaluation loop (``compute_dataset_bpd`` in their ``utils.py``): for each image in turn,
  decode and preprocess it, add ``torch.rand_like(x) / n_bins``, one forward pass of batch size 1 under
  ``torch.no_grad``, results gathered with ``torch.cat``: images/second over ``--loop-images`` images;
- their ratio.

    python benchmarks/likelihood.py [--model embedded:glow-digits] [--counts 2000 20000] [--loop-images 100]
        [--batch-size 256] [--threads 2]

When the model file does not exist (the embedded model not trained yet), a freshly initialized Glow of the
embedded model's shape (16x16 grayscale, 5 bits, n_flow 8, n_block 2, hidden 128, additive, LU) is used
and a note says so: throughput depends on the architecture, not on the weights.
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
from flowtame.data.images import DIGITS_ASSET, preprocess
from flowtame.data.quantization import DataSpec, discrete_nll, quantize
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, make_provenance, save_checkpoint
from flowtame.likelihood.nll import compute_nll

FALLBACK_SPEC = GlowSpec(channels=1, image_size=16, n_flow=8, n_block=2, hidden=128, affine=False)
FALLBACK_DATA = DataSpec(image_size=16, channels=1, n_bits=5)


def _peak_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _digit_files(folder: Path) -> list[Path]:
    """Write the 1,797 embedded 8x8 digits as PNG files; returns their paths."""
    with np.load(asset_path(DIGITS_ASSET)) as arrays:
        images = arrays["images"]
    paths = []
    for index, image in enumerate(images):
        path = folder / f"digit{index:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _list_file(folder: Path, files: list[Path], count: int) -> Path:
    """A .txt list naming ``count`` images, cycling through ``files``."""
    path = folder / f"images-{count}.txt"
    path.write_text("".join(f"{files[i % len(files)].name}\n" for i in range(count)))
    return path


def _worker_batched(model_path: str, list_path: str, batch_size: int) -> dict:
    from flowtame.data.images import open_images

    ckpt = load_checkpoint(model_path)
    image_set = open_images(list_path, ckpt.data_spec)
    with torch.inference_mode():  # warm-up: one batch through every layer (allocator, oneDNN kernels)
        ckpt.model.log_prob(torch.zeros(batch_size, *ckpt.model.event_shape))
    rss_before = _peak_rss_mib()
    result = compute_nll(ckpt.model, image_set, batch_size=batch_size, device="cpu")
    return {"images": len(result), "images_per_second": result.images_per_second,
            "rss_before_mib": rss_before, "rss_peak_mib": _peak_rss_mib()}


def _worker_loop(model_path: str, list_path: str) -> dict:
    """One image per forward pass, decoded in the loop, as the authors' evaluation does."""
    ckpt = load_checkpoint(model_path)
    spec, model = ckpt.data_spec, ckpt.model
    folder = Path(list_path).parent
    files = [folder / line for line in Path(list_path).read_text().split()]
    n_bins = 2 ** spec.n_bits
    with torch.no_grad():
        model.log_prob(torch.zeros(1, *model.event_shape))
    start = time.perf_counter()
    nll = None
    for path in files:
        with Image.open(path) as image:
            x = quantize(preprocess(image, spec), spec.n_bits).unsqueeze(0)
        x = x + torch.rand_like(x) / n_bins
        with torch.no_grad():
            value = discrete_nll(model.log_prob(x), spec.num_dims, spec.n_bits)
        nll = value if nll is None else torch.cat((nll, value))
    elapsed = time.perf_counter() - start
    return {"images": len(nll), "images_per_second": len(nll) / elapsed}


def _run_worker(mode: str, model_path: Path, list_path: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--model", str(model_path), "--list", str(list_path),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _describe(spec: GlowSpec | object) -> str:
    """Hyperparameters in one short line (the per-step LU flags summarized)."""
    fields = dict(spec.to_dict())
    lu = fields.pop("conv_lu", None)
    text = ", ".join(f"{k} {v}" for k, v in fields.items())
    return text if lu is None else f"{text}, LU 1x1 convs in {sum(lu)}/{len(lu)} steps"


def _model_file(model: str, folder: Path) -> tuple[Path, str]:
    path = resolve_model_path(model)
    if path.exists():
        ckpt = load_checkpoint(path)
        return path, f"{model}: {ckpt.architecture}, {_describe(ckpt.spec)}, {ckpt.data_spec.n_bits} bits"
    torch.manual_seed(0)
    fallback = folder / "fallback-glow.safetensors"
    save_checkpoint(fallback, Checkpoint(model=build_glow(FALLBACK_SPEC), architecture="glow", spec=FALLBACK_SPEC,
                                         data_spec=FALLBACK_DATA, provenance=make_provenance(notes="benchmark")))
    description = f"freshly initialized glow, {_describe(FALLBACK_SPEC)}, {FALLBACK_DATA.n_bits} bits"
    print(f"note: {path} does not exist (yet); using a {description}")
    return fallback, description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:glow-digits")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--loop-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every measured process")
    parser.add_argument("--worker", choices=["batched", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "batched":
        print(json.dumps(_worker_batched(args.model, args.list, args.batch_size)))
        return
    if args.worker == "loop":
        print(json.dumps(_worker_loop(args.model, args.list)))
        return

    with tempfile.TemporaryDirectory(prefix="flowtame-bench-") as tmp:
        folder = Path(tmp)
        model_path, description = _model_file(args.model, folder)
        files = _digit_files(folder)
        print(f"model: {description}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU core(s) visible, "
              f"torch {torch.__version__}, {args.threads} torch thread(s), CUDA available: "
              f"{torch.cuda.is_available()}; load average before: {os.getloadavg()[0]:.2f}")
        loop = _run_worker("loop", model_path, _list_file(folder, files, args.loop_images), args)
        print(f"one image per forward (authors' loop): {loop['images']} images, "
              f"{loop['images_per_second']:.2f} images/s")
        batched = {}
        for count in args.counts:
            batched[count] = _run_worker("batched", model_path, _list_file(folder, files, count), args)
            b = batched[count]
            print(f"compute_nll, batch {args.batch_size}: {b['images']} images, {b['images_per_second']:.1f} "
                  f"images/s ({b['images_per_second'] / loop['images_per_second']:.1f}x the loop), peak RSS "
                  f"{b['rss_peak_mib']:.0f} MiB ({b['rss_peak_mib'] - b['rss_before_mib']:+.0f} MiB during the "
                  f"pass)")
        low, high = (batched[min(args.counts)], batched[max(args.counts)])
        print(f"peak RSS, {high['images']} vs {low['images']} images: {high['rss_peak_mib']:.0f} vs "
              f"{low['rss_peak_mib']:.0f} MiB ({high['rss_peak_mib'] - low['rss_peak_mib']:+.0f} MiB)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
