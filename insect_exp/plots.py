"""Pure figure builders for experiment artifacts.

The figures reproduce the classic TensorFlow-tutorial plots (3x3 sample grids of training/test
images, side-by-side accuracy/loss curves, per-step loss/accuracy curves, the 6x5 prediction grid)
plus a confusion matrix heatmap and an overlay of sweep children's validation curves.

Every function takes numpy arrays or lists and returns a ``matplotlib.figure.Figure``, except
``confusion_matrix``, which returns the count matrix the heatmap draws. Images are what the data
pipeline decodes, uint8 RGB (N x H x W x 3); any other dtype is rejected rather than guessed at.
Labels are integer class indices. Nothing here touches pyplot's global state, TensorFlow or MLflow,
so figures can be built from any thread without a GUI backend; ``Figure.savefig`` renders through
Agg on its own.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "batch_curve",
    "confusion_matrix",
    "confusion_matrix_figure",
    "overlay_curves",
    "prediction_grid",
    "sample_grid",
    "titled_grid",
    "training_curves",
]

CORRECT_COLOR = "green"
WRONG_COLOR = "red"
# Above this many runs an in-plot legend covers the curves it is meant to explain.
_LEGEND_OUTSIDE_AFTER = 6
# Marker shapes and dash patterns that tell the runs of a sweep overlay apart.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", ":", "-.")
# Past this size per-cell count labels overlap and become unreadable.
_MAX_ANNOTATED_CLASSES = 40


def _uint8_images(images: np.ndarray) -> np.ndarray:
    """The images as an array, refusing any dtype but uint8 (imshow would misread floats)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 RGB, got dtype {arr.dtype}")
    return arr


def _as_class_indices(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    """Integer class labels (array or list) as a flat int64 array."""
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _wrap(text: str, width: int = 24) -> str:
    """At most two lines of `width` characters, so long labels stay over their own tile."""
    return "\n".join(textwrap.wrap(text, width, max_lines=2, placeholder="...")) or text


_CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback")
_warned_missing_glyphs: list[bool] = []


def _fonts(text: str) -> list[str]:
    """Matplotlib's default font, then a CJK one for names it has no glyphs for, if installed.

    Without one, CJK names render as empty boxes: say so once, with the package that fixes it.
    """
    families = ["DejaVu Sans"]
    if not any(ord(c) >= 0x2E80 for c in text):
        return families
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    fallback = [f for f in _CJK_FONTS if f in installed]
    if not fallback and not _warned_missing_glyphs:
        _warned_missing_glyphs.append(True)
        import logging

        logging.getLogger(__name__).warning(
            "no font with CJK glyphs is installed: class names such as %r show as boxes in the "
            "plots (Debian: apt-get install fonts-noto-cjk)",
            text,
        )
    return families + fallback


# Image grids are drawn for this resolution (Run.log_figure saves at it): one image pixel is one
# pixel of the PNG.
GRID_DPI = 100
_MIN_TILE = 160  # narrower images are enlarged by whole-pixel repeats, so a title fits over them
_GAP = 10  # pixels between tiles
_LINE = 15  # pixels per line of a 9-10 pt tile title
_TOP = 40  # pixels for the figure's title


def _image_grid(
    images: np.ndarray,
    titles: Sequence[tuple[str, str | None]],
    rows: int,
    cols: int,
    suptitle: str,
    title_lines: int,
    fontsize: float,
) -> Figure:
    """Tiles of images in reading order, each under its (text, colour) title, as one picture
    (images beyond the titles, or beyond rows x cols, are left out).

    Each tile is placed on the figure pixel for pixel (`figimage`: no axes, no resampling) on the
    figure's white; only the titles are text. One image per tile, not one canvas of all tiles:
    Agg draws an image through float copies of it (float64 for RGB input, some 40 bytes a pixel),
    so a copy per tile stays small where one of the whole picture would not. Unused tiles stay
    blank.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be positive, got {rows}x{cols}")
    pixels = _uint8_images(images)[: rows * cols]
    height, width = pixels.shape[1:3] if len(pixels) else (_MIN_TILE, _MIN_TILE)
    scale = max(1, -(-_MIN_TILE // width))
    height, width = height * scale, width * scale
    band = 6 + _LINE * title_lines  # the title over each tile
    row_height = band + height + _GAP
    canvas_h, canvas_w = _TOP + rows * row_height, _GAP + cols * (width + _GAP)
    fig = Figure(figsize=(canvas_w / GRID_DPI, canvas_h / GRID_DPI), dpi=GRID_DPI)
    fig.patch.set_facecolor("white")
    tile = np.full((height, width, 4), 255, dtype=np.uint8)  # RGBA, opaque
    for i, (image, (text, color)) in enumerate(zip(pixels, titles, strict=False)):
        row, col = divmod(i, cols)
        top, left = _TOP + row * row_height + band, _GAP + col * (width + _GAP)
        if scale > 1:
            image = image.repeat(scale, axis=0).repeat(scale, axis=1)
        tile[..., :3] = image
        # figimage's offsets count from the figure's lower left corner.
        fig.figimage(tile.copy(), xo=left, yo=canvas_h - top - height, origin="upper")
        fig.text(
            (left + width / 2) / canvas_w, 1 - (top - 3) / canvas_h, text, ha="center",
            va="bottom", fontsize=fontsize, color=color, fontfamily=_fonts(text), gid="tile",
        )  # fmt: skip
    if suptitle:
        fig.suptitle(suptitle, y=1 - 8 / canvas_h, va="top")
    return fig


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray | Sequence[int],
    class_names: Sequence[str],
    title: str = "",
    rows: int = 3,
    cols: int = 3,
) -> Figure:
    """Grid of images, each tile titled with its class name (the tutorial's train/test preview);
    multi-hot labels (task=multilabel): with their class names joined by `;`."""
    if np.ndim(labels) == 2:
        shown = np.asarray(labels)[: rows * cols]
        names = [";".join(str(class_names[int(i)]) for i in np.flatnonzero(row)) for row in shown]
    else:
        names = [str(class_names[int(label)]) for label in _as_class_indices(labels)[: rows * cols]]
    titles = [(name, None) for name in names]
    return _image_grid(images, titles, rows, cols, title, 1, fontsize=10)


def training_curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Side-by-side accuracy and loss curves per epoch, training vs validation."""
    fig = Figure(figsize=(12, 4.5), layout="tight")
    acc_ax, loss_ax = fig.subplots(1, 2)
    panels = (
        (acc_ax, "accuracy", "Accuracy", "lower right"),
        (loss_ax, "loss", "Loss", "upper right"),
    )
    for ax, key, name, legend_loc in panels:
        for prefix, label_prefix in (("", "Training"), ("val_", "Validation")):
            values = history.get(prefix + key)
            if values is None or len(values) == 0:
                continue
            epochs = np.arange(1, len(values) + 1)
            ax.plot(epochs, values, marker="o", markersize=5, label=f"{label_prefix} {name}")
        ax.set_title(f"Training and Validation {name}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(name)
        if ax.lines:
            ax.legend(loc=legend_loc)
            _epoch_axis(ax)
    return fig


def _epoch_axis(ax) -> None:
    """Whole epochs on the x axis, with room around the first and last (one epoch: a tick at 1).

    Left to itself, matplotlib spans a single point with fractional ticks (0.96 ... 1.04).
    """
    from matplotlib.ticker import MaxNLocator

    last = max((len(line.get_xdata()) for line in ax.lines), default=1)
    ax.set_xlim(0.5, max(last, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xticks([t for t in ax.get_xticks() if 1 <= t <= last])


def batch_curve(
    values: Sequence[float] | np.ndarray,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    title: str = "",
) -> Figure:
    """Per-training-step curve of a metric such as batch loss or batch accuracy."""
    values = np.asarray(values, dtype=float).reshape(-1)
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, values.size + 1), values)
    ax.set_xlabel("Training Steps")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    return fig


def prediction_grid(
    images: np.ndarray,
    predicted: np.ndarray | Sequence[int],
    class_names: Sequence[str],
    true: np.ndarray | Sequence[int] | None = None,
    title: str = "Model predictions",
    rows: int = 6,
    cols: int = 5,
) -> Figure:
    """Grid of images titled by predicted class; green/red by correctness when labels are known."""
    pred_idx = _as_class_indices(predicted)[: rows * cols]
    true_idx = None if true is None else _as_class_indices(true)
    titles: list[tuple[str, str | None]] = []
    for i, p in enumerate(pred_idx):
        # Class names as they are: they are the ids the user gave the folders.
        name = str(class_names[int(p)])
        if true_idx is None:
            titles.append((_wrap(name), None))
        elif int(p) == int(true_idx[i]):
            titles.append((_wrap(name), CORRECT_COLOR))
        else:
            wrong = f"{name} (true: {class_names[int(true_idx[i])]})"
            titles.append((_wrap(wrong), WRONG_COLOR))
    if true_idx is not None:
        # The key to the tiles: which name is the prediction, what the colours mean.
        title = f"{title}: predicted class, green if right, red if wrong (true class after it)"
    return _image_grid(images, titles, rows, cols, title, 2, fontsize=9)


def titled_grid(
    images: np.ndarray,
    titles: Sequence[str],
    title: str = "",
    cols: int = 4,
    wrong: Sequence[bool] | None = None,
) -> Figure:
    """Grid of images in rows of `cols`, each under its own title of up to two lines (in red
    where `wrong`)."""
    rows = max(1, -(-len(titles) // cols))
    marks = wrong if wrong is not None else [False] * len(titles)
    tiles = [(t, WRONG_COLOR if w else None) for t, w in zip(titles, marks, strict=True)]
    return _image_grid(images, tiles, rows, cols, title, 2, fontsize=9)


def confusion_matrix(
    true: np.ndarray | Sequence[int],
    predicted: np.ndarray | Sequence[int],
    num_classes: int,
) -> np.ndarray:
    """Integer (num_classes, num_classes) count matrix; rows are true classes, columns predicted."""
    t = _as_class_indices(true)
    p = _as_class_indices(predicted)
    if t.shape != p.shape:
        raise ValueError(f"true and predicted differ in length: {t.size} vs {p.size}")
    for name, arr in (("true", t), ("predicted", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}), got {arr.min()}..{arr.max()}"
            )
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_figure(
    matrix: np.ndarray,
    class_names: Sequence[str],
    title: str = "Confusion matrix (test)",
) -> Figure:
    """Annotated confusion-matrix heatmap with true classes on rows and predictions on columns."""
    counts = np.asarray(matrix)
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"matrix {counts.shape} does not match {len(class_names)} class names")
    side = min(max(4.0, 0.6 * n + 2.0), 30.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=[str(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(ticks, labels=[str(c) for c in class_names])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    if n <= _MAX_ANNOTATED_CLASSES:
        # Switch to white text once the cell is dark enough that black would vanish.
        threshold = counts.max() / 2.0 if counts.size else 0.0
        for i in range(n):
            for j in range(n):
                value = counts[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:g}",
                    ha="center",
                    va="center",
                    fontsize=8 if n > 15 else 10,
                    color="white" if value > threshold else "black",
                )
    fig.tight_layout()
    return fig


def overlay_curves(
    curves: Mapping[str, Sequence[float]],
    ylabel: str = "val_accuracy",
    title: str = "",
) -> Figure:
    """One line per run over epochs, to compare sweep children's curves on shared axes."""
    many = len(curves) > _LEGEND_OUTSIDE_AFTER
    fig = Figure(figsize=(10 if many else 7, 4.5))
    ax = fig.add_subplot()
    for i, (name, curve) in enumerate(curves.items()):
        values = np.asarray(curve, dtype=float).reshape(-1)
        # Runs of equal values (a sweep of seeds, one epoch) draw on top of each other: each
        # run's own marker and dashes, hollow and a little transparent, keep every one visible.
        ax.plot(
            np.arange(1, values.size + 1), values, label=str(name),
            marker=_MARKERS[i % len(_MARKERS)], markersize=7, fillstyle="none",
            linestyle=_DASHES[i % len(_DASHES)], alpha=0.8,
        )  # fmt: skip
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ax.lines:
        _epoch_axis(ax)
        if many:
            ax.legend(
                loc="upper left",
                bbox_to_anchor=(1.02, 1.0),
                fontsize="x-small",
                ncols=1 + len(curves) // 25,
            )
        else:
            ax.legend(loc="best", fontsize="small")
    return fig
