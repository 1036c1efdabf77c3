"""Statistics shared by sweeps and comparisons, from scipy: a mean's confidence interval, and
paired tests of two models on the same images (exact McNemar, paired bootstrap intervals)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """The mean of n values, their sample standard deviation and a two-sided Student's t
    interval at `confidence` (low = high = mean when n is 1: one value has no spread)."""

    mean: float
    std: float
    low: float
    high: float
    n: int
    confidence: float = 0.95


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of `values` with its Student's t confidence interval."""
    from scipy import stats

    if not values:
        raise ValueError("no values: a mean needs at least one")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, mean, mean, 1, confidence)
    if min(values) == max(values):  # no spread (scipy's t gives NaN bounds for a zero scale)
        return Interval(mean, 0.0, mean, mean, n, confidence)
    std = float(stats.tstd(values))
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return Interval(mean, std, float(low), float(high), n, confidence)


# -- paired comparisons on the same images ---------------------------------------------------


def mcnemar_p(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """The exact McNemar test's two-sided p of two models scored on the same images.

    Only the discordant images count (right for one model, wrong for the other); under the null
    each is equally likely either way, so their split is Binomial(n, 1/2) (scipy's binomtest).
    With no discordant image there is nothing against the null: p = 1.
    """
    from scipy import stats

    only_a = int(np.count_nonzero(a_right & ~b_right))
    only_b = int(np.count_nonzero(b_right & ~a_right))
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_b, only_a + only_b, 0.5).pvalue)


def macro_f1(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 along the last axis (each row a resample); a class's F1 is 0 where undefined."""
    scores = []
    for c in range(num_classes):
        is_true, is_pred = true == c, predicted == c
        hits = np.count_nonzero(is_true & is_pred, axis=-1)
        both = np.count_nonzero(is_true, axis=-1) + np.count_nonzero(is_pred, axis=-1)
        scores.append(np.divide(2 * hits, both, out=np.zeros(hits.shape), where=both > 0))
    return np.mean(scores, axis=0)


@dataclass(frozen=True)
class Difference:
    """B's score minus A's on the same images, with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    confidence: float = 0.95


def _interval(estimate: float, resampled: np.ndarray, confidence: float) -> Difference:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Difference(float(estimate), float(low), float(high), confidence)


def _resamples(n: int, resamples: int, seed: int, chunk: int = 256) -> Iterator[np.ndarray]:
    """Rows of image indices drawn with replacement, `chunk` rows at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        yield rng.integers(0, n, (min(chunk, resamples - start), n))


def paired_bootstrap(
    true: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    num_classes: int,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Difference]:
    """Bootstrap intervals of B's accuracy and macro F1 minus A's: the same images resampled for
    both models (paired), seeded so reruns agree. Keys `accuracy` and `macro_f1`."""
    true, a, b = (np.asarray(x) for x in (true, a, b))
    if not len(true):
        raise ValueError("no images: a difference needs at least one")
    accuracy, f1 = [], []
    for rows in _resamples(len(true), resamples, seed):
        t, pa, pb = true[rows], a[rows], b[rows]
        accuracy.append(np.mean(pb == t, axis=1) - np.mean(pa == t, axis=1))
        f1.append(macro_f1(t, pb, num_classes) - macro_f1(t, pa, num_classes))
    acc_point = float(np.mean(b == true) - np.mean(a == true))
    f1_point = float(macro_f1(true, b, num_classes) - macro_f1(true, a, num_classes))
    return {
        "accuracy": _interval(acc_point, np.concatenate(accuracy), confidence),
        "macro_f1": _interval(f1_point, np.concatenate(f1), confidence),
    }


def per_class_differences(
    true: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    num_classes: int,
    resamples: int = 2000,
    seed: int = 0,
) -> list[Difference | None]:
    """Each class's accuracy (recall) of B minus A, with a paired bootstrap interval over that
    class's images; None for a class with no image."""
    true, a, b = (np.asarray(x) for x in (true, a, b))
    found: list[Difference | None] = []
    for c in range(num_classes):
        where = np.flatnonzero(true == c)
        if not len(where):
            found.append(None)
            continue
        a_right, b_right = a[where] == c, b[where] == c
        diffs = [
            np.mean(b_right[rows], axis=1) - np.mean(a_right[rows], axis=1)
            for rows in _resamples(len(where), resamples, seed + c)
        ]
        point = float(b_right.mean() - a_right.mean())
        found.append(_interval(point, np.concatenate(diffs), 0.95))
    return found
