"""The default config every experiment starts from; experiments override fields.

Every default the paper leaves open (see DESIGN.md) is a field here, so a run
can change it from the command line (`--config.pseudomask.bandwidth=4`).
"""

import dataclasses

import ml_collections

from acis_jax.data.augment import AugmentParams
from acis_jax.pseudomask import PseudoMaskParams


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "pseudomask"
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ""          # nnU-Net folder; empty = the built-in sample below
  config.data.sample = "chest"       # "chest", "abdomen" (sample CTs) or "phantom"
  config.data.image_shape = (192, 192, 160)
  config.data.require_labels = True
  config.data.max_cases = 0          # 0 = every case
  config.data.num_slices = 1         # 2-D runs: axial slices per volume
  config.data.slice_band = (0.3, 0.7)  # ... taken from this fraction of the axial extent
  config.data.phantom_seed = 0
  config.data.num_classes = 5        # counts the background; 0 = label-free (images only)

  config.pseudomask = ml_collections.ConfigDict(dataclasses.asdict(PseudoMaskParams()))
  config.pseudomask.num_seeds = 8192

  config.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentParams()))

  # Widths per network; `dtype` is the compute dtype (parameters stay float32).
  config.model = ml_collections.ConfigDict()
  config.model.latent_dim = 128
  config.model.mask_generator_features = (256, 128, 64, 32, 16)
  config.model.critic_features = (32, 64, 128, 256)
  config.model.annotation_features = (32, 64, 128, 256)
  config.model.image_features = (64, 128, 256, 512)
  config.model.image_dropout = 0.5
  config.model.discriminator_features = (64, 128, 256, 512)
  config.model.registration_features = (16, 32, 32, 32, 32)
  config.model.registration_dropout = 0.2
  config.model.integration_steps = 7
  config.model.int_downsize = 1
  config.model.dtype = "float32"
  config.model.remat = False

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 2
  config.train.masks_steps = 2000
  config.train.images_steps = 2000
  config.train.images_finetune_steps = 1000
  config.train.registration_steps = 2000
  config.train.n_critic = 5
  config.train.gradient_penalty = 10.0
  config.train.adversarial_weight = 1.0
  config.train.reconstruction_weight = 100.0   # pix2pix's weight on its reconstruction term
  config.train.smoothness_weight = 1.0
  config.train.wgan_learning_rate = 1e-4
  config.train.gan_learning_rate = 2e-4
  config.train.registration_learning_rate = 1e-4
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 2

  config.refine = ml_collections.ConfigDict()
  config.refine.mode = "policy_gradient"   # or "backprop" (through the frozen registration net)
  config.refine.steps = 500
  config.refine.passes = 8                 # T of eq. 3
  config.refine.sigma = 0.05               # std of the Gaussian image policy
  config.refine.label_weight = 1.0         # lambda of the label term
  config.refine.baseline_decay = 0.9
  config.refine.learning_rate = 1e-5

  config.synthesize = ml_collections.ConfigDict()
  config.synthesize.num_samples = 16
  config.synthesize.batch_size = 2
  config.synthesize.unrefined = False      # also write ACIS- (before refinement)

  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = -1
  config.distributed.process_id = -1
  return config
