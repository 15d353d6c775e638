"""What the training steps feed their networks: latents, discriminator pairs, label pairs and
the registration's regulariser (issue 12's defects 3, 4 and 5)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from acis_jax.config_utils import load_config_file
from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import window_hu
from acis_jax.train import generation, losses, steps
from acis_jax.train.generation import Chain
from acis_jax.train.networks import init_networks
from acis_jax.train.stages import stages
from acis_jax.train.trainer import fresh_state, step_context

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (32, 32)
NUM_CLASSES = 3


def small_config():
  config = load_config_file(os.path.join(REPO, "experiments", "smoke.py"))
  config.data.num_classes = NUM_CLASSES
  config.augment.enabled = False
  return config


def phantom_batch() -> dict:
  images, labels = [], []
  for seed in (0, 1):
    hu, label = chest_phantom(SHAPE, seed=seed)
    images.append(window_hu(hu)[..., None])
    labels.append(np.minimum(label, NUM_CLASSES - 1).astype(np.int32))
  return {"image": jnp.asarray(np.stack(images)), "labels": jnp.asarray(np.stack(labels)),
          "pair_image": jnp.asarray(np.stack(images[::-1]))}


def stage_setup(name: str, config=None, chain_type=Chain):
  """`(stage, ctx, state, frozen)` with fresh networks; plain SGD, so that an update is
  the gradient itself."""
  config = config or small_config()
  stage = next(s for s in stages(config) if s.name == name)
  ctx = step_context(config, stage)
  ctx = dataclasses.replace(
      ctx, chain=chain_type(ctx.chain.graphdefs, ctx.chain.num_classes, ctx.chain.latent_dim),
      optimizers={n: optax.sgd(1e-2) for n in stage.trained})
  state = fresh_state(stage, config, ctx)
  _, frozen = init_networks(tuple(stage.frozen), config, config.seed)
  return stage, ctx, state, frozen


def test_straight_through_one_hot_is_hard_forward_and_softmax_backward():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 4))
  weights = jax.random.normal(jax.random.key(1), (2, 5, 4))
  hard = generation.straight_through_one_hot(logits)
  np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.argmax(logits, -1), 4))
  np.testing.assert_allclose(
      jax.grad(lambda l: jnp.sum(weights * generation.straight_through_one_hot(l)))(logits),
      jax.grad(lambda l: jnp.sum(weights * jax.nn.softmax(l)))(logits), rtol=1e-5, atol=1e-7)


def test_mismatched_conditions_belong_to_other_examples():
  conditions = jnp.arange(3.0)[:, None, None, None] * jnp.ones((3, 4, 4, 2))
  other = steps.mismatched(conditions)
  assert all(float(other[i, 0, 0, 0]) != i for i in range(3))
  assert sorted(float(c) for c in other[:, 0, 0, 0]) == [0.0, 1.0, 2.0]
  one = jnp.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(steps.mismatched(one), one[:, ::-1])


def test_the_image_discriminator_must_judge_image_and_condition_together():
  """Closed forms of the LSGAN loss, 0.5 (mean (D(real) - 1)^2 + mean D(fake)^2).

  Real conditions are 0, generated ones 1 (channel 1), images carry their own condition's
  id (channel 0). A discriminator that reads the condition alone (1 for a real condition)
  scores the real pairs right, but the fakes made from real conditions and the mismatched
  real images wrong: 2 of the 3 fake sets, loss 0.5 * 2/3. One that checks that image and
  condition agree and that the condition is real scores everything right: loss 0.
  """
  image = jnp.arange(2.0)[:, None, None, None] * jnp.ones((2, 4, 4, 1))
  real_condition = jnp.zeros((2, 4, 4, 1)) + 10.0 * image   # condition id = image id
  generated_condition = real_condition + 1.0
  fakes = [(image + 0.5, real_condition), (image + 0.5, generated_condition)]

  def condition_only(x):
    return jnp.mean(x[..., 1] % 10.0 == 0.0, axis=(1, 2)).astype(jnp.float32)

  def image_and_condition(x):
    return jnp.mean(x[..., 1] == 10.0 * x[..., 0], axis=(1, 2)).astype(jnp.float32)

  np.testing.assert_allclose(
      steps.image_discriminator_loss(condition_only, image, real_condition, fakes), 1 / 3,
      rtol=1e-6)
  np.testing.assert_allclose(
      steps.image_discriminator_loss(image_and_condition, image, real_condition, fakes), 0.0,
      atol=1e-7)


class RecordingChain(Chain):
  """A chain that records the latents the mask generator is called with."""

  def net(self, name, params):
    module = super().net(name, params)
    if name != "mask_generator":
      return module
    record = RECORDED

    def call(z):
      record.append(np.asarray(z))
      return module(z)
    return call


RECORDED: list = []


def test_the_mask_generator_and_its_critic_draw_different_latents():
  _, ctx, state, frozen = stage_setup("masks", chain_type=RecordingChain)
  RECORDED.clear()
  steps.make_masks_step(ctx)(state, frozen, phantom_batch(), jax.random.key(3))
  critic_z, generator_z = RECORDED
  assert critic_z.shape == generator_z.shape == (2, ctx.chain.latent_dim)
  assert not np.allclose(critic_z, generator_z)


def _changed(before, after) -> bool:
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after))) > 0


def test_annotation_finetuning_learns_from_generated_masks_and_holds_the_mask_gan():
  """Phase 2 of the masks stage: the annotation update depends on the mask generator's
  masks (another mask generator, another update), and the mask GAN does not move."""
  stage, ctx, state, frozen = stage_setup("masks")
  assert [factory.keywords for _, factory in stage.phases[1:]] == [{"finetune": True}]
  finetune = jax.jit(steps.make_masks_step(ctx, finetune=True))
  batch, key = phantom_batch(), jax.random.key(4)
  new, metrics = finetune(state, frozen, batch, key)
  assert {"annotation_loss", "label_discriminator_loss"} <= set(metrics)
  for name in ("mask_generator", "mask_critic"):
    assert not _changed(state.params[name], new.params[name]), name
  for name in ("annotation_generator", "label_discriminator"):
    assert _changed(state.params[name], new.params[name]), name

  other_masks = jax.tree.map(lambda p: p * 0.5, state.params["mask_generator"])
  other, _ = finetune(state.replace(params={**state.params, "mask_generator": other_masks}),
                      frozen, batch, key)
  assert _changed(new.params["annotation_generator"], other.params["annotation_generator"])


def test_registration_smoothness_is_that_of_the_velocity():
  """VoxelMorph's diffeomorphic loss regularises the velocity, not the integrated field;
  with a head large enough that the two differ, the step's term is the velocity's."""
  config = small_config()
  config.model.registration_dropout = 0.0  # a deterministic field to compare with
  _, ctx, state, frozen = stage_setup("registration", config)
  net = ctx.net("registration", state.params["registration"])
  net.flow.kernel[...] = net.flow.kernel[...] * 3e4
  state = state.replace(params={**state.params, "registration": nnx.state(net)})
  batch = phantom_batch()
  _, metrics = steps.make_registration_step(ctx)(state, frozen, batch, jax.random.key(6))
  net = ctx.net("registration", state.params["registration"])
  velocity, displacement = net.fields(batch["image"], batch["pair_image"])
  velocity_term = float(losses.smoothness_loss(velocity))
  displacement_term = float(losses.smoothness_loss(displacement))
  assert abs(velocity_term - displacement_term) > 0.05 * velocity_term
  np.testing.assert_allclose(float(metrics["smoothness"]), velocity_term, rtol=1e-4)
