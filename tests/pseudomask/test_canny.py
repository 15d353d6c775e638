"""Canny edges: 2-D against scikit-image, 3-D against geometry and 2-D extrusions."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.feature import canny as skimage_canny

from acis_jax.data import chest_phantom, window_hu
from acis_jax.pseudomask.canny import canny, canny_slicewise

# The package re-exports the function `canny`, which shadows the module's name.
canny_module = importlib.import_module("acis_jax.pseudomask.canny")

# (sigma, low, high, use_quantiles), the last defaults included.
SETTINGS = [(1.0, None, None, False), (2.0, 0.05, 0.15, False), (1.0, 0.6, 0.9, True)]
# Shared shapes keep the number of compilations (most of the run time) down.
SHAPE_2D = (96, 128)
SMALL_2D = (48, 56)
SHAPE_3D = (40, 44, 48)


def _dice(a, b):
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return 2.0 * np.sum(a & b) / max(np.sum(a) + np.sum(b), 1)


def _shapes_image(shape=SHAPE_2D, seed=0):
  """A disc, a rectangle, a triangle and a soft blob on a ramp, with mild noise."""
  rng = np.random.default_rng(seed)
  i, j = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
  image = 0.1 + 0.2 * j / shape[1]
  image = np.where((i - 30) ** 2 + (j - 32) ** 2 < 15 ** 2, 0.8, image)
  image = np.where((i > 55) & (i < 85) & (j > 20) & (j < 60), 0.5, image)
  image = np.where((i > 20) & (i < 70) & (j - 75 > 0) & (j - 75 < (i - 20) * 0.8), 0.95, image)
  image = image + 0.3 * np.exp(-((i - 75) ** 2 + (j - 105) ** 2) / 60.0)
  return (image + rng.normal(0.0, 0.02, shape)).astype(np.float32)


def _assert_matches_skimage(image):
  for sigma, low, high, quantiles in SETTINGS:
    ours = canny(image, sigma, low, high, use_quantiles=quantiles)
    reference = skimage_canny(image, sigma, low, high, use_quantiles=quantiles)
    assert ours.dtype == jnp.bool_ and ours.shape == image.shape
    assert reference.sum() > 50, "the reference must find edges for the test to mean anything"
    assert _dice(ours, reference) >= 0.9, (sigma, low, high, quantiles)


def test_matches_skimage_on_shapes():
  _assert_matches_skimage(_shapes_image())


def test_matches_skimage_on_phantom_slice():
  hu, _ = chest_phantom(SHAPE_2D, seed=3)
  _assert_matches_skimage(window_hu(hu))


@pytest.mark.network
def test_matches_skimage_on_real_ct_slices():
  from acis_jax.data import axial_axis, load_nifti, sample_chest_ct

  volume = load_nifti(sample_chest_ct().image_path)
  image = window_hu(volume.array)
  axis = axial_axis(volume.affine)
  for index in np.linspace(0.3, 0.7, 3) * image.shape[axis]:
    _assert_matches_skimage(np.take(image, int(index), axis=axis))


def test_hysteresis_keeps_the_components_with_a_strong_voxel():
  """Against scipy's 26-connected labelling; 70 voxels along axis 0 cross 32-bit words."""
  rng = np.random.default_rng(1)
  candidates = rng.random((70, 20, 24)) < 0.3
  strong = candidates & (rng.random(candidates.shape) < 0.02)
  labels, _ = ndi.label(candidates, np.ones((3, 3, 3)))
  expected = np.isin(labels, labels[strong]) & candidates
  ours = canny_module._hysteresis(jnp.asarray(candidates), jnp.asarray(strong))
  np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("axis", [0, 2])
def test_3d_extrusion_has_the_2d_edges(axis):
  """A 2-D image repeated along an axis: inner slices have exactly the 2-D edges.

  This pins the 3-D gradient scale to the 2-D one (the thresholds mean the same).
  """
  image = _shapes_image(SMALL_2D)
  volume = np.repeat(np.expand_dims(image, axis), 6, axis=axis)
  edges = np.asarray(canny(volume))
  expected = np.asarray(canny(image))
  assert expected.sum() > 50
  for index in range(1, 5):
    np.testing.assert_array_equal(np.take(edges, index, axis=axis), expected)
  for index in (0, 5):  # the border is never an edge
    assert not np.take(edges, index, axis=axis).any()


def test_3d_sphere_edges_lie_on_its_surface():
  shape, radius = SHAPE_3D, 13.0
  centre = (np.array(shape) - 1) / 2.0 + np.array([0.3, -0.2, 0.1])
  distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.indices(shape), centre)))
  volume = np.where(distance < radius, 0.8, 0.1).astype(np.float32)
  edges = np.asarray(canny(volume))
  assert np.all(np.abs(distance[edges] - radius) < 1.5)
  # Coverage: nearly every voxel on the surface has an edge voxel within one voxel.
  surface = np.abs(distance - radius) < 0.5
  near_edge = ndi.binary_dilation(edges, np.ones((3, 3, 3)))
  assert near_edge[surface].mean() > 0.95
  # Thin: a surface, not a shell (a 1-voxel shell holds about 4 pi r^2 voxels).
  assert edges.sum() < 1.5 * 4.0 * np.pi * radius ** 2


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_constant_image_has_no_edges(shape):
  assert not np.asarray(canny(np.full(shape, 0.7, np.float32))).any()


def test_slicewise_is_2d_canny_per_slice():
  volume = np.stack([_shapes_image(SMALL_2D, seed=s) for s in range(3)])
  ours = np.asarray(canny_slicewise(volume, 1.0, 0.05, 0.15))
  for index, image in enumerate(volume):
    np.testing.assert_array_equal(ours[index], np.asarray(canny(image, 1.0, 0.05, 0.15)))
    assert _dice(ours[index], skimage_canny(image, 1.0, 0.05, 0.15)) >= 0.9


def test_jit_and_vmap():
  images = np.stack([_shapes_image(SMALL_2D, seed=s) for s in range(3)])
  batched = jax.jit(jax.vmap(lambda x: canny(x, 1.0, 0.05, 0.15)))(images)
  for image, edges in zip(images, batched):
    np.testing.assert_array_equal(edges, canny(image, 1.0, 0.05, 0.15))


def test_bad_input_raises():
  with pytest.raises(ValueError, match="2-D or 3-D"):
    canny(np.zeros(16, np.float32))
  with pytest.raises(ValueError, match="2-D or 3-D"):
    canny(np.zeros((4, 4, 4, 4), np.float32))
  with pytest.raises(ValueError, match="low_threshold"):
    canny(np.zeros((16, 16), np.float32), low_threshold=0.3, high_threshold=0.2)
  with pytest.raises(ValueError, match="quantile"):
    canny(np.zeros((16, 16), np.float32), low_threshold=0.5, high_threshold=1.5,
          use_quantiles=True)
  with pytest.raises(ValueError, match="sigma"):
    canny(np.zeros((16, 16), np.float32), sigma=0.0)
  with pytest.raises(ValueError, match="float image"):
    canny(np.zeros((16, 16), np.uint8))
