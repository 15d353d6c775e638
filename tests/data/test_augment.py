"""Augmentation: flips against jnp.flip, quarter turns against np.rot90, rotations against scipy,
labels against the warped image, monotone histogram shifts, Jacobians, keys and vmap."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial.transform import Rotation

from acis_jax.data.augment import (AugmentParams, affine_displacement, augment,
                                   downstream_augment, histogram_shift, random_affine,
                                   random_affine_matrix, rotation_matrix)
from acis_jax.spatial import jacobian_determinant, warp, warp_labels

SHAPES = [(48, 48), (24, 28, 20)]
NO_CHANGE = dict(rotate_degrees=0.0, scale=0.0, shear=0.0, translate=0.0, histogram_shift=0.0)
THRESHOLDS = (0.35, 0.65)
# Compiled once per shape and setting: op-by-op dispatch would dominate the test time.
warp_image = jax.jit(warp)
warp_label_map = jax.jit(warp_labels, static_argnums=2)
# Without flips, so Jacobians stay positive; without a histogram shift, so thresholds hold.
STRONG = AugmentParams(rotate_degrees=20.0, scale=0.2, shear=0.1, translate=0.1,
                       histogram_shift=0.0)


def smooth_image(shape, seed=0):
  """Gaussian-filtered noise rescaled to [0, 1], `(*shape, 1)` float32."""
  noise = np.random.default_rng(seed).normal(size=shape)
  smooth = ndimage.gaussian_filter(noise, 6.0)
  smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
  return smooth[..., None].astype(np.float32)


def classes_of(image):
  """Three intensity classes of a `(*spatial, 1)` image, `(*spatial)` int32."""
  return np.digitize(np.asarray(image)[..., 0], THRESHOLDS).astype(np.int32)


def dice(a, b):
  return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.mark.parametrize("shape", SHAPES)
def test_disabled_returns_inputs(shape):
  image = smooth_image(shape)
  labels = classes_of(image)
  extra = [image * 0.5]
  params = AugmentParams(enabled=False, flip_axes=(0,), flip_probability=1.0, rotate_degrees=45)
  out = augment(jax.random.key(0), image, labels, 3, params, extra=extra)
  assert out[0] is image and out[1] is labels and out[2] is extra


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_ranges_are_identity(shape):
  image = smooth_image(shape)
  labels = classes_of(image)
  params = AugmentParams(**NO_CHANGE)
  out_image, out_labels, (out_extra,) = augment(jax.random.key(3), image, labels, 3, params,
                                                extra=(1.0 - image,))
  np.testing.assert_allclose(out_image, image, atol=1e-6)
  np.testing.assert_allclose(out_extra, 1.0 - image, atol=1e-6)
  np.testing.assert_array_equal(out_labels, labels)
  assert out_labels.dtype == labels.dtype


@pytest.mark.parametrize("shape", SHAPES)
def test_certain_flip_equals_jnp_flip(shape):
  image = smooth_image(shape)
  labels = classes_of(image)
  axes = tuple(range(len(shape)))
  params = AugmentParams(flip_axes=axes, flip_probability=1.0, **NO_CHANGE)
  out_image, out_labels, _ = augment(jax.random.key(1), image, labels, 3, params)
  np.testing.assert_array_equal(out_image, jnp.flip(image, axes))
  np.testing.assert_array_equal(out_labels, jnp.flip(labels, axes))


def test_random_flips_are_flips_of_the_allowed_axes():
  image = smooth_image((24, 28, 20))
  params = AugmentParams(flip_axes=(0, 2), **NO_CHANGE)
  candidates = {(): image, (0,): np.flip(image, 0), (2,): np.flip(image, 2),
                (0, 2): np.flip(image, (0, 2))}
  seen = set()
  for seed in range(12):
    out = np.asarray(augment(jax.random.key(seed), image, None, None, params)[0])
    matches = [axes for axes, flipped in candidates.items() if np.array_equal(out, flipped)]
    assert len(matches) == 1
    seen.add(matches[0])
  assert len(seen) >= 3  # with p = 0.5 per axis, 12 draws reach (almost surely) 3 of the 4


@pytest.mark.parametrize("size", [33, 32])
def test_quarter_turn_matrix_matches_rot90(size):
  # np.rot90(m)[i, j] = m[j, n - 1 - i]: the pull map x -> A (x - c) + c with A = [[0, 1], [-1, 0]].
  image = smooth_image((size, size))
  quarter = np.float32([[0, 1], [-1, 0]])
  disp = affine_displacement(quarter, np.zeros(2), (size, size))
  np.testing.assert_allclose(warp_image(image, disp), np.rot90(image), atol=1e-6)
  labels = classes_of(image)
  np.testing.assert_array_equal(warp_label_map(labels, disp, 3), np.rot90(labels))
  # The same turn from an angle: cos(pi / 2) is ~4e-8 in float32, so only interpolation error.
  turned = warp_image(image, affine_displacement(
      rotation_matrix(jnp.float32([-math.pi / 2]), 2), np.zeros(2), (size, size)))
  np.testing.assert_allclose(turned[2:-2, 2:-2], np.rot90(image)[2:-2, 2:-2], atol=1e-5)


def test_quarter_turn_in_3d_matches_rot90():
  shape = (20, 25, 25)
  image = smooth_image(shape)
  angles = jnp.float32([0.0, 0.0, -math.pi / 2])  # planes (0, 1), (0, 2), (1, 2)
  turned = warp_image(image, affine_displacement(rotation_matrix(angles, 3), np.zeros(3), shape))
  expected = np.rot90(image, axes=(1, 2))
  np.testing.assert_allclose(turned[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-5)


def test_rotation_matrix_matches_scipy():
  angles = np.float32([0.3, -0.2, 0.5])
  # Planes (0, 1), (0, 2), (1, 2) turn about axes 2, 1 (with the opposite sense) and 0,
  # applied in that order: extrinsic z, y, x Euler angles.
  expected = Rotation.from_euler("zyx", [angles[0], -angles[1], angles[2]]).as_matrix()
  np.testing.assert_allclose(rotation_matrix(jnp.asarray(angles), 3), expected, atol=1e-6)
  theta = 0.4
  np.testing.assert_allclose(rotation_matrix(jnp.float32([theta]), 2),
                             [[math.cos(theta), -math.sin(theta)],
                              [math.sin(theta), math.cos(theta)]], atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_affine_warp_matches_scipy_affine_transform(shape):
  # scipy: out(x) = in(M x + offset); ours pulls from M (x - c) + c + t.
  image = smooth_image(shape)
  params = AugmentParams(flip_axes=(1,), rotate_degrees=20.0, scale=0.2, shear=0.1,
                         translate=0.1)
  centre = (np.float64(shape) - 1) / 2
  for seed in range(2):
    key = jax.random.key(seed)
    matrix, translation = (np.asarray(a, np.float64)
                           for a in random_affine_matrix(key, shape, params))
    expected = ndimage.affine_transform(image[..., 0].astype(np.float64), matrix,
                                        offset=centre + translation - matrix @ centre,
                                        order=1, mode="nearest")
    moved = warp_image(image, random_affine(key, shape, params))[..., 0]
    np.testing.assert_allclose(moved, expected, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_factor_stays_in_its_range(shape):
  ndim = len(shape)
  centre = (np.float32(shape) - 1) / 2
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) - centre
  zero = dict(rotate_degrees=0.0, scale=0.0, shear=0.0, translate=0.0)
  for seed in range(4):
    key = jax.random.key(seed)
    # Rotation only: distances to the centre are kept, and in 2-D the angle is within range.
    params = AugmentParams(**(zero | dict(rotate_degrees=20.0)))
    moved = grid + np.asarray(random_affine(key, shape, params))
    np.testing.assert_allclose(np.linalg.norm(moved, axis=-1), np.linalg.norm(grid, axis=-1),
                               atol=1e-4)
    matrix, _ = random_affine_matrix(key, shape, params)
    np.testing.assert_allclose(np.linalg.det(matrix), 1.0, atol=1e-5)
    if ndim == 2:
      assert 0 < abs(math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))) <= 20.0
    # Translation only: a constant shift within the fraction of each size.
    params = AugmentParams(**(zero | dict(translate=0.1)))
    disp = np.asarray(random_affine(key, shape, params))
    np.testing.assert_allclose(disp, np.broadcast_to(disp.reshape(-1, ndim)[0], disp.shape),
                               atol=1e-6)
    assert np.all(np.abs(disp.reshape(-1, ndim)[0]) <= 0.1 * np.float32(shape))
    # Scale only: a diagonal matrix within 1 +- scale.
    params = AugmentParams(**(zero | dict(scale=0.2)))
    matrix, translation = random_affine_matrix(key, shape, params)
    diagonal = np.diag(np.asarray(matrix))
    np.testing.assert_array_equal(np.asarray(matrix), np.diag(diagonal))
    assert np.all(np.abs(diagonal - 1) <= 0.2) and np.all(diagonal != 1)
    np.testing.assert_array_equal(translation, 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_labels_and_extra_follow_the_image(shape):
  image = smooth_image(shape, seed=1)
  labels = classes_of(image)
  for seed in range(3):
    out_image, out_labels, (out_extra,) = augment(jax.random.key(seed), image, labels, 3, STRONG,
                                                  extra=[image])
    np.testing.assert_array_equal(out_extra, out_image)  # one geometry, no intensity change
    assert np.abs(np.asarray(out_image) - image).max() > 0.1  # it did move
    assert set(np.unique(out_labels)) == set(np.unique(labels))
    from_image = classes_of(out_image)
    for c in range(3):
      assert dice(np.asarray(out_labels) == c, from_image == c) > 0.95


@pytest.mark.parametrize("shape", SHAPES)
def test_keys_decide_the_output(shape):
  image = smooth_image(shape)
  labels = classes_of(image)
  first, again, other = (augment(jax.random.key(seed), image, labels, 3, STRONG, extra=[image])
                         for seed in (5, 5, 6))
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert np.abs(np.asarray(first[0]) - np.asarray(other[0])).max() > 1e-3


@pytest.mark.parametrize("shift", [0.05, 0.3])
def test_histogram_shift_is_monotone_and_bounded(shift):
  # Distinct intensities spread over [0, 1], ends included, in scrambled positions.
  values = np.random.default_rng(0).permutation(np.linspace(0, 1, 48 * 48, dtype=np.float32))
  image = values.reshape(48, 48, 1)
  params = AugmentParams(histogram_shift=shift, num_control_points=8)
  for seed in range(5):
    out = np.asarray(histogram_shift(jax.random.key(seed), jnp.asarray(image), params)).ravel()
    assert out.min() >= 0 and out.max() <= 1
    order = np.argsort(values)
    assert np.all(np.diff(out[order]) > 0)
    assert stats.spearmanr(values, out).statistic == 1.0
    np.testing.assert_allclose(out[order[[0, -1]]], [0.0, 1.0], atol=1e-6)  # ends stay put
    change = np.abs(out - values).max()
    assert change > 1e-3
    if shift < 0.5 / 7:  # control points cannot cross: each moves by at most `shift`
      assert change <= shift + 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_output_stays_in_unit_range(shape):
  image = np.random.default_rng(2).uniform(size=(*shape, 2)).astype(np.float32)
  image[..., 0].flat[:2] = [0.0, 1.0]
  params = AugmentParams(rotate_degrees=40.0, scale=0.3, shear=0.2, translate=0.2,
                         histogram_shift=0.4)
  for seed in range(3):
    out, _, _ = augment(jax.random.key(seed), image, None, None, params)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_random_affine_fields_do_not_fold(shape):
  for params in (AugmentParams(), STRONG):
    for seed in range(4):
      key = jax.random.key(seed)
      det = np.asarray(jacobian_determinant(random_affine(key, shape, params)))
      assert det.min() > 0
      matrix, _ = random_affine_matrix(key, shape, params)
      np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-4)  # affine: constant
  mirror = AugmentParams(flip_axes=(0,), flip_probability=1.0, **NO_CHANGE)
  np.testing.assert_allclose(jacobian_determinant(random_affine(key, shape, mirror)), -1.0)


def test_vmap_over_keys_matches_single_calls():
  shape = (48, 48)
  images = np.stack([smooth_image(shape, seed) for seed in range(3)])
  labels = np.stack([classes_of(image) for image in images])
  keys = jax.random.split(jax.random.key(7), 3)

  def one(key, image, label):
    return augment(key, image, label, 3, STRONG, extra=[image])

  batched = jax.jit(jax.vmap(one))(keys, images, labels)
  for i in range(3):
    single = one(keys[i], images[i], labels[i])
    np.testing.assert_allclose(batched[0][i], single[0], atol=1e-6)
    np.testing.assert_array_equal(batched[1][i], single[1])
    np.testing.assert_allclose(batched[2][0][i], single[2][0], atol=1e-6)


def test_downstream_adapter():
  image = smooth_image((48, 48))
  labels = classes_of(image)
  key = jax.random.key(4)
  seg = downstream_augment({"rotate_degrees": 20.0}, num_classes=3)
  out_image, out_labels = seg(key, image, labels)
  expected = augment(key, image, labels, 3, {"rotate_degrees": 20.0})
  np.testing.assert_array_equal(out_image, expected[0])
  np.testing.assert_array_equal(out_labels, expected[1])
  # Reconstruction: the target sees the same geometry and the same intensity curve.
  recon = downstream_augment({"histogram_shift": 0.2})
  out_input, out_target = recon(key, image, image)
  np.testing.assert_array_equal(out_input, out_target)
  assert np.abs(np.asarray(out_input) - image).max() > 1e-3


def test_from_config():
  params = AugmentParams.from_config({"flip_axes": [2], "rotate_degrees": 5})
  assert params == AugmentParams(flip_axes=(2,), rotate_degrees=5)
  hash(params)  # static under jit
  assert AugmentParams.from_config(params) is params
  with pytest.raises(ValueError, match="unknown augmentation settings.*rotation"):
    AugmentParams.from_config({"rotation": 5})
  for bad in [dict(flip_probability=1.5), dict(scale=1.0), dict(shear=-0.1),
              dict(num_control_points=1), dict(flip_axes=(0, 0))]:
    with pytest.raises(ValueError):
      AugmentParams(**bad)


def test_bad_inputs_are_named():
  image = smooth_image((24, 28, 20))
  labels = classes_of(image)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="flip_axes"):
    augment(key, image, labels, 3, AugmentParams(flip_axes=(3,)))
  with pytest.raises(ValueError, match="labels must"):
    augment(key, image, labels[:-1], 3, AugmentParams())
  with pytest.raises(ValueError, match="num_classes"):
    augment(key, image, labels, None, AugmentParams())
  with pytest.raises(ValueError, match="image must"):
    augment(key, image[..., 0, 0], None, None, AugmentParams())  # 2-D without a channel axis
  with pytest.raises(ValueError, match="extra images"):
    augment(key, image, labels, 3, AugmentParams(), extra=[image[:-1]])
