"""Jacobian determinant and folding fraction against closed forms and a numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from acis_jax.spatial import folding_fraction, identity_grid, jacobian_determinant


def _affine_disp(shape, matrix, offset):
  """Displacement of x -> matrix @ x + offset, i.e. (matrix - I) x + offset."""
  grid = np.asarray(identity_grid(shape), np.float64)
  return (grid @ (matrix - np.eye(len(shape))).T + offset).astype(np.float32)


@pytest.mark.parametrize("shape", [(32, 40), (32, 34, 36)])
def test_affine_map_has_closed_form_determinant(shape):
  rng = np.random.default_rng(0)
  ndim = len(shape)
  for _ in range(3):
    matrix = np.eye(ndim) + rng.uniform(-0.4, 0.4, (ndim, ndim))
    det = np.asarray(jacobian_determinant(_affine_disp(shape, matrix, rng.normal(size=ndim))))
    assert det.shape == shape
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(32, 40), (24, 26, 28)])
def test_matches_numpy_gradient_and_det(shape):
  ndim = len(shape)
  noise = np.random.default_rng(1).normal(size=(*shape, ndim))
  disp = (ndimage.gaussian_filter(noise, (2,) * ndim + (0,)) * 10).astype(np.float32)
  jac = np.stack([np.stack(np.gradient(disp[..., i].astype(np.float64)), -1)
                  for i in range(ndim)], -2) + np.eye(ndim)
  np.testing.assert_allclose(jacobian_determinant(disp), np.linalg.det(jac), atol=1e-4)
  batched = jacobian_determinant(np.stack([disp, -disp]))
  np.testing.assert_allclose(batched[1], jacobian_determinant(-disp), atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 32)])
def test_folding_fraction(shape):
  ndim = len(shape)
  identity = np.zeros((*shape, ndim), np.float32)
  assert float(folding_fraction(identity)) == 0.0
  mirror = np.eye(ndim)
  mirror[0, 0] = -1.0
  assert float(folding_fraction(_affine_disp(shape, mirror, np.zeros(ndim)))) == 1.0
  # Fold: x0 -> x0 - 2 * x0 inside a slab of 8 rows, so d(x0 + disp0)/dx0 = -1 there.
  fold = identity.copy()
  slab = np.arange(shape[0])
  fold[..., 0] = np.where((slab >= 12) & (slab < 20), -2.0 * (slab - 12), -16.0 * (slab >= 20))[
      (slice(None),) + (None,) * (ndim - 1)]
  fraction = float(folding_fraction(fold))
  assert 0 < fraction < 1
  np.testing.assert_allclose(fraction, 8 / shape[0], atol=1.5 / shape[0])  # slab +- one row
  batched = folding_fraction(np.stack([identity, fold]))
  np.testing.assert_allclose(batched, [0.0, fraction])


def test_determinant_is_differentiable():
  disp = jnp.asarray(np.random.default_rng(2).normal(size=(12, 12, 2)), jnp.float32)
  grad = jax.grad(lambda d: jnp.sum(jax.nn.relu(-jacobian_determinant(d))))(disp)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="2-D and 3-D"):
    jacobian_determinant(np.zeros((8, 8, 8, 8, 4)))
  with pytest.raises(ValueError, match=">= 2 voxels"):
    jacobian_determinant(np.zeros((8, 1, 2)))
