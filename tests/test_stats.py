import math

import numpy as np
import pytest

from insect_exp.stats import mean_interval


def test_the_t_interval_is_the_textbook_one():
    values = [0.81, 0.84, 0.79, 0.88, 0.83]
    got = mean_interval(values)
    # t quantile for 4 degrees of freedom at 97.5%, from the table.
    half = 2.7764451 * np.std(values, ddof=1) / math.sqrt(len(values))
    assert got.mean == pytest.approx(np.mean(values))
    assert got.std == pytest.approx(np.std(values, ddof=1))
    assert (got.low, got.high) == pytest.approx((got.mean - half, got.mean + half), rel=1e-6)
    assert got.n == 5


def test_one_value_or_equal_values_have_no_spread():
    assert mean_interval([0.5]).low == mean_interval([0.5]).high == 0.5
    same = mean_interval([0.7, 0.7, 0.7])
    assert same.std == 0.0
    assert same.low == same.mean == same.high == pytest.approx(0.7)


def test_no_values_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
