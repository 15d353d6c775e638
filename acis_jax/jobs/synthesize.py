"""mode = "synthesize": synthetic image-annotation pairs from the trained generators.

Writes `config.synthesize.num_samples` pairs in the nnU-Net layout:
WORKDIR/synthetic/imagesTr/synth_NNNN.nii.gz (HU, int16, the inverse of the
training window) and labelsTr/synth_NNNN.nii.gz (uint8 labels; none in
label-free runs), on the training grid (affine of the first training example),
plus WORKDIR/synthetic/contact_sheet.png. With `synthesize.unrefined` it also
writes ACIS- (the generators before refinement) to WORKDIR/synthetic_unrefined/.
"""

from __future__ import annotations

import json
import os

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from acis_jax.data.nifti import save_nifti
from acis_jax.train.networks import abstract_params
from acis_jax.train.trainer import GRID_FILE, load_network
from acis_jax.viz import contact_sheet

HU_LOW, HU_HIGH = -1000.0, 600.0  # the training window (acis_jax.data.preprocess.window_hu)


def generator_sources(config, refined: bool) -> dict[str, str]:
  """Which stage's result each generator comes from: ACIS (refined) or ACIS-."""
  labelled = config.data.num_classes > 0
  late = "refine" if refined else "images"
  sources = {"mask_generator": "masks", "image_generator": late}
  if labelled:
    sources["annotation_generator"] = "refine" if refined else "masks"
  return sources


def make_sampler(config):
  """`sample(params, key, size) -> (pseudo-masks, labels or None, images)`, jitted.

  The chain of sec 2.2: noise -> pseudo-mask -> labels (argmax) -> image; the
  image generator's dropout stays on, as in pix2pix, as a source of variety.
  """
  graphdefs = {name: abstract_params(name, config)[0]
               for name in generator_sources(config, refined=True)}
  num_classes = config.data.num_classes

  @jax.jit(static_argnames="size")
  def sample(params, key, size):
    net = lambda name: nnx.merge(graphdefs[name], params[name])  # noqa: E731
    z_key, drop_key = jax.random.split(key)
    masks = net("mask_generator")(jax.random.normal(z_key, (size, config.model.latent_dim)))
    if not num_classes:
      return masks, None, net("image_generator")(masks, key=drop_key)
    labels = jnp.argmax(net("annotation_generator")(masks), axis=-1)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return masks, labels, net("image_generator")(masks, one_hot, key=drop_key)

  return sample


def write_pairs(config, workdir: str, out_dir: str, refined: bool) -> None:
  with open(os.path.join(workdir, "networks", GRID_FILE)) as f:
    affine = np.asarray(json.load(f)["affine"])
  # Every process takes part in orbax's restore; process 0 alone samples and writes.
  params = {name: load_network(workdir, stage, name, config)
            for name, stage in generator_sources(config, refined).items()}
  if jax.process_index() != 0:
    return
  sample = make_sampler(config)
  settings = config.synthesize
  key = jax.random.fold_in(jax.random.key(config.seed), 2 if refined else 3)
  sheet = []
  for start in range(0, settings.num_samples, settings.batch_size):
    size = min(settings.batch_size, settings.num_samples - start)
    masks, labels, images = jax.device_get(sample(params, jax.random.fold_in(key, start), size))
    for i in range(size):
      name = f"synth_{start + i:04d}"
      hu = np.round(HU_LOW + images[i, ..., 0] * (HU_HIGH - HU_LOW)).astype(np.int16)
      save_nifti(os.path.join(out_dir, "imagesTr", f"{name}.nii.gz"), hu, affine)
      if labels is not None:
        save_nifti(os.path.join(out_dir, "labelsTr", f"{name}.nii.gz"),
                   labels[i].astype(np.uint8), affine)
      if len(sheet) < 6:
        sheet.append((name, masks[i, ..., 0], None if labels is None else labels[i],
                      images[i, ..., 0]))
    logging.info("[synthesize%s] %d/%d pairs written to %s", "" if refined else " ACIS-",
                 start + size, settings.num_samples, out_dir)
  contact_sheet(os.path.join(out_dir, "contact_sheet.png"), sheet, affine,
                title=f"{'ACIS' if refined else 'ACIS-'}: synthetic pairs")


def run(config, workdir: str) -> None:
  write_pairs(config, workdir, os.path.join(workdir, "synthetic"), refined=True)
  if config.synthesize.unrefined:
    write_pairs(config, workdir, os.path.join(workdir, "synthetic_unrefined"), refined=False)
