"""Kernel density (eq. 1) against a direct numpy sum and scipy's gaussian_kde."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import gaussian_kde

from acis_jax.pseudomask.kde import kde

METHODS = ["fft", "matmul", "exact"]
SHAPES = [(40, 50), (20, 24, 28)]
BANDWIDTH = 3.0


def _grid(shape):
  return np.indices(shape).reshape(len(shape), -1).T.astype(np.float64)


def _eq1(points, shape, h, weights=None):
  """Eq. 1 summed directly in float64: sum_j w_j K(|x - p_j| / h) / sum_j w_j."""
  weights = np.ones(len(points)) if weights is None else np.asarray(weights, np.float64)
  d2 = ((_grid(shape)[:, None, :] - np.asarray(points, np.float64)[None]) ** 2).sum(-1)
  kernel = np.exp(-0.5 * d2 / h ** 2) / np.sqrt(2.0 * np.pi)
  return (kernel @ weights / weights.sum()).reshape(shape)


def _integer_points(shape, n=60, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, s, n) for s in shape], axis=1).astype(np.int32)


def _relative_error(ours, reference):
  return np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_integer_points_match_eq1(shape, method):
  points = _integer_points(shape)
  density = kde(points, shape, BANDWIDTH, method=method, chunk_size=7)
  assert density.shape == shape and density.dtype == jnp.float32
  assert _relative_error(density, _eq1(points, shape, BANDWIDTH)) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_scipy_gaussian_kde(shape):
  """scipy's kernel covariance is factor^2 * data covariance; with the data
  covariance set to I and factor = h it is the isotropic h^2 I of eq. 1."""

  class IsotropicKDE(gaussian_kde):

    def __init__(self, dataset, h):
      self._data_covariance = np.eye(len(dataset))
      self._data_cho_cov = np.eye(len(dataset))
      super().__init__(dataset, bw_method=h)

  points = _integer_points(shape, seed=1)
  reference = IsotropicKDE(points.T.astype(np.float64), BANDWIDTH)
  np.testing.assert_allclose(reference.covariance, BANDWIDTH ** 2 * np.eye(len(shape)))
  reference = reference(_grid(shape).T).reshape(shape)
  reference /= reference.sum()
  for method in METHODS:
    density = np.asarray(kde(points, shape, BANDWIDTH, method=method), np.float64)
    assert _relative_error(density / density.sum(), reference) < 1e-4, method


def test_fft_matches_exact_at_a_wide_bandwidth():
  """A bandwidth wide against the grid: the FFT kernel must neither wrap nor be cut short."""
  shape, h = (64, 80), 14.0
  points = _integer_points(shape, n=200, seed=2)
  exact = np.asarray(kde(points, shape, h, method="exact"))
  for method in ("fft", "matmul"):
    assert _relative_error(kde(points, shape, h, method=method), exact) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_fractional_points(shape):
  """Exact stays exact; binning by linear splatting errs by at most ~1/(8 h^2) per axis."""
  rng = np.random.default_rng(3)
  points = np.stack([rng.uniform(0, s - 1, 50) for s in shape], axis=1).astype(np.float32)
  reference = _eq1(points, shape, BANDWIDTH)
  assert _relative_error(kde(points, shape, BANDWIDTH, method="exact"), reference) < 1e-5
  bound = len(shape) / (8.0 * BANDWIDTH ** 2)
  for method in ("fft", "matmul"):
    assert _relative_error(kde(points, shape, BANDWIDTH, method=method), reference) < bound


def test_weights_replace_one_over_n():
  shape = SHAPES[0]
  points = _integer_points(shape)
  weights = np.zeros(len(points), np.float32)
  weights[::3] = 1.0
  for method in METHODS:
    padded = kde(points, shape, BANDWIDTH, method=method, weights=weights)
    kept = kde(points[::3], shape, BANDWIDTH, method=method)
    np.testing.assert_allclose(padded, kept, rtol=1e-5, atol=1e-9)
    doubled = kde(points, shape, BANDWIDTH, method=method, weights=np.full(len(points), 2.0))
    np.testing.assert_allclose(doubled, kde(points, shape, BANDWIDTH, method=method),
                               rtol=1e-5, atol=1e-9)
    zero = kde(points, shape, BANDWIDTH, method=method, weights=np.zeros(len(points)))
    assert not np.asarray(zero).any()


def test_traced_points_under_jit():
  shape = SHAPES[0]
  points = _integer_points(shape)
  jitted = jax.jit(lambda p, w: kde(p, shape, BANDWIDTH, weights=w))
  np.testing.assert_allclose(jitted(points, jnp.ones(len(points))),
                             kde(points, shape, BANDWIDTH), rtol=1e-6)


def test_bad_input_raises():
  points = _integer_points((10, 12))
  with pytest.raises(ValueError, match="shape"):
    kde(points, (10, 12, 14), 2.0)
  with pytest.raises(ValueError, match="bandwidth"):
    kde(points, (10, 12), 0.0)
  with pytest.raises(ValueError, match="method"):
    kde(points, (10, 12), 2.0, method="tree")
  with pytest.raises(ValueError, match="weights"):
    kde(points, (10, 12), 2.0, weights=np.ones(3))
