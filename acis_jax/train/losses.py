"""Losses of ACIS, as pure functions of arrays (and keys). Channel-last, any spatial rank.

Adversarial: WGAN-GP (mask GAN), PatchGAN LSGAN or BCE-with-logits (image GAN).
Supervised: MSE reconstruction, soft Dice + cross-entropy for labels.
Registration: local normalised cross-correlation (negated: lower is better) and a
smoothness penalty on displacement or velocity fields.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
  """Axes between batch and channel of a `(b, *spatial, C)` array."""
  return tuple(range(1, x.ndim - 1))


# ---------------------------------------------------------------- WGAN-GP

def gradient_penalty(critic_fn: Callable[[jax.Array], jax.Array], real: jax.Array,
                     fake: jax.Array, key: jax.Array, weight: float = 10.0) -> jax.Array:
  """WGAN-GP penalty `weight * mean_b (||grad critic(x_b)|| - 1)^2` (Gulrajani et al. 2017).

  `x_b = eps_b real_b + (1 - eps_b) fake_b` with `eps_b ~ U(0, 1)` per sample. `critic_fn`
  maps `(b, ...)` to scores `(b,)` and must treat samples independently (no batch norm), so the
  gradient of the summed scores gives every sample's own gradient.
  """
  if real.shape != fake.shape:
    raise ValueError(f"real {real.shape} and fake {fake.shape} shapes differ")
  eps = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1), dtype=real.dtype)
  mixed = eps * real + (1.0 - eps) * fake
  grads = jax.grad(lambda x: jnp.sum(critic_fn(x)))(mixed)
  norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))) + 1e-12)
  return weight * jnp.mean(jnp.square(norms - 1.0))


def wgan_critic_loss(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """Critic loss without penalty: `mean critic(fake) - mean critic(real)` (lower is better)."""
  return jnp.mean(fake_scores) - jnp.mean(real_scores)


def wgan_gp_critic_loss(critic_fn: Callable[[jax.Array], jax.Array], real: jax.Array,
                        fake: jax.Array, key: jax.Array, weight: float = 10.0) -> jax.Array:
  """The full WGAN-GP critic loss: `wgan_critic_loss + gradient_penalty`."""
  return (wgan_critic_loss(critic_fn(real), critic_fn(fake))
          + gradient_penalty(critic_fn, real, fake, key, weight))


def wgan_generator_loss(fake_scores: jax.Array) -> jax.Array:
  """Generator loss against a WGAN critic: `-mean critic(fake)`."""
  return -jnp.mean(fake_scores)


# ---------------------------------------------------------------- PatchGAN

def lsgan_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """Least-squares GAN: `0.5 (mean (D(real) - 1)^2 + mean D(fake)^2)` (pix2pix halves D's loss)."""
  return 0.5 * (jnp.mean(jnp.square(real_logits - 1.0)) + jnp.mean(jnp.square(fake_logits)))


def lsgan_generator_loss(fake_logits: jax.Array) -> jax.Array:
  """Least-squares GAN generator loss: `mean (D(fake) - 1)^2`."""
  return jnp.mean(jnp.square(fake_logits - 1.0))


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over all elements (the pix2pix reconstruction term of ACIS)."""
  if prediction.shape != target.shape:
    raise ValueError(f"prediction {prediction.shape} and target {target.shape} shapes differ")
  return jnp.mean(jnp.square(prediction - target))


def _check_logits_labels(logits: jax.Array, labels: jax.Array, num_classes: int) -> None:
  if logits.shape[-1] != num_classes or logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits must be (b, *spatial, {num_classes}) for labels (b, *spatial); "
                     f"got logits {logits.shape}, labels {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")


def cross_entropy_map(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Softmax cross-entropy `(b, *spatial)` of logits `(b, *spatial, K)` against int labels."""
  _check_logits_labels(logits, labels, num_classes)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Mean softmax cross-entropy of logits `(b, *spatial, K)` against int labels `(b, *spatial)`."""
  return jnp.mean(cross_entropy_map(logits, labels, num_classes))


def soft_dice(logits: jax.Array, labels: jax.Array, num_classes: int, *,
              include_background: bool = True, smooth: float = 1e-5) -> jax.Array:
  """Soft Dice `(b, k)` of each sample and class: `(2 sum p y + s) / (sum p + sum y + s)`,
  softmax `p`, one-hot `y`.

  Sums run over the spatial axes of each sample; `s = smooth`. A class absent from both the
  label and the prediction scores 1 (perfect), so empty classes do not punish. With
  `include_background=False` class 0 is left out (k = num_classes - 1).
  """
  _check_logits_labels(logits, labels, num_classes)
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  y = jax.nn.one_hot(labels, num_classes, dtype=p.dtype)
  axes = _spatial_axes(p)
  dice = ((2.0 * jnp.sum(p * y, axis=axes) + smooth)
          / (jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes) + smooth))
  if not include_background:
    if num_classes < 2:
      raise ValueError("include_background=False needs at least two classes")
    dice = dice[:, 1:]
  return dice


def soft_dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int, *,
                   include_background: bool = True, smooth: float = 1e-5) -> jax.Array:
  """`1 - mean_{b,k} soft_dice`."""
  return 1.0 - jnp.mean(soft_dice(logits, labels, num_classes,
                                  include_background=include_background, smooth=smooth))


def dice_ce_per_case(logits: jax.Array, labels: jax.Array, num_classes: int, *,
                     include_background: bool = True,
                     class_weights: jax.Array | None = None) -> jax.Array:
  """Soft Dice loss plus mean cross-entropy of each sample `(b,)` (the nnU-Net pairing):
  `1 - mean_k soft_dice + mean over voxels of the cross-entropy`, each voxel's cross-entropy
  times `class_weights[its label]` when given `(num_classes,)`."""
  dice = jnp.mean(soft_dice(logits, labels, num_classes,
                            include_background=include_background), axis=1)
  cross = cross_entropy_map(logits, labels, num_classes)
  if class_weights is not None:
    cross = cross * class_weights[labels]
  return 1.0 - dice + jnp.mean(cross, axis=tuple(range(1, cross.ndim)))


def dice_ce_loss(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """`soft_dice_loss + cross_entropy`: `dice_ce_per_case` averaged over the batch."""
  return jnp.mean(dice_ce_per_case(logits, labels, num_classes))


# ---------------------------------------------------------------- registration

def _box_sum(x: jax.Array, window: int) -> jax.Array:
  """Sum over a centred `window`-wide box on each spatial axis, zeros outside (separable)."""
  for axis in _spatial_axes(x):
    dims = [1] * x.ndim
    dims[axis] = window
    pad = [(0, 0)] * x.ndim
    pad[axis] = (window // 2, window // 2)
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, pad)
  return x


def local_ncc(a: jax.Array, b: jax.Array, window: int = 9, eps: float = 1e-5) -> jax.Array:
  """Signed local normalised cross-correlation map of two `(b, *spatial, C)` images.

  Per voxel and channel: `cov / sqrt(var_a var_b + eps)` over the `window`-wide box around it
  (boxes zero-padded at the border, as VoxelMorph), so values lie in [-1, 1]: 1 where `b` is an
  increasing affine function of `a` in the box, -1 for a decreasing one.
  """
  if a.shape != b.shape:
    raise ValueError(f"NCC inputs must share a shape, got {a.shape} and {b.shape}")
  if window < 1 or window % 2 == 0:
    raise ValueError(f"NCC window must be a positive odd number, got {window}")
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  n = float(window ** (a.ndim - 2))
  sum_a, sum_b = _box_sum(a, window), _box_sum(b, window)
  cov = _box_sum(a * b, window) - sum_a * sum_b / n
  var_a = _box_sum(a * a, window) - sum_a * sum_a / n
  var_b = _box_sum(b * b, window) - sum_b * sum_b / n
  # Rounding can leave tiny negative variances in flat regions.
  return cov / jnp.sqrt(jnp.maximum(var_a, 0.0) * jnp.maximum(var_b, 0.0) + eps)


def ncc_loss(fixed: jax.Array, moved: jax.Array, window: int = 9, eps: float = 1e-5) -> jax.Array:
  """Negative mean local NCC (window 9 by default): -1 for a perfect (affine) match."""
  return -jnp.mean(local_ncc(fixed, moved, window, eps))


def smoothness_loss(field: jax.Array) -> jax.Array:
  """Mean over spatial axes `d` of the mean squared forward difference of `field` along `d`.

  `field` is `(b, *spatial, ndim)` (displacement or velocity, voxel units). For a linear field
  `u(x) = A x` this is `||A||_F^2 / ndim**2`.
  """
  axes = _spatial_axes(field)
  if not axes:
    raise ValueError(f"field must be (b, *spatial, ndim), got {field.shape}")
  return jnp.mean(jnp.stack([jnp.mean(jnp.square(jnp.diff(field, axis=a))) for a in axes]))
