"""The StyleGAN-like synthesizer (`config.synthesizer = "joint_gan"`, `acis_jax.synthesizers`):
one generator draws an image and its label map together from noise, judged together by one
WGAN-GP critic (`train.steps.make_noise_gan_step`). Its networks: `joint_generator`,
`joint_critic` (`acis_jax.train.networks`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from acis_jax.train import steps
from acis_jax.train.stages import Stage, generator_budget


def stages(config) -> list[Stage]:
  """One stage with ACIS's whole generator budget."""
  return [Stage("joint", ("joint_generator", "joint_critic"),
                ((generator_budget(config), functools.partial(steps.make_noise_gan_step,
                                                              generator="joint_generator")),))]


def sample(chain, params, key: jax.Array, size: int):
  """`(None, labels, images)`: `size` pairs from noise."""
  pair = chain.from_noise("joint_generator", params, key, size)
  return None, jnp.argmax(pair[..., 1:], -1), pair[..., :1]
