import math

import numpy as np
import pytest
from scipy import stats

from insect_exp.stats import mcnemar_p, mean_interval, paired_bootstrap, per_class_differences


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


# -- paired tests ----------------------------------------------------------------------------


def test_identical_predictions_differ_by_nothing_with_p_1():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 3, 60)
    predicted = np.where(rng.random(60) < 0.7, true, (true + 1) % 3)
    right = predicted == true

    assert mcnemar_p(right, right) == 1.0
    found = paired_bootstrap(true, predicted, predicted, 3, resamples=200)
    for difference in found.values():
        assert difference.estimate == difference.low == difference.high == 0.0
    assert all(d.estimate == 0.0 for d in per_class_differences(true, predicted, predicted, 3))


@pytest.mark.parametrize(("only_a", "only_b"), [(3, 12), (10, 10), (0, 7), (25, 11)])
def test_mcnemar_p_is_scipys_exact_binomial_test_on_the_discordant_images(only_a, only_b):
    # Given: 40 images both get right, 9 both get wrong, and the discordant counts.
    a_right = np.array([True] * 40 + [False] * 9 + [True] * only_a + [False] * only_b)
    b_right = np.array([True] * 40 + [False] * 9 + [False] * only_a + [True] * only_b)

    expected = stats.binomtest(only_b, only_a + only_b, 0.5).pvalue
    assert mcnemar_p(a_right, b_right) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_p(b_right, a_right) == pytest.approx(expected, rel=1e-12)


def test_the_paired_bootstrap_is_seeded_and_covers_the_true_difference_about_95_percent():
    # Given: models right with probabilities 0.75 and 0.70 on each image, independently; the
    # true difference of their accuracies is 0.05.
    rng = np.random.default_rng(7)
    covered, repetitions, n = 0, 200, 300
    for i in range(repetitions):
        true = rng.integers(0, 2, n)
        a = np.where(rng.random(n) < 0.70, true, 1 - true)
        b = np.where(rng.random(n) < 0.75, true, 1 - true)
        got = paired_bootstrap(true, a, b, 2, resamples=300, seed=i)["accuracy"]
        covered += got.low <= 0.05 <= got.high
    assert 0.90 <= covered / repetitions <= 0.99

    again = paired_bootstrap(true, a, b, 2, resamples=300, seed=i)
    assert again["accuracy"] == got
    assert again["macro_f1"].low <= again["macro_f1"].estimate <= again["macro_f1"].high
