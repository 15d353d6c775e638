"""Examples from config: axial slices keep their world position; bad shapes are refused."""

import ml_collections
import numpy as np
import pytest
from nibabel.affines import apply_affine

from acis_jax.data import Volume, phantom_case
from acis_jax.data.sources import axial_slice, load_examples, slice_indices
from acis_jax.defaults import base_config


def oblique_volume():
  rotation = np.array([[0.0, 0.0, -1.2], [0.9, 0.1, 0.0], [0.0, 2.0, 0.1]])  # axial = axis 1
  affine = np.eye(4)
  affine[:3, :3] = rotation
  affine[:3, 3] = [10.0, -20.0, 5.0]
  return Volume(np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), affine)


def test_axial_slice_maps_pixels_to_their_world_position():
  volume = oblique_volume()
  sliced = axial_slice(volume, 4)
  np.testing.assert_array_equal(sliced.array, volume.array[:, 4, :])
  ij = np.array([[0, 0], [5, 7], [2, 3]])
  world_2d = apply_affine(sliced.affine, np.c_[ij, np.zeros(3)])
  world_3d = apply_affine(volume.affine, np.c_[ij[:, 0], np.full(3, 4), ij[:, 1]])
  np.testing.assert_allclose(world_2d, world_3d)


def test_slice_indices_are_inside_the_band_and_distinct():
  indices = slice_indices(100, 5, (0.2, 0.8))
  assert len(indices) == 5 and len(set(indices)) == 5
  assert all(20 <= i <= 80 for i in indices)
  with pytest.raises(ValueError, match="slice band"):
    slice_indices(100, 5, (0.8, 0.2))


def data_config(tmp_path, shape, **overrides):
  phantom_case(tmp_path, (40, 36, 30))
  data = ml_collections.ConfigDict(base_config().data.to_dict())
  data.data_dir = str(tmp_path)
  data.image_shape = shape
  data.update(overrides)
  return data


def test_load_examples_from_a_folder_in_3d_and_2d(tmp_path):
  (volume,) = load_examples(data_config(tmp_path, (32, 32, 24)))
  assert volume.image.array.shape == (32, 32, 24) == volume.label.array.shape
  assert 0.0 <= volume.image.array.min() and volume.image.array.max() <= 1.0
  slices = load_examples(data_config(tmp_path, (48, 48), num_slices=3))
  assert [s.image.array.shape for s in slices] == [(48, 48)] * 3
  assert len({s.name for s in slices}) == 3
  assert all(s.label.array.dtype.kind == "u" for s in slices)


def test_a_2d_folder_cannot_feed_a_3d_run(tmp_path):
  from acis_jax.data import save_nifti
  (tmp_path / "imagesTr").mkdir()
  (tmp_path / "labelsTr").mkdir()
  save_nifti(tmp_path / "imagesTr" / "flat.nii.gz", np.zeros((8, 8), np.int16), np.eye(4))
  save_nifti(tmp_path / "labelsTr" / "flat.nii.gz", np.ones((8, 8), np.uint8), np.eye(4))
  data = ml_collections.ConfigDict(base_config().data.to_dict())
  data.data_dir, data.image_shape = str(tmp_path), (8, 8, 8)
  with pytest.raises(ValueError, match="flat.nii.gz: a 2-D image cannot feed a 3-D run"):
    load_examples(data)
