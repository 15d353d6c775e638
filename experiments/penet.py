"""PENet-style 2-D synthesis for reconstruction (paper Table 2): 256x256 slices, images only.

Command:

  python -m acis_jax.main --config=experiments/penet.py --workdir=runs/penet \\
      --config.data.data_dir=/path/to/PENet_nnunet_layout

PENet CTPA volumes (Huang et al. 2020, public) arranged as an nnU-Net folder (imagesTr/
only: no labels are needed, `num_classes = 0` trains the label-free variant: no
annotation generator, image-only reward). With no data_dir it uses 32 axial slices of the
built-in sample chest CT. Expected: the four stages, then 16 synthetic 256x256 slices in
runs/penet/synthetic/imagesTr and a contact sheet; GPU-sized (not timed on CPU).
"""

from acis_jax.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.mode = "train,synthesize"
  config.data.image_shape = (256, 256)
  config.data.num_classes = 0
  config.data.require_labels = False
  config.data.num_slices = 32
  config.data.slice_band = (0.2, 0.8)
  config.pseudomask.num_seeds = 2048
  config.train.batch_size = 8
  config.synthesize.unrefined = True
  return config
