"""Figures of a multi-label run: per-class precision-recall curves (pure, as plots.py is)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def precision_recall_curves(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], aps: np.ndarray
) -> Figure:
    """One precision-recall curve per class (with its AP in the legend); classes without a true
    image have no curve."""
    from sklearn.metrics import precision_recall_curve

    fig = Figure(figsize=(7, 5.5), layout="tight")
    ax = fig.add_subplot()
    for c, name in enumerate(class_names):
        if not labels[:, c].any():
            continue
        precision, recall, _ = precision_recall_curve(labels[:, c], probs[:, c])
        ax.step(recall, precision, where="post", label=f"{name} (AP {aps[c]:.3f})")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall per class (test)")
    if ax.lines:
        ax.legend(loc="lower left", fontsize=8)
    return fig
