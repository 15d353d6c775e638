"""warp / warp_labels / resize against scipy.ndimage and closed forms, in 2-D and 3-D."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import ndimage

from acis_jax.spatial import identity_grid, resize, resize_field, warp, warp_labels

SHAPES = [(40, 48), (32, 36, 40)]
_SCIPY_MODES = {"nearest": "nearest", "constant": "grid-constant"}  # ours -> scipy's


def _random(shape, scale, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _scipy_warp(image, disp, order, mode):
  """Per-channel scipy.ndimage.map_coordinates at identity + disp (float32 coords, as ours)."""
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in disp.shape[:-1]],
                              indexing="ij"), -1)
  coords = np.moveaxis(grid + disp, -1, 0).astype(np.float64)
  return np.stack([ndimage.map_coordinates(image[..., c].astype(np.float64), coords,
                                           order=order, mode=mode)
                   for c in range(image.shape[-1])], -1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
def test_warp_matches_scipy_nearest_mode(shape, order):
  image = _random((*shape, 2), 1.0, 0)
  disp = _random((*shape, len(shape)), 4.0, 1)  # rough field: many samples fall off the grid
  ours = np.asarray(warp(image, disp, order=order, mode="nearest"))
  np.testing.assert_allclose(ours, _scipy_warp(image, disp, order, "nearest"), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_constant_mode_matches_scipy_grid_constant(shape):
  image = _random((*shape, 1), 1.0, 2)
  disp = _random((*shape, len(shape)), 4.0, 3)
  ours = np.asarray(warp(image, disp, mode="constant"))
  np.testing.assert_allclose(ours, _scipy_warp(image, disp, 1, "grid-constant"), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_displacement_is_identity(shape):
  image = _random((*shape, 3), 1.0, 4)
  np.testing.assert_array_equal(warp(image, np.zeros((*shape, len(shape)), np.float32)), image)


@pytest.mark.parametrize("shape", SHAPES)
def test_integer_translation_is_exact(shape):
  image = _random((*shape, 2), 1.0, 5)
  shift = np.arange(len(shape)) * 2 - 3  # e.g. (-3, -1, 1)
  disp = np.broadcast_to(shift.astype(np.float32), (*shape, len(shape)))
  # out[x] = image[clip(x + shift)]: edge voxels repeat outward in mode "nearest".
  index = tuple(np.clip(np.arange(n) + s, 0, n - 1) for n, s in zip(shape, shift))
  expected = image[np.ix_(*index)]
  np.testing.assert_array_equal(warp(image, disp), expected)
  np.testing.assert_array_equal(warp(image, disp, order=0), expected)


@pytest.mark.parametrize("order,mode", [(1, "nearest"), (1, "constant"), (0, "constant")])
def test_batch_axis_on_either_input(order, mode):
  """A batch samples each image with its own field (the images share one flat array, and
  points that leave the grid must not reach the neighbouring image), or shares the unbatched
  input; resize works per image too."""
  shape = (24, 28)
  images = _random((3, *shape, 2), 1.0, 6)
  disps = _random((3, *shape, 2), 6.0, 7)  # many points leave the grid
  batched = warp(images, disps, order=order, mode=mode)
  for b in range(3):
    np.testing.assert_allclose(batched[b], _scipy_warp(images[b], disps[b], order,
                                                       _SCIPY_MODES[mode]), atol=1e-5)
  resized = resize(images, (13, 40), order=order)
  for b in range(3):
    np.testing.assert_allclose(resized[b], resize(images[b], (13, 40), order=order), atol=1e-6)
  if order == 0 or mode == "constant":
    return
  shared_image = warp(images[0], disps)
  shared_disp = warp(images, disps[0])
  for b in range(3):
    np.testing.assert_allclose(shared_image[b], warp(images[0], disps[b]), atol=1e-6)
    np.testing.assert_allclose(shared_disp[b], warp(images[b], disps[0]), atol=1e-6)


def _blobs(shape, seed):
  """Label map with classes {0, 2, 5} (1, 3, 4 deliberately unused) from thresholded noise."""
  noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3)
  return np.where(noise > 0.05, 2, np.where(noise < -0.05, 5, 0)).astype(np.int32)


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_labels_stay_labels_and_shift_exactly(shape):
  labels = _blobs(shape, 8)
  disp = ndimage.gaussian_filter(_random((*shape, len(shape)), 30.0, 9), (4,) * len(shape) + (0,))
  warped = np.asarray(warp_labels(labels, disp, num_classes=6))
  assert warped.dtype == np.int32
  assert set(np.unique(warped)) <= {0, 2, 5}
  # Sub-voxel motion: differs from nearest-neighbour warping only along class boundaries.
  nearest = np.asarray(warp(labels[..., None].astype(np.float32), disp, order=0))[..., 0]
  assert np.mean(warped == nearest) > 0.9
  shift = np.ones(len(shape), np.int32) * 2
  index = tuple(np.clip(np.arange(n) + s, 0, n - 1) for n, s in zip(shape, shift))
  shifted = warp_labels(labels, np.broadcast_to(shift.astype(np.float32), disp.shape), 6)
  np.testing.assert_array_equal(shifted, labels[np.ix_(*index)])


def test_resize_is_exact_on_linear_ramps_and_rescales_fields():
  old, new = (33, 17), (17, 65)
  ramp = identity_grid(old)  # f(x) = x: linear interpolation reproduces it exactly
  resized = np.asarray(resize(ramp, new))
  for a in range(2):
    expected = np.linspace(0, old[a] - 1, new[a])
    np.testing.assert_allclose(np.moveaxis(resized[..., a], a, 0),
                               np.broadcast_to(expected[:, None], (new[a], new[1 - a])), atol=1e-5)
  # A field of constant (3, -2) voxels on the old grid is (3 * 16/32, -2 * 64/16) on the new one.
  field = np.broadcast_to(np.float32([3.0, -2.0]), (*old, 2))
  np.testing.assert_allclose(resize_field(field, new), np.broadcast_to([1.5, -8.0], (*new, 2)),
                             atol=1e-5)


def test_warp_gradients_match_finite_differences():
  shape = (8, 9)
  rng = np.random.default_rng(10)
  image = rng.normal(size=(*shape, 2))
  # Sample points kept 0.2 voxels away from grid lines, where linear interpolation has kinks.
  disp = rng.integers(-2, 2, size=(*shape, 2)) + rng.uniform(0.2, 0.8, (*shape, 2))
  with jax.enable_x64(True):
    args = (jnp.asarray(image, jnp.float64), jnp.asarray(disp, jnp.float64))
    for mode in ("nearest", "constant"):
      check_grads(lambda i, d: warp(i, d, mode=mode), args, order=1, modes=("rev",))
  grads = jax.grad(lambda i, d: jnp.sum(warp(i, d) ** 2), argnums=(0, 1))(
      image.astype(jnp.float32), disp.astype(jnp.float32))
  for g in grads:
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def _map_coordinates_warp(image, disp, mode):
  """Warp by jax.scipy.ndimage.map_coordinates per channel: an independent, autodiff-ed path."""
  coords = identity_grid(disp.shape[:-1]) + disp
  axes = [coords[..., a] for a in range(disp.shape[-1])]
  return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], axes, order=1, mode=mode)
                    for c in range(image.shape[-1])], -1)


@pytest.mark.parametrize("shape", [(12, 14), (8, 10, 9)])
@pytest.mark.parametrize("mode", ["nearest", "constant"])
def test_warp_gradients_equal_autodiff_of_map_coordinates(shape, mode):
  """The written-out backward pass of linear sampling gives autodiff's values (image and
  displacement, points inside, across the border and outside the grid), in 2-D and 3-D."""
  image = jnp.asarray(_random((*shape, 3), 1.0, 1))
  disp = jnp.asarray(_random((*shape, len(shape)), 3.0, 2))  # many points leave the grid
  weights = jnp.asarray(_random((*shape, 3), 1.0, 3))

  def loss(warp_fn):
    return lambda i, d: jnp.sum(jnp.sin(warp_fn(i, d)) * weights)

  ours = jax.grad(loss(lambda i, d: warp(i, d, mode=mode)), argnums=(0, 1))(image, disp)
  reference = jax.grad(loss(lambda i, d: _map_coordinates_warp(i, d, mode)),
                       argnums=(0, 1))(image, disp)
  for got, expected in zip(ours, reference):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.any(np.asarray(expected) != 0)


@pytest.mark.parametrize("mode", ["nearest", "constant"])
def test_warp_gradients_with_batches_and_low_precision_images(mode):
  """A batched field over a shared image sums the image gradient over the batch; batched
  images and fields give each image the gradient of its own field only (points leave the
  grid); a bfloat16 image gets a bfloat16 gradient of the float32 values."""
  image = jnp.asarray(_random((10, 12, 2), 1.0, 4))
  disp = jnp.asarray(_random((3, 10, 12, 2), 4.0, 5))
  loss = lambda i, d: jnp.sum(warp(i, d, mode=mode) ** 2)
  reference = jax.grad(lambda i, d: jnp.sum(_map_coordinates_warp(i, d, mode) ** 2),
                       argnums=(0, 1))
  grad_image, grad_disp = jax.grad(loss, argnums=(0, 1))(image, disp)
  per_example = [reference(image, disp[b]) for b in range(3)]
  np.testing.assert_allclose(grad_image, sum(g for g, _ in per_example), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_disp, np.stack([g for _, g in per_example]), rtol=1e-5,
                             atol=1e-5)
  images = jnp.asarray(_random((3, 10, 12, 2), 1.0, 8))
  grads = jax.grad(loss, argnums=(0, 1))(images, disp)
  per_example = [reference(images[b], disp[b]) for b in range(3)]
  for got, want in zip(grads, zip(*per_example)):
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
  low = jax.grad(lambda i: jnp.sum(warp(i, disp[0]).astype(jnp.float32)))(
      image.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  full = jax.grad(lambda i: jnp.sum(warp(i, disp[0])))(image)
  np.testing.assert_allclose(low.astype(np.float32), full, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bad, message", [
    (dict(image=np.zeros((8, 8, 1)), disp=np.zeros((8, 9, 2))), "spatial shape"),
    (dict(image=np.zeros((8, 8)), disp=np.zeros((8, 8, 2))), "image must have shape"),
    (dict(image=np.zeros((8, 8, 1)), disp=np.zeros((8, 8, 2)), order=3), "order"),
    (dict(image=np.zeros((8, 8, 1)), disp=np.zeros((8, 8, 2)), mode="wrap"), "mode"),
    (dict(image=np.zeros((2, 8, 8, 1)), disp=np.zeros((3, 8, 8, 2))), "batch sizes"),
])
def test_bad_input_raises(bad, message):
  with pytest.raises(ValueError, match=message):
    warp(**bad)
