"""The MedGen3D-like synthesizer (`config.synthesizer = "labels_first"`,
`acis_jax.synthesizers`): a label-map generator from noise (WGAN-GP), then the pix2pix image
generator conditioned on the label map alone. Its networks: `label_generator`,
`label_critic`, and ACIS's `image_generator` / `image_discriminator` without the pseudo-mask
channel (`acis_jax.train.networks`)."""

from __future__ import annotations

import functools

import jax

from acis_jax.train import steps
from acis_jax.train.stages import Stage


def stages(config) -> list[Stage]:
  """ACIS's masks-stage steps for the label GAN, its images-stage steps (the fine-tuning also
  its refinement's) for the image generator: ACIS's generator budget."""
  train = config.train
  return [
      Stage("labels", ("label_generator", "label_critic"),
            ((train.masks_steps + train.annotation_finetune_steps,
              functools.partial(steps.make_noise_gan_step, generator="label_generator")),)),
      Stage("images", ("image_generator", "image_discriminator"),
            ((train.images_steps, functools.partial(steps.make_images_step, finetune=False)),
             (train.images_finetune_steps + config.refine.steps,
              functools.partial(steps.make_images_step, finetune=True))),
            reads=("label_generator",))]


def sample(chain, params, key: jax.Array, size: int):
  """`(None, labels, images)`: label maps from noise, then their images (dropout on)."""
  labels_key, image_key = jax.random.split(key)
  labels = chain.generated_labels(params, labels_key, size)
  return None, labels, chain.image(params, chain.condition(None, labels), image_key)
