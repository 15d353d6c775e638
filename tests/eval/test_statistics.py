"""wilcoxon_greater and summarize against SciPy/NumPy and cases worked out by hand."""
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from acis_jax.eval.statistics import summarize, wilcoxon_greater


@pytest.mark.parametrize("n, with_zeros", [(8, False), (20, True), (80, False)])
def test_wilcoxon_greater_matches_scipy(n, with_zeros):
  rng = np.random.default_rng(n)
  a = rng.normal(size=n)
  b = a - 0.3 + rng.normal(scale=0.5, size=n)
  if with_zeros:
    b[:3] = a[:3]
  expected = stats.wilcoxon(a, b, alternative="greater").pvalue
  assert wilcoxon_greater(a, b) == pytest.approx(expected, rel=1e-12)
  # The two one-sided p-values add up to 1 + P(W+ = w) >= 1 (exactly 1 under the normal
  # approximation).
  assert wilcoxon_greater(a, b) + wilcoxon_greater(b, a) >= 1.0 - 1e-12


def test_wilcoxon_greater_exact_hand_cases():
  # n differences, all positive: only the all-plus sign pattern is as extreme, p = 2^-n.
  assert wilcoxon_greater([2.0, 3, 4, 5, 6], [1.0, 1, 1, 1, 1]) == pytest.approx(2.0**-5)
  # All negative: every sign pattern has W+ >= 0, p = 1.
  assert wilcoxon_greater([1.0, 1, 1, 1], [2.0, 3, 4, 5]) == pytest.approx(1.0)
  # Differences +1, +2, -3: W+ = 3. Of the 8 sign patterns of ranks {1, 2, 3}, W+ >= 3 for
  # {3}, {1,2}, {1,3}, {2,3}, {1,2,3}: p = 5/8.
  assert wilcoxon_greater([1.0, 2, 0], [0.0, 0, 3]) == pytest.approx(5 / 8)
  # A zero difference is dropped: the same p as without that pair.
  assert wilcoxon_greater([1.0, 2, 0, 7], [0.0, 0, 3, 7]) == pytest.approx(5 / 8)
  # One pair: the exact p is 1/2, not an error.
  assert wilcoxon_greater([1.0], [0.0]) == pytest.approx(0.5)


def test_wilcoxon_greater_all_equal_is_one_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert wilcoxon_greater([0.8, 0.9, 0.7], [0.8, 0.9, 0.7]) == 1.0


@pytest.mark.parametrize("a, b, message", [
    ([], [], "at least one pair"),
    ([1.0, 2.0], [1.0], "pair up"),
    ([[1.0, 2.0]], [[0.0, 1.0]], "1-D"),
    ([1.0, np.nan], [0.0, 0.0], "non-finite"),
    ([1.0, 2.0], [0.0, np.inf], "non-finite"),
])
def test_wilcoxon_greater_rejects_bad_input(a, b, message):
  with pytest.raises(ValueError, match=message):
    wilcoxon_greater(a, b)


def test_summarize_matches_numpy():
  values = np.random.default_rng(0).normal(size=17)
  summary = summarize(list(values))
  assert summary.mean == pytest.approx(np.mean(values))
  assert summary.std == pytest.approx(np.std(values, ddof=1))
  assert summary.median == pytest.approx(np.median(values))
  assert summary.n == 17
  # By hand: mean 2, squared deviations 1 + 0 + 1 over n - 1 = 2, median of an even count.
  assert summarize([1.0, 2.0, 3.0]) == (2.0, 1.0, 2.0, 3)
  assert summarize([4.0, 1.0, 3.0, 2.0]).median == 2.5


def test_summarize_single_value_and_bad_input():
  single = summarize([0.9])
  assert single.mean == 0.9 and single.median == 0.9 and single.n == 1
  assert math.isnan(single.std)
  with pytest.raises(ValueError, match="at least one"):
    summarize([])
  with pytest.raises(ValueError, match="non-finite"):
    summarize([0.5, float("nan")])
