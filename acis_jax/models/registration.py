"""VoxelMorph-style diffeomorphic registration net with Monte-Carlo dropout (ACIS sec 2.3).

`(moving, fixed)` -> stationary velocity `v` -> scaling and squaring -> displacement `phi`,
in voxel units, component `i` along array axis `i` (the `acis_jax.spatial` convention), so that
`warp(moving, phi)` resembles `fixed`. With dropout and a key, each pass draws a different field:
`register` runs T such passes as one vectorised call (the `phi_t` of eq. 3). Dropout drops
whole feature maps of the coarse decoder levels, so two passes differ by a deformation as
smooth as the fields themselves, as two plausible registrations do, not by per-voxel noise.

Default widths follow VoxelMorph (ref [23]): levels `(16, 32, 32, 32, 32)` with one conv per
level (encoder 16-32-32-32, decoder 32-32-32-32 with skips) and two full-resolution convs
`(16, 16)`; no normalisation, LeakyReLU 0.2, max-pool down, nearest up. The "16..256 ladder"
of DESIGN.md is `features=(16, 32, 64, 128, 256)`.
"""
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from acis_jax.models.layers import ConvBlock, UNet, check_input, conv
from acis_jax.spatial import integrate_velocity


class RegistrationNet(nnx.Module):
  """`(moving, fixed)`, each `(b, *spatial, in_channels)` -> displacement `(b, *spatial, ndim)`.

  Spatial sizes must be multiples of `2 ** (len(features) - 1)`. The velocity head starts near
  zero (weights ~ N(0, 1e-5), zero bias), so an untrained net gives a near-identity transform.
  Dropout (rate `dropout`, whole feature maps, after every decoder stage but the
  full-resolution one) runs only when a key is given. `int_downsize > 1` integrates at that
  many times coarser resolution (VoxelMorph's `int_downsize`; 2 is 8x cheaper in 3-D).
  """

  def __init__(self, ndim: int, *, in_channels: int = 1,
               features: Sequence[int] = (16, 32, 32, 32, 32), convs_per_level: int = 1,
               final_convs: Sequence[int] = (16, 16), norm: str = "none",
               activation: str = "leaky_relu", down: str = "pool", up: str = "nearest",
               dropout: float = 0.0, integration_steps: int = 7, int_downsize: int = 1,
               remat: bool = False, dtype: Any = None, rngs: nnx.Rngs):
    if integration_steps < 0:
      raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
    self.ndim = ndim
    self.in_channels = in_channels
    self.integration_steps = integration_steps
    self.int_downsize = int_downsize
    self.unet = UNet(2 * in_channels, ndim, features=features, convs_per_level=convs_per_level,
                     norm=norm, activation=activation, down=down, up=up, dropout=dropout,
                     dropout_stages=len(features) - 2, channel_dropout=True, remat=remat,
                     dtype=dtype, rngs=rngs)
    widths = [self.unet.features[0], *final_convs]
    self.final = nnx.List([
        ConvBlock(a, b, ndim, norm=norm, activation=activation, dtype=dtype, rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:])])
    self.flow = conv(widths[-1], ndim, ndim, kernel_size=3, dtype=dtype,
                     kernel_init=nnx.initializers.normal(1e-5), rngs=rngs)

  def velocity(self, moving: jax.Array, fixed: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """Stationary velocity field `(b, *spatial, ndim)`, float32, voxel units."""
    check_input(moving, self.ndim, self.in_channels, "moving image")
    check_input(fixed, self.ndim, self.in_channels, "fixed image")
    if moving.shape != fixed.shape:
      raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} shapes differ")
    x = self.unet(jnp.concatenate([moving, fixed], axis=-1), key)
    for block in self.final:
      x = block(x)
    return self.flow(x).astype(jnp.float32)

  def fields(self, moving: jax.Array, fixed: jax.Array, *,
             key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(velocity, displacement)`, both `(b, *spatial, ndim)` in voxels."""
    v = self.velocity(moving, fixed, key=key)
    return v, integrate_velocity(v, steps=self.integration_steps, downsize=self.int_downsize)

  def __call__(self, moving: jax.Array, fixed: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """Displacement `(b, *spatial, ndim)`, voxels: `warp(moving, phi)` approximates `fixed`."""
    return self.fields(moving, fixed, key=key)[1]


@partial(jax.jit, static_argnums=(0, 5))
def _register(graphdef: nnx.GraphDef, state: nnx.State, moving: jax.Array, fixed: jax.Array,
              key: jax.Array, passes: int) -> jax.Array:
  def one_pass(k):
    return nnx.merge(graphdef, state)(moving, fixed, key=k)
  return jax.vmap(one_pass)(jax.random.split(key, passes))


def register(model: RegistrationNet, moving: jax.Array, fixed: jax.Array, key: jax.Array,
             passes: int = 8) -> jax.Array:
  """`passes` stochastic (dropout) forward passes as one compiled, vectorised call.

  Args:
    model: a RegistrationNet built with `dropout > 0` (else every pass is the same field).
    moving, fixed: `(b, *spatial, C)` images.
    key: PRNG key; pass `t` uses `split(key, passes)[t]`.
    passes: T, the number of Monte-Carlo samples.

  Returns:
    Displacements `(passes, b, *spatial, ndim)`, voxel units.
  """
  if passes < 1:
    raise ValueError(f"passes must be at least 1, got {passes}")
  graphdef, state = nnx.split(model)
  return _register(graphdef, state, moving, fixed, key, passes)
