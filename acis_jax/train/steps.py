"""Pure training steps of the ACIS stages (paper sec 2.2-2.3, DESIGN.md).

Each `make_*_step(ctx)` returns `step(state, frozen, batch, key) -> (state, metrics)`:
- `state`: a `TrainState` (`acis_jax.train.state`) whose `params` and `opt_state` map each
  trained network to its parts, the only thing that changes (the trainer donates it);
- `frozen`: `{network: nnx.State}` of earlier stages' networks, read only;
- `batch`: `{"image": (b, *spatial, 1) in [0, 1], "labels": (b, *spatial) int}` (labels absent
  in label-free runs) plus `"pair_image"` for registration;
- `key`: this step's key (the trainer folds the step number into the run's key).
With `ctx.patch_shape` set, every network but the mask generator and its critic sees random
patches instead of the whole grid (`acis_jax.data.patches`).
Graph definitions (in the generation chain, `ctx.chain`) and hyper-parameters live in
`ctx` (static). Every example gets
its own key from `split(key, batch)`, so a batch split over devices computes
exactly what one device would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
import optax

from acis_jax.data.augment import AugmentParams, augment
from acis_jax.data.patches import random_crops
from acis_jax.pseudomask import PseudoMaskParams, pseudo_mask
from acis_jax.spatial import folding_fraction, warp
from acis_jax.train import losses
from acis_jax.train.generation import Chain, straight_through_one_hot
from acis_jax.train.state import TrainState, apply_update


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a step needs besides arrays: graph definitions, optimizers, settings."""

  chain: Chain
  trained: tuple[str, ...]
  optimizers: dict[str, optax.GradientTransformation]
  pseudomask: PseudoMaskParams
  augment: AugmentParams
  train: Any   # config.train (loss weights, n_critic, ...)
  refine: Any  # config.refine
  patch_shape: tuple[int, ...] | None = None  # None: whole grids

  @property
  def num_classes(self) -> int:
    return self.chain.num_classes

  def net(self, name: str, params) -> nnx.Module:
    return self.chain.net(name, params)


def apply_gradients(ctx: StepContext, state: TrainState, name: str, grads
                    ) -> tuple[TrainState, jax.Array]:
  """One optimizer update of network `name`; returns the new state and the gradient norm."""
  params, opt_state = apply_update(state.params[name], state.opt_state[name], grads,
                                   ctx.optimizers[name])
  new_state = state.replace(params={**state.params, name: params},
                            opt_state={**state.opt_state, name: opt_state})
  return new_state, optax.tree.norm(grads)


def prepare_real(ctx: StepContext, batch: dict, key: jax.Array, with_masks: bool = True):
  """Augments the real batch and makes pseudo-masks of the augmented images (sec 2.1).

  Returns `(image, labels or None, pseudo_mask or None)`; fresh keys every step
  give the "unlimited masks" of sec 2.2.
  """
  image, labels = batch["image"], batch.get("labels")
  size = image.shape[0]
  aug_keys, mask_keys = jnp.split(jax.random.split(key, 2 * size), 2)
  image, labels, _ = jax.vmap(
      lambda k, x, y: augment(k, x, y, ctx.num_classes, ctx.augment))(aug_keys, image, labels)
  masks = None
  if with_masks:
    masks = jax.vmap(lambda k, x: pseudo_mask(k, x[..., 0], ctx.pseudomask).mask)(
        mask_keys, image)[..., None]
  return image, labels, masks


def patches(ctx: StepContext, key: jax.Array, *arrays):
  """The arrays cropped at the same random places (as they are without a patch shape)."""
  return random_crops(key, arrays, ctx.patch_shape)


def generated_masks(ctx: StepContext, params: dict, size: int, key: jax.Array) -> jax.Array:
  """Pseudo-masks of the mask generator (patches of them, with a patch shape)."""
  mask_key, patch_key = jax.random.split(key)
  masks, = patches(ctx, patch_key, ctx.chain.masks(params, mask_key, size))
  return masks


def generated_pairs(ctx: StepContext, frozen: dict, size: int, key: jax.Array):
  """Generated pseudo-masks (patches of them, with a patch shape) and hard labels (None when
  label-free) from the stage-1 generators; for a synthesizer without pseudo-masks
  (labels first), `(None, labels of the label generator)`."""
  if not ctx.chain.uses_masks:
    labels_key, patch_key = jax.random.split(key)
    labels, = patches(ctx, patch_key, ctx.chain.generated_labels(frozen, labels_key, size))
    return None, labels
  masks = generated_masks(ctx, frozen, size, key)
  return masks, ctx.chain.labels(frozen, masks)


def annotation_update(ctx: StepContext, state: TrainState, masks, labels, generated,
                      key: jax.Array) -> tuple[TrainState, dict]:
  """One update of the annotation generator (Dice + CE on the real pseudo-masks, plus the
  adversarial term) and of the label discriminator on (pseudo-mask, labels) pairs.

  `generated` pseudo-masks (None: not used) are the mask generator's, which the annotation
  generator labels at synthesis: their labels are judged too, so it learns to label them.
  """
  real_pair = ctx.chain.condition(masks, labels)
  fake_masks = masks if generated is None else jnp.concatenate([masks, generated])

  def annotation_loss(params):
    all_logits = ctx.net("annotation_generator", params)(fake_masks, key=key)
    pairs = jnp.concatenate([fake_masks, straight_through_one_hot(all_logits)], -1)
    logits = all_logits[:masks.shape[0]]  # those of the real pseudo-masks
    supervised = losses.dice_ce_loss(logits, labels, ctx.num_classes)
    disc = ctx.net("label_discriminator", state.params["label_discriminator"])
    adversarial = losses.lsgan_generator_loss(disc(pairs))
    return supervised + ctx.train.adversarial_weight * adversarial, (pairs, supervised)

  (_, (pairs, supervised)), grads = jax.value_and_grad(annotation_loss, has_aux=True)(
      state.params["annotation_generator"])
  state, _ = apply_gradients(ctx, state, "annotation_generator", grads)
  pairs = jax.lax.stop_gradient(pairs)

  def discriminator_loss(params):
    disc = ctx.net("label_discriminator", params)
    return losses.lsgan_discriminator_loss(disc(real_pair), disc(pairs))

  disc_value, grads = jax.value_and_grad(discriminator_loss)(state.params["label_discriminator"])
  state, _ = apply_gradients(ctx, state, "label_discriminator", grads)
  return state, {"annotation_loss": supervised, "label_discriminator_loss": disc_value}


def wgan_update(ctx: StepContext, state: TrainState, real: jax.Array, key: jax.Array,
                generator: str, critic: str) -> tuple[TrainState, dict]:
  """One WGAN-GP update of `critic` on `real` samples against `generator`'s from noise
  (`Chain.from_noise`), and of the generator once per `train.n_critic` critic updates."""
  train = ctx.train
  critic_z_key, generator_z_key, gp_key = jax.random.split(key, 3)
  size = real.shape[0]
  critic_z = jax.random.normal(critic_z_key, (size, ctx.chain.latent_dim))
  # Fresh latents for the generator: on the critic's it would chase the scores the critic
  # has just been fitted to.
  generator_z = jax.random.normal(generator_z_key, (size, ctx.chain.latent_dim))

  def fake(params, z):
    return ctx.chain.from_noise(generator, {generator: params}, None, size, z=z)

  def critic_loss(params):
    return losses.wgan_gp_critic_loss(
        ctx.net(critic, params), real,
        jax.lax.stop_gradient(fake(state.params[generator], critic_z)), gp_key,
        train.gradient_penalty)

  critic_value, grads = jax.value_and_grad(critic_loss)(state.params[critic])
  state, critic_norm = apply_gradients(ctx, state, critic, grads)

  def generator_loss(params):
    return losses.wgan_generator_loss(
        ctx.net(critic, state.params[critic])(fake(params, generator_z)))

  # The generator moves once per `n_critic` critic updates (WGAN-GP's schedule). Both
  # outcomes are computed and one is kept: on XLA:CPU a lax.cond here cost 6x the step.
  generator_value, grads = jax.value_and_grad(generator_loss)(state.params[generator])
  updated, generator_norm = apply_gradients(ctx, state, generator, grads)
  move = state.step % train.n_critic == 0
  state = jax.tree.map(lambda new, old: jnp.where(move, new, old), updated, state)
  return state, {"critic_loss": critic_value, f"{generator}_loss": generator_value,
                 "critic_grad_norm": critic_norm, f"{generator}_grad_norm": generator_norm}


def make_masks_step(ctx: StepContext, finetune: bool = False) -> Callable:
  """Stage 1: mask generator vs WGAN-GP critic; annotation generator, supervised + adversarial.

  Phase 2 (`finetune=True`, labelled runs) holds the mask GAN still and goes on training the
  annotation generator, its adversarial term now also on labels of generated pseudo-masks:
  the masks it labels at synthesis, which it would otherwise never see.
  """
  def step(state, frozen, batch, key):
    del frozen
    prep_key, gan_key, drop_key, patch_key, generated_key = jax.random.split(key, 5)
    _, labels, masks = prepare_real(ctx, batch, prep_key)
    metrics = {}
    if not finetune:
      state, metrics = wgan_update(ctx, state, masks, gan_key, "mask_generator", "mask_critic")
    if ctx.num_classes:
      generated = None
      if finetune:
        generated = jax.lax.stop_gradient(generated_masks(
            ctx, state.params, masks.shape[0], generated_key))
      masks, labels = patches(ctx, patch_key, masks, labels)
      state, annotation_metrics = annotation_update(ctx, state, masks, labels, generated,
                                                    drop_key)
      metrics |= annotation_metrics
    return state.next_step(), metrics

  return step


def make_noise_gan_step(ctx: StepContext, generator: str) -> Callable:
  """The comparison synthesizers' GAN from noise (`acis_jax.synthesizers`), WGAN-GP like the
  mask GAN, on whole grids: `"label_generator"` (labels first) against one-hot real label
  maps, `"joint_generator"` (joint GAN) against real images with their one-hot label maps
  on the channel axis. Real cases augmented as everywhere else."""
  critic = {"label_generator": "label_critic", "joint_generator": "joint_critic"}[generator]

  def step(state, frozen, batch, key):
    del frozen
    prep_key, gan_key = jax.random.split(key)
    image, labels, _ = prepare_real(ctx, batch, prep_key, with_masks=False)
    real = ctx.chain.one_hot(labels)
    if generator == "joint_generator":
      real = jnp.concatenate([image, real], -1)
    state, metrics = wgan_update(ctx, state, real, gan_key, generator, critic)
    return state.next_step(), metrics

  return step


def mismatched(condition: jax.Array) -> jax.Array:
  """Conditions that belong to other examples: the batch rolled by one, or, for a batch of
  one, the condition mirrored along the first spatial axis."""
  if condition.shape[0] > 1:
    return jnp.roll(condition, 1, axis=0)
  return jnp.flip(condition, axis=1)


def image_discriminator_loss(disc: Callable, image, real_condition, fakes) -> jax.Array:
  """LSGAN loss of the image discriminator, judging (image, condition) pairs (sec 2.2).

  Real: each real image with its own condition. Fake: every `(image, condition)` pair of
  `fakes` (generated images with the conditions they were made from) and each real image
  with another example's condition (`mismatched`). Both sets then hold real conditions, so
  a discriminator cannot reject fakes by the condition alone: it must judge whether image
  and condition agree.
  """
  fakes = list(fakes) + [(image, mismatched(real_condition))]
  fake_input = jnp.concatenate([jnp.concatenate(pair, axis=-1) for pair in fakes])
  return losses.lsgan_discriminator_loss(
      disc(jnp.concatenate([image, real_condition], axis=-1)), disc(fake_input))


def image_generator_objective(ctx: StepContext, disc: Callable, reconstruction, image, fake,
                              fake_condition) -> tuple[jax.Array, jax.Array, jax.Array]:
  """pix2pix's generator objective: `(loss, mse, adversarial)`, the reconstruction's MSE to
  the real image and the LSGAN term of the discriminator on (fake image, its condition),
  weighted by `train.reconstruction_weight` and `train.adversarial_weight`. The images stage
  trains on it, the refinement keeps it as its realism term."""
  mse = losses.mse(reconstruction, image)
  adversarial = losses.lsgan_generator_loss(disc(jnp.concatenate([fake, fake_condition], -1)))
  return (ctx.train.reconstruction_weight * mse + ctx.train.adversarial_weight * adversarial,
          mse, adversarial)


def make_images_step(ctx: StepContext, finetune: bool) -> Callable:
  """Stage 2: pix2pix image generator vs a PatchGAN that sees image, pseudo-mask and labels.

  Phase 1 (`finetune=False`) conditions on real pseudo-masks and labels. Phase 2
  conditions the adversarial term on generated pseudo-masks and labels (sec 2.2)
  and keeps the reconstruction term on the real batch, which anchors the
  generator while it adapts; the discriminator sees the images of both conditions.
  """
  def step(state, frozen, batch, key):
    prep_key, gen_key, drop_key, fake_drop_key, patch_key = jax.random.split(key, 5)
    image, labels, masks = prepare_real(ctx, batch, prep_key, with_masks=ctx.chain.uses_masks)
    image, labels, masks = patches(ctx, patch_key, image, labels, masks)
    real_condition = ctx.chain.condition(masks, labels)
    if finetune:
      fake_condition = ctx.chain.condition(*generated_pairs(ctx, frozen, image.shape[0], gen_key))
    else:
      fake_condition = real_condition

    def generate(params, condition, key):
      return ctx.chain.image({"image_generator": params}, condition, key)

    def generator_loss(params):
      reconstruction = generate(params, real_condition, drop_key)
      fake = reconstruction if not finetune else generate(params, fake_condition, fake_drop_key)
      loss, mse, adversarial = image_generator_objective(
          ctx, ctx.net("image_discriminator", state.params["image_discriminator"]),
          reconstruction, image, fake, fake_condition)
      return loss, (reconstruction, fake, mse, adversarial)

    (_, (reconstruction, fake, mse, adversarial)), grads = jax.value_and_grad(
        generator_loss, has_aux=True)(state.params["image_generator"])
    state, generator_norm = apply_gradients(ctx, state, "image_generator", grads)
    fakes = [(jax.lax.stop_gradient(reconstruction), real_condition)]
    if finetune:
      fakes.append((jax.lax.stop_gradient(fake), fake_condition))

    def discriminator_loss(params):
      return image_discriminator_loss(ctx.net("image_discriminator", params), image,
                                      real_condition, fakes)

    disc_value, grads = jax.value_and_grad(discriminator_loss)(
        state.params["image_discriminator"])
    state, _ = apply_gradients(ctx, state, "image_discriminator", grads)
    return state.next_step(), {"mse": mse, "adversarial": adversarial,
                           "discriminator_loss": disc_value, "generator_grad_norm": generator_norm}

  return step


def make_registration_step(ctx: StepContext) -> Callable:
  """Stage 3: the registration net on pairs of real images (NCC + smoothness of the
  velocity), dropout on."""
  train = ctx.train

  def step(state, frozen, batch, key):
    del frozen
    moving_key, fixed_key, drop_key, patch_key = jax.random.split(key, 4)
    moving, _, _ = prepare_real(ctx, {"image": batch["image"]}, moving_key, with_masks=False)
    fixed, _, _ = prepare_real(ctx, {"image": batch["pair_image"]}, fixed_key, with_masks=False)
    moving, fixed = patches(ctx, patch_key, moving, fixed)

    def loss(params):
      # VoxelMorph's diffeomorphic variant regularises the velocity it integrates.
      velocity, disp = ctx.net("registration", params).fields(moving, fixed, key=drop_key)
      similarity = losses.ncc_loss(fixed, warp(moving, disp))
      smooth = losses.smoothness_loss(velocity)
      return similarity + train.smoothness_weight * smooth, (similarity, smooth, disp)

    (_, (similarity, smooth, disp)), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params["registration"])
    state, norm = apply_gradients(ctx, state, "registration", grads)
    return state.next_step(), {"ncc_loss": similarity, "smoothness": smooth,
                           "folding": jnp.mean(folding_fraction(disp)), "grad_norm": norm}

  return step
