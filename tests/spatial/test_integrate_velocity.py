"""Scaling and squaring and composition: closed forms, inverse consistency, diffeomorphism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import ndimage

from acis_jax.spatial import (compose, folding_fraction, identity_grid, integrate_velocity,
                              jacobian_determinant, warp)


def smooth_field(shape, amplitude, sigma, seed):
  """Gaussian-filtered noise, `(*shape, ndim)`, max |component| = amplitude voxels."""
  ndim = len(shape)
  noise = np.random.default_rng(seed).normal(size=(*shape, ndim))
  field = ndimage.gaussian_filter(noise, (sigma,) * ndim + (0,))
  return (field / np.abs(field).max() * amplitude).astype(np.float32)


def _interior(array, margin):
  return array[tuple(slice(margin, -margin) for _ in range(array.ndim - 1))]


@pytest.mark.parametrize("shape", [(40, 48), (32, 32, 36)])
@pytest.mark.parametrize("downsize", [1, 2])
def test_constant_velocity_is_exact_translation(shape, downsize):
  shift = np.float32([2.5, -1.25, 3.0][:len(shape)])
  velocity = np.broadcast_to(shift, (*shape, len(shape)))
  np.testing.assert_allclose(integrate_velocity(velocity, steps=7, downsize=downsize), velocity,
                             atol=1e-5)


@pytest.mark.parametrize("downsize", [1, 2])
def test_linear_velocity_matches_matrix_power(downsize):
  # v(x) = A (x - c) is reproduced exactly by linear interpolation, so away from the border
  # (which the samples never reach) scaling and squaring gives ((I + A / 2^s)^(2^s) - I)(x - c),
  # and with downsize the coarse grid carries the same linear field.
  shape, steps = (49, 49), 5
  a = np.float32([[0.02, -0.08], [0.06, -0.01]])
  centre = (np.float32(shape) - 1) / 2
  rel = np.asarray(identity_grid(shape)) - centre
  velocity = rel @ a.T
  expected = rel @ (np.linalg.matrix_power(np.eye(2) + a / 2**steps, 2**steps) - np.eye(2)).T
  phi = integrate_velocity(velocity, steps=steps, downsize=downsize)
  np.testing.assert_allclose(_interior(np.asarray(phi), 12), _interior(expected, 12), atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 32)])
def test_inverse_consistency(shape):
  velocity = smooth_field(shape, 6.0, 4, 0)
  residual = np.asarray(compose(integrate_velocity(velocity), integrate_velocity(-velocity)))
  inner = np.abs(_interior(residual, 12))  # the border sees the edge-repeat extension
  print(f"\n{shape}: |exp(v) o exp(-v) - id| interior max {inner.max():.4f} "
        f"mean {inner.mean():.5f} voxels, for |v| <= 6")
  # Interpolation error only: ~1% of the motion, where v itself would give a 6-voxel error.
  assert inner.max() < 0.02 * 6.0
  assert inner.mean() < 0.005 * 6.0


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 32)])
def test_integrated_smooth_field_does_not_fold(shape):
  velocity = smooth_field(shape, 12.0 if len(shape) == 2 else 8.0, 3, 1)
  assert float(folding_fraction(velocity)) > 0  # used directly as a displacement, it folds
  det = np.asarray(jacobian_determinant(integrate_velocity(velocity, steps=7)))
  assert det.min() > 0, det.min()


def test_compose_order_and_warp_equivalence():
  shape = (40, 44)
  a = smooth_field(shape, 3.0, 4, 2)
  shift = np.float32([3, -2])
  b = np.broadcast_to(shift, (*shape, 2))
  # compose(a, b)(x) = b(x) + a(x + b(x)): an integer b makes this exact (edges repeat).
  index = tuple(np.clip(np.arange(n) + int(s), 0, n - 1) for n, s in zip(shape, shift))
  np.testing.assert_allclose(compose(a, b), shift + a[np.ix_(*index)], atol=1e-6)
  np.testing.assert_allclose(compose(b, a), a + shift, atol=1e-6)
  # warp(image, compose(a, c)) = warp(warp(image, a), c) exactly for images that are linear in
  # x (linear interpolation reproduces them), wherever no sample leaves the grid.
  c = smooth_field(shape, 3.0, 4, 3)
  image = np.asarray(identity_grid(shape)) @ np.float32([[1.0, 0.3], [-0.5, 2.0]])
  once = np.asarray(warp(image, compose(a, c)))
  twice = np.asarray(warp(warp(image, a), c))
  wrong_order = np.asarray(warp(image, compose(c, a)))
  np.testing.assert_allclose(_interior(once, 7), _interior(twice, 7), atol=1e-4)
  assert np.abs(_interior(wrong_order - twice, 7)).max() > 0.1


def test_batch_axis():
  velocity = np.stack([smooth_field((24, 28), 3.0, 3, s) for s in range(3)])
  batched = integrate_velocity(velocity, downsize=2)
  for b in range(3):
    np.testing.assert_allclose(batched[b], integrate_velocity(velocity[b], downsize=2),
                               atol=1e-5)


def test_gradients_through_integration():
  field = smooth_field((10, 12), 2.0, 2, 5)
  with jax.enable_x64(True):
    check_grads(lambda v: integrate_velocity(v, steps=3), (jnp.asarray(field, jnp.float64),),
                order=1, modes=("rev",))
  image = jnp.asarray(np.random.default_rng(6).normal(size=(10, 12, 1)), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(warp(image, integrate_velocity(v)) ** 2))(field)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("shape", [(14, 12), (8, 10, 9)])
def test_integration_gradient_equals_autodiff_of_a_map_coordinates_integration(shape):
  """Seven squarings, each `d + d(x + d)` sampled by jax.scipy's map_coordinates and
  differentiated by autodiff: the same field and the same gradient as ours."""
  ndim = len(shape)
  grid = identity_grid(shape)

  def reference(v):
    d = v / 2.0 ** 7
    for _ in range(7):
      axes = [(grid + d)[..., a] for a in range(ndim)]
      d = d + jnp.stack([jax.scipy.ndimage.map_coordinates(d[..., c], axes, order=1,
                                                           mode="nearest")
                         for c in range(ndim)], -1)
    return d

  velocity = jnp.asarray(smooth_field(shape, 4.0, 1.5, 8))
  weights = jnp.asarray(np.random.default_rng(9).normal(size=(*shape, ndim)), jnp.float32)
  np.testing.assert_allclose(integrate_velocity(velocity), reference(velocity), atol=1e-5)
  ours, expected = (jax.grad(lambda v: jnp.sum(jnp.sin(f(v)) * weights))(velocity)
                    for f in (integrate_velocity, reference))
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_steps_zero_returns_velocity_and_bad_settings_raise():
  velocity = smooth_field((16, 16), 2.0, 2, 7)
  np.testing.assert_array_equal(integrate_velocity(velocity, steps=0), velocity)
  for bad in (dict(steps=-1), dict(steps=2.0), dict(downsize=0), dict(downsize=1.5)):
    with pytest.raises(ValueError, match="steps|downsize"):
      integrate_velocity(velocity, **bad)
  with pytest.raises(ValueError, match="velocity must have shape"):
    integrate_velocity(np.zeros((4, 16, 16, 16, 2)))
