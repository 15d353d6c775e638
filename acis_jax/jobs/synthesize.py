"""mode = "synthesize": synthetic image-annotation pairs from the trained generators.

`synthesize.source` says where each pair starts (`make_sampler`): "generated", noise through
the whole chain (sec 2.2); "real", a real training case moved by a random smooth
diffeomorphism, whose labels are kept and whose image is new; "labels", a label map the user
gives, onto which the nearest real case is registered. The SynthSeg-style synthesizer
(`config.synthesizer = "synthseg"`) has no networks: it paints the run's real label maps.

Writes `config.synthesize.num_samples` pairs into the work directory's synthetic folder
(`acis_jax.workdir`) as an nnU-Net v2 raw dataset (`acis_jax.data.nnunet`):
imagesTr/synth_NNNN_0000.nii.gz (HU, int16, the inverse of the training window),
labelsTr/synth_NNNN.nii.gz (uint8 labels) and dataset.json with the training data's label
names (label-free runs: images only, no dataset.json), on the training grid (affine of the
first training example), plus contact_sheet.png. With `synthesize.unrefined` it also writes
ACIS- (the generators before refinement) from the same latents and dropout keys, so that pair k
of ACIS and pair k of ACIS- differ only by the refinement. Each folder is written aside and
swapped in whole, so it never mixes two runs.
"""

from __future__ import annotations

import contextlib
import os

from absl import logging
import jax
import numpy as np

from acis_jax.data.dataset import load_label_maps
from acis_jax.data.nifti import save_nifti
from acis_jax.data.sources import Example
from acis_jax.data.nnunet import image_file, label_file, write_dataset_json
from acis_jax.data.synthetic import run_labels, synthetic_name
from acis_jax.data.preprocess import unwindow_hu
from acis_jax.eval import metrics, quality
from acis_jax.rng import stream_key
from acis_jax.spatial import register_labels, warp
from acis_jax.train.networks import load_network
from acis_jax.train.stages import generator_sources
from acis_jax.synthesizers import pairs_title, pseudomask_params
from acis_jax.synthesizers.synthseg import SynthSegParams, synthseg_pairs
from acis_jax.train.trainer import (TrainingData, load_training_data, make_chain,
                                    model_fingerprint, run_fingerprint)
from acis_jax.viz import contact_sheet
from acis_jax.workdir import Workdir, replaced_folder


def starting_cases(config, examples: list[Example] | None, workdir: Workdir):
  """What the pairs start from besides noise, read and checked before any work:
  `(images (n, *spatial, 1), labels (n, *spatial) or None, deformation)`, or None for
  `synthesize.source="generated"`.
  - "real": the run's training cases (checked against its fingerprint), to be moved by
    random diffeomorphisms of RMS `synthesize.deformation`;
  - "labels": the maps of `synthesize.labels_dir`, each with the real case that overlaps it
    most registered onto it (`registered_cases`), not moved further;
  - the SynthSeg-style synthesizer, whatever the source: the run's training cases, whose label
    maps it paints (its own deformation is `config.synthseg`'s).
  """
  settings = config.synthesize
  if config.synthesizer == "synthseg":  # paints the run's label maps (no networks)
    data = load_training_data(config, examples)
    workdir.require_trained(run_fingerprint(config, data))
    return data.images, data.labels, 0.0
  if settings.source == "generated":
    workdir.require_trained(model_fingerprint(config))
    return None
  label_maps = None
  if settings.source == "labels":  # first: a bad file names itself before anything runs
    _, label_maps = load_label_maps(settings.labels_dir, tuple(config.data.image_shape),
                                    config.data.num_classes, tuple(config.data.spacing_mm))
  data = load_training_data(config, examples)
  workdir.require_trained(run_fingerprint(config, data))
  if label_maps is None:
    return data.images, data.labels, settings.deformation
  return registered_cases(config, data, label_maps), label_maps, 0.0


def make_sampler(config, cases=None):
  """`sample(params, key, start, size) -> (pseudo-masks, labels or None, images)`, jitted,
  for pairs `start .. start + size - 1`: the chain of sec 2.2 from noise (`cases` None), or
  variants of `cases` (`starting_cases`; `Chain.variants`), pair k from case
  `k * n // num_samples` of the n, so each gets its share. The image generator's dropout is
  on, as in pix2pix, as a source of variety. The SynthSeg-style synthesizer paints label maps
  of `cases` drawn at random (`synthseg_pairs`) and ignores the parameters."""
  settings = config.synthesize
  if config.synthesizer == "synthseg":
    images, labels, _ = cases
    params = SynthSegParams.from_config(config.synthseg)

    def paint(_, key, start, size):
      images_out, labels_out = synthseg_pairs(key, labels, size, config.data.num_classes,
                                              params, images=images)
      return None, labels_out, images_out
    return paint
  chain = make_chain(config, generator_sources(config, refined=True))
  if cases is None:
    chain_sample = jax.jit(chain.sample, static_argnames="size")
    return lambda params, key, start, size: chain_sample(params, key, size=size)
  images, labels, deformation = cases
  pseudomask = pseudomask_params(config)
  variants = jax.jit(lambda params, key, images, labels: chain.variants(
      params, key, images, labels, pseudomask, deformation, settings.deformation_scale))

  def sample(params, key, start, size):
    cases = np.arange(start, start + size) * len(images) // settings.num_samples
    return variants(params, key, images[cases], None if labels is None else labels[cases])
  return sample


def drawn_batches(config, sample, params, count: int):
  """Yields `(start, (pseudo-masks, labels, images))` on the host for pairs 0 .. count - 1,
  `synthesize.batch_size` at a time, each batch with its synthesis key: the same keys for any
  parameters, so that pair k of ACIS and of ACIS- differ only by the refinement."""
  key = stream_key(config.seed, "synthesize")
  size = config.synthesize.batch_size
  for start in range(0, count, size):
    yield start, jax.device_get(sample(params, jax.random.fold_in(key, start), start,
                                       min(size, count - start)))


def registered_cases(config, data: TrainingData, label_maps: np.ndarray) -> np.ndarray:
  """Images `(m, *spatial, 1)`: for each label map, the real case nearest to it (highest mean
  Dice, `metrics.label_distances`) moved onto it by `register_labels`."""
  num_classes = config.data.num_classes
  _, nearest = quality.nearest(metrics.label_distances(label_maps, data.labels, num_classes))
  fit = jax.jit(lambda moving, fixed: register_labels(
      moving, fixed, num_classes, steps=config.synthesize.label_fit_steps))
  moved = []
  for index, given in zip(nearest, label_maps):
    moved.append(np.asarray(warp(data.images[index], fit(data.labels[index], given))))
  logging.info("[synthesize] %d label maps registered onto their nearest real cases %s",
               len(label_maps), [data.names[i] for i in nearest])
  return np.stack(moved)


def write_pairs(config, workdir: Workdir, arm: str, cases) -> None:
  grid = workdir.read_grid()
  affine = np.asarray(grid["affine"])
  # Every process takes part in orbax's restore; process 0 alone samples and writes.
  sources = generator_sources(config, refined=arm != "acis-")
  if cases is not None and sources:  # variants of real cases: the image generator alone
    sources = {"image_generator": sources["image_generator"]}
  params = {name: load_network(workdir, stage, name, config) for name, stage in sources.items()}
  if jax.process_index() != 0:
    return
  sample = make_sampler(config, cases)
  settings = config.synthesize
  final = workdir.synthetic(arm)
  title = pairs_title(config.synthesizer, arm)
  sheet = []
  with replaced_folder(final) as out_dir:
    for start, (masks, labels, images) in drawn_batches(config, sample, params,
                                                        settings.num_samples):
      size = len(images)
      for i in range(size):
        name = synthetic_name(start + i)
        hu = np.round(unwindow_hu(images[i, ..., 0])).astype(np.int16)
        save_nifti(image_file(out_dir, name), hu, affine)
        if labels is not None:
          save_nifti(label_file(out_dir, name), labels[i].astype(np.uint8), affine)
        if len(sheet) < 6:
          sheet.append((name, None if masks is None else masks[i, ..., 0],
                        None if labels is None else labels[i], images[i, ..., 0]))
      logging.info("[synthesize %s] %d/%d pairs made", title, start + size,
                   settings.num_samples)
    if config.data.num_classes:
      write_dataset_json(out_dir, run_labels(grid, config.data.num_classes),
                         settings.num_samples, f"acis-jax {title} synthetic pairs")
    contact_sheet(os.path.join(out_dir, "contact_sheet.png"), sheet, affine,
                  title=f"{title}: synthetic pairs")
  logging.info("[synthesize %s] wrote %s", title, final)


def write_from_real(config, workdir: str, examples: list[Example] | None = None) -> None:
  """The evaluation's "ACIS from real anatomy" pairs (folder of arm "acis-real"): the refined
  image generator painting the run's training cases moved by random diffeomorphisms, as
  `synthesize.source = "real"` makes them, whatever `config.synthesize.source` says."""
  config = config.copy_and_resolve_references()
  config.synthesize.source = "real"
  workdir = Workdir(workdir)
  with workdir.lock():
    write_pairs(config, workdir, "acis-real", starting_cases(config, examples, workdir))


def run(config, workdir: str, examples: list[Example] | None = None) -> None:
  """Writes the synthetic folders. `examples`: the real cases the run was trained on, when
  they are not those `config.data` names (the evaluation's few-shot synthesizers); read
  only with `synthesize.source` "real" or "labels", and checked against the run's
  fingerprint; the quality report compares the pairs with them."""
  workdir = Workdir(workdir)
  lead = jax.process_index() == 0
  with workdir.lock() if lead else contextlib.nullcontext():
    cases = starting_cases(config, examples, workdir)
    write_pairs(config, workdir, "acis", cases)
    if config.synthesize.unrefined:
      write_pairs(config, workdir, "acis-", cases)
    if config.synthesize.quality and jax.process_count() > 1:
      # Its network reads and segmenter cache are single-process: orbax's are collective.
      logging.info("[synthesize] no quality report in a multi-process run: run mode=quality "
                   "on one process")
    elif config.synthesize.quality:
      quality.write_reports(config, workdir, paired_arms=config.synthesize.unrefined,
                            examples=examples)
