"""mode = "export": one nnU-Net v2 raw dataset of the real training cases and the synthetic pairs.

  EXPORT/DatasetNNN_Name/imagesTr/, labelsTr/, dataset.json   (`acis_jax.data.nnunet`)
  EXPORT/DatasetNNN_Name/splits_final.json                    the folds (export.num_folds)

EXPORT is `export.out_dir` (point it at `$nnUNet_raw`), or WORKDIR/nnunet when empty. The real
cases are the training examples as the synthesizer saw them (the slices of a 2-D run, the
resampled volumes of a 3-D one, HU clipped to the training window), so that real and synthetic
cases share one grid and one intensity range; their names are the examples' names, the
synthetic ones `synth_NNNN`. The folds deal the real patients (all slices of a volume
together) to `num_folds` validation sets and keep every synthetic case in training, so nnU-Net
never validates on synthetic data; copy the file to `$nnUNet_preprocessed/DatasetNNN_Name/`
after planning. The folder is written aside and swapped in whole; an existing folder is
replaced only when an earlier export made it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from absl import logging
import numpy as np

from acis_jax.data import nnunet
from acis_jax.data.nifti import save_nifti
from acis_jax.data.preprocess import unwindow_hu
from acis_jax.data.sources import load_examples, parse_slice_name
from acis_jax.data.synthetic import (run_labels, synthetic_complete, synthetic_files,
                                     synthetic_name)
from acis_jax.train.trainer import load_training_data, run_fingerprint
from acis_jax.workdir import (Workdir, read_json, replaced_folder,
                              write_json_atomically)

_MADE_BY = "acis-jax export"


def _check_target(out_root: Path, dataset_id: int, final: Path) -> None:
  """Refuses a dataset id another dataset uses, and a folder that no export made."""
  prefix = f"Dataset{dataset_id:03d}_"
  others = sorted(p.name for p in out_root.glob(prefix + "*") if p != final) \
      if out_root.is_dir() else []
  if others:
    raise ValueError(f"{out_root}: {others} already use dataset id {dataset_id}; nnU-Net needs "
                     "one folder per id: choose another export.dataset_id")
  if final.exists():
    description = final / "dataset.json"
    made_by_us = description.is_file() and str(
        read_json(description).get("description", "")).startswith(_MADE_BY)
    if not made_by_us:
      raise ValueError(f"{final} exists and was not written by an acis-jax export; it is left "
                       "as it is: move it, or choose another export.dataset_id or export.name")


def folds(names: list[str], synthetic: list[str], num_folds: int, is_2d: bool):
  """The folds of `splits_final.json`: by patient when there are enough patients, else by case;
  None (with a warning) when there are fewer real cases than folds."""
  groups: dict[str, list[str]] = {}
  for name in names:
    slice_of = parse_slice_name(name) if is_2d else None
    groups.setdefault(slice_of[0] if slice_of else name, []).append(name)
  if len(names) < num_folds:
    logging.warning("[export] %d real case(s) cannot fill export.num_folds=%d validation folds: "
                    "no splits_final.json (train nnU-Net on fold 'all')", len(names), num_folds)
    return None
  if len(groups) < num_folds:
    logging.warning("[export] %d patient(s) cannot fill %d folds: the folds split cases, so "
                    "validation slices have neighbours of the same patient in training",
                    len(groups), num_folds)
    groups = {name: [name] for name in names}
  return nnunet.cross_validation_folds(groups, synthetic, num_folds)


def run(config, workdir: str) -> None:
  workdir = Workdir(workdir)
  settings = config.export
  folder_name = nnunet.dataset_folder_name(settings.dataset_id, settings.name)
  num_classes = config.data.num_classes
  if not num_classes:
    raise ValueError("export: a label-free run (data.num_classes=0) has no labels, and nnU-Net "
                     "datasets need them")
  out_root = Path(settings.out_dir or workdir.nnunet_export).absolute()
  final = out_root / folder_name
  _check_target(out_root, settings.dataset_id, final)
  synthetic = workdir.synthetic(settings.arm)
  count = config.synthesize.num_samples
  if not synthetic_complete(synthetic, count, labelled=True):
    raise FileNotFoundError(f"{synthetic}: lacks some of the {count} synthetic pairs "
                            "(synthesize.num_samples); run mode=synthesize first")
  examples = load_examples(config.data)
  names = [e.name for e in examples]
  synthetic_names = [synthetic_name(i) for i in range(count)]
  clash = sorted(set(names) & set(synthetic_names))
  if clash:
    raise ValueError(f"real cases {clash} are named like synthetic pairs")
  splits = (folds(names, synthetic_names, settings.num_folds, len(config.data.image_shape) == 2)
            if settings.num_folds else None)
  with workdir.lock():
    workdir.require_trained(run_fingerprint(config, load_training_data(config, examples)))
    labels = run_labels(workdir.read_grid(), num_classes)
    with replaced_folder(str(final)) as out:
      os.makedirs(os.path.join(out, "imagesTr"))
      os.makedirs(os.path.join(out, "labelsTr"))
      for example in examples:
        hu = np.round(unwindow_hu(example.image.array)).astype(np.int16)
        save_nifti(nnunet.image_file(out, example.name), hu, example.image.affine)
        save_nifti(nnunet.label_file(out, example.name), example.label.array.astype(np.uint8),
                   example.label.affine)
      for (image, label), name in zip(synthetic_files(synthetic, count, True), synthetic_names):
        shutil.copyfile(image, nnunet.image_file(out, name))
        shutil.copyfile(label, nnunet.label_file(out, name))
      nnunet.write_dataset_json(
          out, labels, len(names) + count,
          f"{_MADE_BY}: {len(names)} real cases and {count} synthetic pairs "
          f"({settings.arm.upper()}) of {workdir.root}")
      if splits is not None:
        write_json_atomically(os.path.join(out, nnunet.SPLITS_FILE), splits)
      problems = nnunet.check_dataset(out)  # before it replaces anything
      if problems:
        raise RuntimeError(f"{final}: the export would break nnU-Net's rules, so it was not "
                           "written:\n  " + "\n  ".join(problems))
  logging.info("[export] wrote %s: %d real + %d synthetic cases%s", final, len(names), count,
               f", {settings.num_folds} folds in splits_final.json" if splits else "")
