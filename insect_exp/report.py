"""What a finished run shows in MLflow: plots, dataset stats and summaries, built from results.

Each report comes in two halves. The training process cuts what it needs from its results
(`summarize_*`: a few sample images, labels, counts), small enough to send to the logging process
(tracking/remote.py); `log_*_summary` draws and logs it there, so matplotlib and MLflow run beside
training rather than in its process. `log_data` and `log_predictions` do both halves in one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# Per-image test probabilities of a training run, one column per class after `path` and `true`.
PROBABILITIES_TSV = "predictions/test.tsv"

if TYPE_CHECKING:
    from insect_exp.data.pipeline import Data, ImageSplit
    from insect_exp.tracking import Run


def sample(split: ImageSplit, count: int, seed: int) -> np.ndarray:
    """A seeded random pick of indices, so grids show every class rather than the first one."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(split), size=min(count, len(split)), replace=False))


@dataclass(frozen=True)
class DataSummary:
    """What a run logs about its data: stats, lineage and 3x3 samples of the train and test split.

    Attributes:
        splits: each split's lineage record (tracking.lineage.SplitRecord's fields).
        samples: by split, the sample images and their labels.
    """

    stats: dict[str, Any]
    class_names: list[str]
    storage: str
    skipped: list[tuple[str, str]]
    splits: list[dict[str, Any]]
    samples: dict[str, tuple[np.ndarray, np.ndarray]]
    audit: Any = None  # data.audit: duplicates.Audit, or None


def summarize_data(data: Data, seed: int) -> DataSummary:
    samples = {}
    grids = {"train": data.train, "test": data.test if data.test is not None else data.val}
    for name, split in grids.items():
        idx = sample(split, 9, seed)
        samples[name] = (split.images[idx], split.labels[idx])
    stats = data.stats()
    if data.audit is not None:
        stats.update(data.audit.stats())
    return DataSummary(
        stats, list(data.class_names), data.storage, list(data.skipped), lineage(data),
        samples, data.audit,
    )  # fmt: skip


def log_data(run: Run, data: Data, seed: int) -> None:
    """Dataset stats, class names, skipped files, the splits' lineage (MLflow dataset inputs), and
    3x3 sample grids of each split."""
    log_data_summary(run, summarize_data(data, seed))


def log_data_summary(run: Run, summary: DataSummary) -> None:
    from insect_exp import plots
    from insect_exp.tracking.lineage import SplitRecord

    stats = summary.stats
    run.log_dict(stats, "dataset/stats.json")
    run.log_dict(summary.class_names, "class_names.json")
    run.log_params(
        {
            **{f"data.num_{k}": v for k, v in stats["num_images"].items()},
            "data.storage": summary.storage,
        }
    )
    run.log_metrics({"skipped_files": len(summary.skipped)})
    if summary.skipped:
        run.log_table(["path", "reason"], summary.skipped, "dataset/skipped.tsv")
    run.log_inputs([SplitRecord(**record) for record in summary.splits])
    for name, (images, labels) in summary.samples.items():
        fig = plots.sample_grid(images, labels, summary.class_names, name)
        run.log_figure(fig, f"plots/{name}_samples.png")
    if summary.audit is not None:
        from insect_exp.dataset_report import log_audit

        log_audit(run, summary.audit, stats["images_per_class"])


def lineage(data: Data) -> list[dict[str, Any]]:
    """The train, val and test splits as dataset inputs: source, content digest, class counts.

    Each as the fields of a tracking.lineage.SplitRecord (whose module imports MLflow).
    """
    splits = {"train": data.train, "val": data.val, "test": data.test}
    stats = data.stats()["images_per_class"]
    base = Path(data.source).name or "dataset"
    root = data.source if Path(data.source).is_dir() else str(Path(data.source).parent)
    return [
        dict(
            context=name,
            name=f"{base}/{name}",
            source=data.source,
            digest=split.content_digest(root, data.class_names),
            profile={"num_images": len(split), "class_counts": stats[name]},
        )
        for name, split in splits.items()
        if split is not None and split.fingerprints is not None
    ]


def log_training(run: Run, best_epoch: int | None, stopped_epoch: int | None) -> None:
    """Curves per epoch and per training step; where early stopping stopped, if it did.

    The curves are drawn from what the run holds (the metrics went there as training went), so a
    resumed run's curves cover the epochs before the interruption too.
    """
    from insect_exp import plots

    stored = run.metric_history(
        ["loss", "accuracy", "val_loss", "val_accuracy", "batch_loss", "batch_accuracy"]
    )
    epochs = {k: v for k, v in stored.items() if not k.startswith("batch_") and v}
    run.log_figure(plots.training_curves(epochs), "plots/training_curves.png")
    losses, accuracies = stored["batch_loss"], stored["batch_accuracy"]
    top = max([2.0, *losses])
    loss = plots.batch_curve(losses, "Loss", (0, top), "Loss per training step")
    run.log_figure(loss, "plots/batch_loss.png")
    accuracy = plots.batch_curve(accuracies, "Accuracy", (0, 1), "Accuracy per training step")
    run.log_figure(accuracy, "plots/batch_accuracy.png")
    stopping = {"best_epoch": best_epoch, "stopped_epoch": stopped_epoch}
    run.log_metrics({k: v for k, v in stopping.items() if v is not None})


@dataclass(frozen=True)
class PredictionSummary:
    """What a run logs about its test predictions: every image's, and 30 samples to draw."""

    class_names: list[str]
    paths: list[str]
    labels: np.ndarray
    predicted: np.ndarray
    sample_images: np.ndarray
    sample_index: np.ndarray
    probabilities: np.ndarray | None = None  # (images, classes)


def summarize_predictions(
    split: ImageSplit, logits: np.ndarray, class_names: list[str], seed: int
) -> PredictionSummary:
    from insect_exp.calibration import probabilities  # not serving's: it imports MLflow

    idx = sample(split, 30, seed)
    predicted = logits.argmax(axis=1)
    return PredictionSummary(
        list(class_names), list(split.paths), split.labels, predicted, split.images[idx], idx,
        probabilities(logits),
    )  # fmt: skip


def log_predictions(
    run: Run, split: ImageSplit, logits: np.ndarray, class_names: list[str], seed: int
) -> None:
    """A grid of predictions (wrong ones marked), a confusion matrix, per-image predictions."""
    log_prediction_summary(run, summarize_predictions(split, logits, class_names, seed))


def log_prediction_summary(run: Run, summary: PredictionSummary) -> None:
    from insect_exp import plots

    names, labels, predicted, idx = (
        summary.class_names, summary.labels, summary.predicted, summary.sample_index,
    )  # fmt: skip
    fig = plots.prediction_grid(summary.sample_images, predicted[idx], names, true=labels[idx])
    run.log_figure(fig, "plots/test_predictions.png")
    matrix = plots.confusion_matrix(labels, predicted, len(names))
    run.log_figure(plots.confusion_matrix_figure(matrix, names), "plots/confusion_matrix.png")
    run.log_dict({"class_names": names, "matrix": matrix.tolist()}, "confusion_matrix.json")
    rows = (
        (p, names[t], names[q]) for p, t, q in zip(summary.paths, labels, predicted, strict=True)
    )
    run.log_table(["path", "true", "predicted"], rows, "predictions.tsv")
    if summary.probabilities is not None:
        # Every class's probability: what `python -m insect_exp.compare` reuses (an ensemble of
        # replicates averages them) instead of running the model on the test split again.
        probabilities = (
            (p, names[t], *(f"{x:.6g}" for x in row))
            for p, t, row in zip(summary.paths, labels, summary.probabilities, strict=True)
        )
        run.log_table(["path", "true", *names], probabilities, PROBABILITIES_TSV)


def log_artifacts(run: Run, artifacts: Mapping[str, Any]) -> None:
    """Log a recipe's extra artifacts: Figures as PNG, text as is, (header, rows) as TSV."""
    from matplotlib.figure import Figure

    for path, item in artifacts.items():
        if isinstance(item, Figure):
            run.log_figure(item, path)
        elif isinstance(item, str):
            run.log_text(item, path)
        else:
            header, rows = item
            run.log_table(header, rows, path)
