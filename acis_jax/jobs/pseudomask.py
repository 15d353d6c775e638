"""mode = "pseudomask": pseudo-masks of the configured images, as NIfTI and a figure.

Writes, per example NAME, into WORKDIR/pseudomask/: NAME_image.nii.gz (the
preprocessed CT in [0, 1]), NAME_pseudomask.nii.gz, NAME_density.nii.gz,
NAME_edges.nii.gz (all on the preprocessed grid, with its affine) and NAME.png.
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax
import numpy as np

from acis_jax.data.nifti import save_nifti
from acis_jax.data.sources import load_examples
from acis_jax.pseudomask import pseudo_mask
from acis_jax.pseudomask.pipeline import warn_if_no_edges
from acis_jax.rng import stream_key
from acis_jax.synthesizers import pseudomask_params, uses_pseudo_masks
from acis_jax.workdir import Workdir
from acis_jax.viz import pseudomask_figure


def run(config, workdir: str) -> None:
  if not uses_pseudo_masks(config.synthesizer):
    raise ValueError(f"mode=pseudomask: config.synthesizer={config.synthesizer!r} paints no "
                     "pseudo-masks (acis_jax.synthesizers); use 'acis' or 'superpixel'")
  out_dir = Workdir(workdir).pseudomask
  params = pseudomask_params(config)
  logging.info("Loading images (%s)...", config.data.data_dir or f"built-in {config.data.sample}")
  examples = load_examples(config.data)
  logging.info("%d example(s) of shape %s", len(examples), tuple(config.data.image_shape))
  key = stream_key(config.seed, "pseudomask")
  for index, example in enumerate(examples):
    image = example.image.array
    start = time.perf_counter()
    result = jax.block_until_ready(pseudo_mask(jax.random.fold_in(key, index), image, params))
    logging.info("[%d/%d] %s: pseudo-mask with %d seeds in %.2f s%s", index + 1, len(examples),
                 example.name, params.num_seeds, time.perf_counter() - start,
                 " (includes compilation)" if index == 0 else "")
    if params.method == "voronoi":
      warn_if_no_edges(result, example.name)
    affine = example.image.affine
    prefix = os.path.join(out_dir, example.name)
    mask, density, edges = (np.asarray(a) for a in (result.mask, result.density, result.edges))
    save_nifti(f"{prefix}_image.nii.gz", image, affine)
    save_nifti(f"{prefix}_pseudomask.nii.gz", mask, affine)
    save_nifti(f"{prefix}_density.nii.gz", density, affine)
    save_nifti(f"{prefix}_edges.nii.gz", edges.astype(np.uint8), affine)
    pseudomask_figure(f"{prefix}.png", image, edges, density, mask, np.asarray(result.seeds),
                      affine, title=f"{example.name}: " + (
                          f"{params.num_seeds} seeds, bandwidth {params.bandwidth} voxels, "
                          f"{int(edges.sum())} edge voxels" if params.method == "voronoi" else
                          f"SLIC superpixels, about {params.num_seeds} cells, compactness "
                          f"{params.superpixel_compactness}"))
    logging.info("Wrote %s_{image,pseudomask,density,edges}.nii.gz and %s.png", prefix, prefix)
