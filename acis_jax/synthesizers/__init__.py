"""The synthesizers `config.synthesizer` names, and what each changes in the one pipeline.

  "acis"        the paper's (default): density-sampled Voronoi pseudo-masks (sec 2.1), the
                mask, annotation and image generators, the registration-reward refinement.
  "superpixel"  V2UM2I-like (Chen et al. [11] of the paper): the same stages, networks and
                sampling, with each pseudo-mask an unsupervised SLIC superpixel mask, its
                cells filled with their mean intensity (`acis_jax.pseudomask.superpixel`).
                What it keeps of V2UM2I: the unsupervised, intensity-and-position mask that
                the image generator paints from; what it drops: V2UM2I's own networks and
                losses (ours are ACIS's, so the arm tests the pseudo-mask alone).

SynthSeg-style pairs (`synthesizers.synthseg`) need no training and are drawn by the
evaluation protocol itself (arm "synthseg").
"""

from __future__ import annotations

import dataclasses

from acis_jax.pseudomask import PseudoMaskParams

# Each trained synthesizer and the pseudo-mask method it uses.
PSEUDO_MASK_METHODS = {"acis": "voronoi", "superpixel": "superpixel"}
SYNTHESIZERS = tuple(PSEUDO_MASK_METHODS)


def pseudomask_params(config) -> PseudoMaskParams:
  """The pseudo-mask settings of `config.pseudomask` with the method of
  `config.synthesizer`."""
  params = PseudoMaskParams.from_config(config.pseudomask)
  return dataclasses.replace(params, method=PSEUDO_MASK_METHODS[config.synthesizer])
