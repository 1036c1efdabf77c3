"""Statistics shared by sweeps and comparisons, from scipy: a mean's confidence interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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
