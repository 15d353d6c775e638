"""Appearance uncertainty (paper eq. 3) and label consistency against closed forms / numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from acis_jax.spatial import appearance_uncertainty, identity_grid, label_consistency


def _constant_fields(shifts, shape):
  """(T, *shape, ndim) stack of constant displacement fields."""
  return np.stack([np.broadcast_to(np.float32(s), (*shape, len(shape))) for s in shifts])


@pytest.mark.parametrize("shape", [(32, 40), (24, 28, 32)])
def test_zero_when_images_match_and_fields_are_zero(shape):
  x = np.random.default_rng(0).uniform(size=(*shape, 1)).astype(np.float32)
  zeros = np.zeros((4, *shape, len(shape)), np.float32)
  voxel_map, mean = appearance_uncertainty(x, x, zeros, zeros)
  assert voxel_map.shape == x.shape
  np.testing.assert_array_equal(voxel_map, 0.0)
  assert float(mean) == 0.0


@pytest.mark.parametrize("shape", [(32, 40), (24, 28, 32)])
def test_constant_shifts_of_a_linear_ramp(shape):
  # x = w . pos, x_hat = x + c. For constant shifts s_t (forward) and r_t (backward), away from
  # the border: x o phi_t - x_hat = w.s_t - c and x_hat o varphi_t - x = w.r_t + c.
  ndim = len(shape)
  w = np.float32([0.02, -0.01, 0.015][:ndim])
  c = np.float32(0.1)
  x = (np.asarray(identity_grid(shape)) @ w)[..., None]
  rng = np.random.default_rng(1)
  fwd, bwd = rng.uniform(-3, 3, (2, 5, ndim)).astype(np.float32)
  expected = np.mean((fwd @ w - c) ** 2 + (bwd @ w + c) ** 2)
  voxel_map, mean = appearance_uncertainty(x, x + c, _constant_fields(fwd, shape),
                                           _constant_fields(bwd, shape))
  inner = np.asarray(voxel_map)[tuple(slice(4, -4) for _ in shape)]
  np.testing.assert_allclose(inner, expected, rtol=1e-4)
  np.testing.assert_allclose(mean, np.mean(voxel_map), rtol=1e-6)


def test_batch_axis_and_gradient():
  shape = (20, 24)
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(2, *shape, 1)).astype(np.float32)
  x_hat = rng.uniform(size=(2, *shape, 1)).astype(np.float32)
  fwd = rng.normal(size=(3, 2, *shape, 2)).astype(np.float32)
  bwd = rng.normal(size=(3, 2, *shape, 2)).astype(np.float32)
  _, means = appearance_uncertainty(x, x_hat, fwd, bwd)
  assert means.shape == (2,)
  for b in range(2):
    np.testing.assert_allclose(means[b], appearance_uncertainty(x[b], x_hat[b], fwd[:, b],
                                                                bwd[:, b])[1], rtol=1e-6)
  grad = jax.grad(lambda xh: jnp.sum(appearance_uncertainty(x, xh, fwd, bwd)[1]))(x_hat)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def _labels(shape, seed):
  noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2)
  return np.digitize(noise, np.quantile(noise, [0.4, 0.7, 0.9])).astype(np.int32)  # classes 0-3


def _dice(a, b, classes):
  return np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
                  for k in classes])


@pytest.mark.parametrize("shape", [(32, 40), (24, 28, 32)])
def test_label_consistency(shape):
  ndim = len(shape)
  y = _labels(shape, 3)
  zeros = np.zeros((3, *shape, ndim), np.float32)
  np.testing.assert_allclose(label_consistency(y, y, zeros, 4), 1.0, rtol=1e-6)
  # y_hat as probabilities: one-hot probabilities give the same score as labels.
  np.testing.assert_allclose(label_consistency(y, np.eye(4, dtype=np.float32)[y], zeros, 4), 1.0,
                             rtol=1e-6)
  # Integer shifts warp one-hot labels exactly: compare with a numpy Dice of shifted labels.
  shifts = [np.full(ndim, s) for s in (1, -2)]
  expected = []
  for s in shifts:
    index = tuple(np.clip(np.arange(n) + s[a], 0, n - 1) for a, n in enumerate(shape))
    expected.append(_dice(y[np.ix_(*index)], y, range(1, 4)))
  score = label_consistency(y, y, _constant_fields(shifts, shape), 4)
  np.testing.assert_allclose(score, np.mean(expected), rtol=1e-5)
  assert float(score) < 1.0


def test_label_consistency_bad_input():
  y = np.zeros((8, 8), np.int32)
  with pytest.raises(ValueError, match="y_hat"):
    label_consistency(y, np.zeros((8, 8, 2)), np.zeros((2, 8, 8, 2), np.float32), 4)
  with pytest.raises(ValueError, match="labels must be integers"):
    label_consistency(y.astype(np.float32), y, np.zeros((2, 8, 8, 2), np.float32), 4)


def test_a_class_absent_from_both_maps_scores_one_with_a_bounded_gradient():
  """Class 3 is in neither map: it scores 1, and the Dice's gradient with respect to the
  label probabilities stays within 2 / (the smallest present class's voxel count) per voxel;
  through the smoothed ratio it was -1 / smooth = -1e6 (issue 13's refinement blew up)."""
  y = np.zeros((16, 16), np.int32)
  y[4:12, 4:12] = 1
  y[0:2, 0:4] = 2
  probs = jnp.asarray(np.eye(4, dtype=np.float32)[y])
  zeros = jnp.zeros((1, 16, 16, 2))
  np.testing.assert_allclose(label_consistency(y, probs, zeros, 4), 1.0, rtol=1e-6)
  grad = jax.grad(lambda p: label_consistency(y, p, zeros, 4))(probs)
  assert np.all(np.isfinite(grad))
  assert float(jnp.max(jnp.abs(grad))) <= 2.0 / 8 + 1e-6
  np.testing.assert_array_equal(grad[..., 3], 0.0)
