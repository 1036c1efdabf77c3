"""A multi-label run's end of training: thresholds tuned on validation, the test scores, and
what the logging process draws and logs of them (as insect_exp/report.py for one label).

Logged: `val_micro_f1_tuned`, `val_macro_f1_tuned` and thresholds.json (the global threshold and
each class's); `test_loss`, `test_accuracy` (binary), `test_micro_f1`, `test_macro_f1`, `test_map`
at the global threshold and `test_micro_f1_tuned`, `test_macro_f1_tuned` at the classes' own;
per_class.tsv (each class's AP, threshold and true test images), predictions.tsv (true and
predicted label sets), predictions/test.tsv (every class's probability),
plots/precision_recall.png and plots/test_predictions.png (predicted and true label sets).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from insect_exp.data.multilabel import SEPARATOR
from insect_exp.multilabel import scores
from insect_exp.multilabel.scores import THRESHOLDS_JSON
from insect_exp.report import PROBABILITIES_TSV, sample

if TYPE_CHECKING:
    from insect_exp.data.pipeline import ImageSplit
    from insect_exp.tracking import Run, TrackedRun

log = logging.getLogger(__name__)


def tune(
    run: TrackedRun,
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    threshold: float,
    step: int,
) -> np.ndarray:
    """Each class's F1-maximising threshold on the validation logits, logged (thresholds.json and
    the validation F1 at them)."""
    probs = scores.probabilities(logits)
    thresholds = scores.tune_thresholds(labels, probs, threshold)
    run.log_dict(scores.thresholds_record(class_names, thresholds, threshold), THRESHOLDS_JSON)
    tuned = scores.f1(labels, probs, thresholds)
    run.log_metrics({f"val_{k}_tuned": v for k, v in tuned.items()}, step)
    log.info("per-class thresholds tuned on validation: micro F1 %.4f", tuned["micro_f1"])
    return thresholds


@dataclass(frozen=True)
class Summary:
    """What the logging process needs to draw and log the test predictions."""

    class_names: list[str]
    paths: list[str]
    labels: np.ndarray  # (images, classes) multi-hot
    probabilities: np.ndarray
    thresholds: np.ndarray
    average_precisions: np.ndarray
    sample_images: np.ndarray
    sample_index: np.ndarray


def evaluate(
    run: TrackedRun,
    split: ImageSplit,
    logits: np.ndarray,
    class_names: list[str],
    thresholds: np.ndarray,
    threshold: float,
    step: int,
) -> tuple[float, list[Future]]:
    """The test scores logged; the binary accuracy, and the report handed to the logging
    process."""
    labels = np.asarray(split.labels)
    probs = scores.probabilities(logits)
    found = scores.scores(logits, labels, threshold)
    found.update({f"{k}_tuned": v for k, v in scores.f1(labels, probs, thresholds).items()})
    run.log_metrics({f"test_{k}": v for k, v in found.items()}, step)
    log.info(
        "test micro F1 %.4f (%.4f at the tuned thresholds), mAP %.4f",
        found["micro_f1"], found["micro_f1_tuned"], found["map"],
    )  # fmt: skip
    index = sample(split, 30, 0)
    summary = Summary(
        list(class_names), list(split.paths), labels, probs, thresholds,
        scores.average_precisions(labels, probs), split.images[index], index,
    )  # fmt: skip
    return found["accuracy"], [run.submit(log_summary, summary)]


def log_summary(run: Run, summary: Summary) -> None:
    """Per-class AP and thresholds, the label sets and probabilities, and the two figures."""
    from insect_exp import plots
    from insect_exp.multilabel.plots import precision_recall_curves

    names, labels, probs = summary.class_names, summary.labels, summary.probabilities
    guess = scores.predicted(probs, summary.thresholds)
    true_sets = [SEPARATOR.join(s) for s in scores.label_sets(labels, names)]
    guess_sets = [SEPARATOR.join(s) for s in scores.label_sets(guess, names)]
    per_class = [
        (name, f"{ap:.6g}", f"{t:.6g}", int(n))
        for name, ap, t, n in zip(
            names, summary.average_precisions, summary.thresholds, labels.sum(axis=0), strict=True
        )
    ]
    run.log_table(["class", "ap", "threshold", "true_images"], per_class, "per_class.tsv")
    rows = list(zip(summary.paths, true_sets, guess_sets, strict=True))
    run.log_table(["path", "true", "predicted"], rows, "predictions.tsv")
    table = [
        (p, t, *(f"{x:.6g}" for x in row))
        for p, t, row in zip(summary.paths, true_sets, probs, strict=True)
    ]
    run.log_table(["path", "true", *names], table, PROBABILITIES_TSV)
    figure = precision_recall_curves(labels, probs, names, summary.average_precisions)
    run.log_figure(figure, "plots/precision_recall.png")
    index = summary.sample_index
    titles = [f"{guess_sets[i] or '(none)'}\ntrue: {true_sets[i]}" for i in index]
    wrong = [bool((guess[i] != labels[i]).any()) for i in index]
    grid = plots.titled_grid(
        summary.sample_images, titles, "Predicted label sets (red: not the true set)", 5, wrong
    )
    run.log_figure(grid, "plots/test_predictions.png")
