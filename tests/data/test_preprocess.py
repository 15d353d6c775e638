"""Windowing against its closed form; resizing against scikit-image and nibabel's apply_affine."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.transform
from nibabel.affines import apply_affine

from acis_jax.data.nifti import Volume
from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import (
    check_same_grid,
    preprocess_case,
    resample_to,
    respace_image,
    resize_image,
    resize_labels,
    resize_volume,
    window_hu,
)


def oblique_affine(spacing=(0.8, 1.2, 2.5), angle=0.4):
  c, s = np.cos(angle), np.sin(angle)
  affine = np.eye(4)
  affine[:3, :3] = np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]]) * np.asarray(spacing)
  affine[:3, 3] = (-30.0, 7.0, 101.0)
  return affine


@pytest.mark.parametrize("low, high", [(-1000.0, 600.0), (-160.0, 240.0)])
def test_window_hu_closed_form(low, high):
  hu = np.linspace(-3000, 3000, 601)
  expected = [0.0 if h <= low else 1.0 if h >= high else (h - low) / (high - low) for h in hu]
  out = window_hu(hu, low, high)
  assert out.dtype == np.float32 and out.shape == hu.shape
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_window_hu_rejects_empty_window():
  with pytest.raises(ValueError, match="low < high"):
    window_hu(np.zeros(3), 100.0, 100.0)


def _index_with_k(index, ndim):
  return np.concatenate([index, np.zeros(3 - ndim)])


@pytest.mark.parametrize("old_shape, new_shape",
                         [((21, 16, 12), (33, 9, 12)), ((20, 15), (10, 41))])
def test_resize_keeps_world_centre_and_extent(old_shape, new_shape):
  source = Volume(np.zeros(old_shape, np.float32), oblique_affine())
  resized = resize_volume(source, new_shape, order=1)
  n = len(old_shape)
  old, new = np.asarray(old_shape, float), np.asarray(new_shape, float)

  def world(affine, index):
    return apply_affine(affine, _index_with_k(index, n))

  # Centre, then the outer corners of the first and last voxels, in (new, old) index pairs.
  first = -0.5 * np.ones(n)
  for new_index, old_index in [((new - 1) / 2, (old - 1) / 2), (first, first), (new - 0.5, old - 0.5)]:
    np.testing.assert_allclose(world(resized.affine, new_index), world(source.affine, old_index),
                               atol=1e-9)
  np.testing.assert_allclose(resized.spacing, np.asarray(source.spacing) * old / new, rtol=1e-12)
  if n == 2:  # the slice normal and thickness are untouched
    np.testing.assert_array_equal(resized.affine[:3, 2], source.affine[:3, 2])
  assert resized.array.shape == tuple(new_shape)


@pytest.mark.parametrize("old_shape, new_shape",
                         [((21, 16, 12), (33, 9, 12)), ((20, 15), (10, 41))])
def test_resized_content_sits_where_the_new_affine_says(old_shape, new_shape):
  """Linear interpolation reproduces a linear function of world position exactly, so a volume
  holding each voxel's world coordinate must still hold it after resizing (away from the edge,
  where samples are clamped)."""
  n = len(old_shape)
  affine = oblique_affine()

  def world_coordinate(shape, affine, axis):
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    index = np.concatenate([index, np.zeros(index.shape[:-1] + (3 - n,))], axis=-1)
    return apply_affine(affine, index)[..., axis]

  for axis in range(3):
    source = Volume(world_coordinate(old_shape, affine, axis), affine)
    resized = resize_volume(source, new_shape, order=1)
    expected = world_coordinate(new_shape, resized.affine, axis)
    scale = np.asarray(old_shape) / np.asarray(new_shape)
    old_index = [(np.arange(m) + 0.5) * k - 0.5 for m, k in zip(new_shape, scale)]
    inside = np.ix_(*[(i >= 0) & (i <= s - 1) for i, s in zip(old_index, old_shape)])
    np.testing.assert_allclose(resized.array[inside], expected[inside], atol=1e-6)


@pytest.mark.parametrize("old_shape, new_shape",
                         [((41, 23), (17, 40)), ((19, 15, 13), (9, 22, 13))])
def test_resize_image_matches_skimage(old_shape, new_shape):
  rng = np.random.default_rng(0)
  array = ndi.gaussian_filter(rng.normal(size=old_shape), 1.0).astype(np.float32)
  ours = resize_image(Volume(array, np.eye(4)), new_shape).array
  reference = skimage.transform.resize(array, new_shape, order=1, mode="edge", anti_aliasing=True)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("old_shape, new_shape",
                         [((41, 23), (17, 40)), ((19, 15, 13), (9, 22, 14))])
def test_resize_labels_is_nearest_and_keeps_the_label_set(old_shape, new_shape):
  # Odd source sizes put no output voxel exactly half-way between two source voxels.
  rng = np.random.default_rng(1)
  labels = np.choose(rng.integers(0, 3, size=old_shape), np.array([0, 2, 7], np.uint8))
  ours = resize_labels(Volume(labels, np.eye(4)), new_shape).array
  reference = skimage.transform.resize(labels, new_shape, order=0, mode="edge",
                                       anti_aliasing=False, preserve_range=True)
  assert ours.dtype == np.uint8
  assert set(np.unique(ours)) <= {0, 2, 7}
  np.testing.assert_array_equal(ours, reference)


def test_resize_labels_rejects_floats():
  with pytest.raises(ValueError, match="expected integers"):
    resize_labels(Volume(np.zeros((4, 4), np.float32), np.eye(4)), (2, 2))


def test_resample_crop_onto_full_grid():
  """A mask stored on a crop lands where the crop is in the full grid (like the sample aorta)."""
  full_affine = np.diag([-1.5, -1.5, 1.5, 1.0])
  full_affine[:3, 3] = (100.0, 80.0, -20.0)
  crop_start = np.array([5, 3, 2])
  crop_affine = full_affine.copy()
  crop_affine[:3, 3] = apply_affine(full_affine, crop_start)
  crop = np.random.default_rng(2).integers(0, 2, size=(6, 7, 5)).astype(np.uint8)

  out = resample_to(Volume(crop, crop_affine), (16, 14, 9), full_affine, order=0,
                    mode="constant").array
  expected = np.zeros((16, 14, 9), np.uint8)
  expected[5:11, 3:10, 2:7] = crop
  np.testing.assert_array_equal(out, expected)


def test_check_same_grid_names_both_files():
  image = Volume(np.zeros((5, 6, 7)), oblique_affine(), path="img.nii.gz")
  check_same_grid(image, Volume(np.zeros((5, 6, 7)), image.affine + 1e-5, path="lab.nii.gz"))
  with pytest.raises(ValueError, match=r"img\.nii\.gz.*lab\.nii\.gz.*shape"):
    check_same_grid(image, Volume(np.zeros((5, 6, 8)), image.affine, path="lab.nii.gz"))
  shifted = image.affine.copy()
  shifted[0, 3] += 0.01
  with pytest.raises(ValueError, match=r"img\.nii\.gz.*lab\.nii\.gz.*different grids"):
    check_same_grid(image, Volume(np.zeros((5, 6, 7)), shifted, path="lab.nii.gz"))


@pytest.mark.parametrize("shape, new_shape", [((64, 64), (32, 48)), ((40, 40, 32), (24, 24, 16))])
def test_preprocess_case(shape, new_shape):
  hu, labels = chest_phantom(shape)
  affine = np.diag([1.5, 1.5, 1.5, 1.0])
  image, label = preprocess_case(Volume(hu, affine), Volume(labels, affine), new_shape)
  assert image.array.shape == label.array.shape == new_shape
  assert image.array.dtype == np.float32 and 0.0 <= image.array.min() and image.array.max() <= 1.0
  assert set(np.unique(label.array)) <= set(np.unique(labels))
  np.testing.assert_array_equal(image.affine, label.affine)
  only_image, none = preprocess_case(Volume(hu, affine), None, new_shape)
  assert none is None
  np.testing.assert_array_equal(only_image.array, image.array)


# A common voxel size (data.spacing_mm): the grid's geometry, its values against the closed
# form of a linear field, and the same physical object the same size from different scans.
@pytest.mark.parametrize("ndim", [2, 3])
def test_respaced_grid_is_centred_with_the_asked_spacing(ndim):
  affine = oblique_affine()
  shape, new_shape, spacing = (30, 24, 20)[:ndim], (16, 12, 10)[:ndim], (2.0, 3.0, 4.0)[:ndim]
  volume = Volume(np.zeros(shape, np.float32), affine)
  out = respace_image(volume, new_shape, spacing)
  assert out.array.shape == new_shape
  np.testing.assert_allclose(out.spacing, spacing)
  centre = lambda v: apply_affine(v.affine, [(s - 1) / 2 for s in v.array.shape]
                                  + [0.0] * (3 - ndim))
  np.testing.assert_allclose(centre(out), centre(volume), atol=1e-9)
  directions = lambda a: a[:3, :ndim] / np.linalg.norm(a[:3, :ndim], axis=0)
  np.testing.assert_allclose(directions(out.affine), directions(affine), atol=1e-12)


def test_respaced_image_samples_a_linear_field_exactly_and_air_outside():
  affine = oblique_affine(spacing=(0.8, 1.2, 2.5))
  shape = (40, 30, 12)
  ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
  field = lambda world: 0.3 + 0.002 * world[..., 0] - 0.001 * world[..., 1] + 0.003 * world[..., 2]
  volume = Volume(field(apply_affine(affine, ijk)).astype(np.float32), affine)
  # Voxels no larger than the source's: no smoothing. The third axis (40 mm) overhangs the
  # 30 mm scan.
  out = respace_image(volume, (20, 20, 40), (0.8, 1.2, 1.0), outside=-7.0)
  out_ijk = np.stack(np.meshgrid(*[np.arange(s) for s in out.array.shape], indexing="ij"), -1)
  source_ijk = apply_affine(np.linalg.inv(affine), apply_affine(out.affine, out_ijk))
  inside = np.all((source_ijk >= 0) & (source_ijk <= np.array(shape) - 1), axis=-1)
  assert inside.any() and (~inside).any()
  np.testing.assert_allclose(out.array[inside], field(apply_affine(out.affine, out_ijk))[inside],
                             atol=1e-5)
  beyond = np.any((source_ijk < -1) | (source_ijk > np.array(shape)), axis=-1)
  assert beyond.any() and np.all(out.array[beyond] == -7.0)


def test_respacing_gives_one_object_one_size_whatever_the_scan_grid():
  """A 60 mm disc scanned with 1 mm and with 1.6 mm pixels over different fields of view:
  on a common 2 mm grid it covers the same area (the closed form, 900 pi mm^2 / 4 mm^2); a
  plain resize to the same shape does not."""
  areas_respaced, areas_resized = [], []
  for pixel, size in ((1.0, 200), (1.6, 90)):
    affine = np.diag([pixel, pixel, 1.0, 1.0])
    affine[:2, 3] = -pixel * (size - 1) / 2  # centred on the world origin
    world = apply_affine(affine, np.stack(np.meshgrid(np.arange(size), np.arange(size),
                                                      [0], indexing="ij"), -1)[:, :, 0])
    disc = (np.hypot(world[..., 0] - 10.0, world[..., 1]) <= 30.0).astype(np.int32)
    hu = np.where(disc, 40.0, -1000.0).astype(np.float32)
    image, label = preprocess_case(Volume(hu, affine), Volume(disc, affine), (64, 64), (2.0,))
    assert image.array.shape == (64, 64) and np.allclose(image.spacing, 2.0)
    areas_respaced.append(int(label.array.sum()))
    areas_resized.append(int(preprocess_case(Volume(hu, affine), Volume(disc, affine),
                                             (64, 64))[1].array.sum()))
  expected = np.pi * 30.0 ** 2 / 4.0
  np.testing.assert_allclose(areas_respaced, expected, rtol=0.04)
  assert abs(areas_resized[0] - areas_resized[1]) > 0.2 * expected


def test_respaced_out_of_scan_is_air_and_background():
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  hu = np.full((20, 20), 300.0, np.float32)
  labels = np.ones((20, 20), np.int32)
  image, label = preprocess_case(Volume(hu, affine), Volume(labels, affine), (20, 20), (2.0,))
  assert image.array[0, 0] == 0.0 and label.array[0, 0] == 0  # 40 mm grid, 20 mm scan
  assert image.array[10, 10] > 0.5 and label.array[10, 10] == 1


def test_spacing_must_match_the_grid():
  volume = Volume(np.zeros((8, 8), np.float32), np.eye(4))
  with pytest.raises(ValueError, match=r"spacing_mm.*image_shape"):
    preprocess_case(volume, None, (4, 4), (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match=r"spacing_mm.*positive"):
    preprocess_case(volume, None, (4, 4), (0.0,))
