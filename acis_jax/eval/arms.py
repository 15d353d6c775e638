"""The training data of each arm of the evaluation: the n real cases, and the synthetic pairs
of the arm's synthesizer (`config.synthesizer`) trained on them.

The synthesizer of size n (the default, `evaluate.train_synthesizer`): the arm's synthesizer's
stages are trained on those n cases only (`acis_jax.train.trainer.train`, with `config.model`,
`config.train`, `config.refine`, ...) into WORKDIR/synth_n{n}_seed{seed}/ (ACIS's; the others
`WORKDIR/<synthesizer>_n{n}_seed{seed}/`, `Workdir.synthesizer`), once per seed with
that seed, so that the synthesizer's own variance is in the error bars (or once per n into
WORKDIR/synth_n{n}/ with `evaluate.synthesizer_per_seed=False`); then `synthesize` writes the
pairs of the synthetic arms there (`acis_jax.workdir.SYNTHETIC_FOLDERS`; HU int16 on disk,
windowed back to [0, 1] with `window_hu`; labels uint8). Both steps resume: finished stages
are skipped, and complete synthetic folders skip training and synthesis altogether, so
pre-made folders put there are used as they are (with `train_synthesizer=False`, missing ones
are an error). After changing a synthesizer's settings, delete its folders to train it
again. With `evaluate.quality_reports`, each synthesizer of the first seed also gets its
quality report (quality.md / .json / .png in each of its synthetic folders; missing ones are
written).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from absl import logging
import numpy as np

from acis_jax.data.sources import Example
from acis_jax.data.synthetic import load_synthetic, synthetic_complete
from acis_jax.eval import quality
from acis_jax.eval.splits import Cases, Split, few_shot_subset, stack_cases
from acis_jax.jobs import synthesize
from acis_jax.train import trainer
from acis_jax.workdir import SYNTHETIC_FOLDERS, Workdir


# The arms whose pairs a trained synthesizer makes: arm -> (config.synthesizer, the folder of
# its work directory, by SYNTHETIC_FOLDERS' arm names).
TRAINED_ARMS = {"acis-": ("acis", "acis-"), "acis": ("acis", "acis"),
                "acis-real": ("acis", "acis-real"), "superpixel": ("superpixel", "acis"),
                "joint_gan": ("joint_gan", "acis"), "labels_first": ("labels_first", "acis"),
                "synthseg": ("synthseg", "acis")}


def synthesizer_dir(config, workdir: str, n: int, seed: int, name: str) -> Workdir:
  """Where synthesizer `name` of size n for `seed` lives: one per seed
  (`evaluate.synthesizer_per_seed`, its variance then in the error bars) or one per n."""
  per_seed = config.evaluate.synthesizer_per_seed
  return Workdir(workdir).synthesizer(n, seed if per_seed else None, name)


def synthesizer_config(config, seed: int, name: str, folders: Sequence[str]):
  """The config of synthesizer `name` for `seed` that writes `folders`."""
  synth_config = config.copy_and_resolve_references()
  synth_config.synthesizer = name
  if config.evaluate.synthesizer_per_seed:
    synth_config.seed = int(seed)
  synth_config.synthesize.unrefined = "acis-" in folders
  synth_config.synthesize.quality = False   # written apart (`write_quality`), if asked for
  return synth_config


def write_quality(config, root: Workdir, seed: int, name: str, folders: Sequence[str],
                  examples: list[Example]) -> None:
  """The quality report (`acis_jax.eval.quality`) of each synthetic folder of `root`, unless
  every one of `folders` has one already."""
  if all(os.path.exists(os.path.join(root.synthetic(f), "quality.json")) for f in folders):
    return
  with root.lock():
    quality.write_reports(synthesizer_config(config, seed, name, folders), root,
                          examples=examples)


def ensure_synthetic(config, workdir: str, n: int, seed: int, examples: list[Example],
                     name: str, folders: Sequence[str]) -> Workdir:
  """The work directory of synthesizer `name` (`synthesizer_dir`), with its synthetic
  `folders` (SYNTHETIC_FOLDERS' arm names) made by it trained on `examples`.

  Complete folders are used as they are; otherwise the synthesizer is trained (finished
  stages skipped, seeded by `seed` when there is one per seed) and the missing folders are
  written: ACIS and ACIS- by `synthesize` (`synthesize.source`), ACIS from real anatomy by
  `synthesize.write_from_real`.
  """
  root = synthesizer_dir(config, workdir, n, seed, name)
  count, labelled = config.synthesize.num_samples, config.data.num_classes > 0
  missing = [arm for arm in folders
             if not synthetic_complete(root.synthetic(arm), count, labelled)]
  if not missing:
    return root
  if not config.evaluate.train_synthesizer:
    raise ValueError(f"{root.root}: the synthetic folders "
                     f"{[SYNTHETIC_FOLDERS[arm] for arm in missing]} lack some of "
                     f"synth_0000..synth_{count - 1:04d}, and evaluate.train_synthesizer=False")
  synth_config = synthesizer_config(config, seed, name, folders)
  logging.info("[evaluate] training the %s synthesizer for n=%d (seed %d) on %s", name, n,
               synth_config.seed, [e.name for e in examples])
  trainer.train(synth_config, root.root, examples=examples)
  if {"acis", "acis-"} & set(missing):
    synthesize.run(synth_config, root.root, examples=examples)
  if "acis-real" in missing:
    synthesize.write_from_real(synth_config, root.root, examples)
  return root


def join(real: Cases, images: np.ndarray, labels: np.ndarray | None) -> Cases:
  return Cases(np.concatenate([real.images, images]),
               None if real.labels is None else np.concatenate([real.labels, labels]),
               real.names + tuple(f"synthetic_{i:04d}" for i in range(len(images))),
               num_real=len(real.names))


def training_sets(config, workdir: str, split: Split) -> dict[tuple[str, int, int], Cases]:
  """`(arm, n, seed) -> training cases` of every arm; trains the synthesizers it needs."""
  ev = config.evaluate
  synthesizers = {}  # name -> the folders the arms want of it
  for arm in ev.arms:
    if arm in TRAINED_ARMS:
      name, folder = TRAINED_ARMS[arm]
      synthesizers.setdefault(name, []).append(folder)
  sets, loaded = {}, {}
  for n in map(int, ev.num_train):
    examples = few_shot_subset(split.pool, n)
    real = stack_cases(config, examples)
    for seed in map(int, ev.seeds):
      roots = {name: ensure_synthetic(config, workdir, n, seed, examples, name, folders)
               for name, folders in synthesizers.items()}
      if ev.quality_reports and seed == ev.seeds[0]:
        for name, folders in synthesizers.items():
          write_quality(config, roots[name], seed, name, folders, examples)
      for arm in ev.arms:
        if arm == "baseline":
          sets[arm, n, seed] = real
        elif arm in TRAINED_ARMS:
          name, folder = TRAINED_ARMS[arm]
          path = roots[name].synthetic(folder)
          if path not in loaded:  # one synthesizer for every seed: read its folders once
            loaded[path] = join(real, *load_synthetic(path, config.synthesize.num_samples,
                                                       config))
          sets[arm, n, seed] = loaded[path]
  if "upper" in ev.arms:
    pool = stack_cases(config, split.pool)
    sets.update({("upper", len(split.pool), int(seed)): pool for seed in ev.seeds})
  return sets
