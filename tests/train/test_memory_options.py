"""`config.model.dtype` and `config.model.remat` through the trainer's networks and steps.

bfloat16 must reach every convolution and matmul while parameters stay float32; remat must
change where activations come from in the backward pass, never the loss or the gradients.
"""

import dataclasses
import os
import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from acis_jax.config_utils import load_config_file
from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import window_hu
from acis_jax.train.networks import NETWORKS, abstract_params, init_networks
from acis_jax.train.stages import stages
from acis_jax.train.trainer import fresh_state, step_context

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (32, 32)
NUM_CLASSES = 3
# The primitive jax.checkpoint (and nnx.remat) leaves in a jaxpr, whatever JAX calls it.
REMAT_PRIMITIVE = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).jaxpr.eqns[0].primitive.name


def tiny_config(dtype: str, remat: bool):
  """The smoke config's networks (32x32) with fewer classes."""
  config = load_config_file(os.path.join(REPO, "experiments", "smoke.py"))
  assert tuple(config.data.image_shape) == SHAPE
  config.data.num_classes = NUM_CLASSES
  config.refine.mode = "backprop"  # gradients through both generators and the registration net
  config.refine.passes = 2
  config.augment.enabled = False  # not under test; it would only lengthen compilation
  config.model.dtype = dtype
  config.model.remat = remat
  return config


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from equations(sub)


def count_remat(jaxpr) -> int:
  return sum(eqn.primitive.name == REMAT_PRIMITIVE for eqn in equations(jaxpr))


def matmul_input_dtypes(jaxpr) -> set[str]:
  return {str(eqn.invars[0].aval.dtype) for eqn in equations(jaxpr)
          if eqn.primitive.name in ("conv_general_dilated", "dot_general")}


def network_inputs(name: str) -> tuple:
  image = jnp.zeros((1, *SHAPE, 1))
  labels = jnp.zeros((1, *SHAPE, NUM_CLASSES))
  return {"mask_generator": (jnp.zeros((1, 8)),),
          "mask_critic": (image,),
          "annotation_generator": (image,),
          "label_discriminator": (jnp.concatenate([image, labels], -1),),
          "image_generator": (image, labels),
          "image_discriminator": (jnp.concatenate([image, image, labels], -1),),
          "registration": (image, image),
          "joint_generator": (jnp.zeros((1, 8)),),
          "joint_critic": (jnp.concatenate([image, labels], -1),),
          "label_generator": (jnp.zeros((1, 8)),),
          "label_critic": (labels,)}[name]


def forward_jaxpr(name: str, dtype: str, remat: bool):
  """The jaxpr of the network's forward pass, from parameter shapes alone (nothing compiled)."""
  graphdef, params = abstract_params(name, tiny_config(dtype, remat))
  return jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(*network_inputs(name)))(params).jaxpr


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_follows_the_dtype_and_remat_settings(name):
  plain, both = forward_jaxpr(name, "float32", False), forward_jaxpr(name, "bfloat16", True)
  assert matmul_input_dtypes(plain) == {"float32"}
  assert matmul_input_dtypes(both) == {"bfloat16"}
  # The U-Nets and the mask generator's decoder hold the full-resolution activations; the
  # discriminators work at half resolution and below and are not rematerialised.
  if name not in ("mask_critic", "label_discriminator", "image_discriminator", "joint_critic",
                  "label_critic"):
    assert count_remat(both) > count_remat(plain)


def phantom_batch() -> dict:
  images, labels, pairs = [], [], []
  for seed in (0, 1):
    hu, label = chest_phantom(SHAPE, seed=seed)
    images.append(window_hu(hu)[..., None])
    labels.append(np.minimum(label, NUM_CLASSES - 1).astype(np.int32))
    pairs.append(window_hu(chest_phantom(SHAPE, seed=seed + 2)[0])[..., None])
  return {"image": jnp.asarray(np.stack(images)), "labels": jnp.asarray(np.stack(labels)),
          "pair_image": jnp.asarray(np.stack(pairs))}


def _stage(config, name: str):
  return next(s for s in stages(config) if s.name == name)


@functools.cache
def initial_arrays(stage_name: str):
  """State and frozen parameters: the same for every dtype and remat setting.

  Networks the trainer loads from earlier stages start fresh here.
  """
  config = tiny_config("float32", False)
  stage = _stage(config, stage_name)
  state = fresh_state(stage, config, step_context(config, stage))
  if stage_name == "refine":
    # Past the first step, with the terms' spreads gathered (of the order of eq. 3's and
    # 1 - Dice's): at the first step the reward divides by the spread of this one batch of
    # alike samples from untrained generators, a ratio of near-equal numbers that magnifies
    # bfloat16's rounding far beyond what the networks do.
    state = state.replace(step=jnp.asarray(1, jnp.int32),
                          extras=dict(state.extras, uncertainty_var=jnp.float32(1e-4),
                                      label_var=jnp.float32(1e-2)))
  _, frozen = init_networks(tuple(stage.frozen), config, config.seed)
  return state, frozen


def one_step(stage_name: str, dtype: str, remat: bool):
  """`(initial params, new params, metrics, step jaxpr)` of one trainer step of the stage."""
  config = tiny_config(dtype, remat)
  # The appearance term over its first batch's spread (2 images) is a ratio of near-equal
  # numbers, which bfloat16 moves by 16 %: compared here, it would stand in for the step.
  config.refine.appearance_weight = 0.0
  stage = _stage(config, stage_name)
  # Plain SGD: Adam's first step is lr * sign(gradient), which would blow float noise in
  # near-zero gradients up to full-size differences between the settings compared.
  ctx = dataclasses.replace(step_context(config, stage),
                            optimizers={n: optax.sgd(1e-2) for n in stage.trained})
  state, frozen = initial_arrays(stage_name)
  state = state.replace(opt_state={n: ctx.optimizers[n].init(state.params[n])
                                   for n in stage.trained})
  args = (state, frozen, phantom_batch(), jax.random.key(7, impl="rbg"))
  traced = jax.jit(stage.phases[0][1](ctx)).trace(*args)
  new_state, metrics = traced.lower().compile()(*args)
  return (jax.device_get(state.params), jax.device_get(new_state.params),
          {k: float(v) for k, v in metrics.items()}, traced.jaxpr.jaxpr)


@pytest.mark.parametrize("stage_name", ["registration", "refine"])
def test_remat_and_bfloat16_steps(stage_name):
  start, reference, ref_metrics, ref_jaxpr = one_step(stage_name, "float32", False)
  _, remat, remat_metrics, remat_jaxpr = one_step(stage_name, "float32", True)
  _, half, half_metrics, half_jaxpr = one_step(stage_name, "bfloat16", True)
  assert all(np.isfinite(v) for v in ref_metrics.values()), ref_metrics
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), start, reference))
  assert max(changed) > 0, "the step did not train"

  # remat: recomputation in the step, the same loss, metrics and update.
  assert count_remat(remat_jaxpr) > count_remat(ref_jaxpr)
  for k in ref_metrics:
    np.testing.assert_allclose(remat_metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7,
                               err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               remat, reference)

  # bfloat16: the networks compute in it, parameters stay float32, the step stays sane.
  assert "bfloat16" in matmul_input_dtypes(half_jaxpr)
  assert "bfloat16" not in matmul_input_dtypes(ref_jaxpr)
  assert all(np.isfinite(v) for v in half_metrics.values()), half_metrics
  assert {leaf.dtype for leaf in jax.tree.leaves(half)} == {np.dtype(np.float32)}
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(half))
  # bfloat16 keeps 8 significant bits: ~0.4% per rounding, a few percent after a network.
  loss = "ncc_loss" if stage_name == "registration" else "loss"
  np.testing.assert_allclose(half_metrics[loss], ref_metrics[loss], rtol=0.05)
