"""Where the model looks (Grad-CAM overlays) and what it gets most wrong (top losses).

A run logs `plots/gradcam.png` (a seeded sample of test images, half right and half wrong where
there are both, each under its Grad-CAM map: models/gradcam.py), and `top_losses.tsv` with
`plots/top_losses.png` (the test images of highest loss, the candidates for a wrong label); with
`report.top_losses_train=true` also `top_losses_train.tsv` and its plot. As in report.py, the
training process cuts what it needs (`summarize`), the logging process draws and logs it.
Neither may fail the run: a failure is one warning line.

`python -m insect_exp.predict ... explain=true` writes each image's overlay with `OverlayWriter`,
from the `gradcam` function saved in the model's SavedModel.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from insect_exp import UserError
from insect_exp.errors import first_line

if TYPE_CHECKING:
    from concurrent.futures import Future

    import tf_keras as keras

    from insect_exp.config import Config
    from insect_exp.data.pipeline import Data, ImageSplit
    from insect_exp.models import Recipe
    from insect_exp.serving import ImageClassifier
    from insect_exp.tracking import Run, TrackedRun

log = logging.getLogger(__name__)

TOP_LOSSES_HEADER = ["path", "true", "predicted", "probability", "probability_true", "loss"]
_SHOWN_LOSSES = 16  # tiles of plots/top_losses.png: 4 x 4
_ALPHA = 0.4  # the map's weight over the image


# -- numbers ---------------------------------------------------------------------------------


def losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's cross-entropy loss: -log softmax(logits)[label]."""
    from scipy.special import log_softmax

    log_probs = log_softmax(np.asarray(logits, np.float64), axis=1)
    return -log_probs[np.arange(len(labels)), np.asarray(labels, np.int64)]


def top_losses(logits: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """The indices of the `count` rows of highest loss, highest first (ties: lower index first)."""
    return np.argsort(-losses(logits, labels), kind="stable")[:count]


def top_loss_rows(
    split: ImageSplit, logits: np.ndarray, class_names: list[str], index: np.ndarray
) -> list[tuple[str, str, str, float, float, float]]:
    """top_losses.tsv's rows for `index`: path, true and predicted label, the probability of the
    prediction and of the true label, the loss."""
    from scipy.special import softmax

    probs = softmax(np.asarray(logits, np.float64), axis=1)
    loss = losses(logits, split.labels)
    rows = []
    for i in index:
        label, predicted = int(split.labels[i]), int(probs[i].argmax())
        rows.append((
            split.paths[i], class_names[label], class_names[predicted],
            round(float(probs[i, predicted]), 6), round(float(probs[i, label]), 6),
            round(float(loss[i]), 6),
        ))  # fmt: skip
    return rows


def right_and_wrong(predicted: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded pick of `count` indices, half wrongly and half rightly predicted where there are
    enough of each (the other kind fills in), in index order."""
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    n_wrong = min(len(wrong), max(count // 2, count - len(right)))
    n_right = min(len(right), count - n_wrong)
    picked = [rng.choice(wrong, n_wrong, replace=False), rng.choice(right, n_right, replace=False)]
    return np.sort(np.concatenate(picked).astype(np.int64))


def overlay(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) uint8 under their maps (N, H, W) in [0, 1], coloured by 'jet'."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(maps, 0, 1))[..., :3] * 255
    mixed = (1 - _ALPHA) * np.asarray(images, np.float64) + _ALPHA * heat
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


# -- a run's report --------------------------------------------------------------------------


@dataclass(frozen=True)
class LossTable:
    """The highest-loss images of a split, with their rows of top_losses.tsv."""

    name: str  # "" for the test split, "_train" for the training split
    images: np.ndarray
    rows: list[tuple[str, str, str, float, float, float]]


@dataclass(frozen=True)
class ExplainSummary:
    """What a run logs about where its model looks and what it gets most wrong."""

    class_names: list[str]
    images: np.ndarray | None  # the Grad-CAM sample; None: no Grad-CAM (see `skipped`)
    labels: np.ndarray
    predicted: np.ndarray
    skipped: str | None
    losses: list[LossTable]
    # The sample's maps (N, H, W) in [0, 1], drawn over the images in the logging process: the
    # training process never imports matplotlib.
    maps: np.ndarray | None = None


def gradcam_sample(
    model: keras.Model, split: ImageSplit, logits: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded sample (right_and_wrong) of `split`: its images, Grad-CAM maps and indices."""
    from insect_exp.models import gradcam

    index = right_and_wrong(logits.argmax(axis=1), split.labels, count, seed)
    images = np.asarray(split.images[index])
    maps, _ = gradcam.gradcam(gradcam.features_and_logits(model), images.astype(np.float32))
    return images, maps.numpy(), index


def summarize(
    model: keras.Model,
    split: ImageSplit,
    logits: np.ndarray,
    class_names: list[str],
    cfg: Config,
    train: tuple[ImageSplit, np.ndarray] | None = None,
) -> ExplainSummary:
    """Grad-CAM overlays of the test split (`split`), and its top losses (and `train`'s)."""
    from insect_exp.models.gradcam import NoFeatureMap

    names, report = list(class_names), cfg.report
    sample, maps, skipped, index = None, None, None, np.zeros(0, np.int64)
    if report.gradcam_images:
        try:
            sample, maps, index = gradcam_sample(
                model, split, logits, report.gradcam_images, cfg.seed
            )
        except NoFeatureMap as err:
            skipped = str(err)
    parts = [("", split, logits)] + ([("_train", *train)] if train is not None else [])
    tables = []
    for name, part, part_logits in parts if report.top_losses else []:
        top = top_losses(part_logits, part.labels, report.top_losses)
        images = np.stack([np.asarray(part.images[i]) for i in top[:_SHOWN_LOSSES]])
        tables.append(LossTable(name, images, top_loss_rows(part, part_logits, names, top)))
    predicted = logits.argmax(axis=1)[index]
    labels = split.labels[index]
    return ExplainSummary(names, sample, labels, predicted, skipped, tables, maps)


def submit(
    run: TrackedRun, cfg: Config, recipe: Recipe, model: keras.Model, data: Data, logits: np.ndarray
) -> list[Future]:
    """Summarize here, draw and log in the logging process; a failure of either is one warning.

    `logits`: the model's on the test split (else validation), as train evaluated it.
    """
    try:
        test = data.test if data.test is not None else data.val
        train = None
        if cfg.report.top_losses_train:
            train = (data.train, recipe.predict(model, data.train, cfg.batch_size))
        summary = summarize(model, test, logits, data.class_names, cfg, train)
    except Exception as err:  # noqa: BLE001  (an explanation never fails the run)
        log.warning("Grad-CAM and top losses not logged: %s", first_line(err))
        return []
    if summary.skipped:
        log.info("Grad-CAM skipped: %s", summary.skipped)
    return [run.submit(log_summary, summary)]


def log_summary(run: Run, summary: ExplainSummary) -> None:
    """plots/gradcam.png, and per split top_losses[_train].tsv and plots/top_losses[_train].png."""
    try:
        _log_summary(run, summary)
    except Exception as err:  # noqa: BLE001  (an explanation never fails the run)
        log.warning("Grad-CAM and top losses not logged: %s", first_line(err))


def _log_summary(run: Run, summary: ExplainSummary) -> None:
    from insect_exp import plots

    names = summary.class_names
    if summary.images is not None and len(summary.images):
        maps = summary.maps
        drawn = summary.images if maps is None else overlay(summary.images, maps)
        cols = min(4, len(drawn))
        figure = plots.prediction_grid(
            drawn, summary.predicted, names, true=summary.labels,
            title="Grad-CAM", rows=-(-len(drawn) // cols), cols=cols,
        )  # fmt: skip
        run.log_figure(figure, "plots/gradcam.png")
    for table in summary.losses:
        run.log_table(TOP_LOSSES_HEADER, table.rows, f"top_losses{table.name}.tsv")
        if not table.rows:
            continue
        shown = table.rows[: len(table.images)]
        titles = [
            f"{predicted[:14]} {p:.2f}\ntrue {true[:12]} {p_true:.2f}, loss {loss:.2f}"
            for _, true, predicted, p, p_true, loss in shown
        ]
        split = "training" if table.name else "test"
        title = f"Highest-loss {split} images: predicted, its probability (red if wrong); true"
        figure = plots.titled_grid(
            table.images, titles, f"{title} label, its probability; loss",
            wrong=[row[1] != row[2] for row in shown],
        )  # fmt: skip
        run.log_figure(figure, f"plots/top_losses{table.name}.png")


# -- predict explain=true --------------------------------------------------------------------


class OverlayWriter:
    """Writes each labelled file's Grad-CAM overlay as PNG, in batches, from the model's own
    `gradcam` function: <folder>/<the file's path under `root`>.png."""

    def __init__(self, classifier: ImageClassifier, folder: Path, root: Path, batch_size: int):
        self.classifier, self.folder, self.root = classifier, folder, root
        self.batch_size = batch_size
        self.pending: list[str] = []
        self.written = 0

    @classmethod
    def for_predict(
        cls, classifier: ImageClassifier, output: str, inputs: str, batch_size: int
    ) -> OverlayWriter:
        """Overlays beside the CSV `output`, in <its name without .csv>_gradcam/.

        Raises:
            UserError: the model has no `gradcam` function (exported before it existed, or its
                backbone shows no feature map).
        """
        if not hasattr(classifier.module, "gradcam"):
            raise UserError(
                "explain=true: this model has no Grad-CAM function (it was exported before "
                "insect_exp saved one, or its backbone shows only pooled features, as TF Hub "
                "layers do); train it again to explain its predictions"
            )
        csv = Path(output)
        root = Path(inputs).expanduser()
        folder = csv.with_name(f"{csv.stem}_gradcam")
        return cls(classifier, folder, root if root.is_dir() else root.parent, batch_size)

    def add(self, path: str) -> None:
        self.pending.append(path)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        import tensorflow as tf

        if not self.pending:
            return
        decode = self.classifier.decode
        images = np.stack([decode(tf.io.read_file(p)).numpy() for p in self.pending])
        maps = self.classifier.module.gradcam(tf.constant(images, tf.float32)).numpy()
        for path, pixels in zip(self.pending, overlay(images, maps), strict=True):
            self._save(Path(path), pixels)
        self.pending = []

    def _save(self, path: Path, pixels: np.ndarray) -> None:
        from PIL import Image

        try:
            relative = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            relative = Path(path.name)
        target = self.folder / relative.with_name(relative.name + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target)
        self.written += 1

    def close(self) -> None:
        """Write what is left, and say where the overlays are."""
        self.flush()
        print(f"predict: {self.written} Grad-CAM overlays in {self.folder}", file=sys.stderr)
