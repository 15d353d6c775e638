"""The networks of a run, built from `config.model`, and their parameters as plain pytrees.

Training steps never hold modules: they receive each network's `nnx.State` and
merge it with a graph definition made once here (`acis_jax.train.generation.Chain.net`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from acis_jax.models import (AnnotationGenerator, Critic, ImageGenerator, MaskGenerator,
                             PatchDiscriminator, RegistrationNet)
from acis_jax.rng import stream_key
from acis_jax.synthesizers import uses_pseudo_masks
from acis_jax.train.checkpoint import restore_state
from acis_jax.workdir import Workdir

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(model) -> Any:
  if model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {model.dtype!r}")
  return DTYPES[model.dtype]


def build_network(name: str, config, rngs: nnx.Rngs) -> nnx.Module:
  """One network of the run, named as in `NETWORKS`."""
  model = config.model
  shape = tuple(config.data.image_shape)
  ndim = len(shape)
  num_classes = config.data.num_classes
  # The image generator's condition: the pseudo-mask (if the synthesizer has one) and labels.
  mask_channels = int(uses_pseudo_masks(config.synthesizer))
  common = dict(dtype=_dtype(model), rngs=rngs)
  noise_decoder = dict(features=model.mask_generator_features, remat=model.remat, **common)
  if name == "mask_generator":
    return MaskGenerator(model.latent_dim, shape, **noise_decoder)
  if name == "mask_critic":
    return Critic(1, shape, features=model.critic_features, **common)
  if name == "joint_generator":  # image channel, then label logits
    return MaskGenerator(model.latent_dim, shape, out_channels=1 + num_classes, sigmoid=False,
                         **noise_decoder)
  if name == "joint_critic":
    return Critic(1 + num_classes, shape, features=model.critic_features, **common)
  if name == "label_generator":
    return MaskGenerator(model.latent_dim, shape, out_channels=num_classes, sigmoid=False,
                         **noise_decoder)
  if name == "label_critic":
    return Critic(num_classes, shape, features=model.critic_features, **common)
  if name == "annotation_generator":
    return AnnotationGenerator(num_classes, ndim, features=model.annotation_features,
                               remat=model.remat, **common)
  if name == "label_discriminator":
    return PatchDiscriminator(1 + num_classes, ndim, features=model.discriminator_features,
                              **common)
  if name == "image_generator":
    return ImageGenerator(num_classes, ndim, features=model.image_features,
                          dropout=model.image_dropout, with_mask=bool(mask_channels),
                          remat=model.remat, **common)
  if name == "image_discriminator":
    return PatchDiscriminator(1 + mask_channels + num_classes, ndim,
                              features=model.discriminator_features, **common)
  if name == "registration":
    return RegistrationNet(ndim, features=model.registration_features,
                           dropout=model.registration_dropout,
                           integration_steps=model.integration_steps,
                           int_downsize=model.int_downsize, remat=model.remat, **common)
  raise ValueError(f"unknown network {name!r}")


NETWORKS = ("mask_generator", "mask_critic", "annotation_generator", "label_discriminator",
            "image_generator", "image_discriminator", "registration", "joint_generator",
            "joint_critic", "label_generator", "label_critic")


def init_networks(names, config, seed: int) -> tuple[dict, dict]:
  """Graph definitions and freshly initialised parameters of `names`.

  Each network's initial parameters depend only on `seed` and its name (random stream
  `init/<name>`). They are drawn with the "rbg" generator under jit: XLA compiles threefry
  slowly for every parameter shape (10-20 s per small network on a CPU, 3 s with rbg).
  """
  graphdefs, params = {}, {}
  for name in names:
    graphdefs[name], _ = abstract_params(name, config)
    init = jax.jit(lambda k, name=name: nnx.state(build_network(name, config, nnx.Rngs(k))))
    params[name] = init(stream_key(seed, f"init/{name}", impl="rbg"))
  return graphdefs, params


def abstract_params(name: str, config) -> tuple[nnx.GraphDef, Any]:
  """Graph definition and parameter shapes of a network, without allocating it."""
  module = nnx.eval_shape(lambda: build_network(name, config, nnx.Rngs(0)))
  return nnx.split(module)


def parameter_count(params) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def load_network(workdir: Workdir, stage: str, network: str, config):
  """Parameters of `network` as trained by `stage`, on this process's first device.

  Readable on any devices, whatever those it was trained on (refused if shapes
  differ). In a multi-host run every process must call it (orbax synchronizes).
  """
  path = workdir.network(stage, network)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is missing: run the '{stage}' stage first (mode=train)")
  _, abstract = abstract_params(network, config)
  # Without a target device orbax places each array as it was saved, which fails
  # on other devices (e.g. networks trained on a pod, read on one machine).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  try:
    return restore_state(path, abstract)
  except ValueError:
    raise  # shapes that differ: restore_state names them
  except Exception as error:  # orbax raises many types for unreadable files
    raise ValueError(
        f"the {network} network of stage '{stage}' at {path} cannot be read ({error}); "
        f"delete {workdir.done_marker(stage)} and run mode=train again to rebuild it") from error
