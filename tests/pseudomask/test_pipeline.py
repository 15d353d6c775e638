"""The whole pseudo-mask pipeline: determinism, vmap, eq. 2, fallbacks, errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import window_hu
from acis_jax.pseudomask import PseudoMaskParams, pseudo_mask
from acis_jax.pseudomask.pipeline import warn_if_no_edges

PARAMS = PseudoMaskParams(num_edge_points=256, num_seeds=128, bandwidth=3.0)


def phantom_image(shape, seed=0):
  hu, _ = chest_phantom(shape, seed=seed)
  return np.asarray(window_hu(hu))


@pytest.mark.parametrize("shape", [(64, 64), (32, 40, 36)])
def test_cells_are_nearest_seed_and_mask_is_seed_intensity(shape):
  image = phantom_image(shape)
  result = pseudo_mask(jax.random.key(0), image, PARAMS)
  seeds = np.asarray(result.seeds)
  cells = np.asarray(result.cells)
  assert seeds.shape == (PARAMS.num_seeds, len(shape))
  assert len(np.unique(seeds, axis=0)) == PARAMS.num_seeds
  grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, len(shape))
  nearest, _ = cKDTree(seeds).query(grid)
  assigned = np.linalg.norm(grid - seeds[cells.reshape(-1)], axis=1)
  np.testing.assert_allclose(assigned, nearest, atol=1e-6)
  # eq. 2: every voxel takes the intensity at its cell's seed.
  np.testing.assert_array_equal(np.asarray(result.mask),
                                image[tuple(np.moveaxis(seeds[cells], -1, 0))])
  # Seeds are drawn where the density is non-zero, and edges feed that density.
  density = np.asarray(result.density)
  assert np.all(density[tuple(seeds.T)] > 0)
  assert np.asarray(result.edges).any()


def test_cell_mean_matches_scipy():
  image = phantom_image((64, 64))
  params = PseudoMaskParams(num_edge_points=256, num_seeds=128, bandwidth=3.0, cell_value="mean")
  result = pseudo_mask(jax.random.key(1), image, params)
  cells = np.asarray(result.cells)
  means = ndimage.mean(image, labels=cells, index=np.arange(params.num_seeds))
  np.testing.assert_allclose(np.asarray(result.mask), means[cells], rtol=1e-5, atol=1e-6)


def test_same_key_same_mask_and_other_key_other_mask():
  image = phantom_image((64, 64))
  first = pseudo_mask(jax.random.key(3), image, PARAMS)
  again = pseudo_mask(jax.random.key(3), image, PARAMS)
  other = pseudo_mask(jax.random.key(4), image, PARAMS)
  np.testing.assert_array_equal(np.asarray(first.mask), np.asarray(again.mask))
  assert not np.array_equal(np.asarray(first.seeds), np.asarray(other.seeds))


def test_vmap_over_images_and_keys_matches_single_calls():
  images = jnp.stack([phantom_image((48, 48), seed=s) for s in range(3)])
  keys = jax.random.split(jax.random.key(7), 3)
  batched = jax.vmap(lambda k, x: pseudo_mask(k, x, PARAMS))(keys, images)
  for i in range(3):
    single = pseudo_mask(keys[i], images[i], PARAMS)
    np.testing.assert_array_equal(np.asarray(batched.cells[i]), np.asarray(single.cells))
    np.testing.assert_array_equal(np.asarray(batched.mask[i]), np.asarray(single.mask))


@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_image_without_edges_falls_back_to_uniform_density(fill, caplog):
  image = np.full((48, 48), fill, np.float32)
  result = jax.block_until_ready(pseudo_mask(jax.random.key(0), image, PARAMS))
  with caplog.at_level(logging.WARNING):
    assert warn_if_no_edges(result, "flat.nii.gz")
  assert not np.asarray(result.edges).any()
  density = np.asarray(result.density)
  # All air (0.0) has no body: the whole image is the support; 0.5 is all body.
  np.testing.assert_array_equal(density, np.ones_like(density))
  assert np.all(np.isfinite(np.asarray(result.mask)))
  assert "flat.nii.gz: the image has no Canny edges" in caplog.text


def test_more_seeds_than_voxels_is_refused():
  with pytest.raises(ValueError, match="num_seeds=5000 exceeds the 4096 voxels"):
    pseudo_mask(jax.random.key(0), np.zeros((64, 64), np.float32),
                PseudoMaskParams(num_seeds=5000))


def test_params_from_config_rejects_unknown_fields():
  with pytest.raises(ValueError, match="unknown pseudo-mask settings \\['num_sedes'\\]"):
    PseudoMaskParams.from_config({"num_sedes": 10})
  with pytest.raises(ValueError, match="cell_value"):
    PseudoMaskParams(cell_value="median")
