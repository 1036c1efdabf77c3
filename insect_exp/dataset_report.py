"""What a run logs of its data audit (data/duplicates.py): the duplicate pairs, their counts,
the original image sizes, and a plot of the images per class and their sizes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from insect_exp.data.duplicates import TSV_NAME, Audit

if TYPE_CHECKING:
    from insect_exp.tracking import Run

TSV_HEADER = ["file_a", "split_a", "file_b", "split_b", "kind", "distance"]
_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}


def log_audit(run: Run, audit: Audit, images_per_class: Mapping[str, Mapping[str, int]]) -> None:
    """dataset/duplicates.tsv, the duplicate counts as metrics, and plots/dataset.png."""
    run.log_table(TSV_HEADER, audit.rows, TSV_NAME)
    run.log_metrics({**audit.counts, "dedupe_dropped_test": audit.dropped})
    run.log_figure(dataset_figure(images_per_class, audit.sizes), "plots/dataset.png")


def dataset_figure(
    images_per_class: Mapping[str, Mapping[str, int]], sizes: Mapping[str, np.ndarray]
) -> Figure:
    """Images per class and split (bars), and each original image's width and height (dots)."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    bars, dots = fig.subplots(1, 2, width_ratios=[3, 2])
    names = list(next(iter(images_per_class.values()), {}))
    x = np.arange(len(names))
    width = 0.8 / max(len(images_per_class), 1)
    for k, (split, counts) in enumerate(images_per_class.items()):
        values = [counts.get(name, 0) for name in names]
        bars.bar(x + k * width, values, width, label=split, color=_COLOURS.get(split))
    bars.set_xticks(x + width * (len(images_per_class) - 1) / 2, names, rotation=45, ha="right")
    bars.set_ylabel("Images")
    bars.set_title("Images per class")
    bars.legend()
    for split, split_sizes in sizes.items():
        known = split_sizes[(split_sizes > 0).all(axis=1)] if len(split_sizes) else split_sizes
        if len(known):
            dots.scatter(known[:, 0], known[:, 1], s=6, alpha=0.4, label=split,
                         color=_COLOURS.get(split))  # fmt: skip
    dots.set_xlabel("Original width (px)")
    dots.set_ylabel("Original height (px)")
    dots.set_title("Original image sizes")
    if sizes:
        dots.legend()
    return fig
