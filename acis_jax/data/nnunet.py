"""nnU-Net v2 raw datasets: their file names, their `dataset.json`, the rules nnU-Net checks
before planning, and the cross-validation folds it reads.

  DatasetNNN_Name/imagesTr/CASE_0000.nii.gz   channel 0 (CT) of case CASE
  DatasetNNN_Name/labelsTr/CASE.nii.gz        its label map, ids 0 (background), 1, 2, ...
  DatasetNNN_Name/dataset.json                channel_names, labels (name -> id), numTraining,
                                              file_ending (and a free-text description)
  nnUNet_preprocessed/DatasetNNN_Name/splits_final.json   the folds, [{"train": [...],
                                              "val": [...]}, ...], read instead of nnU-Net's
                                              own random 5-fold split when present

The rules of `check_dataset` are those of nnU-Net v2's `verify_dataset_integrity`
(nnunetv2/experiment_planning/verify_dataset_integrity.py), which `nnUNetv2_plan_and_preprocess
--verify_dataset_integrity` runs; the ones nnU-Net only warns about (affines) are errors here.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from acis_jax.workdir import read_json, write_json_atomically

FILE_ENDING = ".nii.gz"
CHANNEL_NAMES = {"0": "CT"}
SPLITS_FILE = "splits_final.json"
_DATASET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def image_file(folder: str | os.PathLike, case: str) -> Path:
  return Path(folder) / "imagesTr" / f"{case}_0000{FILE_ENDING}"


def label_file(folder: str | os.PathLike, case: str) -> Path:
  return Path(folder) / "labelsTr" / f"{case}{FILE_ENDING}"


def dataset_folder_name(dataset_id: int, name: str) -> str:
  """`DatasetNNN_Name`, the only folder name nnU-Net's commands find by id."""
  if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
    raise ValueError(f"export.dataset_id={dataset_id!r}: nnU-Net ids have three digits, 1..999 "
                     "(pick one no other dataset in nnUNet_raw uses; >= 500 avoids the ids "
                     "of public datasets)")
  if not _DATASET_NAME.match(name or ""):
    raise ValueError(f"export.name={name!r}: use letters, digits, '_' and '-' only")
  return f"Dataset{dataset_id:03d}_{name}"


def label_ids(label_names: Mapping[int, str]) -> dict[str, int]:
  """`dataset.json`'s labels: name -> id with "background": 0, ids consecutive from 0."""
  table = {0: "background", **{k: v for k, v in label_names.items() if k != 0}}
  ids = sorted(table)
  if ids != list(range(len(ids))):
    raise ValueError(f"label ids {ids}: nnU-Net needs consecutive ids 0, 1, 2, ...")
  names = [table[i] for i in ids]
  if len(set(names)) != len(names):
    raise ValueError(f"label names {names}: each name may name one id only")
  return {table[i]: i for i in ids}


def write_dataset_json(folder: str | os.PathLike, label_names: Mapping[int, str],
                       num_training: int, description: str = "") -> Path:
  """Writes `folder/dataset.json`, atomically and readable by all, so that the folder names its
  labels."""
  folder = Path(folder)
  description = {"channel_names": CHANNEL_NAMES, "labels": label_ids(label_names),
                 "numTraining": num_training,
                 "file_ending": FILE_ENDING, **({"description": description} if description
                                                else {})}
  write_json_atomically(folder / "dataset.json", description)
  return folder / "dataset.json"


def _identifiers(images_dir: Path, file_ending: str) -> list[str]:
  """Case names as nnU-Net derives them: files with `file_ending`, less `_XXXX` + ending."""
  if not images_dir.is_dir():
    return []
  crop = len(file_ending) + 5
  return sorted({f.name[:-crop] for f in images_dir.iterdir()
                 if f.is_file() and f.name.endswith(file_ending)})


def _spacing(image) -> np.ndarray:
  return np.asarray(image.header.get_zooms()[:image.ndim], dtype=np.float64)


def check_dataset(folder: str | os.PathLike) -> list[str]:
  """What nnU-Net would refuse in the raw dataset `folder` (empty: nothing).

  Checks: dataset.json and its required keys, imagesTr and labelsTr, every
  image named CASE_XXXX with one file per channel, numTraining = the number of cases, a
  label map per case, label ids consecutive from background 0, label maps holding only
  those ids, no NaN, and image and labels of a case on one grid (shape, spacing, affine).
  """
  folder = Path(folder)
  problems: list[str] = []
  json_path = folder / "dataset.json"
  if not json_path.is_file():
    return problems + [f"{json_path}: missing"]
  description = read_json(json_path)
  missing = [k for k in ("labels", "channel_names", "numTraining", "file_ending")
             if k not in description]
  if missing:
    return problems + [f"{json_path}: required keys {missing} missing"]
  for sub in ("imagesTr", "labelsTr"):
    if not (folder / sub).is_dir():
      problems.append(f"{folder / sub}: missing")
  if problems:
    return problems
  ending, channels = description["file_ending"], sorted(description["channel_names"])
  cases = _identifiers(folder / "imagesTr", ending)
  if len(cases) != description["numTraining"]:
    problems.append(f"{json_path}: numTraining={description['numTraining']}, but imagesTr "
                    f"holds {len(cases)} case(s)")
  labels = description["labels"]
  if labels.get("background") != 0:
    problems.append(f"{json_path}: labels must map \"background\" to 0, got {labels}")
  ids = sorted(int(v) for v in labels.values())
  if ids != list(range(len(ids))):
    problems.append(f"{json_path}: label ids {ids} are not consecutive from 0")
  channel_files = defaultdict(set)  # what nnU-Net's file lists find: CASE_XXXX + ending
  for f in (folder / "imagesTr").iterdir():
    match = re.fullmatch(rf"(.+)_(\d{{4}}){re.escape(ending)}", f.name)
    if match:
      channel_files[match[1]].add(f.name)
  for case in cases:
    files = [folder / "imagesTr" / f"{case}_{int(c):04d}{ending}" for c in channels]
    if channel_files[case] != {f.name for f in files}:
      problems.append(f"{case}: expected the channel files {[f.name for f in files]}, found "
                      f"{sorted(channel_files[case])}")
      continue
    label_path = folder / "labelsTr" / f"{case}{ending}"
    if not label_path.is_file():
      problems.append(f"{label_path}: missing (case {case} has images)")
      continue
    label = nib.load(label_path)
    label_array = np.asarray(label.dataobj)
    if np.isnan(label_array).any():
      problems.append(f"{label_path}: NaN values")
    unexpected = sorted(set(np.unique(label_array).tolist()) - set(ids))
    if unexpected:
      problems.append(f"{label_path}: label values {unexpected} not in dataset.json's {ids}")
    for image_path in files:
      image = nib.load(image_path)
      if np.isnan(np.asarray(image.dataobj, dtype=np.float32)).any():
        problems.append(f"{image_path}: NaN values")
      if image.shape != label.shape:
        problems.append(f"{case}: image shape {image.shape}, labels {label.shape}")
      elif not np.allclose(_spacing(image), _spacing(label)):
        problems.append(f"{case}: image spacing {_spacing(image)}, labels {_spacing(label)}")
      elif not np.allclose(image.affine, label.affine, atol=1e-4):
        problems.append(f"{case}: image and label affines differ")
  return problems


def cross_validation_folds(groups: Mapping[str, Sequence[str]], always_train: Sequence[str],
                           num_folds: int = 5) -> list[dict[str, list[str]]]:
  """`splits_final.json`'s folds: the `groups` (e.g. a patient's slices) dealt round-robin to
  `num_folds` folds, whole, so that no group is split between training and validation, and
  the `always_train` cases (the synthetic ones) in every fold's training set, never validated
  on.

  Raises:
    ValueError when there are fewer groups than folds.
  """
  names = sorted(groups)
  if len(names) < num_folds:
    raise ValueError(f"{len(names)} group(s) of real cases cannot fill {num_folds} "
                     "validation folds")
  folds = defaultdict(list)
  for index, name in enumerate(names):
    folds[index % num_folds].extend(groups[name])
  every = sorted(c for g in names for c in groups[g])
  return [{"train": sorted(set(every) - set(folds[k])) + sorted(always_train),
           "val": sorted(folds[k])} for k in range(num_folds)]
