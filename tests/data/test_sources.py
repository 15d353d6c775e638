"""Examples from config: axial slices keep their world position; bad shapes are refused."""

import json

import ml_collections
import numpy as np
import pytest
from nibabel.affines import apply_affine

from acis_jax.data import PHANTOM_LABELS, Volume, load_nifti, phantom_case, save_nifti
from acis_jax.data.labels import read_dataset_json
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


def data_config(tmp_path, shape, write_phantom=True, **overrides):
  if write_phantom:
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


def test_spacing_mm_puts_every_slice_on_that_voxel_size_around_its_volume(tmp_path):
  plain = load_examples(data_config(tmp_path, (24, 24), num_slices=2))
  spaced = load_examples(data_config(tmp_path, (24, 24), write_phantom=False, num_slices=2,
                                     spacing_mm=(3.0,)))
  source = load_nifti(next((tmp_path / "imagesTr").glob("*.nii.gz")))
  centre = apply_affine(source.affine, (np.array(source.array.shape) - 1) / 2)
  for example, reference in zip(spaced, plain):
    assert example.name == reference.name and example.image.array.shape == (24, 24)
    np.testing.assert_allclose(example.image.spacing, 3.0)
    np.testing.assert_allclose(example.label.affine, example.image.affine)
    # In the slice's plane its centre is the volume's; along the axial axis, the slice's own.
    middle = apply_affine(example.image.affine, (11.5, 11.5, 0.0))
    reference_middle = apply_affine(reference.image.affine, (11.5, 11.5, 0.0))
    np.testing.assert_allclose(middle, reference_middle, atol=1e-6)
    np.testing.assert_allclose(middle[:2], centre[:2], atol=1e-6)  # the phantom's axial axis: z
  assert not np.allclose(spaced[0].image.spacing, plain[0].image.spacing)


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


def world_z(example) -> float:
  """World z (mm) of a 2-D example's plane."""
  return float(example.image.affine[2, 3] + example.image.affine[2, :2] @ (
      np.array(example.image.array.shape) - 1) / 2)


def test_slices_are_chosen_in_world_coordinates_however_the_file_stores_its_axes(tmp_path):
  """The same CT stored with its axial axis flipped (and its columns swapped) gives slices at
  the same world positions with the same pixels."""
  case = phantom_case(tmp_path / "as_is", (40, 36, 30))
  image, label = load_nifti(case.image_path), load_nifti(case.label_path)
  flip = np.eye(4)
  flip[2, 2], flip[2, 3] = -1, image.array.shape[2] - 1  # index k -> K-1-k
  swap = np.eye(4)[[1, 0, 2, 3]]
  for name, volume in (("image", image), ("label", label)):
    array = np.swapaxes(volume.array[:, :, ::-1], 0, 1)
    save_nifti(tmp_path / "stored_otherwise" / f"{name}sTr" / "phantom.nii.gz", array,
               volume.affine @ flip @ swap)
  configs = [data_config(tmp_path / folder, (32, 32), write_phantom=False, num_slices=4,
                         slice_band=(0.2, 0.6)) for folder in ("as_is", "stored_otherwise")]
  as_is, otherwise = (load_examples(c) for c in configs)
  spacing = image.spacing[2]
  for a, b in zip(as_is, otherwise):
    assert abs(world_z(a) - world_z(b)) <= spacing + 1e-6
    np.testing.assert_allclose(a.image.array, b.image.array, atol=1e-6)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    np.testing.assert_allclose(a.image.affine, b.image.affine, atol=1e-6)


def test_classes_by_name_from_dataset_json(tmp_path):
  data = data_config(tmp_path, (24, 24, 16), classes=("right_lung", "heart"), num_classes=3)
  assert read_dataset_json(tmp_path) == PHANTOM_LABELS  # phantom_case describes its folder
  (example,) = load_examples(data)
  original = load_examples(data_config(tmp_path, (24, 24, 16)))[0].label.array
  np.testing.assert_array_equal(example.label.array,
                                np.select([original == 4, original == 1], [1, 2], 0))


def test_classes_need_names_and_a_matching_class_count(tmp_path):
  data = data_config(tmp_path, (24, 24, 16), classes=("heart",), num_classes=2)
  (tmp_path / "dataset.json").unlink()
  with pytest.raises(ValueError, match="does not name its labels"):
    load_examples(data)
  data.num_classes = 5
  with pytest.raises(ValueError, match="num_classes must be 2"):
    load_examples(data)
  (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "heart": 1}}))
  data.classes, data.num_classes = ("liver",), 2
  with pytest.raises(ValueError, match=r"phantom\.nii\.gz: no class 'liver'; its labels are "
                                       r"\['heart'\]"):
    load_examples(data)
