"""Test-time augmentation: a model's class probabilities averaged over views of each image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from insect_exp.config import TTA


def views(images: Any, policy: TTA) -> list[np.ndarray]:
    """The images (N, H, W, 3) as the model sees them under `policy`: themselves, and for flip
    their horizontal mirror images too."""
    images = np.asarray(images)
    if policy is TTA.flip:
        return [images, images[:, :, ::-1, :]]
    return [images]


def probabilities(
    logits: Callable[[Any], np.ndarray], images: Any, policy: TTA, temperature: float = 1.0
) -> np.ndarray:
    """The mean over the views of each image of softmax(logits(view) / temperature),
    (N, classes)."""
    from insect_exp.calibration import probabilities

    return np.mean([probabilities(logits(v), temperature) for v in views(images, policy)], axis=0)


def multilabel_probabilities(
    logits: Callable[[Any], np.ndarray], images: Any, policy: TTA
) -> np.ndarray:
    """The mean over the views of each image of sigmoid(logits(view)), (N, classes): a
    multi-label model's (task=multilabel)."""
    from scipy.special import expit

    return np.mean([expit(np.asarray(logits(v), np.float64)) for v in views(images, policy)], 0)


def as_logits(probs: np.ndarray) -> np.ndarray:
    """Logits whose softmax is `probs` (their logarithm), for scores that take logits."""
    return np.log(np.maximum(probs, np.finfo(np.float64).tiny))
