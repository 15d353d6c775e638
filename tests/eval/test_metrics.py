"""Metrics against scikit-image, the surface-distance package and closed forms, 2-D and 3-D."""
import math

import jax
import numpy as np
import pytest
import surface_distance
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from surface_distance import lookup_tables

from acis_jax.eval import metrics
from acis_jax.eval.metrics import dice, psnr, ssim, surface_metrics

# surface-distance 0.1 still calls scipy.ndimage.morphology, which SciPy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")


def _smooth_blob(shape, seed):
  """A random mask with smooth, curved borders that also touch the image border."""
  noise = np.random.default_rng(seed).normal(size=shape)
  return ndimage.gaussian_filter(noise, 3.0) > 0.05


def _ball(shape, spacing, radius_mm):
  """Voxels whose centres lie within `radius_mm` of the image centre."""
  axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
  return sum(g**2 for g in np.meshgrid(*axes, indexing="ij")) <= radius_mm**2


def _box(shape, start, size):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(a, a + n) for a, n in zip(start, size))] = True
  return mask


def _package_metrics(pred, target, spacing, tolerance_mm):
  """msd / nsd / hd95 from surface_distance's directed distances and surfel areas."""
  s = surface_distance.compute_surface_distances(target, pred, spacing)
  weighted = (s["distances_gt_to_pred"] @ s["surfel_areas_gt"]
              + s["distances_pred_to_gt"] @ s["surfel_areas_pred"])
  area = s["surfel_areas_gt"].sum() + s["surfel_areas_pred"].sum()
  return {"msd": weighted / area,
          "nsd": surface_distance.compute_surface_dice_at_tolerance(s, tolerance_mm),
          "hd95": surface_distance.compute_robust_hausdorff(s, 95)}


# --- surface metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.6, 1.7), (1.0, 1.0, 1.0), (1.5, 0.8, 2.5),
                                     (3.0, 1.0, 0.5)])
def test_surfel_areas_match_package_tables(spacing):
  ndim = len(spacing)
  if ndim == 2:
    expected = lookup_tables.create_table_neighbour_code_to_contour_length(spacing)
  else:
    expected = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
  corners = 2**ndim
  # The package's kernel gives the cell's low corner the highest bit, ours the lowest.
  package_code = [int(format(code, f"0{corners}b")[::-1], 2) for code in range(2**corners)]
  np.testing.assert_allclose(metrics._surfel_areas(spacing), expected[package_code],
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, spacing", [((64, 50), (0.6, 1.7)),
                                            ((40, 48, 36), (1.5, 0.8, 2.5))])
def test_surface_metrics_match_package(shape, spacing):
  pred, target = _smooth_blob(shape, 1), _smooth_blob(shape, 2)
  for tolerance_mm in (1.0, 2.5):
    ours = surface_metrics(pred, target, spacing, tolerance_mm)
    reference = _package_metrics(pred, target, spacing, tolerance_mm)
    for key in ("msd", "nsd", "hd95"):
      assert ours[key] == pytest.approx(reference[key], rel=1e-10), key
    assert 0.0 < ours["nsd"] < 1.0  # a case that tests the tolerance, not a trivial 0 or 1
    # Every metric is symmetric in its two masks; integer masks mean nonzero = inside.
    swapped = surface_metrics(target.astype(np.uint8) * 3, pred, spacing, tolerance_mm)
    assert swapped == pytest.approx(ours, rel=1e-12)


@pytest.mark.parametrize("shape, spacing", [((64, 40), (0.6, 1.5)),
                                            ((48, 32, 20), (0.6, 1.0, 1.5))])
def test_concentric_balls_distances_are_the_radius_difference(shape, spacing):
  inner_mm, outer_mm = 7.0, 13.0
  gap = outer_mm - inner_mm
  inner, outer = _ball(shape, spacing, inner_mm), _ball(shape, spacing, outer_mm)
  # A surface cell straddles the true surface, so its centre lies within half a cell diagonal
  # of it: every surface distance is within one voxel diagonal of the radius difference.
  slack = math.hypot(*spacing)
  result = surface_metrics(inner, outer, spacing, tolerance_mm=1.0)
  assert gap - slack <= result["msd"] <= gap + slack
  assert gap - slack <= result["hd95"] <= gap + slack
  assert surface_metrics(inner, outer, spacing, gap + slack)["nsd"] == 1.0
  assert surface_metrics(inner, outer, spacing, gap - slack - 1e-6)["nsd"] == 0.0


@pytest.mark.parametrize("shape, spacing", [((24, 30), (1.5, 0.8)),
                                            ((16, 26, 26), (1.5, 0.8, 1.2))])
def test_shifted_box(shape, spacing):
  """A slab shifted by 2 voxels along axis 0: HD95 = the shift, NSD = 1 from that tolerance."""
  ndim = len(shape)
  size = (6,) + (20,) * (ndim - 1)
  target = _box(shape, (4,) + (3,) * (ndim - 1), size)
  pred = _box(shape, (6,) + (3,) * (ndim - 1), size)
  shift_mm = 2 * spacing[0]
  result = surface_metrics(pred, target, spacing, tolerance_mm=shift_mm)
  # No surface point is farther than the shift from the other surface, and the two faces
  # across the shift (over 5 % of the area) are exactly that far.
  assert result["hd95"] == pytest.approx(shift_mm, rel=1e-12)
  assert result["nsd"] == 1.0
  assert surface_metrics(pred, target, spacing, shift_mm - 1e-6)["nsd"] < 1.0
  assert 0.0 < result["msd"] < shift_mm
  # Overlap 4 of 6 slices: Dice = 2 * 4 / (6 + 6).
  assert float(dice(pred, target)["mean"]) == pytest.approx(2 / 3)


def test_identical_masks():
  mask = _smooth_blob((40, 40, 40), 3)
  assert surface_metrics(mask, mask, (1.0, 2.0, 0.5), 0.0) == {"msd": 0.0, "nsd": 1.0, "hd95": 0.0}


def test_empty_mask_policy():
  shape, spacing = (20, 30, 10), (1.0, 2.0, 3.0)
  empty, box = np.zeros(shape, bool), _box(shape, (2, 2, 2), (5, 5, 5))
  diagonal = 70.0  # |(20, 60, 30)| mm
  assert surface_metrics(empty, empty, spacing, 1.0) == {"msd": 0.0, "nsd": 1.0, "hd95": 0.0}
  for pred, target in ((empty, box), (box, empty)):
    assert surface_metrics(pred, target, spacing, 1.0) == pytest.approx(
        {"msd": diagonal, "nsd": 0.0, "hd95": diagonal})
  labels = np.where(box, 2, 0)
  # Label 1 absent from both: 1. Label 2 missed by the prediction: 0.
  scores = dice(np.zeros(shape, np.int32), labels, labels=(1, 2))
  assert float(scores["1"]) == 1.0 and float(scores["2"]) == 0.0
  assert float(scores["mean"]) == 0.5
  # No foreground anywhere: nothing to find and nothing found.
  assert {k: float(v) for k, v in dice(empty, empty).items()} == {"mean": 1.0}


@pytest.mark.parametrize("call, message", [
    (lambda: surface_metrics(np.zeros((8, 8)), np.zeros((8, 8)), (1, 1), 1), "dtype"),
    (lambda: surface_metrics(np.zeros((8, 8), bool), np.zeros((8, 9), bool), (1, 1), 1),
     "shape"),
    (lambda: surface_metrics(np.zeros((8, 8), bool), np.zeros((8, 8), bool), (1, 1, 1), 1),
     "spacing"),
    (lambda: surface_metrics(np.zeros((8, 8), bool), np.zeros((8, 8), bool), (1, 0), 1),
     "spacing"),
    (lambda: surface_metrics(np.zeros((8, 8), bool), np.zeros((8, 8), bool), (1, 1), -1),
     "tolerance"),
    (lambda: surface_metrics(np.zeros(8, bool), np.zeros(8, bool), (1,), 1), "rank"),
    (lambda: dice(np.zeros((8, 8)), np.zeros((8, 8), np.int32)), "integer labels"),
    (lambda: dice(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32), labels=()), "empty"),
    (lambda: dice(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32), labels=(1, 1)),
     "repeated"),
    (lambda: psnr(np.zeros((8, 8)), np.zeros((8, 8)), data_range=0.0), "data_range"),
    (lambda: psnr(np.zeros((4, 8, 8)), np.zeros((4, 8, 8)), spatial_dims=4), "spatial rank"),
    (lambda: ssim(np.zeros((10, 16)), np.zeros((10, 16))), ">= 11"),
])
def test_bad_input_raises(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# --- Dice --------------------------------------------------------------------------------------


def test_dice_matches_package_per_label_and_batch():
  rng = np.random.default_rng(0)
  # Two 3-D cases of labels 0..3 from blocky random fields, so that labels overlap partly.
  coarse = rng.integers(0, 4, size=(2, 4, 5, 6, 2))
  pred = np.kron(coarse[..., 0], np.ones((1, 6, 6, 6), np.int32))
  target = np.kron(coarse[..., 1], np.ones((1, 6, 6, 6), np.int32))
  batch = dice(pred, target, labels=(1, 2, 3), spatial_dims=3)
  for case in range(2):
    one = dice(pred[case], target[case])  # labels read from the data: 1, 2, 3
    assert sorted(one) == ["1", "2", "3", "mean"]
    expected = [surface_distance.compute_dice_coefficient(target[case] == label,
                                                          pred[case] == label)
                for label in (1, 2, 3)]
    for label, value in zip((1, 2, 3), expected):
      assert float(batch[str(label)][case]) == pytest.approx(value, rel=1e-6)
      assert float(one[str(label)]) == pytest.approx(value, rel=1e-6)
    assert float(batch["mean"][case]) == pytest.approx(np.mean(expected), rel=1e-6)


def test_dice_under_jit_needs_labels():
  pred = np.arange(32 * 32).reshape(32, 32) % 3
  jitted = jax.jit(lambda p, t: dice(p, t, labels=(1, 2))["mean"])
  assert float(jitted(pred, pred)) == 1.0
  with pytest.raises(ValueError, match="labels"):
    jax.jit(lambda p, t: dice(p, t)["mean"])(pred, pred)


# --- PSNR and SSIM -----------------------------------------------------------------------------


def _image_pair(shape, seed):
  """A smooth image in [0, 1] and a noisy copy of it, float64."""
  rng = np.random.default_rng(seed)
  clean = ndimage.gaussian_filter(rng.random(shape), 2.0)
  clean = (clean - clean.min()) / (clean.max() - clean.min())
  return clean, np.clip(clean + rng.normal(scale=0.05, size=shape), 0.0, 1.0)


def _skimage_ssim(x, y, data_range=1.0):
  return structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, data_range=data_range)


@pytest.mark.parametrize("shape", [(40, 48), (24, 28, 32)])
def test_psnr_ssim_match_skimage(shape):
  x, y = _image_pair(shape, len(shape))
  assert float(psnr(x, y)) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0),
                                            rel=1e-5)
  assert float(ssim(x, y)) == pytest.approx(_skimage_ssim(x, y), abs=1e-5)
  # data_range rescales: the same images on a 0..255 scale score the same.
  assert float(ssim(255 * x, 255 * y, data_range=255.0)) == pytest.approx(
      _skimage_ssim(255 * x, 255 * y, data_range=255.0), abs=1e-5)
  assert float(psnr(x, x)) == math.inf
  assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_psnr_ssim_batch_axis():
  pairs = [_image_pair((40, 48), seed) for seed in range(3)]
  x = np.stack([p[0] for p in pairs])
  y = np.stack([p[1] for p in pairs])
  batch_psnr = psnr(x, y, spatial_dims=2)
  batch_ssim = jax.jit(lambda a, b: ssim(a, b, spatial_dims=2))(x, y)
  assert batch_psnr.shape == batch_ssim.shape == (3,)
  for i, (a, b) in enumerate(pairs):
    assert float(batch_psnr[i]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0),
                                                 rel=1e-5)
    assert float(batch_ssim[i]) == pytest.approx(_skimage_ssim(a, b), abs=1e-5)


@pytest.mark.parametrize("shape, spatial_dims", [((3, 17, 20), 2), ((2, 9, 10, 11), 3),
                                                 ((2, 3, 12, 13), 2)])
def test_high_frequency_energy_is_scipys_mean_squared_laplacian(shape, spatial_dims):
  images = np.random.default_rng(0).random(shape)
  cases = images.reshape((-1,) + shape[-spatial_dims:])
  expected = np.array([np.mean(ndimage.laplace(x) ** 2) for x in cases]).reshape(
      shape[:-spatial_dims])
  np.testing.assert_allclose(metrics.high_frequency_energy(images, spatial_dims=spatial_dims),
                             expected, rtol=1e-5)
  assert float(metrics.high_frequency_energy(np.full((16, 16), 0.3))) == 0.0
