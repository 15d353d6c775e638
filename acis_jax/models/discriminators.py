"""Discriminators: a WGAN-GP critic for pseudo-masks and a pix2pix PatchGAN for images.

Both take any number of input channels (the image discriminator sees image, pseudo-mask and
labels concatenated) and use only per-sample normalisation, never batch statistics.
"""
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from acis_jax.models.layers import ConvBlock, check_input, check_ndim


class _ConvStack(nnx.Module):
  """Kernel-4, pad-1 ConvBlocks with the given widths and strides; the first has no norm."""

  def __init__(self, in_channels: int, ndim: int, features: Sequence[int], strides: Sequence[int],
               *, norm: str, activation: str, dtype: Any, rngs: nnx.Rngs):
    widths = [in_channels, *features]
    self.blocks = nnx.List([
        ConvBlock(widths[i], widths[i + 1], ndim, kernel_size=4, stride=strides[i], padding=1,
                  norm="none" if i == 0 else norm, activation=activation, dtype=dtype, rngs=rngs)
        for i in range(len(features))])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = block(x)
    return x


def _check_features(features: Sequence[int]) -> tuple[int, ...]:
  features = tuple(int(f) for f in features)
  if len(features) < 2:
    raise ValueError(f"features needs at least two layers, got {features}")
  return features


class Critic(nnx.Module):
  """WGAN-GP critic: `(b, *spatial_shape, in_channels)` -> scores `(b,)` (unbounded, float32).

  Kernel-4 stride-2 convolutions with `features` widths, then a linear map of the whole final
  feature grid (as DCGAN's critic): the score depends on where things are, so the generator is
  judged on the layout of the anatomy, not only on local texture, which a spatial mean of
  local features could not see. Default norm is "none" (WGAN-GP penalises per-sample
  gradients: no batch norm); "layer" is the WGAN-GP paper's alternative.
  """

  def __init__(self, in_channels: int, spatial_shape: Sequence[int], *,
               features: Sequence[int] = (64, 128, 256, 512), norm: str = "none",
               activation: str = "leaky_relu", dtype: Any = None, rngs: nnx.Rngs):
    spatial_shape = tuple(int(s) for s in spatial_shape)
    check_ndim(len(spatial_shape))
    features = _check_features(features)
    final = spatial_shape
    for _ in features:
      final = tuple((s + 2 - 4) // 2 + 1 for s in final)  # kernel 4, stride 2, padding 1
    if min(final) < 1:
      raise ValueError(f"Critic: {len(features)} stride-2 layers need every spatial size of "
                       f"at least {2 ** len(features)}, got {spatial_shape}")
    self.in_channels = in_channels
    self.spatial_shape = spatial_shape
    self.trunk = _ConvStack(in_channels, len(spatial_shape), features, (2,) * len(features),
                            norm=norm, activation=activation, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(math.prod(final) * features[-1], 1, dtype=dtype,
                           param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, len(self.spatial_shape), self.in_channels, "critic input")
    if x.shape[1:-1] != self.spatial_shape:
      raise ValueError(f"critic input: spatial shape {x.shape[1:-1]}, but this critic was "
                       f"built for {self.spatial_shape}")
    h = self.trunk(x)
    return self.head(h.reshape(h.shape[0], -1))[:, 0].astype(jnp.float32)


class PatchDiscriminator(nnx.Module):
  """pix2pix PatchGAN: `(b, *spatial, in_channels)` -> logits `(b, *patch_grid, 1)` (float32).

  Kernel-4, pad-1 convolutions: stride 2 for all but the last of `features`, then stride 1, then
  a stride-1 conv to one channel. The defaults `(64, 128, 256, 512)` are the 70x70 PatchGAN:
  each logit sees a 70-voxel-wide window, and a 256 input gives a 30 grid (per axis,
  `n -> n // 2` per stride-2 layer, then `-1` per stride-1 layer).
  """

  def __init__(self, in_channels: int, ndim: int, *,
               features: Sequence[int] = (64, 128, 256, 512), norm: str = "instance",
               activation: str = "leaky_relu", dtype: Any = None, rngs: nnx.Rngs):
    check_ndim(ndim)
    features = _check_features(features)
    self.in_channels = in_channels
    self.ndim = ndim
    strides = (2,) * (len(features) - 1) + (1,)
    self.trunk = _ConvStack(in_channels, ndim, features, strides, norm=norm,
                            activation=activation, dtype=dtype, rngs=rngs)
    self.head = nnx.Conv(features[-1], 1, (4,) * ndim, padding=((1, 1),) * ndim, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.ndim, self.in_channels, "discriminator input")
    return self.head(self.trunk(x)).astype(jnp.float32)
