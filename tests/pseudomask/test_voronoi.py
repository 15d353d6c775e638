"""Nearest-seed labelling against scipy's k-d tree (distances, so ties are fine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree

from acis_jax.pseudomask.voronoi import voronoi

GRID_2D = (96, 128)
GRID_3D = (40, 48, 32)


def _random_seeds(shape, n, seed=0):
  flat = np.random.default_rng(seed).choice(np.prod(shape), n, replace=False)
  return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int32)


def _fraction_nearest(labels, seeds, shape):
  """Fraction of voxels whose label is a nearest seed (squared distances, exact)."""
  labels = np.asarray(labels)
  assert labels.shape == shape and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < len(seeds)
  voxels = np.indices(shape).reshape(len(shape), -1).T
  nearest, _ = cKDTree(seeds).query(voxels)
  assigned = ((voxels - seeds[labels.reshape(-1)]) ** 2).sum(axis=1)
  return np.mean(assigned == np.rint(nearest ** 2))


CASES = [(GRID_2D, 50), (GRID_2D, 500), (GRID_3D, 20), (GRID_3D, 300)]


@pytest.mark.parametrize("shape,n", CASES)
@pytest.mark.parametrize("method", ["separable", "brute"])
def test_exact_methods_find_a_nearest_seed_everywhere(method, shape, n):
  seeds = _random_seeds(shape, n)
  assert _fraction_nearest(voronoi(seeds, shape, method), seeds, shape) == 1.0


@pytest.mark.parametrize("shape,n", [(GRID_2D, 500), (GRID_3D, 300)])
@pytest.mark.parametrize("method", ["jfa", "auto"])
def test_fast_methods_find_a_nearest_seed_almost_everywhere(method, shape, n):
  seeds = _random_seeds(shape, n, seed=1)
  assert _fraction_nearest(voronoi(seeds, shape, method), seeds, shape) >= 0.9999


def test_far_voxels_seeds_in_one_corner():
  # Every seed in one corner block: most voxels are 20-60 voxels from the
  # nearest seed, so the separable passes need a wide window (and the odd
  # sides give slabs one voxel thick).
  shape = (37, 41, 29)
  seeds = _random_seeds((6, 5, 4), 12, seed=2)
  for method in ("separable", "jfa"):
    assert _fraction_nearest(voronoi(seeds, shape, method), seeds, shape) >= (
        1.0 if method == "separable" else 0.9999), method


@pytest.mark.parametrize("method", ["separable", "jfa", "brute"])
def test_edge_cases(method):
  shape = (9, 7, 6)
  # One seed: every voxel belongs to it.
  one = np.array([[4, 0, 5]], np.int32)
  np.testing.assert_array_equal(voronoi(one, shape, method), np.zeros(shape, np.int32))
  # A seed on every voxel: each voxel is its own cell.
  every = np.indices(shape).reshape(3, -1).T.astype(np.int32)
  order = np.random.default_rng(3).permutation(len(every))
  labels = np.asarray(voronoi(every[order], shape, method))
  np.testing.assert_array_equal(every[order][labels.reshape(-1)], every)
  # Seeds on the corners and faces only.
  corners = np.array([[i, j, k] for i in (0, 8) for j in (0, 6) for k in (0, 5)]
                     + [[0, 3, 2], [8, 4, 5], [5, 0, 3]], np.int32)
  assert _fraction_nearest(voronoi(corners, shape, method), corners, shape) == 1.0


@pytest.mark.parametrize("method", ["separable", "jfa"])
@pytest.mark.parametrize("shape", [(20, 24), (11, 13, 9)])
def test_jit_and_vmap_over_seed_sets(method, shape):
  batch = np.stack([_random_seeds(shape, 15, seed=s) for s in range(3)])
  labels = jax.jit(jax.vmap(lambda s: voronoi(s, shape, method)))(jnp.asarray(batch))
  assert labels.shape == (3,) + shape
  for seeds, lab in zip(batch, labels):
    assert _fraction_nearest(lab, seeds, shape) == 1.0


@pytest.mark.parametrize("seeds,shape,message", [
    (np.zeros((4, 2), np.int32), (8, 8, 8), r"shape \(N, 3\)"),
    (np.zeros((4,), np.int32), (8, 8), r"shape \(N, 2\)"),
    (np.zeros((0, 2), np.int32), (8, 8), "at least one seed"),
    (np.zeros((3, 2), np.float32), (8, 8), "integer"),
    (np.array([[0, 0], [8, 1]], np.int32), (8, 8), r"outside the grid.*\[8, 1\]"),
    (np.array([[0, -1]], np.int32), (8, 8), "outside the grid"),
    (np.zeros((1, 1), np.int32), (8,), "2-D or more"),
])
def test_bad_seeds_raise(seeds, shape, message):
  with pytest.raises(ValueError, match=message):
    voronoi(seeds, shape)


def test_unknown_method_raises():
  with pytest.raises(ValueError, match="unknown Voronoi method 'kd'"):
    voronoi(np.zeros((1, 2), np.int32), (4, 4), method="kd")
