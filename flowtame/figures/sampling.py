"""Sample grids in which every model decodes the very same noise.

The noise is drawn once, on the CPU, from ``torch.Generator().manual_seed(seed)`` by
:meth:`MultiScaleFlow.sample_noise` (standard normal times ``temperature``, one tensor per level), and every
model maps it through its own priors and inverse flow (:meth:`MultiScaleFlow.decode_noise`). Rows of a grid
therefore differ only by the models' weights: the same model twice gives identical rows, and a base and a
tamed model show what taming changed at fixed latents (the paper's Fig. 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowtame.errors import InputError
from flowtame.io.checkpoint import Checkpoint
from flowtame.io.fileio import atomic_path, check_output_path
from flowtame.likelihood.nll import in_chunks

#: Tiles smaller than this many pixels on a side are upscaled (nearest neighbour) by an integer factor.
MIN_TILE_PIXELS = 64
#: Models decode at most this many samples at once (fewer for a wide model on the CPU:
#: :func:`~flowtame.likelihood.nll.in_chunks`).
DECODE_BATCH = 64


def to_uint8(x: torch.Tensor, n_bits: int) -> np.ndarray:
    """Model-space images ``x`` [N, C, H, W] in [-0.5, 0.5) -> uint8 pixels [N, C, H, W].

    Values are clamped, put in their n_bits bin ``b = floor((x + 0.5) · 2**n_bits)`` and the bins spread over
    the full 0..255 range (``round(b · 255 / (2**n_bits - 1))``), so quantizing the pixels again gives back
    ``b``. NaN becomes 0 (black).
    """
    n_bins = 2 ** n_bits
    bins = torch.floor((torch.nan_to_num(x.detach().double().cpu(), nan=-0.5) + 0.5) * n_bins)
    bins = bins.clamp(0, n_bins - 1)
    return torch.round(bins * 255.0 / (n_bins - 1)).to(torch.uint8).numpy()


def _check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    if not checkpoints:
        raise InputError("sampling needs at least one model")
    for ckpt in checkpoints:
        if ckpt.data_spec is None:
            raise InputError(f"{ckpt.path or ckpt.architecture}: not an image model (no data spec); "
                             "sample grids need image models")
    reference = checkpoints[0]
    for ckpt in checkpoints[1:]:
        if ckpt.model.latent_shapes != reference.model.latent_shapes:
            shapes = ", ".join(
                f"{c.path or i}: {' + '.join('x'.join(map(str, s)) for s in c.model.latent_shapes)}"
                for i, c in enumerate(checkpoints))
            raise InputError(f"models must share latent shapes to decode the same noise ({shapes})")


def _decode(ckpt: Checkpoint, noise: Sequence[torch.Tensor]) -> np.ndarray:
    """uint8 pixels [n, C, H, W] of the CPU ``noise`` (one tensor per level, [n, ...]) decoded by ``ckpt``'s model
    on its device, at most :data:`DECODE_BATCH` samples a pass (:func:`in_chunks` sizes)."""
    param = next(ckpt.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    n_bits = ckpt.image_data("sampling").n_bits

    def decoded(start: int, stop: int) -> torch.Tensor:
        batch = [eps[start:stop].to(device=device, dtype=dtype) for eps in noise]
        return torch.from_numpy(to_uint8(ckpt.model.decode_noise(batch), n_bits))

    return torch.cat(in_chunks(ckpt.model, noise[0].shape[0], device, DECODE_BATCH, decoded)).numpy()


@torch.no_grad()
def sample_images(checkpoints: Sequence[Checkpoint], n: int, temperature: float = 0.7,
                  seed: int = 0) -> np.ndarray:
    """Decode one shared noise draw with every model: uint8 array [M, n, C, H, W] (M = number of models).

    Raises InputError when models do not share latent shapes or are not image models.
    """
    if n < 1:
        raise InputError(f"the number of samples must be positive, got {n}")
    if not temperature > 0:
        raise InputError(f"the temperature must be positive, got {temperature}")
    _check_compatible(checkpoints)
    generator = torch.Generator().manual_seed(seed)
    noise = checkpoints[0].model.sample_noise(n, temperature, generator, device="cpu")
    rows = [_decode(ckpt, noise) for ckpt in checkpoints]
    image_shapes = {row.shape[1:] for row in rows}
    if len(image_shapes) > 1:
        raise InputError(f"models decode to different image shapes {sorted(image_shapes)}; "
                         "cannot share a grid")
    return np.stack(rows)


def default_scale(image_size: int) -> int:
    """Integer nearest-neighbour upscaling factor that makes a tile at least MIN_TILE_PIXELS wide."""
    return max(1, -(-MIN_TILE_PIXELS // image_size))


def make_grid(images: np.ndarray, *, scale: int | None = None, padding: int = 2,
              fill: int = 255) -> np.ndarray:
    """uint8 images [M, n, C, H, W] -> one grid image [rows·(H·s + p) + p, cols·(W·s + p) + p, C].

    One row per model, one column per sample, tiles upscaled ``s`` times (nearest neighbour; default
    :func:`default_scale`) and separated by ``padding`` pixels of value ``fill``.
    """
    rows, cols, channels, height, width = images.shape
    scale = default_scale(max(height, width)) if scale is None else scale
    if scale < 1:
        raise InputError(f"the scale must be a positive integer, got {scale}")
    tiles = images.repeat(scale, axis=3).repeat(scale, axis=4)
    tile_h, tile_w = height * scale, width * scale
    grid = np.full((rows * (tile_h + padding) + padding, cols * (tile_w + padding) + padding, channels),
                   fill, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = padding + r * (tile_h + padding), padding + c * (tile_w + padding)
            grid[top:top + tile_h, left:left + tile_w] = tiles[r, c].transpose(1, 2, 0)
    return grid


def sample_grid(checkpoints: Sequence[Checkpoint], n: int, temperature: float = 0.7, seed: int = 0, *,
                scale: int | None = None) -> np.ndarray:
    """The grid of :func:`sample_images` as one uint8 image [height, width, C]: one row per model."""
    return make_grid(sample_images(checkpoints, n, temperature, seed), scale=scale)


def _pil_image(array: np.ndarray) -> Image.Image:
    """uint8 [H, W, C] with C in {1, 3} -> a PIL image (mode L or RGB)."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_png(path: str | Path, array: np.ndarray, *, force: bool = False) -> Path:
    """Write uint8 [H, W, C] as a PNG atomically; refuses to overwrite without ``force``."""
    path = check_output_path(path, force)
    with atomic_path(path) as tmp:
        _pil_image(array).save(tmp, format="PNG")
    return path


def save_individual(images: np.ndarray, out_dir: str | Path, names: Sequence[str], *,
                    scale: int = 1, force: bool = False) -> list[Path]:
    """Write each sample of uint8 [M, n, C, H, W] to ``out_dir/{row}-{name}/{index:04d}.png``."""
    if len(names) != images.shape[0]:
        raise ValueError(f"{len(names)} names for {images.shape[0]} rows of samples")
    written = []
    for row, name in enumerate(names):
        folder = Path(out_dir) / f"{row}-{name}"
        for index, image in enumerate(images[row]):
            tile = image.repeat(scale, axis=1).repeat(scale, axis=2).transpose(1, 2, 0)
            written.append(save_png(folder / f"{index:04d}.png", tile, force=force))
    return written
