"""The forget threshold and its stopping margin, in one place (paper Eq. 8).

An image is forgotten when its NLL lies beyond ``mu + delta * sigma`` of the remember set's normal N(mu, sigma²)
(NLL in nats, ``delta`` in remember standard deviations); its signed distance to the threshold is
``d = (NLL - (mu + delta * sigma)) / sigma`` and taming stops when ``|d| < epsilon`` for every forget image,
with ``epsilon = 0.15 * delta`` unless given (the released code's value). Every function works on floats,
NumPy arrays and tensors alike (gradients flow through tensors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

#: epsilon as a fraction of delta when not given (the released code's 0.15·δ).
DEFAULT_EPSILON_FRACTION = 0.15

#: A float, a NumPy array or a tensor: the result has the type of the per-image argument.
Num = TypeVar("Num", float, "np.ndarray", "torch.Tensor")


def default_epsilon(delta: float) -> float:
    """The stopping margin used when none is given: ``0.15 * delta`` (sigma units)."""
    return DEFAULT_EPSILON_FRACTION * delta


def forget_threshold(mu: Num, sigma: Num | float, delta: float) -> Num:
    """The forget threshold ``mu + delta * sigma`` (the unit of ``mu`` and ``sigma``)."""
    return mu + delta * sigma


def threshold_distance(nll: Num, mu: Num | float, sigma: Num | float, delta: float) -> Num:
    """Signed distance ``(nll - (mu + delta * sigma)) / sigma`` to the forget threshold, in sigma units.

    d > 0: beyond the threshold (less likely than it); an image counts as forgotten when ``d > -epsilon``.
    """
    return (nll - (mu + delta * sigma)) / sigma  # forget_threshold's formula, for mixed scalar/array arguments
