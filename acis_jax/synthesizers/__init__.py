"""The synthesizers `config.synthesizer` names, and what each changes in the one pipeline.

  "acis"          the paper's (default): density-sampled Voronoi pseudo-masks (sec 2.1), the
                  mask, annotation and image generators, the registration-reward refinement.
  "superpixel"    V2UM2I-like (Chen et al. [11] of the paper): the same stages, networks and
                  sampling, with each pseudo-mask an unsupervised SLIC superpixel mask, its
                  cells filled with their mean intensity (`acis_jax.pseudomask.superpixel`).
                  What it keeps of V2UM2I: the unsupervised, intensity-and-position mask that
                  the image generator paints from; what it drops: V2UM2I's own networks and
                  losses (ours are ACIS's, so the arm tests the pseudo-mask alone).
  "joint_gan"     StyleGAN-like ([27] of the paper): one generator draws an image and its label
                  map together from noise (one decoder, an image channel and label logits),
                  judged together by one WGAN-GP critic; no pseudo-mask, no annotation stage,
                  no refinement. What it keeps of StyleGAN: an unconditional GAN from noise to
                  the pair; what it drops: the mapping network, style-modulated convolutions and
                  progressive growth (our mask generator's plain decoder instead, affordable on
                  a CPU), so the arm tests the anatomy priors (pseudo-mask, annotation stage).
  "labels_first"  MedGen3D-like ([9] of the paper): a label-map generator from noise (WGAN-GP),
                  then a pix2pix image generator conditioned on the label map alone; no
                  pseudo-mask, no refinement. What it keeps of MedGen3D: labels first, then the
                  image painted from them; what it drops: its diffusion model for the label
                  sequences and SPADE normalisation (the labels enter the U-Net as input
                  channels, as ACIS's do), so the arm tests the pseudo-mask against label-only
                  conditioning.

  "synthseg"      SynthSeg-style domain randomisation (Billot et al. 2023): no networks; the
                  run's real label maps deformed and painted with random intensities
                  (`acis_jax.synthesizers.synthseg`, settings in `config.synthseg`). Its
                  `train` trains nothing, its `synthesize` paints.

Every trained synthesizer gets the same generator budget: the steps of ACIS's generator stages
(`acis_jax.train.stages.generator_budget`).

Where each one lives: ACIS and the superpixel variant run ACIS's stage table
(`acis_jax.train.stages`) and chain (`acis_jax.train.generation.Chain`); each synthesizer
without pseudo-masks has a module here with its `stages(config)` and `sample(chain, ...)`
(`comparison_module`). Besides that module, a new one names its networks in
`acis_jax.train.networks` and its arm in `acis_jax.eval.arms.TRAINED_ARMS` and
`acis_jax.eval.report.ARM_TITLES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from acis_jax.pseudomask import PseudoMaskParams

# Each trained synthesizer and the pseudo-mask method it paints from (None: none).
PSEUDO_MASK_METHODS = {"acis": "voronoi", "superpixel": "superpixel", "joint_gan": None,
                       "labels_first": None, "synthseg": None}
SYNTHESIZERS = tuple(PSEUDO_MASK_METHODS)


def comparison_module(synthesizer: str) -> ModuleType:
  """The module of a synthesizer without pseudo-masks (`acis_jax.synthesizers.<name>`): its
  `stages(config)` and, for a trained one, `sample(chain, params, key, size)`. Imported on
  demand: those modules build on `acis_jax.train`, which imports this package."""
  if uses_pseudo_masks(synthesizer):
    raise ValueError(f"{synthesizer!r} runs ACIS's stages (acis_jax.train.stages)")
  return importlib.import_module(f"acis_jax.synthesizers.{synthesizer}")


def uses_pseudo_masks(synthesizer: str) -> bool:
  """Whether synthesizer `synthesizer` paints its images from pseudo-masks (ACIS's chain)."""
  return PSEUDO_MASK_METHODS[synthesizer] is not None


def pseudomask_params(config) -> PseudoMaskParams:
  """The pseudo-mask settings of `config.pseudomask` with the method of
  `config.synthesizer` (Voronoi for a synthesizer without pseudo-masks, which makes none)."""
  params = PseudoMaskParams.from_config(config.pseudomask)
  return dataclasses.replace(params, method=PSEUDO_MASK_METHODS[config.synthesizer] or "voronoi")


def pairs_title(synthesizer: str, arm: str) -> str:
  """How the pairs of synthetic folder `arm` (`acis_jax.workdir.SYNTHETIC_FOLDERS`) of a
  `synthesizer` are named in titles, logs and dataset.json: "ACIS", "ACIS-", "ACIS-REAL" for
  ACIS's, the synthesizer's name otherwise."""
  if synthesizer == "acis":
    return arm.upper()
  return {"acis": synthesizer, "acis-": f"{synthesizer} unrefined",
          "acis-real": f"{synthesizer} from real"}[arm]
