"""The refinement stage (acis_jax.train.refine): pairing, action noise, advantages, which
network each term moves, and its policy gradient against the backprop gradient."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import window_hu
from acis_jax.train import refine
from acis_jax.train.state import TrainState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_steps import phantom_batch, small_config, stage_setup  # noqa: E402


def shifted_phantoms(shifts, shape=(32, 32), num_classes=4):
  """The phantom moved by each shift (pixels along the first axis): cases with distinct
  anatomy (the phantom's seed changes its texture only)."""
  hu, label = chest_phantom(shape, seed=0)
  image = window_hu(hu)[..., None]
  label = np.minimum(label, num_classes - 1).astype(np.int32)
  return (jnp.asarray(np.stack([np.roll(image, s, axis=0) for s in shifts])),
          jnp.asarray(np.stack([np.roll(label, s, axis=0) for s in shifts])))


def test_each_generated_pair_is_scored_against_its_nearest_real_case():
  images, labels = shifted_phantoms((0, 4, 8))
  order = np.array([2, 0, 1])
  np.testing.assert_array_equal(
      refine.nearest_real(images, labels, images[order], labels[order], 4), order)
  noisy = images[order] + 0.01 * jax.random.normal(jax.random.key(0), images.shape)
  np.testing.assert_array_equal(refine.nearest_real(images, None, noisy, None, 0), order)


def _lag_one_correlation(noise):
  a, b = noise[:, :-1].ravel(), noise[:, 1:].ravel()
  return float(np.corrcoef(a, b)[0, 1])


def test_action_noise_is_white_per_voxel_and_smooth_on_a_coarse_grid():
  shape = (8, 64, 64, 1)
  white = np.asarray(refine.coarse_noise(jax.random.key(0), shape, 1))
  assert abs(float(white.std()) - 1) < 0.02 and abs(_lag_one_correlation(white)) < 0.03
  smooth = np.asarray(refine.coarse_noise(jax.random.key(0), shape, 8))
  assert smooth.shape == shape and _lag_one_correlation(smooth) > 0.9
  assert refine.coarse_noise(jax.random.key(1), (2, 9, 10, 11, 1), 4).shape == (2, 9, 10, 11, 1)


def test_leave_one_out_advantages_against_their_definition():
  rewards = np.array([[1.0, -2.0], [3.0, 0.5], [2.0, 0.0], [-1.0, 4.0]])
  expected = np.empty_like(rewards)
  for b in range(2):
    for k in range(4):
      others = [rewards[j, b] for j in range(4) if j != k]
      expected[k, b] = (rewards[k, b] - np.mean(others)) / np.std(rewards[:, b])
  np.testing.assert_allclose(refine.leave_one_out_advantages(jnp.asarray(rewards)), expected,
                             rtol=1e-5)


def test_running_variance_starts_at_the_batch_and_then_averages():
  values = jnp.array([1.0, 2.0, 4.0])
  state = TrainState.create({}, {}, label_var=jnp.asarray(5.0))
  np.testing.assert_allclose(refine.running_variance(state, "label_var", values, 0.9),
                             np.var([1, 2, 4]), rtol=1e-6)
  later = state.next_step()
  np.testing.assert_allclose(refine.running_variance(later, "label_var", values, 0.9),
                             0.9 * 5 + 0.1 * np.var([1, 2, 4]), rtol=1e-6)


def test_appearance_gap_against_its_closed_form():
  """0 for the real image and for any rearrangement of its voxels whose Laplacian energy is
  the same (a flip); contrast k about the image mean: (1 - k)^2 + log(k^2)^2."""
  images = jnp.asarray(np.random.default_rng(1).random((2, 16, 16, 1)).astype(np.float32))
  np.testing.assert_allclose(refine.appearance_gap(images, images), 0.0, atol=1e-6)
  np.testing.assert_allclose(refine.appearance_gap(images[:, ::-1], images), 0.0, atol=1e-6)
  centre = jnp.mean(images, (1, 2, 3), keepdims=True)
  k = 0.5
  np.testing.assert_allclose(refine.appearance_gap(centre + k * (images - centre), images),
                             (1 - k) ** 2 + np.log(k ** 2) ** 2, rtol=1e-4)


def _setup(mode, **weights):
  config = small_config()
  config.refine.mode = mode
  config.refine.passes = 2
  config.refine.actions = 4
  config.refine.noise_factor = 4
  for name, value in weights.items():
    config.refine[name] = value
  _, ctx, state, frozen = stage_setup("refine", config)
  batch = phantom_batch()
  batch.pop("pair_image")
  return ctx, state, frozen, batch


def _changed(before, after) -> bool:
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after))) > 0


# Every term but eq. 3's uncertainty switched off.
EQ3_ALONE = dict(label_weight=0.0, realism_weight=0.0, appearance_weight=0.0)


def test_which_network_each_term_moves():
  """Policy gradient on eq. 3 alone moves the image generator and not the annotation
  generator (the image sees the labels without gradient); backprop reaches the annotation
  generator through the image's condition; with every weight 0 the generators stand still
  while the discriminator trains."""
  ctx, state, frozen, batch = _setup("policy_gradient", **EQ3_ALONE)
  new, metrics = refine.make_refine_step(ctx)(state, frozen, batch, jax.random.key(1))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert _changed(state.params["image_generator"], new.params["image_generator"])
  assert not _changed(state.params["annotation_generator"], new.params["annotation_generator"])

  ctx, state, frozen, batch = _setup("backprop", **EQ3_ALONE)
  new, _ = refine.make_refine_step(ctx)(state, frozen, batch, jax.random.key(1))
  assert _changed(state.params["annotation_generator"], new.params["annotation_generator"])

  ctx, state, frozen, batch = _setup("policy_gradient", uncertainty_weight=0.0, **EQ3_ALONE)
  new, _ = refine.make_refine_step(ctx)(state, frozen, batch, jax.random.key(1))
  for name in ("image_generator", "annotation_generator"):
    assert not _changed(state.params[name], new.params[name]), name
  assert _changed(state.params["image_discriminator"], new.params["image_discriminator"])

  # The appearance gap alone: it reaches the image directly, the labels only through it.
  ctx, state, frozen, batch = _setup("policy_gradient", uncertainty_weight=0.0,
                                     **{**EQ3_ALONE, "appearance_weight": 1.0})
  new, metrics = refine.make_refine_step(ctx)(state, frozen, batch, jax.random.key(1))
  assert float(metrics["appearance_gap"]) > 0
  assert _changed(state.params["image_generator"], new.params["image_generator"])
  assert not _changed(state.params["annotation_generator"], new.params["annotation_generator"])


def _image_generator_gradients(mode, keys):
  """The image generator's update under SGD with rate 1 (minus the gradient) of eq. 3's term
  alone, one per key, from the same state."""
  ctx, state, frozen, batch = _setup(mode, **EQ3_ALONE)
  step = jax.jit(refine.make_refine_step(ctx))
  before = jnp.concatenate([x.ravel() for x in jax.tree.leaves(state.params["image_generator"])])
  out = []
  for key in keys:
    new, _ = step(jax.tree.map(jnp.copy, state), frozen, batch, key)
    after = jax.tree.leaves(new.params["image_generator"])
    out.append(np.asarray(before - jnp.concatenate([x.ravel() for x in after])))
  return np.stack(out)


def test_the_policy_gradient_points_where_backprop_does():
  """Averaged over actions, the policy gradient of eq. 3 estimates the gradient of the
  smoothed reward: its mean over keys agrees in direction with the backprop gradient of the
  same term (same masks, real cases and registration passes per key)."""
  keys = [jax.random.key(k) for k in range(24)]
  policy = _image_generator_gradients("policy_gradient", keys).mean(0)
  backprop = _image_generator_gradients("backprop", keys).mean(0)
  cosine = policy @ backprop / (np.linalg.norm(policy) * np.linalg.norm(backprop))
  assert cosine > 0.3, cosine
