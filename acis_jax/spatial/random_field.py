"""Random smooth velocity fields: the deformations that make variants of real anatomy."""
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def random_velocity(key: jax.Array, spatial_shape: Sequence[int], rms: float,
                    scale: float) -> jax.Array:
  """A stationary velocity field `(*spatial_shape, ndim)`, voxel units: white noise smoothed
  by a Gaussian of standard deviation `scale` voxels (periodic, through the FFT), scaled so
  that the root mean square of its vector lengths is `rms` voxels.

  Integrated by scaling and squaring (`integrate_velocity`) it gives a diffeomorphism whose
  displacements are about `rms` voxels and vary over about `scale` voxels.
  """
  spatial_shape = tuple(int(n) for n in spatial_shape)
  if scale <= 0:
    raise ValueError(f"the deformation scale must be positive, got {scale}")
  ndim = len(spatial_shape)
  axes = tuple(range(ndim))
  noise = jax.random.normal(key, (ndim, *spatial_shape))
  frequencies = jnp.meshgrid(*[jnp.fft.fftfreq(n) for n in spatial_shape[:-1]],
                             jnp.fft.rfftfreq(spatial_shape[-1]), indexing="ij")
  # The Fourier transform of a Gaussian of std `scale` (voxels), frequencies in cycles/voxel.
  transfer = jnp.exp(-2.0 * (jnp.pi * scale) ** 2 * sum(f ** 2 for f in frequencies))
  smooth = jnp.fft.irfftn(jnp.fft.rfftn(noise, axes=[a + 1 for a in axes]) * transfer,
                          s=spatial_shape, axes=[a + 1 for a in axes])
  field = jnp.moveaxis(smooth, 0, -1)
  norm = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(field), axis=-1)))
  return (rms / jnp.maximum(norm, 1e-12)) * field
