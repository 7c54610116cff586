"""The forget threshold and its stopping margin, in one place (paper Eq. 8).

An image is forgotten when its NLL lies beyond ``mu + delta * sigma`` of the remember set's normal N(mu, sigma²)
(NLL in nats, ``delta`` in remember standard deviations); its signed distance to the threshold is
``d = (NLL - (mu + delta * sigma)) / sigma`` and taming stops when ``|d| < epsilon`` for every forget image,
with ``epsilon = 0.15 * delta`` unless given (the released code's value). Every function works on floats,
NumPy arrays and tensors alike (gradients flow through tensors).
"""

from __future__ import annotations

from typing import TypeVar

#: epsilon as a fraction of delta when not given (the released code's 0.15·δ).
DEFAULT_EPSILON_FRACTION = 0.15

T = TypeVar("T")


def default_epsilon(delta: float) -> float:
    """The stopping margin used when none is given: ``0.15 * delta`` (sigma units)."""
    return DEFAULT_EPSILON_FRACTION * delta


def forget_threshold(mu: T, sigma: T, delta: float) -> T:
    """The forget threshold ``mu + delta * sigma`` (the unit of ``mu`` and ``sigma``)."""
    return mu + delta * sigma  # type: ignore[operator]


def threshold_distance(nll: T, mu: T | float, sigma: T | float, delta: float) -> T:
    """Signed distance ``(nll - (mu + delta * sigma)) / sigma`` to the forget threshold, in sigma units.

    d > 0: beyond the threshold (less likely than it); an image counts as forgotten when ``d > -epsilon``.
    """
    return (nll - forget_threshold(mu, sigma, delta)) / sigma  # type: ignore[operator]
