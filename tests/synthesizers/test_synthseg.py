"""SynthSeg-style pairs: labels kept exact, intensities from the configured mixture, the blur
against scipy's, valid pairs in 2-D and 3-D, and its arm in the evaluation protocol."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.stats

from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import window_hu
from acis_jax.synthesizers.synthseg import (SynthSegParams, gaussian_blur, generation_labels,
                                            label_intensities, synthseg_pair, synthseg_pairs)


def phantom_labels(shape, num_classes=5):
  return np.minimum(chest_phantom(shape, seed=0)[1], num_classes - 1).astype(np.int32)


def test_intensities_follow_each_labels_gaussian_drawn_from_the_ranges():
  labels = np.repeat(np.arange(4), 4000).reshape(80, 200)
  params = SynthSegParams(mean_range=(0.2, 0.7), std_range=(0.01, 0.1))
  draws = [label_intensities(jax.random.key(i), labels, 4, params) for i in range(40)]
  for image, means, stds in draws[:5]:
    image, means, stds = map(np.asarray, (image, means, stds))
    for k in range(4):
      voxels = image[labels == k]
      assert abs(voxels.mean() - means[k]) < 5 * stds[k] / np.sqrt(voxels.size)
      assert abs(voxels.std() / stds[k] - 1) < 0.1
      assert scipy.stats.normaltest(voxels).pvalue > 1e-4
  means = np.concatenate([np.asarray(m) for _, m, _ in draws])
  stds = np.concatenate([np.asarray(s) for _, _, s in draws])
  assert scipy.stats.kstest(means, scipy.stats.uniform(0.2, 0.5).cdf).pvalue > 1e-3
  assert scipy.stats.kstest(stds, scipy.stats.uniform(0.01, 0.09).cdf).pvalue > 1e-3


@pytest.mark.parametrize("sigma", [0.7, 1.0])
def test_blur_matches_scipy(sigma):
  image = np.random.default_rng(0).random((20, 17)).astype(np.float32)
  radius = 3
  want = ndi.gaussian_filter(image.astype(np.float64), sigma, mode="nearest",
                             truncate=(radius + 0.4) / sigma)
  np.testing.assert_allclose(gaussian_blur(image, np.float32(sigma), radius), want, atol=1e-5)


@pytest.mark.parametrize("shape", [(48, 40), (24, 20, 16)])
def test_pairs_are_valid_and_labels_stay_labels(shape):
  labels = np.stack([phantom_labels(shape), np.roll(phantom_labels(shape), 2, axis=0)])
  images, out = synthseg_pairs(jax.random.key(0), labels, 3, 5, SynthSegParams())
  images, out = np.asarray(images), np.asarray(out)
  assert images.shape == (3, *shape, 1) and out.shape == (3, *shape)
  assert images.dtype == np.float32 and out.dtype == np.int32
  assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
  assert set(np.unique(out)) <= set(np.unique(labels))
  assert not np.array_equal(images[0], images[1])
  # Deformed (2 voxels rms), but the same anatomy: each class keeps most of its area.
  for pair in out:
    for k in range(1, 5):
      areas = [(m == k).sum() for m in labels]
      assert min(areas) * 0.6 <= (pair == k).sum() <= max(areas) * 1.4
  again = np.asarray(synthseg_pairs(jax.random.key(0), labels, 3, 5, SynthSegParams())[0])
  np.testing.assert_array_equal(again, images)


def test_without_deformation_the_labels_are_the_input_exactly():
  labels = phantom_labels((40, 40))[None]
  params = dataclasses.replace(SynthSegParams(), deformation_rms=1e-6)
  _, out = synthseg_pair(jax.random.key(3), labels, 5, params)
  np.testing.assert_array_equal(np.asarray(out), labels[0])


def test_bad_ranges_are_refused():
  section = dataclasses.asdict(SynthSegParams())
  section["std_range"] = (0.2, 0.1)
  with pytest.raises(ValueError, match="std_range"):
    SynthSegParams.from_config(section)


def test_the_body_is_a_generation_label_and_background_again_in_the_output():
  hu, labels = chest_phantom((40, 36), seed=0)
  labels = np.minimum(labels, 4).astype(np.int32)[None]
  images = window_hu(hu)[None, ..., None]
  params = SynthSegParams()
  marked = np.asarray(generation_labels(labels, images, 5, params))
  want = np.where((labels == 0) & (images[..., 0] > params.body_threshold), 5, labels)
  np.testing.assert_array_equal(marked, want)
  assert 0 < (marked == 5).sum() < (labels == 0).sum()  # the body, not the air around it
  out_images, out = synthseg_pairs(jax.random.key(1), labels, 4, 5, params, images=images)
  out = np.asarray(out)
  assert out.max() <= 4 and set(np.unique(out)) <= set(np.unique(labels))
  # Body and air drawn with different means: the background is not one flat intensity.
  no_deformation = dataclasses.replace(params, deformation_rms=1e-6, bias_std=0.0,
                                       noise_max=0.0, blur_max=0.0, gamma_std=0.0)
  image, out = synthseg_pair(jax.random.key(2), jnp.asarray(marked), 5, no_deformation)
  image, out = np.asarray(image)[..., 0], np.asarray(out)
  np.testing.assert_array_equal(out, labels[0])
  body, air = image[marked[0] == 5], image[marked[0] == 0]
  assert abs(body.mean() - air.mean()) > 3 * (body.std() + air.std()) / np.sqrt(min(body.size,
                                                                                    air.size))
