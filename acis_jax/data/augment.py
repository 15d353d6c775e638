"""Training-time augmentation (paper sec 3.1): random flips, rotations, affine transforms and
histogram shifts, in JAX, with one geometry shared by the image, its labels and extra images.

Conventions (as in `acis_jax.spatial`): images are channel-last `(*spatial, C)` with values in
[0, 1]; label maps are integer `(*spatial)`; displacement fields are `(*spatial, ndim)` in voxels
and `warp` samples the input at `identity + disp` (a pull). The affine below therefore maps each
OUTPUT voxel `x` to the INPUT position it reads, `A (x - c) + c + t`, with `c` the volume centre
`(shape - 1) / 2` in voxels and `t` a translation in voxels.

Two things to know:

- Flips are off by default (`flip_axes=()`): mirroring the left-right axis swaps anatomy whose
  labels name a side (left/right lung, lobes), so the flipped pair would be mislabelled. Enable
  flips only along axes where the labels are symmetric, or for label-free training. A flip is a
  reflection: its Jacobian determinant is -1, so folding checks do not apply to those fields.
- The histogram shift changes the image only. `extra` images (e.g. a pseudo-mask) get the
  geometry only; pseudo-masks that are computed FROM the image should be computed after
  augmentation (the pipeline does so), then they see the shifted intensities too.

Everything is a pure function of a key and one case: `jax.vmap` over keys (and cases) gives a
batch, and `jax.jit` works with the `AugmentParams` static (they are hashable).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from acis_jax.config_utils import dataclass_from_config
from acis_jax.spatial import identity_grid, warp, warp_labels

# Full float32 products: TF32 on GPUs would move far voxels by ~0.1 voxel.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Static augmentation settings; every range is symmetric about "no change".

  Attributes:
    enabled: False makes `augment` return its inputs unchanged.
    flip_axes: spatial axes that may be mirrored, each independently with `flip_probability`.
      Default none: a left-right flip breaks laterality labels (see the module docstring).
    flip_probability: chance that each axis in `flip_axes` is flipped.
    rotate_degrees: maximum absolute rotation angle in degrees, drawn uniformly; in 2-D one
      in-plane angle, in 3-D one angle per coordinate plane (the rotation is their product).
    rotate_probability: chance that a rotation is applied at all.
    scale: maximum relative scaling: each axis is scaled by `1 + u_iso + u_axis`, both uniform in
      `[-scale / 2, scale / 2]` (half shared by all axes, half per axis), so within `1 +- scale`.
    shear: maximum absolute off-diagonal shear coefficient (each pair of axes independently).
    translate: maximum translation along each axis, as a fraction of that axis' size.
    affine_probability: chance that scale, shear and translation are applied at all.
    histogram_shift: maximum shift of each interior control point of the intensity curve, in
      [0, 1] image units (see `histogram_shift`).
    num_control_points: control points of the intensity curve, the two ends included.
    histogram_probability: chance that the intensity curve is applied at all.
  """
  enabled: bool = True
  flip_axes: tuple[int, ...] = ()
  flip_probability: float = 0.5
  rotate_degrees: float = 10.0
  rotate_probability: float = 1.0
  scale: float = 0.1
  shear: float = 0.05
  translate: float = 0.05
  affine_probability: float = 1.0
  histogram_shift: float = 0.05
  num_control_points: int = 8
  histogram_probability: float = 1.0

  def __post_init__(self):
    # Lists from a config would make the params unhashable (and so not jit-static).
    object.__setattr__(self, "flip_axes", tuple(int(a) for a in self.flip_axes))
    if len(set(self.flip_axes)) != len(self.flip_axes) or any(a < 0 for a in self.flip_axes):
      raise ValueError(f"flip_axes must be distinct non-negative spatial axes, got "
                       f"{self.flip_axes}")
    for name in ("flip_probability", "rotate_probability", "affine_probability",
                 "histogram_probability"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
    for name in ("rotate_degrees", "shear", "translate", "histogram_shift"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.scale < 1.0:
      raise ValueError(f"scale must lie in [0, 1) (a relative change), got {self.scale}")
    if self.num_control_points < 2:
      raise ValueError(f"num_control_points must be >= 2, got {self.num_control_points}")

  @classmethod
  def from_config(cls, config: Any) -> "AugmentParams":
    """Builds the params from a mapping (e.g. `config.augment`); unknown keys are an error."""
    return dataclass_from_config(cls, config, "augmentation")


def rotation_matrix(angles: jax.Array, ndim: int) -> jax.Array:
  """Product of plane rotations, one angle (radians) per coordinate plane `(i, j), i < j`.

  2-D: one angle, `[[cos, -sin], [sin, cos]]`; 3-D: three angles for the planes (0, 1),
  (0, 2), (1, 2), i.e. rotations about axes 2, 1 and 0, applied in that order to a vector.

  Returns:
    `(ndim, ndim)` orthogonal matrix with determinant 1.
  """
  planes = list(itertools.combinations(range(ndim), 2))
  if angles.shape != (len(planes),):
    raise ValueError(f"{ndim}-D rotations take {len(planes)} angles, got shape {angles.shape}")
  eye = np.eye(ndim, dtype=np.float32)
  matrix = jnp.asarray(eye)
  for (i, j), angle in zip(planes, angles):
    in_plane = eye[:, [i]] * eye[[i]] + eye[:, [j]] * eye[[j]]  # ones at (i, i) and (j, j)
    turn = eye[:, [j]] * eye[[i]] - eye[:, [i]] * eye[[j]]  # +1 at (j, i), -1 at (i, j)
    plane = eye + (jnp.cos(angle) - 1.0) * in_plane + jnp.sin(angle) * turn
    matrix = _matmul(plane, matrix)
  return matrix


def affine_displacement(matrix: jax.Array, translation: jax.Array,
                        spatial_shape: Sequence[int]) -> jax.Array:
  """Displacement field of the pull map `x -> matrix (x - c) + c + translation`.

  Args:
    matrix: `(ndim, ndim)`, acting on voxel coordinates about the centre `c = (shape - 1) / 2`.
    translation: `(ndim,)` in voxels.
    spatial_shape: the grid, `ndim` sizes.

  Returns:
    `(*spatial_shape, ndim)` float32 displacement in voxels, `(matrix - I)(x - c) + translation`,
    for `acis_jax.spatial.warp`.
  """
  ndim = len(spatial_shape)
  matrix = jnp.asarray(matrix, jnp.float32)
  translation = jnp.asarray(translation, jnp.float32)
  if matrix.shape != (ndim, ndim) or translation.shape != (ndim,):
    raise ValueError(f"a {ndim}-D grid needs a ({ndim}, {ndim}) matrix and a ({ndim},) "
                     f"translation, got {matrix.shape} and {translation.shape}")
  centre = (jnp.asarray(spatial_shape, jnp.float32) - 1.0) / 2.0
  # Half-integer offsets from the centre keep flips exact in float32.
  relative = identity_grid(spatial_shape) - centre
  return _matmul(relative, (matrix - jnp.eye(ndim, dtype=jnp.float32)).T) + translation


def random_affine_matrix(key: jax.Array, spatial_shape: Sequence[int],
                         params: AugmentParams) -> tuple[jax.Array, jax.Array]:
  """Draws `(matrix (ndim, ndim), translation (ndim,) in voxels)` of the pull map.

  `matrix = rotation @ scaling @ shear @ flips`, each factor the identity when its draw says
  "not applied" or its range is zero.
  """
  ndim = len(spatial_shape)
  if any(a >= ndim for a in params.flip_axes):
    raise ValueError(f"flip_axes {params.flip_axes} name axes beyond the {ndim} spatial axes "
                     f"of shape {tuple(spatial_shape)}")
  num_planes = ndim * (ndim - 1) // 2
  # One draw for all the numbers: each separate draw compiles its own PRNG code.
  sizes = [ndim + 2, num_planes, 1, ndim, ndim * ndim, ndim]
  draws = jax.random.uniform(key, (sum(sizes),), jnp.float32)
  gates, *signed = jnp.split(draws, np.cumsum(sizes)[:-1])
  angles, iso, per_axis, shear, shift = (2.0 * u - 1.0 for u in signed)  # in [-1, 1)

  flippable = jnp.asarray([axis in params.flip_axes for axis in range(ndim)])
  flipped = flippable & (gates[:ndim] < params.flip_probability)
  flips = jnp.diag(jnp.where(flipped, -1.0, 1.0))

  rotate = gates[ndim] < params.rotate_probability
  rotation = rotation_matrix(angles * math.radians(params.rotate_degrees) * rotate, ndim)

  affine = gates[ndim + 1] < params.affine_probability
  scaling = jnp.diag(1.0 + (iso + per_axis) * (params.scale / 2.0) * affine)
  off_diagonal = 1.0 - jnp.eye(ndim)
  shear = jnp.eye(ndim) + shear.reshape(ndim, ndim) * params.shear * off_diagonal * affine
  translation = shift * params.translate * jnp.asarray(spatial_shape, jnp.float32) * affine
  return _matmul(_matmul(rotation, scaling), _matmul(shear, flips)), translation


def random_affine(key: jax.Array, spatial_shape: Sequence[int],
                  params: AugmentParams) -> jax.Array:
  """A random affine (with optional flips) about the volume centre as a displacement field.

  Returns:
    `(*spatial_shape, ndim)` float32 displacement in voxels, for `acis_jax.spatial.warp`.
  """
  matrix, translation = random_affine_matrix(key, spatial_shape, params)
  return affine_displacement(matrix, translation, spatial_shape)


def histogram_shift(key: jax.Array, image: jax.Array, params: AugmentParams) -> jax.Array:
  """Remaps intensities by a random increasing piecewise-linear curve on [0, 1].

  The idea of MONAI's RandHistogramShift: control points at evenly spaced intensities
  `x_k = k / (K - 1)`; the interior ones move to `y_k = x_k + u_k`, `u_k` uniform in
  `[-histogram_shift, histogram_shift]`; the ends stay at 0 and 1. Sorting the `y_k` keeps the
  curve increasing (strictly, almost surely) when shifts exceed half the spacing, and an affine
  rescale of the sorted points back onto [0, 1] keeps the range. The same curve applies to every
  channel; values outside [0, 1] are clipped first.

  Args:
    image: `(*spatial, C)` float, values in [0, 1].

  Returns:
    the remapped image, same shape and dtype, values in [0, 1].
  """
  num = params.num_control_points
  draws = jax.random.uniform(key, (num - 1,), jnp.float32)  # a gate, then one per shift
  apply = draws[0] < params.histogram_probability
  shifts = (2.0 * draws[1:] - 1.0) * params.histogram_shift * apply
  xs = jnp.linspace(0.0, 1.0, num, dtype=jnp.float32)
  ys = jnp.sort(xs.at[1:-1].add(shifts))
  ys = (ys - ys[0]) / (ys[-1] - ys[0])
  values = jnp.clip(image.astype(jnp.float32), 0.0, 1.0)
  # Evenly spaced control points: the segment of a value is its scaled integer part.
  # Interpolating the offset from the identity keeps a zero shift exact.
  position = values * (num - 1)
  segment = jnp.clip(jnp.floor(position), 0, num - 2).astype(jnp.int32)
  offsets = ys - xs
  below, above = offsets[segment], offsets[segment + 1]
  remapped = values + below + (position - segment) * (above - below)
  return jnp.clip(remapped, 0.0, 1.0).astype(image.dtype)


@jax.jit(static_argnames=("num_classes", "params"))
def _augment(key, image, labels, extra, num_classes, params):
  geometry_key, intensity_key = jax.random.split(key)
  spatial = image.shape[:-1]
  disp = random_affine(geometry_key, spatial, params)
  moved = histogram_shift(intensity_key, warp(image, disp, order=1, mode="nearest"), params)
  if labels is not None:
    labels = warp_labels(labels, disp, num_classes, mode="nearest").astype(labels.dtype)
  if extra is not None:
    extra = type(extra)(warp(e, disp, order=1, mode="nearest") for e in extra)
  return moved, labels, extra


def augment(key: jax.Array, image: jax.Array, labels: jax.Array | None, num_classes: int | None,
            params: Any, extra: Sequence[jax.Array] | None = None
            ) -> tuple[jax.Array, jax.Array | None, Sequence[jax.Array] | None]:
  """Augments one case: random geometry for all inputs, then a histogram shift of the image.

  Args:
    key: PRNG key; the same key gives the same output.
    image: `(*spatial, C)` float in [0, 1], 2-D or 3-D spatial.
    labels: integer `(*spatial)` in `[0, num_classes)`, or None for label-free runs. Moved by
      one-hot -> linear warp -> argmax, so labels stay labels (values outside the range are not
      checked, under jit they cannot be, and fall to 0).
    num_classes: number of label classes (background included); needed with `labels`.
    params: `AugmentParams` or a mapping of its fields (e.g. `config.augment`).
    extra: optional list or tuple of float images `(*spatial, C_i)` (e.g. a pseudo-mask),
      moved with the same geometry but no histogram shift.

  Returns:
    `(image, labels, extra)`: the image in [0, 1] with the input dtype, labels with the input
    dtype (or None), extra as the same container type (or None). Images are warped linearly with
    edge voxels repeated outward. With `params.enabled` False, the inputs themselves.
  """
  params = AugmentParams.from_config(params)
  if not params.enabled:
    return image, labels, extra
  image = jnp.asarray(image)
  spatial = image.shape[:-1]
  if len(spatial) not in (2, 3) or not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"image must be a float (*spatial, C) array with 2 or 3 spatial axes, got "
                     f"shape {image.shape} and dtype {image.dtype}")
  if labels is not None:
    labels = jnp.asarray(labels)
    if labels.shape != spatial or jnp.issubdtype(labels.dtype, jnp.floating):
      raise ValueError(f"labels must be an integer array of shape {spatial} (the image's "
                       f"spatial shape), got shape {labels.shape} and dtype {labels.dtype}")
    if num_classes is None or num_classes < 1:
      raise ValueError(f"num_classes must be a positive integer with labels, got {num_classes}")
  if extra is not None:
    extra = type(extra)(jnp.asarray(e) for e in extra)
    for e in extra:
      if e.shape[:-1] != spatial or e.ndim != image.ndim:
        raise ValueError(f"extra images must have shape ({', '.join(map(str, spatial))}, C), "
                         f"got {e.shape}")
  return _augment(key, image, labels, extra, None if labels is None else int(num_classes),
                  params)


def downstream_augment(params: Any, num_classes: int | None = None
                       ) -> Callable[[jax.Array, jax.Array, jax.Array],
                                     tuple[jax.Array, jax.Array]]:
  """`(key, image, target) -> (image, target)` for `acis_jax.eval.downstream`'s `augment`.

  With `num_classes` the target is a label map; without it, a target image (reconstruction)
  that must see the same geometry AND the same intensity curve as the input, so both travel as
  channels of one image.
  """
  params = AugmentParams.from_config(params)

  def segmentation(key, image, labels):
    image, labels, _ = augment(key, image, labels, num_classes, params)
    return image, labels

  def reconstruction(key, image, target):
    both, _, _ = augment(key, jnp.concatenate([image, target], axis=-1), None, None, params)
    return both[..., :image.shape[-1]], both[..., image.shape[-1]:]

  return reconstruction if num_classes is None else segmentation
