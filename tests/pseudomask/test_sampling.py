"""Seed and edge-point sampling: frequencies against the sampling law, support, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from acis_jax.pseudomask.sampling import sample_edge_points, sample_seeds

DRAWS = 20000
P_VALUE = 1e-3


def _counts(coordinates, shape):
  flat = np.ravel_multi_index(np.asarray(coordinates).reshape(-1, len(shape)).T, shape)
  return np.bincount(flat, minlength=int(np.prod(shape))).reshape(shape)


def _many(fn, *args):
  keys = jax.random.split(jax.random.key(0), DRAWS)
  return jax.jit(jax.vmap(lambda k: fn(k, *args)))(keys)


def _small_density():
  density = np.zeros((4, 5), np.float32)
  density[0, 1], density[1, 3], density[2, 0], density[3, 4], density[3, 2] = 1, 2, 3, 4, 0.5
  density[1, 1] = 1e-3
  return density


def test_first_draw_is_proportional_to_density():
  density = _small_density()
  counts = _counts(_many(sample_seeds, jnp.asarray(density), 1), density.shape)
  assert counts.sum() == DRAWS
  assert counts[density == 0].sum() == 0
  support = density > 0
  expected = density[support].astype(np.float64) / density.sum(dtype=np.float64) * DRAWS
  assert chisquare(counts[support], expected).pvalue > P_VALUE


def test_two_draws_follow_successive_sampling():
  """P(i drawn in 2) = p_i + sum_{j != i} p_j p_i / (1 - p_j), without replacement."""
  density = _small_density()
  p = density.reshape(-1) / density.sum()
  inclusion = p + np.array([sum(p[j] * p[i] / (1 - p[j]) for j in range(p.size) if j != i)
                            for i in range(p.size)])
  seeds = np.asarray(_many(sample_seeds, jnp.asarray(density), 2))
  assert np.all(np.any(seeds[:, 0] != seeds[:, 1], axis=-1)), "a seed drawn twice"
  frequency = _counts(seeds, density.shape).reshape(-1) / DRAWS
  sigma = np.sqrt(inclusion * (1 - inclusion) / DRAWS)
  assert np.all(np.abs(frequency - inclusion) <= 5 * sigma + 1e-12)


def test_many_seeds_are_distinct_and_in_the_support():
  rng = np.random.default_rng(0)
  density = rng.random((16, 20, 24)).astype(np.float32) ** 4
  density[density < 0.2] = 0.0
  seeds = np.asarray(sample_seeds(jax.random.key(1), density, 500))
  assert seeds.shape == (500, 3) and seeds.dtype == np.int32
  assert len({tuple(s) for s in seeds}) == 500
  assert np.all(density[tuple(seeds.T)] > 0)


def test_seed_errors():
  density = _small_density()
  with pytest.raises(ValueError, match="exceeds the 20 voxels"):
    sample_seeds(jax.random.key(0), density, 21)
  with pytest.raises(ValueError, match="non-zero density"):
    sample_seeds(jax.random.key(0), density, 7)
  with pytest.raises(ValueError, match="exceeds the 20 voxels"):
    jax.jit(lambda d: sample_seeds(jax.random.key(0), d, 21))(density)
  # Traced, the support is unknown: no error, and the support comes first.
  seeds = jax.jit(lambda d: sample_seeds(jax.random.key(0), d, 7))(density)
  assert np.all(density[tuple(np.asarray(seeds)[:6].T)] > 0)


def test_edge_points_are_uniform_over_the_edges():
  edges = np.zeros((6, 7), bool)
  edges[1, 1:6] = edges[4, 2:5] = edges[2:4, 5] = True
  points, weights = _many(sample_edge_points, jnp.asarray(edges), 3)
  assert np.all(weights == 1)
  counts = _counts(points, edges.shape)
  assert counts[~edges].sum() == 0
  # Each edge voxel is in a uniform 3-subset with probability 3 / |edges|.
  assert chisquare(counts[edges], np.full(edges.sum(), 3 * DRAWS / edges.sum())).pvalue > P_VALUE


def test_fewer_edges_than_points_get_zero_weights():
  edges = np.zeros((5, 6, 7), bool)
  edges[2, 1:4, 3] = edges[1, 2, 2:6] = True
  points, weights = sample_edge_points(jax.random.key(3), edges, 12)
  points, weights = np.asarray(points), np.asarray(weights)
  assert points.shape == (12, 3) and points.dtype == np.int32 and weights.dtype == np.float32
  assert weights.sum() == edges.sum()
  kept = points[weights > 0]
  assert np.all(edges[tuple(kept.T)]) and len({tuple(p) for p in kept}) == len(kept)
  assert not np.any(edges[tuple(points[weights == 0].T)])


def test_edge_point_errors():
  with pytest.raises(ValueError, match="exceeds the 30 voxels"):
    sample_edge_points(jax.random.key(0), np.ones((5, 6), bool), 31)
  with pytest.raises(ValueError, match="positive"):
    sample_edge_points(jax.random.key(0), np.ones((5, 6), bool), 0)
