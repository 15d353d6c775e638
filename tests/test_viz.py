"""Figures are drawn in the radiological convention whatever the array's storage order."""
import numpy as np
import pytest

from acis_jax.data.sources import axial_slice
from acis_jax.data.nifti import Volume
from acis_jax.viz import display_plane

# Array axes -> world: RAS+ as stored, LPS (DICOM's order) and one with the in-plane axes swapped.
STORAGE = {"RAS": np.diag([1.0, 1.0, 2.0, 1.0]),
           "LPS": np.diag([-1.0, -1.0, 2.0, 1.0]),
           "swapped": np.array([[0.0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])}


def marked_volume(storage: str) -> Volume:
  """An 8x6x4 volume, 1 at the voxel nearest the patient's right-anterior corner (largest
  world x and y), 0.5 at the left-posterior one."""
  affine = STORAGE[storage]
  shape = (8, 6, 4) if storage != "swapped" else (6, 8, 4)
  indices = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, 3)
  world = indices @ affine[:3, :3].T
  array = np.zeros(shape, np.float32)
  score = world[:, 0] + world[:, 1]
  array[tuple(indices[np.argmax(score)])] = 1.0
  array[tuple(indices[np.argmin(score)])] = 0.5
  return Volume(array, affine)


@pytest.mark.parametrize("storage", sorted(STORAGE))
@pytest.mark.parametrize("dims", [2, 3])
def test_right_anterior_is_top_left(storage, dims):
  volume = marked_volume(storage)
  # Every axial plane carries the marks (axis 2 is axial in every storage here).
  marks = volume.array.max(axis=2)
  if dims == 2:
    array, affine = marks, axial_slice(volume, 2).affine
  else:
    array, affine = np.repeat(marks[..., None], 4, axis=2), volume.affine
  plane, aspect = display_plane(array, affine)
  assert plane.shape == (6, 8)  # rows: anterior-posterior (6 voxels); columns: left-right (8)
  # imshow(origin="lower"): the last row is the top, column 0 the viewer's left.
  assert plane[-1, 0] == 1.0, "the patient's right-anterior corner is not at the top left"
  assert plane[0, -1] == 0.5
  assert aspect == 1.0
