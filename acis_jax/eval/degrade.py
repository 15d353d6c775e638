"""Degradations of clean images for the reconstruction experiments (paper sec 3.1).

Every degradation is a pure JAX function `(key, image) -> degraded` of ONE case,
`image: (*spatial, channels)` (2-D `(H, W, C)` or 3-D `(D, H, W, C)`; the spatial rank is
`image.ndim - 1`), returning an array of the same shape and dtype. They are jit- and
vmap-friendly: batch them with `jax.vmap(degrade)(jax.random.split(key, n), images)`.
Blurring and down-sampling are deterministic and ignore the key; the key keeps one signature for
all three, so the trainer can draw fresh degradations every step without knowing which one runs.

  * "superres": bilinear (trilinear in 3-D) down-sampling by `factor` (2 or 4 in the paper),
    then bilinear up-sampling back to the original grid. Decision: the networks see the
    low-resolution image re-sampled onto the full grid (as SRCNN/VDSR do and as medical SR
    commonly does), so one network with input size = output size serves all three tasks,
    including RED-CNN, which cannot up-sample. EDSR and ESRT up-sample inside the network
    instead (pixel shuffle); our ResNet and ESRT therefore have no up-sampler (see recon_nets).
    Both resamplings use the half-pixel grid convention without an anti-aliasing filter, i.e.
    `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`, the usual meaning
    of "bilinear down-sampling" in SR code: output voxel j samples the input at
    `(j + 0.5) * factor - 0.5` (a factor-2 down-sampling is a 2^n-voxel mean). Beyond the
    border the edge value is held.
  * "deblur": Gaussian blur with standard deviation `sigma` voxels along every spatial axis,
    truncated at 4 sigma, borders by half-sample symmetric reflection (`d c b a | a b c d`),
    i.e. `scipy.ndimage.gaussian_filter(mode="reflect", truncate=4.0)`. The paper's text
    gives sigma in {1, 2, 5}; its Table 2 lists 2, 3 and 5. We default to the text.
  * "denoise": additive zero-mean Gaussian noise of standard deviation `sigma` in intensity
    units (images in [0, 1]: sigma in {0.1, 0.2, 0.5}), not clipped, so the noise stays exactly
    Gaussian as the paper states.
"""
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEBLUR_SIGMAS = (1.0, 2.0, 5.0)
NOISE_SIGMAS = (0.1, 0.2, 0.5)
SUPERRES_FACTORS = (2, 4)
TASKS = ("denoise", "deblur", "superres")
# scipy.ndimage.gaussian_filter's default: the kernel is cut at 4 standard deviations.
TRUNCATE = 4.0

Degradation = Callable[[jax.Array, jax.Array], jax.Array]


def _spatial_rank(image: jax.Array, name: str) -> int:
  if image.ndim not in (3, 4):
    raise ValueError(f"{name}: expected one case of shape (*spatial, channels) with 2 or 3 "
                     f"spatial axes, got shape {image.shape}")
  return image.ndim - 1


def gaussian_taps(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
  """Normalised 1-D Gaussian of std `sigma` voxels, radius `int(truncate * sigma + 0.5)` taps."""
  if not sigma > 0:
    raise ValueError(f"gaussian blur: sigma must be > 0 voxels, got {sigma}")
  radius = int(truncate * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1)
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


def gaussian_blur(image: jax.Array, sigma: float, *, truncate: float = TRUNCATE) -> jax.Array:
  """Separable Gaussian blur of one case over its spatial axes, channels independent.

  Args:
    image: `(*spatial, channels)`, 2 or 3 spatial axes.
    sigma: standard deviation in voxels, the same along every spatial axis (static).
    truncate: the kernel radius in standard deviations (static).

  Returns:
    The blurred image, same shape and dtype; borders by half-sample symmetric reflection
    (`scipy.ndimage.gaussian_filter(mode="reflect")`).
  """
  rank = _spatial_rank(image, "gaussian_blur")
  # numpy's "symmetric" repeats the reflection when the radius exceeds the size, like scipy.
  return separable_filter(image, [float(w) for w in gaussian_taps(sigma, truncate)],
                          range(rank), pad_mode="symmetric")


def separable_filter(image: jax.Array, taps: Sequence, axes: Iterable[int], *,
                     pad_mode: str) -> jax.Array:
  """`image` filtered along each of `axes` by the same odd-length 1-D kernel `taps` (floats or
  traced scalars), borders padded by `jnp.pad`'s `pad_mode`; same shape and dtype.

  A sum of shifted slices: cheaper on CPU than XLA's convolution with long kernels.
  """
  radius = len(taps) // 2
  for axis in axes:
    size = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode=pad_mode)
    image = sum(w * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
                for k, w in enumerate(taps)).astype(image.dtype)
  return image


def _resize_spatial(image: jax.Array, spatial: tuple[int, ...], antialias: bool) -> jax.Array:
  return jax.image.resize(image, (*spatial, image.shape[-1]), method="linear",
                          antialias=antialias)


def downsample(image: jax.Array, factor: int, *, antialias: bool = False) -> jax.Array:
  """Bilinear/trilinear down-sampling of one case by an integer `factor` along every spatial axis.

  Args:
    image: `(*spatial, channels)`; every spatial size a multiple of `factor`.
    factor: the integer down-sampling factor (static).
    antialias: low-pass the image first (a `factor`-wide triangle filter, jax.image's
      default). False (our default) samples the bilinear interpolant at the low-resolution
      voxel centres, as `torch.nn.functional.interpolate` does.

  Returns:
    `(*(spatial // factor), channels)`.
  """
  rank = _spatial_rank(image, "downsample")
  if not (isinstance(factor, (int, np.integer)) and factor >= 1):
    raise ValueError(f"downsample: factor must be a positive integer, got {factor!r}")
  spatial = image.shape[:rank]
  if any(s % factor for s in spatial):
    raise ValueError(f"downsample: every spatial size must be a multiple of factor={factor}, "
                     f"got {spatial}")
  return _resize_spatial(image, tuple(s // factor for s in spatial), antialias)


def upsample(image: jax.Array, spatial: tuple[int, ...]) -> jax.Array:
  """Bilinear/trilinear up-sampling of one case `(*small, channels)` to `(*spatial, channels)`."""
  rank = _spatial_rank(image, "upsample")
  if len(spatial) != rank:
    raise ValueError(f"upsample: target spatial shape {spatial} has {len(spatial)} axes, the "
                     f"image has {rank}")
  return _resize_spatial(image, tuple(spatial), antialias=False)


def blur(key: jax.Array, image: jax.Array, *, sigma: float) -> jax.Array:
  """The "deblur" input: `gaussian_blur(image, sigma)`; `key` is unused (deterministic)."""
  del key
  return gaussian_blur(image, sigma)


def add_noise(key: jax.Array, image: jax.Array, *, sigma: float) -> jax.Array:
  """The "denoise" input: `image + sigma * N(0, 1)` voxel-wise, not clipped."""
  _spatial_rank(image, "add_noise")
  if not sigma >= 0:
    raise ValueError(f"add_noise: sigma must be >= 0, got {sigma}")
  return image + sigma * jax.random.normal(key, image.shape, image.dtype)


def degrade_resolution(key: jax.Array, image: jax.Array, *, factor: int) -> jax.Array:
  """The "superres" input: down-sample by `factor`, up-sample back to the original grid."""
  del key
  rank = _spatial_rank(image, "degrade_resolution")
  return upsample(downsample(image, factor), image.shape[:rank])


def make_degradation(task: str, level: float) -> Degradation:
  """The degradation `(key, image) -> degraded` of a reconstruction task.

  Args:
    task: "denoise" (level = noise sigma, intensity units), "deblur" (level = blur sigma,
      voxels) or "superres" (level = integer down-sampling factor).
    level: the task's strength, see above.
  """
  if task == "denoise":
    return lambda key, image: add_noise(key, image, sigma=float(level))
  if task == "deblur":
    gaussian_taps(float(level))  # validates sigma now rather than at trace time
    return lambda key, image: blur(key, image, sigma=float(level))
  if task == "superres":
    if float(level) != int(level) or int(level) < 1:
      raise ValueError(f"superres: the level is the down-sampling factor, a positive integer, "
                       f"got {level!r}")
    return lambda key, image: degrade_resolution(key, image, factor=int(level))
  raise ValueError(f"unknown reconstruction task {task!r}; expected one of {TASKS}")
