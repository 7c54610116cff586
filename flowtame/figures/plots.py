"""Figures: NLL histograms before and after taming, with the forget threshold (the paper's Fig. 1 and 6).

Matplotlib's Agg renderer only (no display, no pyplot global state); files are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flowtame.data.quantization import nats_per_bpd
from flowtame.io.fileio import atomic_path, check_output_path
from flowtame.likelihood.statistics import NormalFit
from flowtame.likelihood.threshold import forget_threshold

#: Sets with fewer images than this are drawn as marks on the axis (a rug) instead of a histogram.
RUG_BELOW = 20


def _scale(num_dims: int | None) -> tuple[float, str]:
    """Factor from nats to the plotted unit, and its name: BPD when ``num_dims`` is given, else nats."""
    if num_dims is None:
        return 1.0, "nats"
    return 1.0 / nats_per_bpd(num_dims), "BPD"


def plot_nll_histograms(
    path: str | Path,
    nll: Mapping[str, Mapping[str, np.ndarray]],
    *,
    fits: Mapping[str, NormalFit] | None = None,
    delta: float | None = None,
    epsilon: float | None = None,
    num_dims: int | None = None,
    bins: int = 40,
    force: bool = False,
) -> Path:
    """Draw one panel per model, each with a histogram per image set, and write a PNG atomically.

    ``nll``: panel title (e.g. "base (before)") -> set name -> per-image NLL in nats, shape [N]. Sets of at
    least 20 images are drawn as density histograms, smaller ones (a forget set) as marks along the x axis.
    ``fits``: panel title -> the remember-set normal fit in nats; its density is overlaid, and with ``delta``
    the forget threshold ``μ_R + δσ_R`` is drawn as a vertical line (with ``epsilon``, also the edge of the
    "forgotten" region ``μ_R + (δ - ε)σ_R``). ``num_dims`` given: the x axis is in BPD (nats / (D ln 2)),
    else in nats. All panels share the x axis. Refuses to overwrite ``path`` without ``force``.
    """
    path = check_output_path(path, force)
    if not nll:
        raise ValueError("nothing to plot")
    factor, unit = _scale(num_dims)
    fits = fits or {}
    values = [np.asarray(v, dtype=np.float64) * factor for sets in nll.values() for v in sets.values()]
    low = min(float(v.min()) for v in values if v.size)
    high = max(float(v.max()) for v in values if v.size)
    for fit in fits.values():
        if delta is not None:
            high = max(high, forget_threshold(fit.mean, fit.std, delta) * factor)
    margin = 0.05 * (high - low or 1.0)
    edges = np.linspace(low - margin, high + margin, bins + 1)

    figure = Figure(figsize=(5.0 * len(nll), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(nll), sharex=True, squeeze=False)[0]
    colours: dict[str, str] = {}
    for ax, (title, sets) in zip(axes, nll.items(), strict=True):
        for index, (name, raw) in enumerate(sets.items()):
            data = np.asarray(raw, dtype=np.float64) * factor
            colour = colours.setdefault(name, f"C{len(colours)}")
            label = f"{name} (n={data.size})"
            if data.size >= RUG_BELOW:
                ax.hist(data, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=colour,
                        label=label)
            else:
                ax.plot(data, np.zeros_like(data), linestyle="none", marker="|", markersize=18,
                        markeredgewidth=2, color=colour, label=label, transform=ax.get_xaxis_transform(),
                        zorder=3 + index)
        panel_fit = fits.get(title)
        if panel_fit is not None:
            mean, std = panel_fit.mean * factor, panel_fit.std * factor
            grid = np.linspace(edges[0], edges[-1], 400)
            density = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * math.sqrt(2.0 * math.pi))
            ax.plot(grid, density, color="black", linewidth=1, label="remember fit N(μ_R, σ_R²)")
            if delta is not None:
                ax.axvline(forget_threshold(mean, std, delta), color="crimson", linewidth=1.5,
                           label=f"threshold μ_R + {delta:g}σ_R")
                if epsilon:
                    ax.axvline(mean + (delta - epsilon) * std, color="crimson", linewidth=1, linestyle=":",
                               label=f"forgotten beyond μ_R + {delta - epsilon:g}σ_R")
        ax.set_title(title)
        ax.set_xlabel(f"NLL ({unit})")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path
