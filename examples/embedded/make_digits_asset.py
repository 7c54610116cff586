"""Build ``flowtame/assets/digits.npz``, the embedded handwritten digits, from scikit-learn's bundled copy.

The 1,797 8x8 digits of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin,
C. Kaynak; CC BY 4.0) as scikit-learn distributes them (``sklearn.datasets.load_digits``). scikit-learn is
needed to run this script only; flowtame reads the written file with NumPy.

Written arrays:
- ``images``: uint8 [1797, 8, 8], the 0..16 gray levels mapped to 0..255 by ``round(v * 255 / 16)``;
- ``labels``: uint8 [1797], the digit 0..9;
- ``train``: bool [1797], a fixed split stratified by class: ``--test-size`` images (300 by default) are
  test images (``train`` False), spread over the classes in proportion to their sizes (largest remainders),
  chosen within each class by a NumPy PCG64 generator seeded with ``--seed``.

Usage: python examples/embedded/make_digits_asset.py [--out flowtame/assets/digits.npz] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "flowtame" / "assets" / "digits.npz"


def stratified_test_counts(labels: np.ndarray, test_size: int) -> dict[int, int]:
    """Test images per class: proportional to class size, largest remainders rounded up to total test_size."""
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * test_size / sizes.sum()
    counts = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: test_size - counts.sum()]] += 1
    return {int(c): int(n) for c, n in zip(classes, counts, strict=True)}


def train_mask(labels: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """bool [N]: True for training images, False for the stratified test images."""
    rng = np.random.default_rng(seed)
    train = np.ones(len(labels), dtype=bool)
    for label, count in stratified_test_counts(labels, test_size).items():
        members = np.flatnonzero(labels == label)
        train[rng.permutation(members)[:count]] = False
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .npz")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--test-size", type=int, default=300, help="number of test images")
    args = parser.parse_args()

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    train = train_mask(labels, args.test_size, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels, train=train)
    print(f"wrote {args.out}: {len(images)} images ({int(train.sum())} train, {int((~train).sum())} test), "
          f"per-class test counts {stratified_test_counts(labels, args.test_size)}")


if __name__ == "__main__":
    main()
