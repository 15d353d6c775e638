"""The three generators of ACIS sec 2.2, rank-agnostic and channel-last.

- `MaskGenerator`: latent `z` -> pseudo-mask in [0, 1] (trained against a WGAN-GP critic); with
  more output channels and no sigmoid, the noise decoder of the comparison synthesizers
  (`acis_jax.synthesizers`: a label map, or an image and its label map, from noise).
- `AnnotationGenerator`: pseudo-mask -> label logits (a U-Net).
- `ImageGenerator`: concat(pseudo-mask, one-hot labels) -> image in [0, 1] (pix2pix U-Net, whose
  dropout is its noise source: it runs whenever a key is given, at training and sampling time).
"""
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from acis_jax.models.layers import (ACTIVATIONS, ConvStage, UNet, Up, check_choice,
                                    check_divisible, check_input, check_ndim, conv)


class MaskGenerator(nnx.Module):
  """Latent `(b, latent_dim)` -> pseudo-mask `(b, *out_shape, 1)` in [0, 1].

  A conv decoder: a linear map to a base grid `out_shape / 2**(len(features) - 1)` with
  `features[0]` channels, then per further level an up-sampling and a ConvStage to
  `features[i]` channels, then a 1-wide conv to `out_channels` channels and a sigmoid (or, with
  `sigmoid=False`, float32 logits `(b, *out_shape, out_channels)`).
  """

  def __init__(self, latent_dim: int, out_shape: Sequence[int], *,
               features: Sequence[int] = (256, 128, 64, 32, 16), convs_per_level: int = 2,
               norm: str = "group", activation: str = "leaky_relu", up: str = "nearest",
               out_channels: int = 1, sigmoid: bool = True, remat: bool = False,
               dtype: Any = None, rngs: nnx.Rngs):
    out_shape = tuple(int(s) for s in out_shape)
    check_ndim(len(out_shape))
    check_choice("activation", activation, tuple(ACTIVATIONS))
    features = tuple(int(f) for f in features)
    if not features:
      raise ValueError("features needs at least one level")
    factor = 2 ** (len(features) - 1)
    check_divisible(out_shape, factor, f"MaskGenerator out_shape with {len(features)} levels")
    ndim = len(out_shape)
    self.latent_dim = latent_dim
    self.out_shape = out_shape
    self.base_shape = tuple(s // factor for s in out_shape)
    self.features = features
    self.activation = activation
    self.sigmoid = sigmoid
    self.project = nnx.Linear(latent_dim, math.prod(self.base_shape) * features[0], dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    stage = dict(num_convs=convs_per_level, norm=norm, activation=activation, remat=remat,
                 dtype=dtype, rngs=rngs)
    self.ups = nnx.List([Up(features[i - 1], ndim, mode=up, dtype=dtype, rngs=rngs)
                         for i in range(1, len(features))])
    self.stages = nnx.List([ConvStage(features[0], features[0], ndim, **stage)] + [
        ConvStage(features[i - 1], features[i], ndim, **stage) for i in range(1, len(features))])
    self.head = conv(features[-1], out_channels, ndim, kernel_size=1, dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    if z.ndim != 2 or z.shape[1] != self.latent_dim:
      raise ValueError(f"latent must have shape (batch, {self.latent_dim}), got {z.shape}")
    x = self.project(z).reshape(z.shape[0], *self.base_shape, self.features[0])
    x = ACTIVATIONS[self.activation](x)
    for i, stage in enumerate(self.stages):
      if i > 0:
        x = self.ups[i - 1](x)
      x = stage(x)
    out = self.head(x).astype(jnp.float32)
    return jax.nn.sigmoid(out) if self.sigmoid else out


class AnnotationGenerator(nnx.Module):
  """Pseudo-mask `(b, *spatial, in_channels)` -> label logits `(b, *spatial, num_classes)`.

  Spatial sizes must be multiples of `2 ** (len(features) - 1)`.
  """

  def __init__(self, num_classes: int, ndim: int, *, in_channels: int = 1,
               features: Sequence[int] = (32, 64, 128, 256), convs_per_level: int = 2,
               norm: str = "group", activation: str = "leaky_relu", down: str = "conv",
               up: str = "nearest", dropout: float = 0.0, remat: bool = False, dtype: Any = None,
               rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    self.num_classes = num_classes
    self.unet = UNet(in_channels, ndim, features=features, convs_per_level=convs_per_level,
                     norm=norm, activation=activation, down=down, up=up, dropout=dropout,
                     remat=remat, dtype=dtype, rngs=rngs)
    self.head = conv(self.unet.features[0], num_classes, ndim, kernel_size=1, dtype=dtype,
                     rngs=rngs)

  def __call__(self, mask: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """Label logits (float32); dropout (if built with a rate) runs only when `key` is given."""
    return self.head(self.unet(mask, key)).astype(jnp.float32)


class ImageGenerator(nnx.Module):
  """pix2pix-style U-Net: pseudo-mask `(b, *spatial, 1)` and labels `(b, *spatial, num_classes)`
  -> image `(b, *spatial, 1)` in [0, 1].

  `num_classes = 0` is the label-free mode (input: the pseudo-mask alone); `with_mask=False`
  the labels-only mode (input: the labels alone; the MedGen3D-like synthesizer). Labels are
  one-hot or class probabilities. Dropout (rate `dropout`, in the `dropout_stages` deepest
  decoder stages, as pix2pix) runs whenever a key is given; it is the generator's only noise
  source. It never reaches the full-resolution stage that feeds the output layer: pix2pix's
  dropout sits at 1/32 to 1/128 of the image, and at full resolution it is per-voxel noise in
  the image (the "salt" of early contact sheets). So a 2-level generator has none.
  """

  def __init__(self, num_classes: int, ndim: int, *, features: Sequence[int] = (64, 128, 256, 512),
               convs_per_level: int = 1, norm: str = "instance", activation: str = "leaky_relu",
               down: str = "conv", up: str = "transpose", dropout: float = 0.5,
               dropout_stages: int = 3, with_mask: bool = True, remat: bool = False,
               dtype: Any = None, rngs: nnx.Rngs):
    if num_classes < 0 or (num_classes == 0 and not with_mask):
      raise ValueError(f"num_classes must be >= 0 (0 = label-free), and >= 1 without a "
                       f"pseudo-mask, got {num_classes}")
    self.num_classes = num_classes
    self.ndim = ndim
    self.with_mask = with_mask
    self.unet = UNet(int(with_mask) + num_classes, ndim, features=features,
                     convs_per_level=convs_per_level, norm=norm, activation=activation,
                     down=down, up=up, dropout=dropout,
                     dropout_stages=min(dropout_stages, len(features) - 2), remat=remat,
                     dtype=dtype, rngs=rngs)
    self.head = conv(self.unet.features[0], 1, ndim, kernel_size=1, dtype=dtype, rngs=rngs)

  def __call__(self, mask: jax.Array | None, labels: jax.Array | None = None, *,
               key: jax.Array | None = None) -> jax.Array:
    if not self.with_mask:
      if mask is not None:
        raise ValueError("ImageGenerator was built without a pseudo-mask but got one")
      if labels is None:
        raise ValueError(f"ImageGenerator needs labels with {self.num_classes} channels")
      check_input(labels, self.ndim, self.num_classes, "labels")
      return jax.nn.sigmoid(self.head(self.unet(labels, key)).astype(jnp.float32))
    check_input(mask, self.ndim, 1, "pseudo-mask")
    if self.num_classes == 0:
      if labels is not None:
        raise ValueError("ImageGenerator was built label-free (num_classes=0) but got labels")
      x = mask
    else:
      if labels is None:
        raise ValueError(f"ImageGenerator needs labels with {self.num_classes} channels")
      check_input(labels, self.ndim, self.num_classes, "labels")
      if labels.shape[:-1] != mask.shape[:-1]:
        raise ValueError(f"labels {labels.shape} and pseudo-mask {mask.shape} differ in "
                         "batch or spatial shape")
      x = jnp.concatenate([mask, labels.astype(mask.dtype)], axis=-1)
    return jax.nn.sigmoid(self.head(self.unet(x, key)).astype(jnp.float32))
