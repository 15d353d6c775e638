"""Random smooth velocity fields: their size, their correlation length (closed form) and the
diffeomorphisms they integrate to."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acis_jax.spatial import folding_fraction, integrate_velocity, random_velocity


@pytest.mark.parametrize("shape", [(48, 40), (16, 20, 12)])
def test_the_root_mean_square_length_is_the_one_asked_for(shape):
  field = random_velocity(jax.random.key(0), shape, 2.5, 3.0)
  assert field.shape == (*shape, len(shape))
  np.testing.assert_allclose(np.sqrt(np.mean(np.sum(np.square(field), -1))), 2.5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(random_velocity(jax.random.key(0), shape, 0.0, 3.0)))) == 0.0


def test_the_correlation_is_that_of_gaussian_smoothed_white_noise():
  """White noise smoothed by a Gaussian of std s has correlation exp(-d^2 / (4 s^2)) at a
  lag of d voxels."""
  scale, size = 3.0, 128
  fields = np.stack([np.asarray(random_velocity(jax.random.key(k), (size, size), 1.0, scale))
                     for k in range(4)])
  fields = fields - fields.mean(axis=(1, 2), keepdims=True)
  for lag in (2, 3, 6):
    for axis in (1, 2):
      shifted = np.roll(fields, lag, axis=axis)  # the field is periodic
      correlation = np.mean(fields * shifted) / np.mean(fields * fields)
      assert correlation == pytest.approx(np.exp(-lag ** 2 / (4 * scale ** 2)), abs=0.05)


def test_integrated_fields_of_the_default_size_do_not_fold():
  """synthesize's default deformation (2 voxels over 8) on the demo's grid, and twice it."""
  for rms in (2.0, 4.0):
    velocity = jax.vmap(lambda k: random_velocity(k, (64, 64), rms, 8.0))(
        jax.random.split(jax.random.key(1), 8))
    disp = integrate_velocity(velocity)
    assert float(jnp.max(folding_fraction(disp))) == 0.0
    assert float(jnp.sqrt(jnp.mean(jnp.sum(disp ** 2, -1)))) == pytest.approx(rms, rel=0.2)


def test_a_scale_that_is_not_positive_is_refused():
  with pytest.raises(ValueError, match="scale"):
    random_velocity(jax.random.key(0), (8, 8), 1.0, 0.0)
