"""Intensity windowing and geometry-preserving resampling of Volumes (paper sec. 3: clip to
[-1000, 600] HU, scale to [0, 1], resize; labels by nearest neighbour).

Resizing keeps the field of view: the outer corners of the first and last voxels stay at the
same world position, so the voxel size becomes old_spacing * old_size / new_size and the world
centre of the volume does not move. The affine is updated to match, so a resized volume still
overlays its source in any viewer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.ndimage as ndi

from acis_jax.data.nifti import Volume

GRID_TOLERANCE_MM = 1e-3


HU_WINDOW = (-1000.0, 600.0)  # the paper's window (sec 3.1)


def window_hu(hu: np.ndarray, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]
              ) -> np.ndarray:
  """Clips HU to [low, high] and maps that range linearly onto [0, 1]; float32, same shape."""
  if not low < high:
    raise ValueError(f"window needs low < high, got low={low}, high={high}")
  hu = np.asarray(hu, dtype=np.float32)
  return np.clip((hu - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def unwindow_hu(x: np.ndarray, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]
                ) -> np.ndarray:
  """The inverse of `window_hu` on [0, 1]: HU, float32."""
  return (np.float32(low) + np.asarray(x, np.float32) * np.float32(high - low)).astype(np.float32)


def _target_shape(volume: Volume, shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != volume.array.ndim or min(shape) < 1:
    raise ValueError(
        f"{volume.path or 'volume'}: cannot resample a {volume.array.ndim}-D array to {shape}")
  return shape


def _index_map(source: Volume, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Matrix and offset taking voxel indices of a grid with `affine` to voxel indices of `source`.

  A 2-D source and target must lie in the same plane (target index k = 0 maps to source k = 0).
  """
  full = np.linalg.solve(source.affine, np.asarray(affine, dtype=np.float64))
  n = source.array.ndim
  if n == 2 and not np.allclose(full[2, [0, 1, 3]], 0.0, atol=1e-6):
    raise ValueError(f"{source.path or 'volume'}: target grid is not in this 2-D slice's plane")
  return full[:n, :n], full[:n, 3]


def resample_to(
    volume: Volume,
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    order: int,
    mode: str = "nearest",
    cval: float = 0.0,
) -> Volume:
  """Samples `volume` on the grid (shape, affine), matching voxels through world coordinates.

  Args:
    volume: the source, (I, J) or (I, J, K).
    shape: the target grid shape, same rank as the source.
    affine: (4, 4) target voxel index -> world mm.
    order: spline order (0 nearest, for labels; 1 linear, for images).
    mode, cval: scipy.ndimage handling of samples outside the source ("nearest" repeats the edge,
    "constant" fills with cval).

  Returns:
    A Volume of `shape` with `affine`, in the source dtype, with the source path.
  """
  shape = _target_shape(volume, shape)
  matrix, offset = _index_map(volume, affine)
  # A diagonal map takes scipy's faster separable path.
  if np.allclose(matrix, np.diag(np.diag(matrix))):
    matrix = np.diag(matrix)
  array = ndi.affine_transform(
      volume.array, matrix, offset=offset, output_shape=shape, order=order, mode=mode, cval=cval
  )
  return Volume(array=array, affine=affine, path=volume.path)


def resized_affine(
    affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]
) -> np.ndarray:
  """The (4, 4) affine of a grid of new_shape covering the same field of view as old_shape.

  New voxel j sits at old index (j + 1/2) * old/new - 1/2 along each axis; a missing third
  axis (2-D) keeps size 1.
  """
  to_old = np.eye(4)
  for axis, (old, new) in enumerate(zip(old_shape, new_shape)):
    scale = old / new
    to_old[axis, axis] = scale
    to_old[axis, 3] = 0.5 * scale - 0.5
  return np.asarray(affine, dtype=np.float64) @ to_old


def resize_volume(volume: Volume, shape: Sequence[int], *, order: int) -> Volume:
  """Resamples `volume` to `shape` over the same field of view (see the module docstring).

  order=1 (linear) for images, order=0 (nearest) for labels. The dtype is kept.
  """
  shape = _target_shape(volume, shape)
  affine = resized_affine(volume.affine, volume.array.shape, shape)
  return resample_to(volume, shape, affine, order=order, mode="nearest")


def _antialiased(volume: Volume, factors: Sequence[float]) -> Volume:
  """`volume` as float32, each axis whose voxels grow by a factor f > 1 Gaussian-smoothed with
  sigma = (f - 1) / 2 voxels first (scikit-image's rule against aliasing)."""
  sigma = np.maximum(0.0, (np.asarray(factors, dtype=np.float64) - 1.0) / 2.0)
  array = volume.array.astype(np.float32)
  if np.any(sigma > 0):
    array = ndi.gaussian_filter(array, sigma, mode="nearest")
  return Volume(array, volume.affine, volume.path)


def _check_label_dtype(volume: Volume) -> None:
  if volume.array.dtype.kind not in "biu":
    raise ValueError(
        f"{volume.path or 'labels'}: label map has dtype {volume.array.dtype}, expected integers")


def resize_image(volume: Volume, shape: Sequence[int]) -> Volume:
  """Linear resize to float32, anti-aliased (`_antialiased`)."""
  shape = _target_shape(volume, shape)
  return resize_volume(_antialiased(volume, np.divide(volume.array.shape, shape)), shape,
                       order=1)


def spaced_affine(volume: Volume, shape: Sequence[int], spacing: Sequence[float]
                  ) -> np.ndarray:
  """The (4, 4) affine of a grid of `shape` with voxels of `spacing` mm, centred on `volume`'s
  centre, its axes along the volume's (a 2-D slice keeps its plane)."""
  n = volume.array.ndim
  affine = np.array(volume.affine, dtype=np.float64)
  centre = affine @ np.array([(size - 1) / 2 for size in volume.array.shape]
                             + [0.0] * (3 - n) + [1.0])
  for axis in range(n):
    affine[:3, axis] *= spacing[axis] / np.linalg.norm(affine[:3, axis])
  affine[:3, 3] = centre[:3] - affine[:3, :n] @ [(size - 1) / 2 for size in shape]
  return affine


def check_spacing(spacing: Sequence[float], shape: Sequence[int]) -> tuple[float, ...]:
  """`spacing` as one float per axis of `shape` (one number serves every axis)."""
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) == 1:
    spacing = spacing * len(shape)
  if len(spacing) != len(shape) or min(spacing) <= 0:
    raise ValueError(f"data.spacing_mm={spacing} must be () or positive voxel sizes in mm, one "
                     f"or one per axis of data.image_shape={tuple(shape)}")
  return spacing


def respace_image(volume: Volume, shape: Sequence[int], spacing: Sequence[float],
                  outside: float = 0.0) -> Volume:
  """Linear resampling to the grid of `spaced_affine`, float32; axes whose voxels grow by a
  factor f are first Gaussian-smoothed with sigma = (f - 1) / 2 voxels (as `resize_image`).
  Voxels beyond the scan read `outside`."""
  shape = _target_shape(volume, shape)
  return resample_to(_antialiased(volume, np.divide(spacing, volume.spacing[:len(shape)])),
                     shape, spaced_affine(volume, shape, spacing), order=1, mode="constant",
                     cval=outside)


def respace_labels(volume: Volume, shape: Sequence[int], spacing: Sequence[float]) -> Volume:
  """Nearest-neighbour resampling to the grid of `spaced_affine`; background (0) beyond the
  scan."""
  _check_label_dtype(volume)
  shape = _target_shape(volume, shape)
  return resample_to(volume, shape, spaced_affine(volume, shape, spacing), order=0,
                     mode="constant", cval=0)


def resize_labels(volume: Volume, shape: Sequence[int]) -> Volume:
  """Nearest-neighbour resize: integer dtype and label values stay (small labels may vanish)."""
  _check_label_dtype(volume)
  return resize_volume(volume, shape, order=0)


def _corners(shape: Sequence[int]) -> np.ndarray:
  """(2**ndim, 4) homogeneous voxel indices of the corner voxels of a grid (k = 0 in 2-D)."""
  grids = np.meshgrid(*[[0, s - 1] for s in shape], indexing="ij")
  corners = np.stack([g.ravel() for g in grids], axis=1).astype(np.float64)
  pad = np.zeros((len(corners), 3 - len(shape)))
  return np.concatenate([corners, pad, np.ones((len(corners), 1))], axis=1)


def check_same_grid(image: Volume, label: Volume) -> None:
  """Raises ValueError naming both files unless image and label have the same shape and their
  corner voxels lie within GRID_TOLERANCE_MM of each other in world space."""
  names = f"image {image.path or '(in memory)'} and label {label.path or '(in memory)'}"
  if image.array.shape != label.array.shape:
    raise ValueError(f"{names} differ in shape: {image.array.shape} vs {label.array.shape}")
  corners = _corners(image.array.shape)
  gap = np.max(np.abs((corners @ image.affine.T - corners @ label.affine.T)[:, :3]))
  if gap > GRID_TOLERANCE_MM:
    raise ValueError(
        f"{names} are on different grids (corners up to {gap:.4g} mm apart):\n"
        f"{image.affine}\nvs\n{label.affine}"
    )


def preprocess_case(
    image: Volume, label: Volume | None, shape: Sequence[int] | None,
    spacing: Sequence[float] = ()
) -> tuple[Volume, Volume | None]:
  """Windows the HU image to [0, 1] float32 and resamples image (linear) and label (nearest),
  after checking that they share a grid: to `shape` over the same field of view, or, given a
  `spacing` (mm), to `shape` voxels of that size around the volume's centre, so that a voxel
  is the same size in every case (what lies beyond the scan reads as air and background).
  `shape` None keeps the source grid."""
  if label is not None:
    check_same_grid(image, label)
  windowed = Volume(window_hu(image.array), image.affine, image.path)
  if shape is None:
    return windowed, label
  return (fit_image(windowed, shape, spacing),
          None if label is None else fit_labels(label, shape, spacing))


def fit_image(windowed: Volume, shape: Sequence[int], spacing: Sequence[float] = ()) -> Volume:
  """A windowed image on the training grid: `respace_image` given a `spacing` (mm), air
  beyond the scan, else `resize_image` (see `preprocess_case`)."""
  if spacing:
    return respace_image(windowed, shape, check_spacing(spacing, shape),
                         outside=float(window_hu(HU_WINDOW[0])))
  return resize_image(windowed, shape)


def fit_labels(label: Volume, shape: Sequence[int], spacing: Sequence[float] = ()) -> Volume:
  """A label map on the training grid: `respace_labels` given a `spacing` (mm), else
  `resize_labels` (see `preprocess_case`)."""
  if spacing:
    return respace_labels(label, shape, check_spacing(spacing, shape))
  return resize_labels(label, shape)
