"""The quality report's measures against independent references and known answers: real cases
scored as if synthetic, copies of training cases, constant images."""

import numpy as np
import pytest
from skimage import measure

from acis_jax.config_utils import load_config_file
from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import window_hu
from acis_jax.eval import metrics, quality
from acis_jax.workdir import Workdir


def _phantoms(n, shape=(32, 32)):
  cases = [chest_phantom(shape, seed=s) for s in range(n)]
  return (np.stack([window_hu(hu) for hu, _ in cases]).astype(np.float32),
          np.stack([labels for _, labels in cases]).astype(np.int32))


def test_label_islands_count_components_beyond_the_largest_as_scikit_image_does():
  _, labels = _phantoms(3)
  labels[0, :3, :3] = 1  # a stray island of class 1
  labels[1, -2:, -2:] = 1
  labels[1, 0, -1] = 1
  islands = quality.label_islands(labels, 6)
  for case, row in zip(labels, islands):
    for c in range(1, 6):
      components = measure.label(case == c, connectivity=1).max()
      assert row[c - 1] == max(components - 1, 0)
  assert islands[0, 0] >= 1 and islands[1, 0] >= 2


def test_distances():
  rng = np.random.default_rng(1)
  a, b = rng.uniform(size=(3, 8, 8)), rng.uniform(size=(2, 8, 8))
  expected = np.sqrt(((a[:, None] - b[None]) ** 2).mean(axis=(2, 3)))
  np.testing.assert_allclose(metrics.image_distances(a, b), expected, rtol=1e-9)
  left = np.zeros((1, 4, 4), np.int32)
  left[0, :2] = 1                       # 8 voxels of class 1
  right = np.zeros((1, 4, 4), np.int32)
  right[0, 1:3] = 1                     # 8 voxels, 4 shared: Dice 0.5
  right[0, 3] = 2                       # class 2 only here: Dice 0
  np.testing.assert_allclose(metrics.label_distances(left, right, 3), [[1 - (0.5 + 0) / 2]])
  np.testing.assert_allclose(metrics.label_distances(left, left, 3), [[0.0]])


@pytest.fixture(scope="module")
def report_setup(tmp_path_factory):
  config = load_config_file("experiments/smoke.py")
  config.quality.segmenter_steps = 80
  config.evaluate.nets.unet.features = (4, 8, 16, 32)
  return config, Workdir(tmp_path_factory.mktemp("quality"))


def test_real_cases_scored_as_synthetic_are_copies_with_the_same_statistics(report_setup):
  config, workdir = report_setup
  images, labels = _phantoms(4)
  result = quality.report(config, workdir, images, labels, images, labels)
  assert result["memorisation"]["copies"] == 4
  assert result["memorisation"]["nearest_real_median"] == pytest.approx(0.0, abs=1e-6)
  assert result["texture"]["synthetic"] == pytest.approx(result["texture"]["real"])
  assert result["islands"]["synthetic"] == result["islands"]["real"]
  assert result["intensity"]["synthetic"] == result["intensity"]["real"]
  assert result["diversity"]["image_synthetic"] == pytest.approx(result["diversity"]["image_real"])
  # Labels that do not belong to their images (flipped front to back) are inconsistent.
  flipped = quality.report(config, workdir, images, labels, images, labels[:, :, ::-1])
  mean = lambda d: np.mean([v for v in d.values() if v is not None])
  assert mean(flipped["consistency"]["synthetic"]) < mean(result["consistency"]["synthetic"]) - 0.1
  # Cached: a second report reads the segmenters instead of training them again.
  again = quality.report(config, workdir, images, labels, images, labels)
  assert again["consistency"] == result["consistency"]


def test_constant_images_have_no_texture_no_diversity_and_are_not_copies(report_setup):
  config, workdir = report_setup
  images, labels = _phantoms(4)
  constant = np.full_like(images, 0.5)
  result = quality.report(config, workdir, images, labels, constant, labels)
  assert result["texture"]["synthetic"] == 0.0
  assert result["diversity"]["image_synthetic"] == 0.0
  assert result["memorisation"]["copies"] == 0
  md = quality.markdown(result, {0: "background", 1: "heart"}, "t")
  assert "| heart: segmenter Dice |" in md


def test_grids_the_segmenter_cannot_take_are_padded_for_it(report_setup):
  config, workdir = report_setup
  images, labels = _phantoms(2, shape=(40, 36))  # not multiples of the U-Net's 16
  result = quality.report(config, Workdir(workdir.path("odd")), images, labels, images, labels)
  assert set(result["consistency"]["synthetic"]) == {"1", "2", "3", "4", "5"}


def test_the_refinement_effect_against_closed_forms():
  """With identity registrations eq. 3 is twice the squared difference to the nearest real
  case: zero for pairs that are the real cases, 2 sigma^2 for the same with noise of std
  sigma; all 8 differences of one sign give the one-sided signed-rank p 1/2^8. The labels,
  equal in both arms, give no evidence (p 1)."""
  rng = np.random.default_rng(0)
  real = rng.uniform(size=(8, 16, 16)).astype(np.float32)
  labels = np.zeros((8, 16, 16), np.int32)
  for k in range(8):
    labels[k, k:k + 8, 2 * k % 8: 2 * k % 8 + 6] = 1 + k % 2  # distinct maps: nearest = self
  noisy = real + rng.normal(scale=0.1, size=real.shape).astype(np.float32)

  def identity_passes(moving, fixed):
    return np.zeros((3, *moving.shape[:-1], 2), np.float32)

  result = quality.refinement_effect(identity_passes, real, labels, (real, labels),
                                     (noisy, labels), 3)
  assert result["pairs"] == 8
  assert result["uncertainty"]["acis"] == pytest.approx(0.0, abs=1e-9)
  assert result["uncertainty"]["acis-"] == pytest.approx(2 * np.mean((noisy - real) ** 2),
                                                        rel=1e-4)
  assert result["uncertainty"]["p_lower"] == pytest.approx(1 / 2 ** 8)
  assert result["label_consistency"]["acis"] == result["label_consistency"]["acis-"]
  assert result["label_consistency"]["p_higher"] == 1.0
  text = quality.refinement_markdown(result)
  expected = f"| {2 * np.mean((noisy - real) ** 2):.4g} | 0 | {1 / 2 ** 8:.4g} |"
  assert f"| eq. 3 appearance uncertainty (lower is better) {expected}" in text
