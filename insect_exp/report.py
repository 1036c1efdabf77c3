"""What a finished run shows in MLflow: plots, dataset stats and summaries, built from results."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from insect_exp import plots
from insect_exp.data.pipeline import Data, ImageSplit
from insect_exp.fit import History
from insect_exp.tracking import Run
from insect_exp.tracking.lineage import SplitRecord


def sample(split: ImageSplit, count: int, seed: int) -> np.ndarray:
    """A seeded random pick of indices, so grids show every class rather than the first one."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(split), size=min(count, len(split)), replace=False))


def log_data(run: Run, data: Data, seed: int) -> None:
    """Dataset stats, class names, skipped files, the splits' lineage (MLflow dataset inputs), and
    3x3 sample grids of each split."""
    stats = data.stats()
    run.log_dict(stats, "dataset/stats.json")
    run.log_dict(data.class_names, "class_names.json")
    run.log_params(
        {
            **{f"data.num_{k}": v for k, v in stats["num_images"].items()},
            "data.storage": data.storage,
        }
    )
    run.log_metrics({"skipped_files": len(data.skipped)})
    if data.skipped:
        run.log_table(["path", "reason"], data.skipped, "dataset/skipped.tsv")
    run.log_inputs(lineage(data))
    grids = {"train": data.train, "test": data.test if data.test is not None else data.val}
    for name, split in grids.items():
        idx = sample(split, 9, seed)
        fig = plots.sample_grid(split.images[idx], split.labels[idx], data.class_names, name)
        run.log_figure(fig, f"plots/{name}_samples.png")


def lineage(data: Data) -> list[SplitRecord]:
    """The train, val and test splits as dataset inputs: source, content digest, class counts."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    stats = data.stats()["images_per_class"]
    base = Path(data.source).name or "dataset"
    root = data.source if Path(data.source).is_dir() else str(Path(data.source).parent)
    return [
        SplitRecord(
            context=name,
            name=f"{base}/{name}",
            source=data.source,
            digest=split.content_digest(root, data.class_names),
            profile={"num_images": len(split), "class_counts": stats[name]},
        )
        for name, split in splits.items()
        if split is not None and split.fingerprints is not None
    ]


def log_training(run: Run, history: History) -> None:
    """Curves per epoch and per training step; where early stopping stopped, if it did.

    The curves are drawn from what the run holds (the metrics went there as training went), so a
    resumed run's curves cover the epochs before the interruption too.
    """
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
    stopping = {"best_epoch": history.best_epoch, "stopped_epoch": history.stopped_epoch}
    run.log_metrics({k: v for k, v in stopping.items() if v is not None})


def log_predictions(
    run: Run, split: ImageSplit, logits: np.ndarray, class_names: list[str], seed: int
) -> None:
    """A grid of predictions (wrong ones marked), a confusion matrix, per-image predictions."""
    predicted = logits.argmax(axis=1)
    idx = sample(split, 30, seed)
    fig = plots.prediction_grid(
        split.images[idx], predicted[idx], class_names, true=split.labels[idx]
    )
    run.log_figure(fig, "plots/test_predictions.png")
    matrix = plots.confusion_matrix(split.labels, predicted, len(class_names))
    run.log_figure(plots.confusion_matrix_figure(matrix, class_names), "plots/confusion_matrix.png")
    run.log_dict({"class_names": class_names, "matrix": matrix.tolist()}, "confusion_matrix.json")
    rows = (
        (p, class_names[t], class_names[q])
        for p, t, q in zip(split.paths, split.labels, predicted, strict=True)
    )
    run.log_table(["path", "true", "predicted"], rows, "predictions.tsv")


def log_artifacts(run: Run, artifacts: Mapping[str, Any]) -> None:
    """Log a recipe's extra artifacts: Figures as PNG, text as is, (header, rows) as TSV."""
    for path, item in artifacts.items():
        if isinstance(item, Figure):
            run.log_figure(item, path)
        elif isinstance(item, str):
            run.log_text(item, path)
        else:
            header, rows = item
            run.log_table(header, rows, path)
