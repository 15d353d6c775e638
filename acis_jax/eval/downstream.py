"""Downstream training and evaluation (paper sec 3.1): what the synthetic data is judged by.

One arm of an experiment = one network trained on one training set (real only, real + ACIS-,
real + ACIS, ...) for a fixed number of steps, then scored on held-out real cases. Every arm gets
the same `steps`, whatever the size of its training set, so arms differ only in their data.

Tasks (`Task`):
  * "segmentation": inputs images `(n, *spatial, channels)`, targets integer labels
    `(n, *spatial)` in `[0, num_classes)`; soft Dice + cross-entropy weighted by class
    (`case_losses`, `cross_entropy_weights`); prediction = argmax.
  * "denoise", "deblur", "superres": targets clean images `(n, *spatial, channels)` (by default
    the inputs themselves); the network input is the degraded clean image, made on the fly
    inside the train step with a fresh key per step (`acis_jax.eval.degrade`), so noise is
    new every step; L2 (mean squared error) loss. At evaluation the degraded test inputs are made
    once with a fixed key, so every arm sees the very same test inputs.

Training: Adam (optax) on the parameters; the step is a pure function
`(graphdef, state, batch, key) -> (state, loss)` under `jax.jit` with the state donated. Step k
uses the key `fold_in(key, k)`: it draws the batch by index from the in-memory training arrays
(without replacement when `batch_size <= n`; with real and synthetic cases, synthetic cases
only, then real ones only, or a fixed share of each batch from the real ones), then the
augmentation and degradation keys.
Models have parameters only (no batch statistics), so a trained model is `graphdef + params`.
"""
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from acis_jax.eval import degrade, metrics
from acis_jax.train import losses
from acis_jax.train.state import TrainState, apply_update

SEGMENTATION = "segmentation"
TASKS = (SEGMENTATION,) + degrade.TASKS

# augment(key, image, target) -> (image, target), on ONE case (vmapped over the batch).
# For segmentation the target is an integer label map, for reconstruction the clean image
# (transform it like the input: it is an image too). Runs before the degradation.
Augment = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Task:
  """A downstream task.

  Attributes:
    name: "segmentation", "denoise", "deblur" or "superres".
    num_classes: segmentation only: the number of classes including background (label 0).
    level: reconstruction only: noise sigma (intensity units), blur sigma (voxels) or the
      super-resolution factor (integer), see `acis_jax.eval.degrade`.
  """
  name: str
  num_classes: int | None = None
  level: float | None = None

  def __post_init__(self):
    if self.name not in TASKS:
      raise ValueError(f"unknown downstream task {self.name!r}; expected one of {TASKS}")
    if self.name == SEGMENTATION:
      if self.num_classes is None or self.num_classes < 2 or self.level is not None:
        raise ValueError(f"segmentation needs num_classes >= 2 (background included) and no "
                         f"level, got num_classes={self.num_classes}, level={self.level}")
    else:
      if self.level is None or self.num_classes is not None:
        raise ValueError(f"{self.name} needs a level (its degradation strength) and no "
                         f"num_classes, got level={self.level}, num_classes={self.num_classes}")
      degrade.make_degradation(self.name, self.level)  # validates the level

  @property
  def is_segmentation(self) -> bool:
    return self.name == SEGMENTATION

  def degrade(self, key: jax.Array, image: jax.Array) -> jax.Array:
    """The network input made from one clean case `(*spatial, channels)` (reconstruction)."""
    return degrade.make_degradation(self.name, self.level)(key, image)


class Trained(NamedTuple):
  """A trained downstream model.

  Attributes:
    graphdef: the network's structure (`nnx.split`).
    params: its trained parameters.
    losses: `(steps,)` training loss of each step, for monitoring.
  """
  graphdef: nnx.GraphDef
  params: nnx.State
  losses: np.ndarray

  def module(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params)


# A class's cross-entropy weight goes as its voxel share to this power (`cross_entropy_weights`).
CLASS_WEIGHT_POWER = -0.25
# What `case_losses` computes, recorded with every trained arm (a change retrains it).
LOSSES = {True: f"soft_dice_foreground+cross_entropy_weighted_share^{CLASS_WEIGHT_POWER}",
          False: "mse"}


def cross_entropy_weights(task: Task, targets: jax.Array) -> jax.Array | None:
  """Segmentation: the cross-entropy weight of each class `(num_classes,)`, its voxel share
  in the training `targets` to the power `CLASS_WEIGHT_POWER`, divided by the mean of those
  of the classes present (an absent class, never a target, does not enter that mean). None
  for reconstruction.

  Why: with the plain mean the U-Net lost the heart (2.7 % of the voxels) at one seed of six
  (Dice 0); the power -0.25 kept it at every seed, -0.5 cost the left lung at two. Scaling
  the weights to average 1 over the voxels instead (here a 1.5x stronger cross-entropy) came
  out the same within the seeds' noise (README, "Seeds")."""
  if not task.is_segmentation:
    return None
  counts = jnp.bincount(jnp.ravel(targets), length=task.num_classes)
  weights = (jnp.maximum(counts, 1) / targets.size) ** CLASS_WEIGHT_POWER
  present = counts > 0
  return weights / (jnp.sum(jnp.where(present, weights, 0)) / jnp.sum(present))


def case_losses(task: Task, outputs: jax.Array, targets: jax.Array,
                class_weights: jax.Array | None = None) -> jax.Array:
  """The loss of each case `(b,)`: for segmentation (`outputs` = logits), soft Dice over the
  foreground classes plus the voxels' mean cross-entropy (nnU-Net's pairing), each voxel's
  weighted by `class_weights[its label]` when given; mean squared error otherwise. The
  cross-entropy is there because soft Dice alone let a small class go unlearned for some
  initialisations: MedNeXt's heart Dice was 29 % at seed 0 and 68 % at seed 2 on the same
  data (README, "Seeds")."""
  if task.is_segmentation:
    return losses.dice_ce_per_case(outputs, targets, task.num_classes,
                                   include_background=False, class_weights=class_weights)
  error = jnp.square(outputs.astype(jnp.float32) - targets.astype(jnp.float32))
  return jnp.mean(error, axis=tuple(range(1, error.ndim)))


def task_loss(task: Task, outputs: jax.Array, targets: jax.Array,
              weights: jax.Array | None = None,
              class_weights: jax.Array | None = None) -> jax.Array:
  """The batch loss: `case_losses` averaged with per-case `weights` `(b,)` (default equal)."""
  per_case = case_losses(task, outputs, targets, class_weights)
  if weights is None:
    return jnp.mean(per_case)
  return jnp.sum(weights * per_case) / jnp.sum(weights)


def _network_inputs(task: Task, batch: tuple[jax.Array, jax.Array], key: jax.Array,
                    augment: Augment | None) -> tuple[jax.Array, jax.Array]:
  """Augments a batch of cases, then degrades the inputs for reconstruction tasks."""
  inputs, targets = batch
  augment_key, degrade_key = jax.random.split(key)
  if augment is not None:
    inputs, targets = jax.vmap(augment)(jax.random.split(augment_key, inputs.shape[0]),
                                        inputs, targets)
  if not task.is_segmentation:
    inputs = jax.vmap(task.degrade)(jax.random.split(degrade_key, inputs.shape[0]), inputs)
  return inputs, targets


def train_step(graphdef: nnx.GraphDef, state: TrainState, batch: tuple, key: jax.Array, *,
               task: Task, optimizer: optax.GradientTransformation,
               augment: Augment | None = None) -> tuple[TrainState, jax.Array]:
  """One optimiser step on one batch `(inputs, targets, case weights[, class weights])` (the
  class weights: the training set's, see `cross_entropy_weights`); returns the new state and
  the loss."""
  inputs, targets = _network_inputs(task, batch[:2], key, augment)

  def loss_fn(params):
    return task_loss(task, nnx.merge(graphdef, params)(inputs), targets, *batch[2:])

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  params, opt_state = apply_update(state.params, state.opt_state, grads, optimizer)
  return state.replace(params=params, opt_state=opt_state).next_step(), loss


def make_train_step(task: Task, optimizer: optax.GradientTransformation,
                    augment: Augment | None = None) -> Callable:
  """`train_step` bound to a task and optimiser, jitted, the state (argument 1) donated."""
  return jax.jit(functools.partial(train_step, task=task, optimizer=optimizer, augment=augment),
                 static_argnums=0, donate_argnums=1)


@functools.lru_cache(maxsize=32)
def _adam_train_step(task: Task, learning_rate: float, augment: Augment | None
                     ) -> tuple[optax.GradientTransformation, Callable]:
  """Adam and its jitted step, shared by every training with the same task, rate and augment.

  A protocol trains one network many times (arms x seeds); one jitted function per setting
  lets those trainings reuse one compiled step (the graphdef, a static argument, compares
  equal across identical networks) instead of compiling it again for each.
  """
  optimizer = optax.adam(learning_rate)
  return optimizer, make_train_step(task, optimizer, augment)


@functools.partial(jax.jit, static_argnames=("batch_size", "num_real", "real_per_batch"))
def draw_batch(key: jax.Array, inputs: jax.Array, targets: jax.Array, batch_size: int,
               num_real: int = 0, real_per_batch: int = -1, synthetic_weight: float = 1.0
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(inputs, targets, loss weights)` of `batch_size` cases drawn by index, without
  replacement unless a group is smaller than its draw: uniformly from all n (`real_per_batch`
  negative), or, with `num_real` (the first cases are the real ones, the rest synthetic),
  `real_per_batch` (0 to batch_size) from the real cases and the rest from the synthetic ones.
  A synthetic case's loss weighs `synthetic_weight`, a real one's 1."""
  n = inputs.shape[0]
  if not 0 < num_real < n or real_per_batch < 0:
    index = jax.random.choice(key, n, (batch_size,), replace=batch_size > n)
  else:
    real_key, synthetic_key = jax.random.split(key)
    synthetic_per_batch = batch_size - real_per_batch
    index = jnp.concatenate([
        jax.random.choice(real_key, num_real, (real_per_batch,),
                          replace=real_per_batch > num_real),
        num_real + jax.random.choice(synthetic_key, n - num_real, (synthetic_per_batch,),
                                     replace=synthetic_per_batch > n - num_real)])
  weights = jnp.where(index < num_real, 1.0, synthetic_weight) if 0 < num_real < n else (
      jnp.ones(batch_size))
  return inputs[index], targets[index], weights


def _check_data(task: Task, inputs: Any, targets: Any, name: str) -> tuple[jax.Array, jax.Array]:
  """Validates `(inputs, targets)` of a task and returns them as device arrays."""
  inputs = jnp.asarray(inputs)
  if inputs.ndim not in (4, 5) or inputs.shape[0] < 1:
    raise ValueError(f"{name}: inputs must be (n >= 1, *spatial[2 or 3], channels), got "
                     f"{inputs.shape}")
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    raise ValueError(f"{name}: inputs must be floating-point images, got dtype {inputs.dtype}")
  if task.is_segmentation:
    if targets is None:
      raise ValueError(f"{name}: segmentation needs targets (integer label maps)")
    targets = jnp.asarray(targets)
    if targets.shape != inputs.shape[:-1]:
      raise ValueError(f"{name}: label maps must have shape {inputs.shape[:-1]} (the inputs "
                       f"without their channel axis), got {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise ValueError(f"{name}: labels must be integers, got dtype {targets.dtype}")
    low, high = int(jnp.min(targets)), int(jnp.max(targets))
    if low < 0 or high >= task.num_classes:
      raise ValueError(f"{name}: labels must lie in [0, {task.num_classes}), found "
                       f"[{low}, {high}]")
  else:
    targets = inputs if targets is None else jnp.asarray(targets)
    if targets.shape != inputs.shape:
      raise ValueError(f"{name}: clean targets must have the inputs' shape {inputs.shape}, "
                       f"got {targets.shape}")
  return inputs, targets


def train_downstream(net_factory: Callable[[nnx.Rngs], nnx.Module], task: Task,
                     train_inputs: Any, train_targets: Any = None, *, steps: int,
                     batch_size: int, learning_rate: float, seed: int,
                     augment: Augment | None = None, num_real: int = 0,
                     real_share: float = -1.0, synthetic_weight: float = 1.0,
                     pretrain_steps: int = 0) -> Trained:
  """Trains a fresh network on a task for exactly `steps` Adam steps.

  Args:
    net_factory: `rngs -> nnx.Module`, the network mapping `(b, *spatial, channels)` to logits
      `(b, *spatial, num_classes)` (segmentation) or to images of the input's shape.
    task: the downstream task.
    train_inputs: `(n, *spatial, channels)` float images (for reconstruction: clean images).
    train_targets: segmentation: integer labels `(n, *spatial)`; reconstruction: the clean
      targets `(n, *spatial, channels)`, default `train_inputs`.
    steps: the number of optimiser steps (the same for every arm of an experiment).
    batch_size: cases per step.
    learning_rate: Adam's step size.
    seed: seeds the initialisation and every step's batch, augmentation and degradation.
    augment: optional per-case augmentation, see `Augment`. Pass the same function object
      to every training that should share one compiled step.
    num_real: the first `num_real` cases are real, the rest synthetic (0: all alike).
    real_share: with `num_real`, the fraction of every batch drawn from the real cases
      (rounded, at least one case of each kind); negative: batches drawn uniformly from all.
    synthetic_weight: with `num_real`, the weight of a synthetic case's loss in its batch
      (a real case's is 1; the batch loss is the weighted mean).
    pretrain_steps: with `num_real`, the first `pretrain_steps` of the `steps` draw synthetic
      cases only and the rest real cases only (pretrain, then fine-tune, one Adam state
      throughout); 0: every step mixes them as `real_share` says.

  Returns:
    The trained model (`Trained`).
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f"train_downstream: steps and batch_size must be >= 1, got steps={steps}, "
                     f"batch_size={batch_size}")
  if not 0 <= pretrain_steps < steps or synthetic_weight <= 0:
    raise ValueError(f"train_downstream: need 0 <= pretrain_steps < steps={steps} and "
                     f"synthetic_weight > 0, got pretrain_steps={pretrain_steps}, "
                     f"synthetic_weight={synthetic_weight}")
  inputs, targets = _check_data(task, train_inputs, train_targets, "train_downstream")
  # Parameters are drawn with the "rbg" generator: XLA compiles threefry anew for every
  # parameter shape, ~30 s for a small U-Net on a CPU against ~4 s with rbg.
  init_key, train_key = jax.random.key(seed, impl="rbg"), jax.random.key(seed)
  graphdef, params, rest = nnx.split(net_factory(nnx.Rngs(init_key)), nnx.Param, ...)
  if jax.tree.leaves(rest):
    kinds = sorted({type(v).__name__ for v in
                    jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))})
    raise ValueError(f"train_downstream: the network must hold parameters only (nnx.Param), "
                     f"it also holds {kinds}: the pure train step does not carry batch "
                     "statistics or RNG state")
  optimizer, step_fn = _adam_train_step(task, float(learning_rate), augment)
  state = TrainState.create(params, optimizer.init(params))
  real_counts = _real_per_batch(steps, batch_size, 0 < num_real < inputs.shape[0],
                                real_share, pretrain_steps)
  weights = cross_entropy_weights(task, targets)
  step_losses = []
  for step, real_per_batch in enumerate(real_counts):
    batch_key, step_key = jax.random.split(jax.random.fold_in(train_key, step))
    batch = draw_batch(batch_key, inputs, targets, batch_size, num_real, real_per_batch,
                       synthetic_weight)
    state, loss = step_fn(graphdef, state, batch + (weights,), step_key)
    step_losses.append(loss)
  return Trained(graphdef, state.params, np.asarray(jnp.stack(step_losses)))


def _real_per_batch(steps: int, batch_size: int, mixed: bool, real_share: float,
                    pretrain_steps: int) -> list[int]:
  """How many real cases each step's batch draws (-1: uniformly from all cases)."""
  if not mixed:
    return [-1] * steps
  if pretrain_steps:
    return [0] * pretrain_steps + [batch_size] * (steps - pretrain_steps)
  if real_share < 0 or batch_size < 2:
    return [-1] * steps
  return [min(max(round(batch_size * real_share), 1), batch_size - 1)] * steps


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, segmentation: bool
             ) -> jax.Array:
  out = nnx.merge(graphdef, params)(x)
  return jnp.argmax(out, axis=-1).astype(jnp.int32) if segmentation else out


def predict(model: Trained, task: Task, inputs: Any, *, batch_size: int = 4) -> jax.Array:
  """The trained network on `inputs` `(n, *spatial, channels)`, `batch_size` cases at a time.

  Returns:
    Segmentation: integer labels `(n, *spatial)` (argmax over classes). Reconstruction: the
    restored images `(n, *spatial, channels)`; `inputs` are the degraded images.
  """
  inputs = jnp.asarray(inputs)
  if batch_size < 1:
    raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
  return jnp.concatenate([
      _forward(model.graphdef, model.params, inputs[i:i + batch_size], task.is_segmentation)
      for i in range(0, inputs.shape[0], batch_size)])


def _per_channel_mean(metric: Callable, x: jax.Array, y: jax.Array, data_range: float,
                      spatial_dims: int) -> np.ndarray:
  """A per-case image metric averaged over channels: `(n, *spatial, c)` -> `(n,)`."""
  value = metric(jnp.moveaxis(x, -1, 1), jnp.moveaxis(y, -1, 1), data_range,
                 spatial_dims=spatial_dims)
  return np.asarray(jnp.mean(value, axis=1))


@functools.lru_cache(maxsize=32)
def _batched_degradation(task: Task) -> Callable:
  """`task.degrade` over a batch, jitted once per task: every evaluation of it reuses one."""
  return jax.jit(jax.vmap(task.degrade))


def evaluate_downstream(model: Trained, task: Task, test_inputs: Any, test_targets: Any = None,
                        *, spacing: Sequence[float] | None = None,
                        nsd_tolerance_mm: float = 1.0, data_range: float = 1.0,
                        batch_size: int = 4, seed: int = 0) -> list[dict[str, float]]:
  """Per-case metrics of a trained model on held-out cases.

  Args:
    model: from `train_downstream`.
    task: the task it was trained for.
    test_inputs: `(n, *spatial, channels)` images (for reconstruction: clean images).
    test_targets: segmentation: integer labels `(n, *spatial)`; reconstruction: clean targets,
      default `test_inputs`.
    spacing: segmentation: voxel size in mm per spatial axis (default 1 mm: distances in voxels).
    nsd_tolerance_mm: segmentation: the normalised-surface-Dice tolerance in mm.
    data_range: reconstruction: the intensity range for PSNR/SSIM (1 for images in [0, 1]).
    batch_size: cases per forward pass.
    seed: reconstruction: seeds the (fixed) degradation of the test inputs.

  Returns:
    One dict per case. Segmentation: `dice/<label>`, `msd/<label>` (mm), `nsd/<label>`,
    `hd95/<label>` (mm) for every foreground label and each metric's `/mean` over labels (empty
    masks: the convention of `acis_jax.eval.metrics`). Reconstruction: `psnr` (dB) and `ssim`
    of the output, and `psnr_input`, `ssim_input` of the degraded input (the identity baseline);
    channels are averaged.
  """
  inputs, targets = _check_data(task, test_inputs, test_targets, "evaluate_downstream")
  spatial_dims = inputs.ndim - 2
  if task.is_segmentation:
    spacing = (1.0,) * spatial_dims if spacing is None else tuple(spacing)
    labels = tuple(range(1, task.num_classes))
    pred = predict(model, task, inputs, batch_size=batch_size)
    dice = {k: np.asarray(v) for k, v in
            metrics.dice(pred, targets, labels, spatial_dims=spatial_dims).items()}
    pred, targets = np.asarray(pred), np.asarray(targets)
    cases = []
    for i in range(inputs.shape[0]):
      case = {f"dice/{k}": float(v[i]) for k, v in dice.items()}
      for label in labels:
        surface = metrics.surface_metrics(pred[i] == label, targets[i] == label, spacing,
                                          nsd_tolerance_mm)
        case.update({f"{name}/{label}": value for name, value in surface.items()})
      for name in ("msd", "nsd", "hd95"):
        case[f"{name}/mean"] = float(np.mean([case[f"{name}/{label}"] for label in labels]))
      cases.append(case)
    return cases

  keys = jax.random.split(jax.random.key(seed), inputs.shape[0])
  degrade_batch = _batched_degradation(task)
  degraded = jnp.concatenate([degrade_batch(keys[i:i + batch_size], inputs[i:i + batch_size])
                              for i in range(0, inputs.shape[0], batch_size)])
  restored = predict(model, task, degraded, batch_size=batch_size)
  scores = {
      "psnr": _per_channel_mean(metrics.psnr, restored, targets, data_range, spatial_dims),
      "ssim": _per_channel_mean(metrics.ssim, restored, targets, data_range, spatial_dims),
      "psnr_input": _per_channel_mean(metrics.psnr, degraded, targets, data_range, spatial_dims),
      "ssim_input": _per_channel_mean(metrics.ssim, degraded, targets, data_range, spatial_dims),
  }
  return [{name: float(v[i]) for name, v in scores.items()} for i in range(inputs.shape[0])]
