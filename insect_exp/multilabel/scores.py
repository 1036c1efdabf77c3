"""Multi-label scores (task=multilabel): each image has a set of classes, one sigmoid per class.

- F1 at a threshold: a class is predicted where its probability is at least the threshold (the
  global `threshold`, or each class's own). Micro F1 pools every (image, class) decision; macro F1
  is the mean of the classes' own F1 (0 for a class never true nor predicted).
- Average precision (AP) of a class: the mean of the precision at each of its true images, the
  images ranked by probability (scikit-learn's `average_precision_score`); mAP is the mean over
  the classes that have a true image.
- Per-class thresholds: each class's threshold maximises its F1 on the validation split (the
  lowest of equally good ones); a class without a true validation image keeps the global one.
- `accuracy` (binary accuracy): the fraction of (image, class) decisions right at the threshold,
  so that early stopping, sweeps and the batch curves keep a measure where higher is better.

NumPy, SciPy and scikit-learn only: the logging process draws the curves without TensorFlow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.metrics import average_precision_score, precision_recall_curve

THRESHOLDS_JSON = "thresholds.json"


def probabilities(logits: np.ndarray) -> np.ndarray:
    """sigmoid(logits), element by element, in float64."""
    return expit(np.asarray(logits, dtype=np.float64))


def binary_crossentropy(logits: np.ndarray, labels: np.ndarray, smoothing: float = 0.0) -> float:
    """Mean sigmoid cross-entropy on logits, targets smoothed to (1 - s) * y + s / 2 as Keras's."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64) * (1 - smoothing) + smoothing / 2
    # max(z, 0) - z * y + log(1 + exp(-|z|)): the stable form (TensorFlow's too).
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def predicted(probs: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """The multi-hot predictions (uint8): probability at least the (per-class) threshold."""
    return (np.asarray(probs) >= np.asarray(thresholds)).astype(np.uint8)


def f1(labels: np.ndarray, probs: np.ndarray, thresholds: float | np.ndarray) -> dict[str, float]:
    """micro_f1 and macro_f1 of the predictions at the thresholds."""
    guess = predicted(probs, thresholds).astype(bool)
    true = np.asarray(labels).astype(bool)
    # 2 TP / (2 TP + FP + FN) per class and pooled: the counts hold one column as well as many
    # (scikit-learn's f1_score reads a single column as a binary target, not one label).
    tp = (guess & true).sum(axis=0)
    wrong = (guess != true).sum(axis=0)
    per_class = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(len(tp)), where=(2 * tp + wrong) > 0)
    pooled = 2 * tp.sum() + wrong.sum()
    return {
        "micro_f1": float(2 * tp.sum() / pooled) if pooled else 0.0,
        "macro_f1": float(per_class.mean()),
    }


def average_precisions(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each class's AP (NaN for a class without a true image)."""
    labels = np.asarray(labels)
    return np.array(
        [
            average_precision_score(labels[:, c], probs[:, c]) if labels[:, c].any() else math.nan
            for c in range(labels.shape[1])
        ]
    )


def mean_ap(aps: np.ndarray) -> float:
    """The mean of the classes' APs that are defined (NaN if none is)."""
    defined = aps[~np.isnan(aps)]
    return float(defined.mean()) if defined.size else math.nan


def tune_thresholds(labels: np.ndarray, probs: np.ndarray, default: float) -> np.ndarray:
    """Each class's F1-maximising threshold on these scores; `default` for a class with no true
    image."""
    labels = np.asarray(labels)
    found = np.full(labels.shape[1], default, dtype=np.float64)
    for c in range(labels.shape[1]):
        if not labels[:, c].any():
            continue
        precision, recall, cuts = precision_recall_curve(labels[:, c], probs[:, c])
        # The last (precision 1, recall 0) point has no threshold.
        p, r = precision[:-1], recall[:-1]
        scores = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
        found[c] = cuts[int(np.argmax(scores))]  # cuts rise: the first best is the lowest
    return found


def scores(
    logits: np.ndarray, labels: np.ndarray, threshold: float = 0.5, smoothing: float = 0.0
) -> dict[str, float]:
    """loss, accuracy (binary), micro_f1, macro_f1 and map of logits against multi-hot labels."""
    probs = probabilities(logits)
    labels = np.asarray(labels)
    found = {
        "loss": binary_crossentropy(logits, labels, smoothing),
        "accuracy": float((predicted(probs, threshold) == labels).mean()),
    }
    found.update(f1(labels, probs, threshold))
    found["map"] = mean_ap(average_precisions(labels, probs))
    return found


def label_sets(multi_hot: np.ndarray, class_names: list[str]) -> list[list[str]]:
    """Each row's class names."""
    return [[class_names[i] for i in np.flatnonzero(row)] for row in np.asarray(multi_hot)]


def thresholds_record(class_names: list[str], thresholds: np.ndarray, default: float) -> dict:
    """What thresholds.json holds: the global threshold and each class's tuned one."""
    per_class = {name: float(t) for name, t in zip(class_names, thresholds, strict=True)}
    return {"threshold": default, "per_class": per_class}


def saved_thresholds(module: Any) -> np.ndarray | None:
    """A loaded SavedModel's per-class thresholds (its variable `thresholds`); None for a
    single-label model."""
    variable = getattr(module, "thresholds", None)
    return None if variable is None else np.asarray(variable.numpy(), dtype=np.float64)
