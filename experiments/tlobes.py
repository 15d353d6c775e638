"""TLobes-style 3-D synthesis (paper Table 1): 192x192x160 CT with lobe and heart labels.

Command (a GPU with >= 48 GB; see benchmarks/train_step.py for the memory per stage):

  python -m acis_jax.main --config=experiments/tlobes.py --workdir=runs/tlobes \\
      --config.data.data_dir=/path/to/Dataset

`data_dir` is an nnU-Net folder (imagesTr/, labelsTr/) whose labels are background,
five lobes and the heart (num_classes = 7); without one the run stops with an error
before any work. TLobes itself is in-house (not public). The preset `tlobes.py:sample`
runs the same networks on the built-in sample chest CT instead (labels: heart, aorta,
derived lungs; num_classes = 5), so that the command works as it stands. Expected: the
four stages (about 13k steps at batch 1), then 16 synthetic 3-D pairs in
runs/tlobes/synthetic/ and their contact sheet; on one H100 several hours (not measured
yet).
"""

from acis_jax.config_utils import parse_presets
from acis_jax.defaults import base_config


def get_config(arg=None):
  presets = parse_presets(arg, ("sample",))
  config = base_config()
  config.mode = "train,synthesize"
  config.data.image_shape = (192, 192, 160)
  # The paper's data must be given: no built-in sample has lobes.
  config.data.sample = ""
  config.data.num_classes = 7
  # Six levels put the mask generator's base grid at 6x6x5: its first linear map stays
  # at 5.9 M parameters (five levels: 12x12x10x256, 47 M).
  config.model.mask_generator_features = (256, 128, 64, 32, 16, 8)
  config.train.batch_size = 1
  config.synthesize.unrefined = True
  if "sample" in presets:
    config.data.sample = "chest"
    config.data.num_classes = 5  # background, heart, aorta, left lung, right lung
  return config
