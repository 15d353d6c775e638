"""Summaries of per-case metrics and the paired one-sided significance test of the paper (sec 3.1).

Conventions:
  * `wilcoxon_greater(a, b)` is SciPy's paired Wilcoxon signed-rank test of `a - b` with
    `alternative="greater"`: zero differences are dropped (`zero_method="wilcox"`), and SciPy
    picks the exact null distribution for small samples. Two cases SciPy does not settle cleanly
    are settled here: when every difference is zero, nothing suggests `a > b`, so p = 1.0
    (SciPy would warn about dividing by zero); and no pairs at all is a ValueError. A handful
    of pairs is not an error: the exact p-value is valid for any number n of nonzero
    differences, it just cannot fall below 2^-n, so fewer than 5 pairs never reach p < 0.05.
  * `summarize` reports the sample standard deviation (ddof = 1), nan for a single value.
  * Inputs must be finite: the metrics give finite values for every case (empty masks
    included, see `acis_jax.eval.metrics`), so nan or inf means something upstream went wrong.
"""
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def _finite_vector(values: ArrayLike, name: str) -> np.ndarray:
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 1:
    raise ValueError(f"{name} must be a 1-D sequence of per-case values, got shape {values.shape}")
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise ValueError(f"{name} holds {bad.size} non-finite value(s), first at index {bad[0]}: "
                     f"{values[bad[0]]}")
  return values


def wilcoxon_greater(a: ArrayLike, b: ArrayLike) -> float:
  """One-sided p-value that `a` is greater than `b`, paired Wilcoxon signed-rank test.

  Args:
    a, b: `(n,)` per-case values of two methods on the same n cases, in the same order
      (e.g. Dice of ACIS and of the best other method), n >= 1.

  Returns:
    the p-value in (0, 1]; 1.0 when `a == b` everywhere (module docstring).
  """
  a, b = _finite_vector(a, "a"), _finite_vector(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b must pair up case by case, got {a.size} and {b.size} values")
  if a.size == 0:
    raise ValueError("wilcoxon_greater needs at least one pair of values, got none")
  if np.all(a == b):
    return 1.0
  return float(stats.wilcoxon(a, b, alternative="greater").pvalue)


class Summary(NamedTuple):
  """Mean, sample standard deviation (ddof = 1), median and count of per-case values."""
  mean: float
  std: float
  median: float
  n: int


def summarize(values: ArrayLike) -> Summary:
  """Summary of `(n,)` finite per-case values, n >= 1; `std` is nan when n == 1."""
  values = _finite_vector(values, "values")
  if values.size == 0:
    raise ValueError("summarize needs at least one value, got none")
  std = float(np.std(values, ddof=1)) if values.size > 1 else float("nan")
  return Summary(mean=float(np.mean(values)), std=std, median=float(np.median(values)),
                 n=int(values.size))
