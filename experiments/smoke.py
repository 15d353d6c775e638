"""Smoke run on the procedural phantom (no network): tiny networks, a few steps.

  python -m acis_jax.main --config=experiments/smoke.py --workdir=/tmp/smoke

Expected on a 2-core CPU: under two minutes, mostly compilation. It trains
every stage for a few steps on a 32x32 phantom slice and writes 4 synthetic
pairs to /tmp/smoke/synthetic/ (nothing anatomical at this size: it checks
the plumbing). Presets, comma-separated: `3d` (a 16x16x16 phantom instead),
`pseudomask` (only pseudo-masks, 48x48x40, or 64x64 with `2d`).
"""

from acis_jax.config_utils import parse_presets
from acis_jax.defaults import base_config


def get_config(arg=None):
  presets = parse_presets(arg, known=("3d", "pseudomask", "2d"))
  config = base_config()
  config.data.sample = "phantom"
  config.data.num_classes = 6  # the phantom's background + 5 structures
  config.pseudomask.num_edge_points = 512
  config.pseudomask.num_seeds = 256
  config.pseudomask.bandwidth = 3.0
  if "pseudomask" in presets:
    config.mode = "pseudomask"
    config.data.image_shape = (64, 64) if "2d" in presets else (48, 48, 40)
    return config

  config.mode = "train,synthesize"
  config.data.image_shape = (16, 16, 16) if "3d" in presets else (32, 32)
  config.pseudomask.num_edge_points = 128
  config.pseudomask.num_seeds = 64
  config.pseudomask.bandwidth = 2.0
  config.model.latent_dim = 8
  config.model.mask_generator_features = (16, 8, 8)
  config.model.critic_features = (8, 16)
  config.model.annotation_features = (8, 16)
  config.model.image_features = (8, 16)
  config.model.discriminator_features = (8, 16)
  config.model.registration_features = (8, 8, 8)
  config.train.batch_size = 2
  config.train.masks_steps = 4
  config.train.annotation_finetune_steps = 2
  config.train.images_steps = 3
  config.train.images_finetune_steps = 2
  config.train.registration_steps = 4
  config.train.n_critic = 2
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.image_every = 2
  config.refine.steps = 3
  config.refine.passes = 2
  config.synthesize.num_samples = 4
  config.synthesize.quality = False   # tests run mode=quality on their own
  config.quality.segmenter_steps = 3
  return config
