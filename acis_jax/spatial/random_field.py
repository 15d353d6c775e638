"""Random smooth velocity fields, the deformations that make variants of real anatomy, and the
periodic Gaussian smoothing they are made with."""
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def smooth_periodic(x: jax.Array, scale: float) -> jax.Array:
  """`x` `(*spatial, C)` convolved with a Gaussian of standard deviation `scale` voxels along
  every spatial axis, through the FFT (so the grid wraps around)."""
  if scale <= 0:
    raise ValueError(f"the smoothing scale must be positive, got {scale}")
  spatial = x.shape[:-1]
  axes = tuple(range(len(spatial)))
  frequencies = jnp.meshgrid(*[jnp.fft.fftfreq(n) for n in spatial[:-1]],
                             jnp.fft.rfftfreq(spatial[-1]), indexing="ij")
  # The Fourier transform of a Gaussian of std `scale` (voxels), frequencies in cycles/voxel.
  transfer = jnp.exp(-2.0 * (jnp.pi * scale) ** 2 * sum(f ** 2 for f in frequencies))
  return jnp.fft.irfftn(jnp.fft.rfftn(x, axes=axes) * transfer[..., None], s=spatial, axes=axes)


def random_velocity(key: jax.Array, spatial_shape: Sequence[int], rms: float,
                    scale: float) -> jax.Array:
  """A stationary velocity field `(*spatial_shape, ndim)`, voxel units: white noise smoothed
  by a Gaussian of standard deviation `scale` voxels (`smooth_periodic`), scaled so that the
  root mean square of its vector lengths is `rms` voxels.

  Integrated by scaling and squaring (`integrate_velocity`) it gives a diffeomorphism whose
  displacements are about `rms` voxels and vary over about `scale` voxels.
  """
  spatial_shape = tuple(int(n) for n in spatial_shape)
  field = smooth_periodic(jax.random.normal(key, (*spatial_shape, len(spatial_shape))), scale)
  norm = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(field), axis=-1)))
  return (rms / jnp.maximum(norm, 1e-12)) * field
