"""Tests for the pure figure builders in insect_exp.plots."""

from __future__ import annotations

import ast
import io
import json
import pathlib
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.text import Text

from insect_exp import plots

CLASSES = ["ant", "bee", "beetle"]


def _render(fig: Figure) -> np.ndarray:
    """Rasterise fig with Agg and return its RGB pixels."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _solid(n: int, rgb: tuple[int, int, int], dtype: type = np.uint8) -> np.ndarray:
    """N solid-colour 16x16 images, uint8 like the data pipeline's unless told otherwise."""
    return np.broadcast_to(np.asarray(rgb, dtype=dtype), (n, 16, 16, 3)).copy()


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], min_count: int = 50) -> bool:
    """Whether at least min_count pixels have exactly this colour."""
    return int(np.all(pixels == np.asarray(rgb, dtype=np.uint8), axis=-1).sum()) >= min_count


def _tile_titles(fig: Figure) -> list[Text]:
    """The titles over an image grid's tiles, in reading order (unused tiles have none)."""
    return [t for t in fig.texts if t.get_gid() == "tile"]


def _visible_titles(fig: Figure) -> list[str]:
    return [t.get_text() for t in _tile_titles(fig)]


def _runs(present: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], present.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _tiles(pixels: np.ndarray, rgb: tuple[int, int, int]) -> tuple[list, list, int]:
    """The column and row spans that pixels of this colour fill, and the side of their square
    tiles; asserts that every tile is that square, solid (placed pixel for pixel)."""
    mask = np.all(pixels == rgb, axis=-1)
    columns, rows = _runs(mask.any(axis=0)), _runs(mask.any(axis=1))
    sides = {int(stop - start) for start, stop in columns + rows}
    assert len(sides) == 1, (columns, rows)
    side = sides.pop()
    tiles = sum(bool(mask[r0, c0]) for r0, _ in rows for c0, _ in columns)
    assert int(mask.sum()) == tiles * side * side
    return columns, rows, side


def test_module_has_no_heavy_or_global_state_imports() -> None:
    source = pathlib.Path(plots.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"tensorflow", "tf_keras", "keras", "mlflow"}
    assert "matplotlib.pyplot" not in imported


def test_sample_grid_titles_tiles_with_class_names() -> None:
    images = _solid(4, (10, 20, 30))
    fig = plots.sample_grid(images, [0, 2, 1, 2], CLASSES, title="train")
    assert isinstance(fig, Figure)
    assert _visible_titles(fig) == ["ant", "beetle", "bee", "beetle"]
    assert fig.get_suptitle() == "train"
    # 3x3 tiles, no axes frames; the tiles without an image stay blank (white): 4 tiles of the
    # images' colour (3 in the first row, 1 in the second), enlarged by whole-pixel repeats to at
    # least 160 px a side, placed pixel for pixel
    assert fig.axes == [] and len(fig.images) == 4
    pixels = _render(fig)
    columns, rows, side = _tiles(pixels, (10, 20, 30))
    assert (len(columns), len(rows)) == (3, 2)
    assert side >= 160 and side % 16 == 0
    assert int(np.all(pixels == (10, 20, 30), axis=-1).sum()) == 4 * side * side
    assert np.all(pixels[rows[1][0] : rows[1][1], columns[1][0] : columns[2][1]] == 255)
    # Equal white gaps between the tiles and at both edges
    edges = [0, *(x for span in columns for x in span), pixels.shape[1]]
    gaps = {int(b - a) for a, b in zip(edges[::2], edges[1::2], strict=True)}
    assert len(gaps) == 1 and gaps.pop() > 0
    # Each tile's title over its tile, under the figure's title
    renderer = fig.canvas.get_renderer()
    height = pixels.shape[0]
    (suptitle,) = [t.get_window_extent(renderer) for t in fig.texts if t.get_text() == "train"]
    for text in _tile_titles(fig)[:3]:
        box = text.get_window_extent(renderer)
        assert height - rows[0][0] <= box.y0 and box.y1 <= suptitle.y0


def test_a_prediction_grid_saves_without_a_full_size_float_copy() -> None:
    # Given a 6x5 grid of 180 px photos (a 950 x 1,400 px picture)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 180, 180, 3), dtype=np.uint8)
    fig = plots.prediction_grid(images, np.arange(30) % 3, CLASSES, true=np.arange(30) % 2)

    # When it is saved as a PNG
    tracemalloc.start()
    try:
        fig.savefig(io.BytesIO(), format="png", dpi=plots.GRID_DPI)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Then Agg's float copies are per tile: far below one float64 RGBA copy of the picture
    # (43 MB; drawn as one canvas the save peaked at 150 MB)
    assert peak < 20e6


def test_sample_grid_accepts_int32_labels_and_custom_shape() -> None:
    labels = np.array([1, 0], dtype=np.int32)
    fig = plots.sample_grid(_solid(2, (0, 0, 0)), labels, CLASSES, rows=1, cols=2)
    assert _visible_titles(fig) == ["bee", "ant"]


def test_sample_grid_shows_only_first_tiles_when_given_more_images() -> None:
    fig = plots.sample_grid(_solid(12, (1, 2, 3)), [0] * 12, CLASSES, rows=2, cols=2)
    assert len(_visible_titles(fig)) == 4
    columns, rows, side = _tiles(_render(fig), (1, 2, 3))
    assert (len(columns), len(rows)) == (2, 2)


@pytest.mark.parametrize(
    "rgb",
    [(255, 0, 0), (0, 128, 0), (0, 0, 255), (200, 100, 7)],
    ids=["red", "half-green", "blue", "mixed"],
)
def test_images_render_with_their_exact_colour(rgb: tuple[int, int, int]) -> None:
    sample = _render(plots.sample_grid(_solid(1, rgb), [0], CLASSES, rows=1, cols=1))
    preds = _render(plots.prediction_grid(_solid(2, rgb), [0, 1], CLASSES))
    assert _has_colour(sample, rgb)
    assert _has_colour(preds, rgb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_image_grids_reject_non_uint8_images(dtype: type) -> None:
    # A float image in [0, 1] would otherwise render as a plausible but wrong picture.
    images = _solid(1, (1, 0, 0), dtype)
    with pytest.raises(TypeError, match="uint8"):
        plots.sample_grid(images, [0], CLASSES)
    with pytest.raises(TypeError, match="uint8"):
        plots.prediction_grid(images, [0], CLASSES)


def test_prediction_grid_colours_correct_green_and_wrong_red() -> None:
    images = _solid(3, (51, 102, 153))
    true = np.array([0, 2, 2], dtype=np.int32)
    fig = plots.prediction_grid(images, np.array([0, 1, 2]), CLASSES, true=true, title="Preds")
    tiles = _tile_titles(fig)  # 3 images: the other 27 tiles of the 6x5 grid stay untitled
    assert [t.get_text() for t in tiles] == ["ant", "bee (true: beetle)", "beetle"]
    colours = [to_rgb(t.get_color()) for t in tiles]
    assert colours == [to_rgb("green"), to_rgb("red"), to_rgb("green")]
    # And the figure says which name is the prediction and what the colours mean
    assert fig.get_suptitle().startswith("Preds: predicted class, green if right, red if wrong")


def test_prediction_grid_without_truth_titles_predictions_only() -> None:
    names = ["background", "tench", "goldfish", "great white shark"]
    fig = plots.prediction_grid(_solid(2, (5, 5, 5)), [3, 1], names, rows=1, cols=2)
    assert _visible_titles(fig) == ["great white shark", "tench"]
    assert fig.get_suptitle() == "Model predictions"
    # Without labels there is no right/wrong, so neither verdict colour may appear.
    verdicts = {to_rgb("green"), to_rgb("red")}
    assert all(to_rgb(t.get_color()) not in verdicts for t in _tile_titles(fig))


def test_training_curves_panels_and_legends() -> None:
    history = {
        "accuracy": [0.5, 0.7, 0.8],
        "val_accuracy": [0.4, 0.6, 0.65],
        "loss": [1.2, 0.8, 0.5],
        "val_loss": [1.3, 1.0, 0.9],
    }
    fig = plots.training_curves(history)
    assert len(fig.axes) == 2
    acc_ax, loss_ax = fig.axes
    assert acc_ax.get_title() == "Training and Validation Accuracy"
    assert loss_ax.get_title() == "Training and Validation Loss"
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == [
        "Training Accuracy",
        "Validation Accuracy",
    ]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "Training Loss",
        "Validation Loss",
    ]
    # Epochs are 1-based and the plotted values are the history values, unchanged.
    np.testing.assert_array_equal(acc_ax.lines[0].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(loss_ax.lines[1].get_ydata(), history["val_loss"])


def test_training_curves_without_validation_draws_train_lines_only() -> None:
    fig = plots.training_curves({"accuracy": [0.1, 0.2], "loss": [2.0, 1.5]})
    acc_ax, loss_ax = fig.axes
    assert [line.get_label() for line in acc_ax.lines] == ["Training Accuracy"]
    assert [line.get_label() for line in loss_ax.lines] == ["Training Loss"]


def test_batch_curve_labels_limits_and_data() -> None:
    values = [1.9, 1.4, 0.9, 0.7]
    fig = plots.batch_curve(values, "Loss", ylim=(0, 2), title="Batch loss")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Training Steps"
    assert ax.get_ylabel() == "Loss"
    assert ax.get_ylim() == (0, 2)
    assert ax.get_title() == "Batch loss"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), values)
    assert len(ax.lines[0].get_xdata()) == len(values)


@pytest.mark.parametrize("loss_scale", [1.0, 12345.6])
def test_curves_keep_every_label_inside_the_figure_and_off_the_other_panel(loss_scale) -> None:
    # Given curves whose loss ticks are short (1.0) or long (a diverging 12345.6)
    loss = [loss_scale * v for v in (1.2, 0.8, 0.5)]
    history = {"accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.4, 0.6, 0.65], "loss": loss}
    figures = [
        plots.training_curves(history),
        plots.batch_curve(loss, "Loss", (0, max(2.0, *loss)), "Loss per training step"),
    ]
    for fig in figures:
        # When drawn
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        width, height = fig.bbox.width, fig.bbox.height
        # Then each panel's labels, tick labels and title lie inside the figure
        for ax in fig.axes:
            drawn = ax.get_tightbbox(renderer)
            assert drawn.x0 >= 0 and drawn.y0 >= 0, (loss_scale, drawn)
            assert drawn.x1 <= width and drawn.y1 <= height, (loss_scale, drawn)
        # and the right panel's labels stay off the left panel
        if len(fig.axes) == 2:
            left, right = fig.axes
            edge = left.get_window_extent(renderer).x1
            assert right.get_tightbbox(renderer).x0 > edge


def test_batch_curve_without_ylim_autoscales_to_data() -> None:
    ax = plots.batch_curve([0.2, 0.9], "Accuracy").axes[0]
    low, high = ax.get_ylim()
    assert low <= 0.2 and high >= 0.9 and high < 1.5


def test_confusion_matrix_counts_small_example() -> None:
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pred = [0, 1, 0, 1, 2, 2, 2, 0, 2]
    matrix = plots.confusion_matrix(true, pred, num_classes=3)
    expected = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 3]])
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix.sum(axis=1), np.bincount(true, minlength=3))
    np.testing.assert_array_equal(matrix.sum(axis=0), np.bincount(pred, minlength=3))


def test_confusion_matrix_keeps_absent_classes_and_rejects_bad_input() -> None:
    matrix = plots.confusion_matrix(np.array([0, 0]), np.array([0, 0]), num_classes=4)
    assert matrix.shape == (4, 4)
    assert matrix[0, 0] == 2 and matrix.sum() == 2
    with pytest.raises(ValueError, match="differ"):
        plots.confusion_matrix([0, 1], [0], num_classes=2)
    with pytest.raises(ValueError, match="lie in"):
        plots.confusion_matrix([0, 2], [0, 1], num_classes=2)


def test_confusion_matrix_figure_annotates_counts() -> None:
    matrix = np.array([[9, 1, 0], [0, 5, 2], [1, 0, 7]])
    fig = plots.confusion_matrix_figure(matrix, CLASSES)
    ax = fig.axes[0]
    assert ax.get_title() == "Confusion matrix (test)"
    assert ax.get_xlabel() == "Predicted"
    assert ax.get_ylabel() == "True"
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert ax.get_xticklabels()[0].get_rotation() != 0
    cells = {(t.get_position(), t.get_text()): t.get_color() for t in ax.texts}
    assert len(cells) == 9
    # Text positions are (x=column, y=row). Dark (large) cells get white text, light ones black.
    assert cells[((0, 0), "9")] == "white"
    assert cells[((2, 2), "7")] == "white"
    assert cells[((2, 1), "2")] == "black"
    assert cells[((2, 0), "0")] == "black"


def test_confusion_matrix_figure_rejects_mismatched_names() -> None:
    with pytest.raises(ValueError):
        plots.confusion_matrix_figure(np.zeros((2, 2)), CLASSES)


def test_overlay_curves_one_line_per_run() -> None:
    curves = {"lr=0.01": [0.5, 0.6, 0.7], "lr=0.001": [0.4, 0.5]}
    fig = plots.overlay_curves(curves, title="Sweep")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_title() == "Sweep"
    assert ax.get_ylabel() == "val_accuracy"
    assert ax.get_xlabel() == "Epoch"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(curves)
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), [1, 2])


def test_overlay_curves_many_runs_puts_small_legend_outside() -> None:
    curves = {f"run-{i}": [0.1 * i, 0.1 * i + 0.05] for i in range(12)}
    fig = plots.overlay_curves(curves)
    legend = fig.axes[0].get_legend()
    assert len(legend.get_texts()) == 12
    pixels = _render(fig)  # legend position is only final after a draw
    assert pixels.size
    legend_box = legend.get_window_extent()
    axes_box = fig.axes[0].get_window_extent()
    assert legend_box.x0 >= axes_box.x1
    assert legend.get_texts()[0].get_fontsize() < fig.axes[0].xaxis.label.get_fontsize()


# Draws a grid with a Japanese class name twice in a fresh process ("once" is per process) and
# prints the fonts its tiles ask for, the installed fonts and the warnings logged.
_CJK_SCRIPT = """
import json, logging
import numpy as np
from matplotlib import font_manager
from insect_exp import plots
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger().addHandler(handler)
names = ["\\u30ab\\u30d6\\u30c8\\u30e0\\u30b7", "beetle"]
for _ in range(2):
    fig = plots.sample_grid(np.zeros((2, 16, 16, 3), np.uint8), [0, 1], names)
families = [t.get_fontfamily() for t in fig.texts if t.get_gid() == "tile"]
installed = sorted({f.name for f in font_manager.fontManager.ttflist})
print(json.dumps({"families": families, "installed": installed, "warnings": warnings}))
"""


def test_cjk_class_names_fall_back_to_a_cjk_font_or_say_once_that_none_is_installed():
    # When a grid is drawn with a Japanese class name (twice, in a fresh process)
    done = subprocess.run(
        [sys.executable, "-c", _CJK_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)

    # Then its tile asks for an installed CJK font after the default one, or else one warning
    # says which package to add
    cjk, latin = seen["families"]
    cjk_warnings = [w for w in seen["warnings"] if "CJK" in w]
    if len(cjk) > 1:
        assert set(cjk[1:]) <= set(seen["installed"]) and cjk_warnings == []
    else:
        assert len(cjk_warnings) == 1 and "fonts-noto-cjk" in cjk_warnings[0]
    assert cjk[0] == latin[0] and latin == ["DejaVu Sans"]


def test_a_one_epoch_training_curve_shows_its_points_over_a_whole_epoch() -> None:
    # Given the history of a run of one epoch
    history = {"accuracy": [0.61], "val_accuracy": [0.67], "loss": [0.98], "val_loss": [0.67]}

    # When its curves are drawn
    fig = plots.training_curves(history)

    for ax in fig.axes:
        # Then the x axis has one tick, epoch 1, inside the view, not 0.96 ... 1.04
        assert list(ax.get_xticks()) == [1]
        low, high = ax.get_xlim()
        assert low < 1 < high
        # And each single point is a marker big enough to see
        for line in ax.lines:
            assert line.get_marker() not in ("", " ", "None", None) and line.get_markersize() >= 5


def test_a_sweep_overlay_keeps_runs_of_equal_values_apart() -> None:
    # Given a sweep whose runs reached the same values (same data, different seeds)
    curves = {f"seed={i}": [0.5, 0.6, 0.7] for i in range(5)}

    # When their curves are overlaid
    ax = plots.overlay_curves(curves).axes[0]

    # Then each run's line looks different, so none hides another under it
    styles = {(line.get_marker(), line.get_linestyle()) for line in ax.lines}
    assert len(styles) == len(curves), styles
    # And hollow markers, a little transparent, leave the ones beneath visible
    assert all(line.get_fillstyle() == "none" for line in ax.lines)
    assert all(line.get_alpha() is not None and line.get_alpha() < 1 for line in ax.lines)
    # And whole epochs on the x axis
    assert list(ax.get_xticks()) == [1, 2, 3]
