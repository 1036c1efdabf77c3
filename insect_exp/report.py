"""What a finished run shows in MLflow: plots, dataset stats and summaries, built from results."""

from __future__ import annotations

import numpy as np

from insect_exp import plots
from insect_exp.config import PreviewConfig
from insect_exp.data.pipeline import Data, ImageSplit
from insect_exp.fit import History
from insect_exp.tracking import Run


def _sample(split: ImageSplit, count: int, seed: int) -> np.ndarray:
    """A seeded random pick of indices, so grids show every class rather than the first one."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(split), size=min(count, len(split)), replace=False))


def log_data(run: Run, data: Data, seed: int) -> None:
    """Dataset stats, class names, skipped files, and 3x3 sample grids of each split."""
    stats = data.stats()
    run.log_dict(stats, "dataset/stats.json")
    run.log_dict(data.class_names, "class_names.json")
    run.log_params({f"data.num_{k}": v for k, v in stats["num_images"].items()})
    run.log_metrics({"skipped_files": len(data.skipped)})
    if data.skipped:
        lines = [f"{path}\t{reason}" for path, reason in data.skipped]
        run.log_text("\n".join(lines) + "\n", "dataset/skipped.tsv")
    grids = {"train": data.train, "test": data.test if data.test is not None else data.val}
    for name, split in grids.items():
        idx = _sample(split, 9, seed)
        fig = plots.sample_grid(split.images[idx], split.labels[idx], data.class_names, name)
        run.log_figure(fig, f"plots/{name}_samples.png")


def log_training(run: Run, history: History) -> None:
    """Accuracy/loss curves per epoch and loss/accuracy per training step."""
    run.log_series({"batch_loss": history.batch_loss, "batch_accuracy": history.batch_accuracy})
    run.log_figure(plots.training_curves(history.epochs), "plots/training_curves.png")
    run.log_figure(plots.batch_curve(history.batch_loss, "Loss", (0, 2)), "plots/batch_loss.png")
    run.log_figure(
        plots.batch_curve(history.batch_accuracy, "Accuracy", (0, 1)), "plots/batch_accuracy.png"
    )


def log_predictions(
    run: Run, split: ImageSplit, logits: np.ndarray, class_names: list[str], seed: int
) -> None:
    """A grid of predictions (wrong ones marked), a confusion matrix, per-image predictions."""
    predicted = logits.argmax(axis=1)
    idx = _sample(split, 30, seed)
    fig = plots.prediction_grid(
        split.images[idx], predicted[idx], class_names, true=split.labels[idx]
    )
    run.log_figure(fig, "plots/test_predictions.png")
    matrix = plots.confusion_matrix(split.labels, predicted, len(class_names))
    run.log_figure(plots.confusion_matrix_figure(matrix, class_names), "plots/confusion_matrix.png")
    run.log_dict({"class_names": class_names, "matrix": matrix.tolist()}, "confusion_matrix.json")
    rows = ["path\ttrue\tpredicted"] + [
        f"{p}\t{class_names[t]}\t{class_names[q]}"
        for p, t, q in zip(split.paths, split.labels, predicted, strict=True)
    ]
    run.log_text("\n".join(rows) + "\n", "predictions.tsv")


def log_imagenet_preview(run: Run, split: ImageSplit, preview: PreviewConfig, seed: int) -> None:
    """The post's "ImageNet predictions" grid: a full classifier's labels for sample images."""
    from insect_exp.models.hub import imagenet_preview

    idx = _sample(split, preview.num_images, seed)
    names = imagenet_preview(preview.handle, preview.labels, split.images[idx])
    cols = min(5, len(idx))
    fig = plots.prediction_grid(
        split.images[idx],
        np.arange(len(idx)),
        names,
        title="ImageNet predictions",
        rows=-(-len(idx) // cols),
        cols=cols,
    )
    run.log_figure(fig, "plots/imagenet_predictions.png")
    rows = ["path\timagenet_label"] + [
        f"{split.paths[i]}\t{n}" for i, n in zip(idx, names, strict=True)
    ]
    run.log_text("\n".join(rows) + "\n", "imagenet_predictions.tsv")
