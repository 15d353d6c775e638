"""Stage 4, the refinement of sec 2.3: the annotation and image generators refined with the
registration uncertainty of eq. 3 as a reward, while the images stage's objective holds their
realism.

Each step draws b generated pseudo-masks and a batch of b real cases (x, y):
- The annotation generator labels each pseudo-mask with its argmax, y_hat, and the image
  generator paints the image from (pseudo-mask, y_hat): the condition it sees at synthesis.
- Each generated pair is scored against the real case of the batch whose labels overlap y_hat
  most (the nearest image when label-free), not against an unrelated one: against a random
  real case the reward pulls every sample toward a warped mean anatomy.
- Reward of an image x_hat: `-(w_u u / s_u + w_l (1 - c) / s_l)`. u is eq. 3's appearance
  uncertainty over T = `refine.passes` stochastic passes of the frozen registration net in both
  directions, c the label consistency (Dice of y o phi_t against y_hat). s_u and s_l are their
  running standard deviations over the batches, so the weights `refine.uncertainty_weight` and
  `refine.label_weight` compare terms on one scale (u is 1e-3 to 1e-2, 1 - c is 0.1 to 0.5).

Two estimators of the reward's gradient (`refine.mode`):
- "policy_gradient" (the paper's): the image is the mean of a Gaussian policy of std
  `refine.sigma`. K = `refine.actions` actions per sample share one mean; their noise is drawn
  on a grid `refine.noise_factor` times coarser than the image and upsampled linearly, so that
  an action moves regions, not single voxels (per-voxel noise gives a score whose noise grows
  with sqrt(voxels)). The advantage of action k is its reward minus the mean of the sample's
  other actions (leave-one-out), divided by the std of the sample's rewards. The label term
  reaches the annotation generator directly: Dice is differentiable in the label
  probabilities (straight-through one-hot), with the actions' fields held fixed. `actions=1,
  noise_factor=1` is the paper's estimator: per-voxel noise, a moving-average baseline.
- "backprop": the same reward differentiated through the frozen registration net (its T
  passes rematerialised), labels straight-through one-hot.

Realism (`refine.realism_weight`; 0 turns it off): the images stage's generator objective goes
on beside the reward (reconstruction of the real images from their pseudo-masks and labels,
the adversarial term on the generated pairs), with the image discriminator trained alongside
so that a lower uncertainty cannot be bought with images it would reject; the annotation
generator keeps its supervised loss on the real pseudo-masks. Eq. 3 can also be lowered by
lowering contrast and smoothing texture, which the discriminator lets through; so the
appearance gap of each generated image to its real case (`appearance_gap`: intensity
distribution and high-frequency energy, no labels involved) is a term of its own, divided by
its running standard deviation like the reward's terms, weighed by `refine.appearance_weight`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from acis_jax.eval import metrics
from acis_jax.spatial import appearance_uncertainty, label_consistency
from acis_jax.train import losses
from acis_jax.train.generation import straight_through_one_hot
from acis_jax.train.steps import (StepContext, apply_gradients, image_discriminator_loss,
                                  image_generator_objective, patches, prepare_real)

MODES = ("policy_gradient", "backprop")
# Running statistics the refinement carries in the train state (`Stage.extras`).
EXTRAS = ("baseline", "uncertainty_var", "label_var", "appearance_var")


def nearest_real(real_image, real_labels, fake_image, fake_labels, num_classes: int
                 ) -> jax.Array:
  """Index `(b_fake,)` of the real case nearest each generated one: the lowest label distance
  (1 - Dice), or image distance when label-free (`acis_jax.eval.metrics`)."""
  if num_classes:
    return jnp.argmin(metrics.label_distances(fake_labels, real_labels, num_classes), axis=1)
  return jnp.argmin(metrics.image_distances(fake_image, real_image), axis=1)


def coarse_noise(key: jax.Array, shape: tuple[int, ...], factor: int) -> jax.Array:
  """Standard normal noise of `shape` `(n, *spatial, C)` drawn on a grid `factor` times
  coarser (at least 2 nodes an axis) and upsampled linearly; `factor=1`: white noise."""
  if factor == 1:
    return jax.random.normal(key, shape)
  coarse = (shape[0], *(max(2, -(-s // factor)) for s in shape[1:-1]), shape[-1])
  return jax.image.resize(jax.random.normal(key, coarse), shape, "linear")


def leave_one_out_advantages(rewards: jax.Array) -> jax.Array:
  """`(K, b)` rewards of K actions per sample -> advantages: each reward minus the mean of the
  other K - 1, divided by the std of the sample's K rewards."""
  k = rewards.shape[0]
  others = (jnp.sum(rewards, 0, keepdims=True) - rewards) / (k - 1)
  return (rewards - others) / (jnp.std(rewards, 0, keepdims=True) + 1e-8)


def registration_terms(ctx: StepContext, frozen: dict, image, labels, fake_image, fake_labels,
                       key):
  """`(u, c)` of each generated pair `(n,)`: eq. 3 uncertainty over T stochastic passes of the
  frozen registration net in both directions (x onto x_hat, phi_t; x_hat onto x, varphi_t), and
  the label consistency of y o phi_t with `fake_labels` (hard, or one-hot-like and
  differentiable; ones when label-free).

  The passes run one after the other (each rematerialised in backprop mode) and their terms
  are averaged, which equals eq. 3 over the stack of T fields with 1/T of its memory: at
  192x192x160 the T passes side by side were most of the step's memory.
  """
  registration = ctx.net("registration", frozen["registration"])

  def one_pass(pass_key):
    forward_key, backward_key = jax.random.split(pass_key)
    forward = registration(image, fake_image, key=forward_key)[None]
    backward = registration(fake_image, image, key=backward_key)[None]
    _, uncertainty = appearance_uncertainty(image, fake_image, forward, backward)
    if not ctx.num_classes:
      return uncertainty, jnp.ones_like(uncertainty)
    return uncertainty, label_consistency(labels, fake_labels, forward, ctx.num_classes)

  if ctx.refine.mode == "backprop":
    one_pass = jax.checkpoint(one_pass)
  uncertainty, consistency = jax.lax.map(one_pass, jax.random.split(key, ctx.refine.passes))
  return jnp.mean(uncertainty, 0), jnp.mean(consistency, 0)


def appearance_gap(fake_image: jax.Array, real_image: jax.Array) -> jax.Array:
  """`(b,)`: how far each generated image's appearance is from its real case's, in two
  statistics no label map enters (so the generator cannot meet them by moving what its labels
  hold): the squared 2-Wasserstein distance between their intensity distributions (sorted
  intensities), over the real image's variance, plus the squared log ratio of their
  high-frequency energies (`metrics.high_frequency_energy`)."""
  b = fake_image.shape[0]
  fake, real = fake_image.reshape(b, -1), real_image.reshape(b, -1)
  wasserstein = jnp.mean((jnp.sort(fake, 1) - jnp.sort(real, 1)) ** 2, 1)
  energy = lambda x: metrics.high_frequency_energy(x[..., 0], spatial_dims=x.ndim - 2)
  texture = jnp.log((energy(fake_image) + 1e-12) / (energy(real_image) + 1e-12))
  return wasserstein / (jnp.var(real, 1) + 1e-12) + texture ** 2


def running_average(state, name: str, value: jax.Array, decay: float) -> jax.Array:
  """The exponential moving average `state.extras[name]` updated with `value`, started at the
  first step's value."""
  return jnp.where(state.step == 0, value, decay * state.extras[name] + (1 - decay) * value)


def running_variance(state, name: str, values: jax.Array, decay: float) -> jax.Array:
  """The running average of the batch variance of `values`."""
  return running_average(state, name, jnp.var(jax.lax.stop_gradient(values)), decay)


def make_refine_step(ctx: StepContext) -> Callable:
  """The refinement step of the module docstring: `step(state, frozen, batch, key)`."""
  refine, chain = ctx.refine, ctx.chain
  if refine.mode not in MODES:
    raise ValueError(f"refine.mode must be one of {MODES}, got {refine.mode!r}")
  generators = tuple(n for n in ctx.trained if n != "image_discriminator")
  labelled = bool(ctx.num_classes)

  def generate(params, masks, key):
    """`(labels, image)`: straight-through one-hot labels of the pseudo-masks (None when
    label-free), hard as at synthesis, and the image painted from them; in policy_gradient
    mode the image generator sees them without gradient (its gradient is the image policy's)."""
    if not labelled:
      return None, chain.image(params, masks, key)
    labels = straight_through_one_hot(chain.label_logits(params, masks))
    seen = labels if refine.mode == "backprop" else jax.lax.stop_gradient(labels)
    return labels, chain.image(params, jnp.concatenate([masks, seen], -1), key)

  def realism(params, disc_params, image, labels, real_masks, real_condition, fake_condition,
              fake_image, key):
    """The images stage's generator objective and the annotation generator's supervised loss
    on the real batch; returns `(loss, (reconstruction, mse, adversarial))`."""
    reconstruction = chain.image(params, real_condition, key)
    loss, mse, adversarial = image_generator_objective(
        ctx, ctx.net("image_discriminator", disc_params), reconstruction, image, fake_image,
        fake_condition)
    if labelled:
      loss += losses.dice_ce_loss(chain.label_logits(params, real_masks), labels,
                                  ctx.num_classes)
    return loss, (reconstruction, mse, adversarial)

  def scaled_reward(state, uncertainty, consistency):
    """`(reward, uncertainty variance, label variance)`: the reward of each pair with both
    terms divided by their running standard deviations."""
    u_var = running_variance(state, "uncertainty_var", uncertainty, refine.baseline_decay)
    l_var = running_variance(state, "label_var", consistency, refine.baseline_decay)
    reward = -(refine.uncertainty_weight * uncertainty / jnp.sqrt(u_var + 1e-20)
               + refine.label_weight * (1 - consistency) / jnp.sqrt(l_var + 1e-20))
    return reward, u_var, l_var

  def policy_gradient_loss(state, frozen, mean, fake_labels, real, real_labels, noise_key,
                           reward_key):
    """The surrogate whose gradient is the estimator of the module docstring."""
    k = refine.actions
    repeat = lambda x: None if x is None else jnp.tile(x, (k,) + (1,) * (x.ndim - 1))
    means = repeat(mean)
    actions = jax.lax.stop_gradient(
        means + refine.sigma * coarse_noise(noise_key, means.shape, refine.noise_factor))
    # The actions' fields carry no gradient; the labels' Dice keeps its own.
    uncertainty, consistency = registration_terms(ctx, frozen, repeat(real), repeat(real_labels),
                                                  actions, repeat(fake_labels), reward_key)
    reward, u_var, l_var = scaled_reward(state, uncertainty, consistency)
    rewards = jax.lax.stop_gradient(reward).reshape(k, -1)
    if k > 1:
      advantage = leave_one_out_advantages(rewards)
    else:  # the paper's: a moving-average baseline, started at the first batch's mean
      advantage = rewards - jnp.where(state.step == 0, jnp.mean(rewards),
                                      state.extras["baseline"])
    # The Gaussian log-density of each action up to a constant: its gradient moves the mean
    # along the action's noise.
    log_prob = jnp.mean(-0.5 * ((actions - means) / refine.sigma) ** 2,
                        axis=tuple(range(1, mean.ndim)))
    loss = -jnp.mean(advantage.reshape(-1) * log_prob)
    if labelled:
      loss += refine.label_weight * jnp.mean(1 - consistency) / jnp.sqrt(l_var + 1e-20)
    return loss, (reward, uncertainty, consistency, u_var, l_var)

  def backprop_loss(state, frozen, mean, fake_labels, real, real_labels, reward_key):
    uncertainty, consistency = registration_terms(ctx, frozen, real, real_labels, mean,
                                                  fake_labels, reward_key)
    reward, u_var, l_var = scaled_reward(state, uncertainty, consistency)
    return -jnp.mean(reward), (reward, uncertainty, consistency, u_var, l_var)

  def step(state, frozen, batch, key):
    (prep_key, gen_key, drop_key, recon_key, noise_key, reward_key,
     patch_key) = jax.random.split(key, 7)
    image, labels, real_masks = prepare_real(ctx, batch, prep_key)
    masks = jax.lax.stop_gradient(chain.masks(frozen, gen_key, image.shape[0]))
    # Real and generated grids cut at the same places.
    image, labels, real_masks, masks = patches(ctx, patch_key, image, labels, real_masks, masks)
    disc_params = state.params["image_discriminator"]
    real_condition = chain.condition(real_masks, labels)

    def loss(params):
      fake_labels, mean = generate(params, masks, drop_key)
      fake_condition = jax.lax.stop_gradient(
          masks if fake_labels is None else jnp.concatenate([masks, fake_labels], -1))
      index = jax.lax.stop_gradient(nearest_real(
          image, labels, mean, None if fake_labels is None else jnp.argmax(fake_labels, -1),
          ctx.num_classes))
      real, real_labels = image[index], None if labels is None else labels[index]
      if refine.mode == "backprop":
        reward_loss, outcome = backprop_loss(state, frozen, mean, fake_labels, real,
                                             real_labels, reward_key)
      else:
        reward_loss, outcome = policy_gradient_loss(state, frozen, mean, fake_labels, real,
                                                    real_labels, noise_key, reward_key)
      realism_loss, realism_out = realism(params, disc_params, image, labels, real_masks,
                                          real_condition, fake_condition, mean, recon_key)
      appearance = appearance_gap(mean, real)
      appearance_var = running_variance(state, "appearance_var", appearance,
                                        refine.baseline_decay)
      total = (reward_loss + refine.realism_weight * realism_loss + refine.appearance_weight
               * jnp.mean(appearance) / jnp.sqrt(appearance_var + 1e-20))
      return total, (mean, fake_condition, outcome, realism_out,
                     (jnp.mean(appearance), appearance_var))

    (total, (mean, fake_condition, outcome, realism_out, (appearance, appearance_var))
     ), grads = jax.value_and_grad(loss, has_aux=True)({n: state.params[n] for n in generators})
    reward, uncertainty, consistency, u_var, l_var = outcome
    reconstruction, mse, adversarial = realism_out
    norms = {}
    for name in generators:
      state, norms[name] = apply_gradients(ctx, state, name, grads[name])
    fakes = [(jax.lax.stop_gradient(reconstruction), real_condition),
             (jax.lax.stop_gradient(mean), fake_condition)]
    disc_value, disc_grads = jax.value_and_grad(lambda p: image_discriminator_loss(
        ctx.net("image_discriminator", p), image, real_condition, fakes))(disc_params)
    state, _ = apply_gradients(ctx, state, "image_discriminator", disc_grads)
    mean_reward = jnp.mean(reward)
    baseline = running_average(state, "baseline", mean_reward, refine.baseline_decay)
    state = state.replace(extras={"baseline": baseline, "uncertainty_var": u_var,
                                  "label_var": l_var, "appearance_var": appearance_var})
    metrics = {"loss": total, "reward": mean_reward, "uncertainty": jnp.mean(uncertainty),
               "label_consistency": jnp.mean(consistency), "mse": mse,
               "adversarial": adversarial, "appearance_gap": appearance,
               "discriminator_loss": disc_value,
               "grad_norm": optax.tree.norm(list(norms.values()))}
    return state.next_step(), metrics

  return step
