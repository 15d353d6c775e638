"""SLIC superpixels (the V2UM2I-like arm's masks) against scikit-image's SLIC."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.segmentation import find_boundaries, slic as skimage_slic

from acis_jax.data import chest_phantom, window_hu
from acis_jax.pseudomask import PseudoMaskParams, pseudo_mask
from acis_jax.pseudomask.superpixel import slic


def _assert_agrees_with_skimage(image: np.ndarray, num_segments: int, compactness: float):
  """Cell count within 10 % and mean boundary distance (both ways) under 1.5 voxels.
  scikit-image's connectivity pass is off: ours has none (a cell may come in pieces)."""
  ours, _ = slic(jax.random.key(0), jnp.asarray(image, jnp.float32), num_segments,
                 compactness)
  ours = np.asarray(ours)
  theirs = skimage_slic(image.astype(np.float64), n_segments=num_segments,
                        compactness=compactness, channel_axis=None, start_label=0,
                        enforce_connectivity=False)
  count, their_count = len(np.unique(ours)), len(np.unique(theirs))
  assert abs(count - their_count) <= 0.1 * their_count, (count, their_count)
  ours_edge, their_edge = find_boundaries(ours, mode="inner"), find_boundaries(theirs,
                                                                                 mode="inner")
  to_theirs = ndi.distance_transform_edt(~their_edge)[ours_edge].mean()
  to_ours = ndi.distance_transform_edt(~ours_edge)[their_edge].mean()
  assert to_theirs < 1.5 and to_ours < 1.5, (to_theirs, to_ours)


@pytest.mark.parametrize("num_segments, compactness", [(256, 0.1), (100, 0.05)])
def test_agrees_with_skimage_on_a_phantom_slice(num_segments, compactness):
  hu, _ = chest_phantom((96, 128), seed=3)
  _assert_agrees_with_skimage(window_hu(hu), num_segments, compactness)


def test_agrees_with_skimage_on_a_phantom_volume():
  hu, _ = chest_phantom((32, 36, 40), seed=1)
  _assert_agrees_with_skimage(window_hu(hu), 200, 0.1)


@pytest.mark.network
def test_agrees_with_skimage_on_a_real_ct_slice():
  from acis_jax.data import axial_axis, load_nifti, sample_chest_ct

  volume = load_nifti(sample_chest_ct().image_path)
  image = window_hu(volume.array)
  axis = axial_axis(volume.affine)
  _assert_agrees_with_skimage(np.take(image, image.shape[axis] // 2, axis=axis)[::2, ::2],
                              256, 0.1)


def test_the_superpixel_mask_fills_each_cell_with_its_mean_and_moves_with_the_key():
  hu, _ = chest_phantom((64, 64), seed=0)
  image = jnp.asarray(window_hu(hu), jnp.float32)
  params = PseudoMaskParams(method="superpixel", num_seeds=64)
  first = pseudo_mask(jax.random.key(0), image, params)
  cells, mask = np.asarray(first.cells), np.asarray(first.mask)
  for cell in np.unique(cells):
    np.testing.assert_allclose(mask[cells == cell], np.asarray(image)[cells == cell].mean(),
                               rtol=1e-5)
  other = pseudo_mask(jax.random.key(1), image, params)
  assert not np.array_equal(np.asarray(other.cells), cells)  # the jittered start
  still = PseudoMaskParams(method="superpixel", num_seeds=64, superpixel_jitter=0.0)
  np.testing.assert_array_equal(pseudo_mask(jax.random.key(0), image, still).cells,
                                pseudo_mask(jax.random.key(1), image, still).cells)
  with pytest.raises(ValueError, match="method"):
    PseudoMaskParams(method="watershed")
