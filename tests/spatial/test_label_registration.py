"""Label-map registration: known shifts recovered, a diffeomorphism, 2-D and 3-D."""
import jax.numpy as jnp
import numpy as np
import pytest

from acis_jax.spatial import folding_fraction, register_labels, warp_labels


def disks(shape, centres, radius):
  """Label k + 1 inside a ball of `radius` around `centres[k]`."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
  labels = np.zeros(shape, np.int32)
  for k, centre in enumerate(centres):
    labels[np.sum((grid - np.asarray(centre)) ** 2, -1) < radius ** 2] = k + 1
  return labels


def mean_dice(a, b):
  return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
                        for k in np.unique(b) if k]))


@pytest.mark.parametrize("shape, moving_centres, shifts, radius", [
    ((48, 48), [(16, 16), (32, 30)], [(3, -2), (-2, 3)], 7),
    ((24, 24, 24), [(12, 12, 12)], [(2, -2, 1)], 6),
])
def test_known_shifts_are_recovered(shape, moving_centres, shifts, radius):
  """Each ball of `moving` is moved by its own shift in `fixed`: the moved labels overlap
  `fixed` and have its centroids."""
  moving = disks(shape, moving_centres, radius)
  fixed = disks(shape, [np.add(c, s) for c, s in zip(moving_centres, shifts)], radius)
  assert mean_dice(moving, fixed) < 0.75
  disp = register_labels(jnp.asarray(moving), jnp.asarray(fixed), len(moving_centres) + 1)
  moved = np.asarray(warp_labels(jnp.asarray(moving), disp, len(moving_centres) + 1))
  assert mean_dice(moved, fixed) > 0.9
  assert float(folding_fraction(disp[None])[0]) == 0.0
  for k in range(len(shifts)):
    np.testing.assert_allclose(np.argwhere(moved == k + 1).mean(axis=0),
                               np.argwhere(fixed == k + 1).mean(axis=0), atol=0.5)
  # Inside a ball the labels leave the field free; near its centre it is a shift towards
  # the moving ball: `warp(x)(p) = x(p + d(p))`, so d is minus the shift.
  disp = np.asarray(disp)
  for k, (centre, shift) in enumerate(zip(moving_centres, shifts)):
    at = tuple(int(c) for c in np.add(centre, shift))
    assert np.dot(disp[at], -np.asarray(shift)) > 0.5 * np.dot(shift, shift)


def test_identical_maps_need_no_motion():
  labels = jnp.asarray(disks((32, 32), [(16, 14)], 8))
  disp = register_labels(labels, labels, 2, steps=50)
  assert float(jnp.max(jnp.abs(disp))) < 0.3
