"""SynthSeg-style domain randomisation (Billot et al., Medical Image Analysis 2023): image-label
pairs from real label maps alone, no training.

Each pair: one of the real label maps, moved by a random smooth diffeomorphism (labels stay
labels: one-hot, linear warp, argmax); an image that paints every label with intensities
from its own Gaussian, mean and standard deviation drawn per label and per pair; a Gaussian
blur of random width; a smooth multiplicative bias field; additive noise; a random gamma.
What it keeps of SynthSeg: labels -> random-appearance images through a Gaussian mixture,
deformation, blur, bias and noise, and one generation-only label as SynthSeg paints unlabelled
tissue with extra labels: given the real images, the background brighter than
`body_threshold` (the body, not the air around it) gets a Gaussian of its own, and is
background again in the output labels. What it leaves out: the random affine and resolution
(slice thickness) models, and SynthSeg's finer generation labels (the unlabelled body is one
class, so it is painted as one).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from acis_jax.eval.degrade import separable_filter
from acis_jax.spatial import integrate_velocity, random_velocity, smooth_periodic, warp_labels


@dataclasses.dataclass(frozen=True)
class SynthSegParams:
  """Ranges of the randomisation; intensities in [0, 1] image units, lengths in voxels.

  Attributes:
    mean_range: each label's mean intensity is uniform in this range (SynthSeg: 0-255, here
      the same range on [0, 1]).
    std_range: each label's standard deviation, uniform in this range (SynthSeg: 0-35 of 255).
    deformation_rms, deformation_scale: the velocity field's rms length and smoothing scale
      (`spatial.random_velocity`), integrated in `integration_steps` squarings.
    blur_max: the blur's Gaussian standard deviation is uniform in [0, blur_max].
    bias_std, bias_scale: the log bias field's standard deviation and smoothing scale.
    noise_max: the noise's standard deviation is uniform in [0, noise_max].
    gamma_std: the image is raised to exp(g), g normal with this standard deviation.
    body_threshold: background voxels of the real image above this ([0, 1] units; 0.3125 is
      -500 HU in the [-1000, 600] window) form the generation-only body label.
  """
  mean_range: tuple[float, float] = (0.0, 1.0)
  std_range: tuple[float, float] = (0.0, 0.14)
  deformation_rms: float = 2.0
  deformation_scale: float = 8.0
  integration_steps: int = 7
  blur_max: float = 1.0
  bias_std: float = 0.3
  bias_scale: float = 12.0
  noise_max: float = 0.03
  gamma_std: float = 0.2
  body_threshold: float = 0.3125

  @classmethod
  def from_config(cls, section) -> "SynthSegParams":
    values = {f.name: section[f.name] for f in dataclasses.fields(cls)}
    for name in ("mean_range", "std_range"):
      values[name] = tuple(float(v) for v in values[name])
    params = cls(**values)
    for name in ("mean_range", "std_range"):
      low, high = getattr(params, name)
      if not 0.0 <= low <= high:
        raise ValueError(f"synthseg.{name}={getattr(params, name)}: need 0 <= low <= high")
    return params


def label_intensities(key: jax.Array, labels: jax.Array, num_classes: int,
                      params: SynthSegParams) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each voxel drawn from its label's Gaussian: `(image (*spatial), means (K,), stds (K,))`."""
  k_mean, k_std, k_voxel = jax.random.split(key, 3)
  means = jax.random.uniform(k_mean, (num_classes,), minval=params.mean_range[0],
                             maxval=params.mean_range[1])
  stds = jax.random.uniform(k_std, (num_classes,), minval=params.std_range[0],
                            maxval=params.std_range[1])
  image = means[labels] + stds[labels] * jax.random.normal(k_voxel, labels.shape)
  return image, means, stds


def gaussian_blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """`image` `(*spatial)` blurred by a Gaussian of standard deviation `sigma` (traced) along
  every axis, with a kernel of `2 radius + 1` taps and the edges repeated."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * (offsets / jnp.maximum(sigma, 1e-3)) ** 2)
  weights = weights / jnp.sum(weights)
  return separable_filter(image, list(weights), range(image.ndim), pad_mode="edge")


def generation_labels(label_maps: jax.Array, images: jax.Array | None, num_classes: int,
                      params: SynthSegParams) -> jax.Array:
  """The label maps with the body (background above `body_threshold` in `images`
  `(n, *spatial, 1)`) as label `num_classes`; the label maps themselves without images."""
  if images is None:
    return label_maps
  body = (label_maps == 0) & (images[..., 0] > params.body_threshold)
  return jnp.where(body, num_classes, label_maps)


@functools.partial(jax.jit, static_argnames=("num_classes", "params"))
def synthseg_pair(key: jax.Array, label_maps: jax.Array, num_classes: int,
                  params: SynthSegParams) -> tuple[jax.Array, jax.Array]:
  """One pair from generation label maps `(n, *spatial)` with labels in `[0, num_classes]`
  (`generation_labels`; `num_classes` the body): image `(*spatial, 1)` in [0, 1], labels in
  `[0, num_classes)`."""
  k_pick, k_velocity, k_paint, k_blur, k_bias, k_noise_std, k_noise, k_gamma = (
      jax.random.split(key, 8))
  spatial = label_maps.shape[1:]
  labels = label_maps[jax.random.randint(k_pick, (), 0, label_maps.shape[0])]
  velocity = random_velocity(k_velocity, spatial, params.deformation_rms,
                             params.deformation_scale)
  disp = integrate_velocity(velocity, params.integration_steps)
  labels = warp_labels(labels, disp, num_classes + 1)
  image, _, _ = label_intensities(k_paint, labels, num_classes + 1, params)
  radius = max(1, math.ceil(3 * params.blur_max))
  image = gaussian_blur(image, params.blur_max * jax.random.uniform(k_blur), radius)
  log_bias = smooth_periodic(jax.random.normal(k_bias, (*spatial, 1)), params.bias_scale)[..., 0]
  log_bias = params.bias_std * (log_bias - jnp.mean(log_bias)) / jnp.maximum(
      jnp.std(log_bias), 1e-12)
  image = image * jnp.exp(log_bias)
  noise_std = params.noise_max * jax.random.uniform(k_noise_std)
  image = image + noise_std * jax.random.normal(k_noise, spatial)
  low, high = jnp.min(image), jnp.max(image)
  image = (image - low) / jnp.maximum(high - low, 1e-6)
  image = image ** jnp.exp(params.gamma_std * jax.random.normal(k_gamma))
  return image[..., None].astype(jnp.float32), jnp.where(labels == num_classes, 0, labels)


def stages(config) -> list:
  """No stage: the SynthSeg-style synthesizer trains nothing (`acis_jax.train.stages`)."""
  del config
  return []


def synthseg_pairs(key: jax.Array, label_maps, count: int, num_classes: int,
                   params: SynthSegParams, images=None) -> tuple[jax.Array, jax.Array]:
  """`count` pairs (`synthseg_pair`) from real label maps `(n, *spatial)` and, optionally,
  their images `(n, *spatial, 1)` for the body label (`generation_labels`); the i-th pair
  from `fold_in(key, i)`: images `(count, *spatial, 1)`, labels `(count, *spatial)` int32."""
  label_maps = jnp.asarray(label_maps, jnp.int32)
  if label_maps.ndim not in (3, 4) or label_maps.shape[0] < 1:
    raise ValueError(f"synthseg: label maps must be (n >= 1, *spatial) in 2-D or 3-D, got "
                     f"shape {label_maps.shape}")
  if images is not None and tuple(images.shape) != (*label_maps.shape, 1):
    raise ValueError(f"synthseg: images of shape {tuple(images.shape)} do not match the label "
                     f"maps {tuple(label_maps.shape)}")
  label_maps = generation_labels(label_maps, None if images is None else jnp.asarray(images),
                                 num_classes, params)
  pairs = [synthseg_pair(jax.random.fold_in(key, i), label_maps, num_classes, params)
           for i in range(count)]
  return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
