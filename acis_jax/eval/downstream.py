"""Downstream training and evaluation (paper sec 3.1): what the synthetic data is judged by.

One arm of an experiment = one network trained on one training set (real only, real + ACIS-,
real + ACIS, ...) for a fixed number of steps, then scored on held-out real cases. Every arm gets
the same `steps`, whatever the size of its training set, so arms differ only in their data.

Tasks (`Task`):
  * "segmentation": inputs images `(n, *spatial, channels)`, targets integer labels
    `(n, *spatial)` in `[0, num_classes)`; soft Dice loss (`dice_loss`); prediction = argmax.
  * "denoise", "deblur", "superres": targets clean images `(n, *spatial, channels)` (by default
    the inputs themselves); the network input is the degraded clean image, made on the fly
    inside the train step with a fresh key per step (`acis_jax.eval.degrade`), so noise is
    new every step; L2 (mean squared error) loss. At evaluation the degraded test inputs are made
    once with a fixed key, so every arm sees the very same test inputs.

Training: Adam (optax) on the parameters; the step is a pure function
`(graphdef, state, batch, key) -> (state, loss)` under `jax.jit` with the state donated. Step k
uses the key `fold_in(key, k)`: it draws the batch by index from the in-memory training arrays
(without replacement when `batch_size <= n`; with real and synthetic cases, a fixed share of
each batch from the real ones), then the augmentation and degradation keys.
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


def dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int, *,
              include_background: bool = False, smooth: float = 1e-5) -> jax.Array:
  """Soft Dice loss, `1 - mean_{case, class} (2 sum p t + s) / (sum p + sum t + s)`.

  Args:
    logits: `(b, *spatial, num_classes)`; probabilities are their softmax.
    labels: integer `(b, *spatial)` in `[0, num_classes)`.
    num_classes: classes including background (label 0).
    include_background: average over class 0 too (default: foreground classes only, as
      nnU-Net does).
    smooth: added to numerator and denominator; a class absent from a case scores ~1 only when
      it is (almost) not predicted there.

  Returns:
    A scalar in [0, 1].
  """
  if logits.shape[:-1] != labels.shape or logits.shape[-1] != num_classes:
    raise ValueError(f"dice_loss: logits {logits.shape} must be labels {labels.shape} plus a "
                     f"last axis of num_classes={num_classes}")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  axes = tuple(range(1, labels.ndim))
  overlap = jnp.sum(probs * onehot, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  score = (2.0 * overlap + smooth) / (total + smooth)  # (b, num_classes)
  if not include_background:
    score = score[:, 1:]
  return 1.0 - jnp.mean(score)


def task_loss(task: Task, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Soft Dice for segmentation (`outputs` = logits), mean squared error otherwise."""
  if task.is_segmentation:
    return dice_loss(outputs, targets, task.num_classes)
  return jnp.mean(jnp.square(outputs.astype(jnp.float32) - targets.astype(jnp.float32)))


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


def train_step(graphdef: nnx.GraphDef, state: TrainState, batch: tuple[jax.Array, jax.Array],
               key: jax.Array, *, task: Task, optimizer: optax.GradientTransformation,
               augment: Augment | None = None) -> tuple[TrainState, jax.Array]:
  """One optimiser step on one batch `(inputs, targets)`; returns the new state and the loss."""
  inputs, targets = _network_inputs(task, batch, key, augment)

  def loss_fn(params):
    return task_loss(task, nnx.merge(graphdef, params)(inputs), targets)

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
               num_real: int = 0, real_per_batch: int = 0) -> tuple[jax.Array, jax.Array]:
  """`batch_size` cases drawn by index, without replacement unless a group is smaller than its
  draw: uniformly from all n, or, with `num_real` (the first cases are the real ones, the rest
  synthetic), `real_per_batch` from the real cases and the rest from the synthetic ones."""
  n = inputs.shape[0]
  if not 0 < num_real < n:
    index = jax.random.choice(key, n, (batch_size,), replace=batch_size > n)
  else:
    real_key, synthetic_key = jax.random.split(key)
    synthetic_per_batch = batch_size - real_per_batch
    index = jnp.concatenate([
        jax.random.choice(real_key, num_real, (real_per_batch,),
                          replace=real_per_batch > num_real),
        num_real + jax.random.choice(synthetic_key, n - num_real, (synthetic_per_batch,),
                                     replace=synthetic_per_batch > n - num_real)])
  return inputs[index], targets[index]


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
                     real_share: float = -1.0) -> Trained:
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

  Returns:
    The trained model (`Trained`).
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f"train_downstream: steps and batch_size must be >= 1, got steps={steps}, "
                     f"batch_size={batch_size}")
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
  mixed = 0 < num_real < inputs.shape[0] and real_share >= 0 and batch_size > 1
  real_per_batch = min(max(round(batch_size * real_share), 1), batch_size - 1) if mixed else 0
  losses = []
  for step in range(steps):
    batch_key, step_key = jax.random.split(jax.random.fold_in(train_key, step))
    batch = draw_batch(batch_key, inputs, targets, batch_size, num_real if mixed else 0,
                       real_per_batch)
    state, loss = step_fn(graphdef, state, batch, step_key)
    losses.append(loss)
  return Trained(graphdef, state.params, np.asarray(jnp.stack(losses)))


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
