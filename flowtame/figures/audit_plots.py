"""The membership audit's figure: ROC curves of the loss attack and NLL histograms, one column per model.

Matplotlib's Agg renderer only; the file is written atomically. Scores as in :mod:`flowtame.likelihood.audits`:
the loss attack flags low NLL as "member".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flowtame.io.fileio import atomic_path, check_output_path


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR [T], TPR [T]) of the rule ``score >= t`` over every distinct score t, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]
    fpr = np.array([0.0, *[(nonmembers >= t).mean() for t in thresholds]])
    tpr = np.array([0.0, *[(members >= t).mean() for t in thresholds]])
    return fpr, tpr


def plot_membership(path: str | Path, forget: Mapping[str, np.ndarray], holdout: Mapping[str, np.ndarray],
                    aucs: Mapping[str, float] | None = None, *, bins: int = 30, force: bool = False) -> Path:
    """Top: ROC curves of the loss attack (forget = members vs held-out) for every model on one axis.
    Bottom: per model, histograms of forget and held-out NLL (nats). ``forget``, ``holdout``: model -> NLL [N]."""
    path = check_output_path(path, force)
    models = list(forget)
    figure = Figure(figsize=(4.0 * max(len(models), 2), 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, len(models))
    roc = figure.add_subplot(grid[0, :])
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    for name in models:
        fpr, tpr = roc_curve(-np.asarray(forget[name]), -np.asarray(holdout[name]))
        label = name if aucs is None or name not in aucs else f"{name} (AUC {aucs[name]:.3f})"
        roc.step(fpr, tpr, where="post", label=label)
    roc.set_xlabel("false-positive rate (held-out images flagged)")
    roc.set_ylabel("true-positive rate (forget images flagged)")
    roc.set_title("loss attack: flag low NLL as 'trained on'")
    roc.legend(loc="lower right")
    for column, name in enumerate(models):
        axis = figure.add_subplot(grid[1, column])
        values = np.concatenate([forget[name], holdout[name]])
        edges = np.linspace(values.min(), values.max(), bins + 1).tolist()
        axis.hist(holdout[name], bins=edges, density=True, alpha=0.5, label="held-out")
        axis.hist(forget[name], bins=edges, density=True, alpha=0.5, label="forget")
        axis.set_title(name)
        axis.set_xlabel("NLL (nats)")
        axis.legend()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path
