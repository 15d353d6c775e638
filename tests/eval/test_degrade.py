"""Degradations: blur against scipy, down-sampling against closed forms, noise statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from acis_jax.eval import degrade


def _random_image(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape,sigma", [
    ((32, 32, 1), 1.0), ((32, 32, 1), 2.0), ((32, 30, 2), 5.0),  # radius 20 > half the size
    ((16, 16, 16, 1), 1.0), ((12, 16, 10, 2), 5.0)])
def test_blur_matches_scipy(shape, sigma):
  image = _random_image(shape)
  blurred = jax.jit(lambda x: degrade.gaussian_blur(x, sigma))(image)
  expected = np.stack([ndimage.gaussian_filter(image[..., c].astype(np.float64), sigma,
                                               mode="reflect", truncate=4.0)
                       for c in range(shape[-1])], axis=-1)
  np.testing.assert_allclose(blurred, expected, atol=1e-4)


def test_blur_vmaps_over_cases():
  images = _random_image((3, 16, 16, 1))
  batched = jax.jit(jax.vmap(degrade.make_degradation("deblur", 2.0)))(
      jax.random.split(jax.random.key(0), 3), images)
  for image, result in zip(images, np.asarray(batched)):
    np.testing.assert_allclose(result[..., 0], ndimage.gaussian_filter(image[..., 0], 2.0),
                               atol=1e-4)


def _ramp(spatial, slopes, offset=0.3):
  """`offset + sum_a slopes[a] * index_a` on a grid, with a channel axis."""
  grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in spatial], indexing="ij")
  return (offset + sum(s * g for s, g in zip(slopes, grids)))[..., None]


@pytest.mark.parametrize("spatial,slopes", [((32, 16), (0.01, -0.02)),
                                            ((16, 8, 24), (0.01, 0.02, -0.005))])
@pytest.mark.parametrize("factor", [2, 4])
def test_downsampling_a_ramp_is_exact(spatial, slopes, factor):
  """Low-res voxel j samples the ramp at (j + 0.5) * factor - 0.5 (half-pixel bilinear)."""
  image = _ramp(spatial, slopes).astype(np.float32)
  small = degrade.downsample(jnp.asarray(image), factor)
  centres = [(np.arange(n // factor) + 0.5) * factor - 0.5 for n in spatial]
  grids = np.meshgrid(*centres, indexing="ij")
  expected = 0.3 + sum(s * g for s, g in zip(slopes, grids))
  assert small.shape == tuple(n // factor for n in spatial) + (1,)
  np.testing.assert_allclose(small[..., 0], expected, atol=1e-5)


def test_factor_two_is_the_block_mean():
  image = _random_image((16, 12, 2))
  block_mean = image.reshape(8, 2, 6, 2, 2).mean(axis=(1, 3))
  np.testing.assert_allclose(degrade.downsample(jnp.asarray(image), 2), block_mean, atol=1e-6)


@pytest.mark.parametrize("factor", [2, 4])
def test_superres_input_of_a_ramp(factor):
  """Down then up again: a ramp comes back exactly between the outermost low-res voxel centres,
  and the edge value is held beyond them."""
  image = _ramp((32, 32), (0.01, 0.02)).astype(np.float32)
  degraded = np.asarray(degrade.make_degradation("superres", factor)(jax.random.key(0),
                                                                     jnp.asarray(image)))
  assert degraded.shape == image.shape
  # Up-sampling: full-res voxel i sits at (i + 0.5) / factor - 0.5 on the low-res grid.
  position = (np.arange(32) + 0.5) / factor - 0.5
  inside = (position >= 0) & (position <= 32 // factor - 1)
  np.testing.assert_allclose(degraded[np.ix_(inside, inside)], image[np.ix_(inside, inside)],
                             atol=1e-5)
  first_centre = (factor - 1) / 2  # the first low-res voxel's centre in full-res voxels
  np.testing.assert_allclose(degraded[0, inside, 0], 0.3 + 0.01 * first_centre
                             + 0.02 * np.arange(32)[inside], atol=1e-5)


def test_noise_has_the_requested_distribution():
  sigma = 0.2
  images = np.full((4, 64, 64, 1), 0.5, np.float32)
  noisy = jax.jit(jax.vmap(degrade.make_degradation("denoise", sigma)))(
      jax.random.split(jax.random.key(0), 4), images)
  noise = np.asarray(noisy, np.float64) - 0.5
  n = noise.size
  # Standard errors of the mean (sigma / sqrt(n)) and of the standard deviation
  # (sigma / sqrt(2 n)) of n Gaussian draws; 5 of them is a 1-in-a-million false alarm.
  assert abs(noise.mean()) < 5 * sigma / np.sqrt(n)
  assert abs(noise.std() - sigma) < 5 * sigma / np.sqrt(2 * n)
  # Every case of the batch gets its own noise, and the same key gives the same noise.
  assert not np.allclose(noise[0], noise[1])
  again = degrade.add_noise(jax.random.split(jax.random.key(0), 4)[2], images[2], sigma=sigma)
  np.testing.assert_allclose(again, noisy[2], atol=1e-6)


@pytest.mark.parametrize("task,level", [("superres", 2), ("deblur", 1.0), ("denoise", 0.1)])
def test_degradations_are_jit_vmap_friendly_in_3d(task, level):
  images = _random_image((2, 8, 8, 8, 1))
  out = jax.jit(jax.vmap(degrade.make_degradation(task, level)))(
      jax.random.split(jax.random.key(1), 2), images)
  assert out.shape == images.shape and out.dtype == images.dtype


@pytest.mark.parametrize("call,message", [
    (lambda: degrade.downsample(jnp.zeros((30, 32, 1)), 4), "multiple of factor=4"),
    (lambda: degrade.downsample(jnp.zeros((32, 32)), 2), "channels"),
    (lambda: degrade.gaussian_blur(jnp.zeros((8, 8, 1)), 0.0), "sigma"),
    (lambda: degrade.make_degradation("superres", 2.5), "positive integer"),
    (lambda: degrade.make_degradation("inpaint", 1.0), "unknown reconstruction task"),
    (lambda: degrade.upsample(jnp.zeros((4, 4, 1)), (8, 8, 8)), "axes"),
])
def test_bad_input_raises(call, message):
  with pytest.raises(ValueError, match=message):
    call()
