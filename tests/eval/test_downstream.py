"""Downstream trainer: the loss, the step's plumbing, and two tiny tasks that must be learnt."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from acis_jax.eval import downstream, recon_nets, seg_nets


def disks(n: int, seed: int, size: int = 32, noise: float = 0.1):
  """Images `(n, size, size, 1)` of one bright disk on a dark noisy background, and its mask."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  images, masks = [], []
  for _ in range(n):
    cy, cx = rng.uniform(8, size - 8, 2)
    radius = rng.uniform(4, 8)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    images.append(0.2 + 0.6 * mask + noise * rng.standard_normal((size, size)))
    masks.append(mask)
  return np.stack(images)[..., None].astype(np.float32), np.stack(masks).astype(np.int32)


class Scale(nnx.Module):
  """`w * x` with one parameter w = 1 at the start: its loss is the degradation's error."""

  def __init__(self, rngs: nnx.Rngs):
    del rngs
    self.w = nnx.Param(jnp.ones((), jnp.float32))

  def __call__(self, x):
    return self.w[...] * x


class Threshold(nnx.Module):
  """A parameter-free segmenter: label 1 where the image exceeds 0.5."""

  def __call__(self, x):
    return jnp.concatenate([0.5 - x, x - 0.5], axis=-1)


def _as_trained(module: nnx.Module) -> downstream.Trained:
  graphdef, params = nnx.split(module)
  return downstream.Trained(graphdef, params, np.zeros(0))


def test_losses_match_a_direct_computation():
  """Per-case soft Dice over the foreground classes and per-case MSE against NumPy; the batch
  loss is their mean, or their weighted mean with case weights."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 6, 5))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  scores = np.zeros((2, 3))
  for b in range(2):
    for c in range(3):
      p, t = probs[b, ..., c], labels[b] == c
      scores[b, c] = (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
  segmentation = downstream.Task("segmentation", num_classes=3)
  cross_entropy = -np.log(np.take_along_axis(probs, labels[..., None], -1)).mean(axis=(1, 2, 3))
  per_case = 1 - scores[:, 1:].mean(axis=1) + cross_entropy
  np.testing.assert_allclose(downstream.case_losses(segmentation, logits, labels), per_case,
                             rtol=1e-5)
  np.testing.assert_allclose(downstream.task_loss(segmentation, logits, labels),
                             per_case.mean(), rtol=1e-5)
  weights = np.array([1.0, 0.25], np.float32)
  np.testing.assert_allclose(downstream.task_loss(segmentation, logits, labels, weights),
                             (per_case * weights).sum() / weights.sum(), rtol=1e-5)
  confident = 100.0 * (2 * np.eye(3)[labels] - 1)
  assert float(downstream.task_loss(segmentation, confident, labels)) < 1e-6
  # Class-weighted cross-entropy: each voxel's term times its class's weight.
  class_weights = np.array([0.5, 2.0, 1.5], np.float32)
  voxel_ce = -np.log(np.take_along_axis(probs, labels[..., None], -1))[..., 0]
  weighted = 1 - scores[:, 1:].mean(axis=1) + (voxel_ce * class_weights[labels]).mean((1, 2))
  np.testing.assert_allclose(
      downstream.case_losses(segmentation, logits, labels, jnp.asarray(class_weights)),
      weighted, rtol=1e-5)
  images, clean = rng.random((2, 2, 6, 5, 1)).astype(np.float32)
  denoise = downstream.Task("denoise", level=0.1)
  mse = ((images - clean) ** 2).reshape(2, -1).mean(axis=1)
  np.testing.assert_allclose(downstream.case_losses(denoise, images, clean), mse, rtol=1e-5)
  np.testing.assert_allclose(downstream.task_loss(denoise, images, clean, weights),
                             (mse * weights).sum() / weights.sum(), rtol=1e-5)


def test_cross_entropy_weights_follow_the_voxel_shares():
  """Weight of class k proportional to share_k ** -0.25, mean 1 over the classes present; a
  class absent from the targets gets a finite weight and does not change the others'."""
  task = downstream.Task("segmentation", num_classes=4)
  labels = np.zeros((2, 10, 10), np.int32)
  labels[0, :2] = 1   # 20 voxels
  labels[1, :5] = 2   # 50 voxels; class 3 absent
  share = np.array([130, 20, 50, 0]) / 200
  expected = share[:3] ** -0.25 / np.mean(share[:3] ** -0.25)
  weights = np.asarray(downstream.cross_entropy_weights(task, jnp.asarray(labels)))
  np.testing.assert_allclose(weights[:3], expected, rtol=1e-5)
  assert np.isfinite(weights[3]) and weights[3] > weights[1]
  assert downstream.cross_entropy_weights(downstream.Task("denoise", level=0.1), labels) is None


def test_segmentation_of_disks_is_learnt(numpy_initialised):
  task = downstream.Task("segmentation", num_classes=2)
  train_x, train_y = disks(16, seed=0)
  test_x, test_y = disks(6, seed=1)
  model = downstream.train_downstream(
      lambda rngs: numpy_initialised(lambda r: seg_nets.SegUNet(
          1, 2, spatial_dims=2, features=(4, 8), rngs=r)),
      task, train_x, train_y, steps=100, batch_size=4, learning_rate=1e-2, seed=0)
  assert model.losses.shape == (100,)
  cases = downstream.evaluate_downstream(model, task, test_x, test_y, spacing=(0.5, 0.5))
  assert len(cases) == 6
  assert set(cases[0]) == {f"{m}/{k}" for m in ("dice", "msd", "nsd", "hd95")
                           for k in ("1", "mean")}
  assert np.mean([case["dice/1"] for case in cases]) > 0.8


def test_denoiser_beats_the_identity(numpy_initialised):
  task = downstream.Task("denoise", level=0.1)
  clean = np.stack([ndimage.gaussian_filter(image, (1, 1, 0))
                    for image in disks(24, seed=2, noise=0.0)[0]])
  model = downstream.train_downstream(
      lambda rngs: numpy_initialised(lambda r: recon_nets.ResNet(
          1, spatial_dims=2, features=8, num_blocks=2, rngs=r)),
      task, clean[:16], steps=100, batch_size=4, learning_rate=3e-3, seed=0)
  cases = downstream.evaluate_downstream(model, task, clean[16:])
  assert all(case["psnr"] > case["psnr_input"] for case in cases)


def test_evaluation_of_a_known_segmenter():
  """A perfect segmentation scores Dice 1, NSD 1 and zero distances; a missed label gets
  Dice 0 and the field-of-view diagonal as distances."""
  task = downstream.Task("segmentation", num_classes=3)
  images, masks = disks(2, seed=3, noise=0.0)
  labels = masks.copy()
  labels[1, :2, :2] = 2  # a label the segmenter never predicts
  cases = downstream.evaluate_downstream(_as_trained(Threshold()), task, images, labels,
                                         spacing=(2.0, 1.0))
  assert cases[0]["dice/1"] == 1.0 and cases[0]["dice/2"] == 1.0  # label 2 absent from both
  assert cases[0]["msd/1"] == 0.0 and cases[0]["hd95/1"] == 0.0 and cases[0]["nsd/1"] == 1.0
  assert cases[1]["dice/2"] == 0.0 and cases[1]["nsd/2"] == 0.0
  np.testing.assert_allclose(cases[1]["msd/2"], math.hypot(32 * 2.0, 32 * 1.0))
  np.testing.assert_allclose(cases[1]["dice/mean"], (cases[1]["dice/1"] + 0.0) / 2)


def test_evaluation_of_the_identity_on_blurred_images():
  """The blurred test inputs against scikit-image's PSNR and SSIM of scipy's blur."""
  task = downstream.Task("deblur", level=2.0)
  images = disks(2, seed=4, noise=0.05)[0]
  cases = downstream.evaluate_downstream(_as_trained(Scale(None)), task, images)
  for image, case in zip(images[..., 0].astype(np.float64), cases):
    blurred = ndimage.gaussian_filter(image, 2.0, mode="reflect")
    np.testing.assert_allclose(case["psnr_input"],
                               peak_signal_noise_ratio(image, blurred, data_range=1.0), rtol=1e-4)
    ssim = structural_similarity(image, blurred, data_range=1.0, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)
    np.testing.assert_allclose(case["ssim_input"], ssim, atol=1e-4)
    assert case["psnr"] == case["psnr_input"]  # the identity model restores nothing


def test_steps_draw_fresh_noise_from_the_seed():
  """With `w * x` and w = 1, the first loss is the noise power; the seed fixes every step."""
  task = downstream.Task("denoise", level=0.2)
  clean = np.full((4, 32, 32, 1), 0.5, np.float32)

  def run(seed):
    return downstream.train_downstream(Scale, task, clean, steps=3, batch_size=2,
                                       learning_rate=1e-3, seed=seed).losses

  losses = run(0)
  # Mean square of 2048 N(0, 0.2^2) draws: 0.04 with a standard error of 0.04 * sqrt(2 / 2048).
  assert abs(losses[0] - 0.04) < 5 * 0.04 * math.sqrt(2 / 2048)
  np.testing.assert_array_equal(run(0), losses)
  assert not np.array_equal(run(1), losses)


def test_augmentation_runs_per_case_before_the_degradation():
  task = downstream.Task("denoise", level=0.0)
  clean = np.random.default_rng(0).uniform(size=(4, 16, 16, 1)).astype(np.float32)

  def shift_inputs(key, image, target):
    assert image.shape == target.shape == (16, 16, 1) and key.shape == ()
    return image + 1.0, target

  model = downstream.train_downstream(Scale, task, clean, steps=1, batch_size=2,
                                      learning_rate=1e-3, seed=0, augment=shift_inputs)
  np.testing.assert_allclose(model.losses[0], 1.0, rtol=1e-6)  # w (x + 1) - x with w = 1


def test_batches_are_drawn_without_replacement():
  index = np.arange(6, dtype=np.float32)
  inputs = np.broadcast_to(index[:, None, None, None], (6, 4, 4, 1))
  targets = np.broadcast_to(index[:, None, None].astype(np.int32), (6, 4, 4))
  for step in range(3):
    x, y, _ = downstream.draw_batch(jax.random.key(step), inputs, targets, 6)
    np.testing.assert_array_equal(np.sort(np.asarray(x)[:, 0, 0, 0]), index)
    np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], np.asarray(y)[:, 0, 0])


@pytest.mark.parametrize("make,message", [
    (lambda: downstream.Task("segmentation"), "num_classes"),
    (lambda: downstream.Task("denoise"), "level"),
    (lambda: downstream.Task("superres", level=3.5), "positive integer"),
    (lambda: downstream.Task("detection", level=1.0), "unknown downstream task"),
])
def test_bad_tasks_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("labels,message", [
    (np.full((2, 32, 32), 2), r"\[0, 2\)"),
    (np.zeros((2, 32, 31), np.int32), "shape"),
    (np.zeros((2, 32, 32), np.float32), "integers"),
    (None, "needs targets"),
])
def test_bad_segmentation_data_raises(labels, message):
  task = downstream.Task("segmentation", num_classes=2)
  with pytest.raises(ValueError, match=message):
    downstream.train_downstream(lambda rngs: Threshold(), task,
                                np.zeros((2, 32, 32, 1), np.float32), labels,
                                steps=1, batch_size=1, learning_rate=1e-3, seed=0)


def test_networks_with_batch_statistics_are_refused():
  class WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.BatchNorm(1, rngs=rngs)

    def __call__(self, x):
      return self.norm(x)

  with pytest.raises(ValueError, match="BatchStat"):
    downstream.train_downstream(WithBatchNorm, downstream.Task("denoise", level=0.1),
                                np.zeros((2, 8, 8, 1), np.float32), steps=1, batch_size=1,
                                learning_rate=1e-3, seed=0)


def test_batches_with_a_real_share_take_it_from_the_real_cases():
  """Two real cases first, eight synthetic: each batch of 4 holds both real ones once and two
  distinct synthetic ones, every synthetic case is drawn over the steps, and the synthetic
  cases carry the synthetic weight."""
  index = np.arange(10, dtype=np.float32)
  inputs = np.broadcast_to(index[:, None, None, None], (10, 4, 4, 1))
  targets = np.broadcast_to(index[:, None, None].astype(np.int32), (10, 4, 4))
  seen = set()
  for step in range(40):
    x, _, weights = downstream.draw_batch(jax.random.key(step), inputs, targets, 4,
                                          num_real=2, real_per_batch=2, synthetic_weight=0.3)
    drawn = np.asarray(x)[:, 0, 0, 0]
    np.testing.assert_array_equal(np.sort(drawn[:2]), [0, 1])
    assert len(set(drawn[2:])) == 2 and all(d >= 2 for d in drawn[2:])
    np.testing.assert_allclose(weights, np.where(drawn < 2, 1.0, 0.3))
    seen |= set(drawn[2:].tolist())
  assert seen == set(range(2, 10))


def test_pretraining_draws_synthetic_cases_then_real_ones(monkeypatch):
  """With pretrain_steps, the first steps see synthetic cases only and the rest real only."""
  index = np.arange(10, dtype=np.float32)
  inputs = np.broadcast_to(index[:, None, None, None], (10, 4, 4, 1))
  drawn = []
  real_draw = downstream.draw_batch

  def recording_draw(*args, **kwargs):
    batch = real_draw(*args, **kwargs)
    drawn.append(np.asarray(batch[0])[:, 0, 0, 0])
    return batch
  monkeypatch.setattr(downstream, "draw_batch", recording_draw)
  downstream.train_downstream(lambda rngs: nnx.Linear(1, 1, rngs=rngs),
                              downstream.Task("denoise", level=0.1), inputs, steps=7,
                              batch_size=3, learning_rate=1e-3, seed=0, num_real=2,
                              real_share=0.5, pretrain_steps=4)
  assert all(np.all(d >= 2) for d in drawn[:4]) and all(np.all(d < 2) for d in drawn[4:])
  with pytest.raises(ValueError, match="pretrain_steps"):
    downstream.train_downstream(lambda rngs: nnx.Linear(1, 1, rngs=rngs),
                                downstream.Task("denoise", level=0.1), inputs, steps=4,
                                batch_size=3, learning_rate=1e-3, seed=0, pretrain_steps=4)
