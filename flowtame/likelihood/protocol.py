"""The paper's evaluation protocol on labelled image sets: choosing D_F, D'_F and D_R.

The paper picks the forget images of an identity near the identity's median likelihood, so results are
not driven by outliers; D'_F is the identity's other images, D_R everything else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flowtame.data.images import ImageSet
from flowtame.flows.base import MultiScaleFlow
from flowtame.io.fileio import atomic_path
from flowtame.likelihood.nll import compute_nll


def median_nearest(model: MultiScaleFlow, image_set: ImageSet, k: int, *, seed: int = 0,
                   device: str = "auto") -> tuple[list[int], np.ndarray]:
    """Indices of the ``k`` images of ``image_set`` whose NLL is nearest the set's median, and all NLLs (nats)."""
    result = compute_nll(model, image_set, seed=seed, device=device, num_workers=0)
    if k > len(result.nll):
        raise ValueError(f"{image_set.name}: asked for {k} images, the set has {len(result.nll)}")
    order = np.argsort(np.abs(result.nll - np.median(result.nll)), kind="stable")
    return sorted(order[:k].tolist()), result.nll


def write_pngs(image_set: ImageSet, indices: list[int], folder: str | Path, prefix: str = "image") -> list[Path]:
    """Write the preprocessed pixels of the chosen images as PNG files (grayscale or RGB), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in indices:
        pixels = image_set.pixels(index)
        array = pixels[0] if pixels.shape[0] == 1 else np.transpose(pixels, (1, 2, 0))
        path = folder / f"{prefix}-{index:05d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
        written.append(path)
    return written
