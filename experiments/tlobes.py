"""TLobes-style 3-D synthesis (paper Table 1): 192x192x160 CT with lobe and heart labels.

Command (a GPU with >= 48 GB; see benchmarks/train_step.py for the memory per stage):

  python -m acis_jax.main --config=experiments/tlobes.py --workdir=runs/tlobes \\
      [--config.data.data_dir=/path/to/Dataset]

The classes are the TLobes ones (num_classes = 7): background, the upper and lower left
lobes, the upper, middle and lower right lobes, and the heart. `data_dir` is an nnU-Net folder
(imagesTr/, labelsTr/) with those labels; TLobes itself is in-house (not public). With no
data_dir the run uses the built-in lobes sample (one real chest CT with TotalSegmentator's lobes
and heart, acis_jax.data.sample), so the command works as it stands. Expected: the four stages
(about 13k steps at batch 1), then 16 synthetic 3-D pairs in runs/tlobes/synthetic/ and their
contact sheet; on one H100 several hours (not measured yet).

Preset `cpu`: the same pipeline on the lobes sample at 40x40x32 with small networks and a few
hundred steps, sized for a 2-core CPU: 9.6 minutes there on 2026-12-03 with an empty
compilation cache (masks 3.3 min, images 2.7, registration 1.3, refine 1.5, synthesize ACIS
and ACIS- 18 s; 2 min of it compiling). It shows that the 3-D path works end to end on real
lobes; the pairs are not usable yet: the pseudo-masks have the body outline and two dark
lungs, the labels put lobes and heart roughly in place but are blocky with stripe artefacts,
and the images are noisy (contact sheet in the README).
"""

from acis_jax.config_utils import parse_presets
from acis_jax.defaults import base_config


def get_config(arg=None):
  presets = parse_presets(arg, ("cpu",))
  config = base_config()
  config.mode = "train,synthesize"
  config.data.sample = "lobes"
  config.data.num_classes = 7
  config.data.image_shape = (192, 192, 160)
  # Six levels put the mask generator's base grid at 6x6x5: its first linear map stays
  # at 5.9 M parameters (five levels: 12x12x10x256, 47 M).
  config.model.mask_generator_features = (256, 128, 64, 32, 16, 8)
  config.train.batch_size = 1
  config.synthesize.unrefined = True
  if "cpu" in presets:
    config.data.image_shape = (40, 40, 32)
    config.pseudomask.num_edge_points = 1024
    config.pseudomask.num_seeds = 512
    config.pseudomask.bandwidth = 2.0
    config.model.latent_dim = 32
    config.model.mask_generator_features = (64, 32, 16, 8)
    config.model.critic_features = (8, 16, 32, 64)
    config.model.annotation_features = (8, 16, 32)
    config.model.image_features = (8, 16, 32)
    config.model.discriminator_features = (8, 16, 32)
    config.model.registration_features = (8, 16, 16, 16)
    config.train.batch_size = 2
    config.train.wgan_learning_rate = 3e-4
    config.train.masks_steps = 300
    config.train.annotation_finetune_steps = 50
    config.train.images_steps = 150
    config.train.images_finetune_steps = 50
    config.train.registration_steps = 100
    config.refine.steps = 30
    config.refine.passes = 2
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.synthesize.num_samples = 8
    config.synthesize.batch_size = 4
  return config
