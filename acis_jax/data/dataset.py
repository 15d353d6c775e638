"""Cases in the nnU-Net / Medical Segmentation Decathlon layout, loaded and checked.

  DATA_DIR/imagesTr/NAME.nii.gz   HU image (or NAME_0000.nii.gz, nnU-Net's channel 0; one channel)
  DATA_DIR/labelsTr/NAME.nii.gz   integer label map on the image's grid, 0 = background
  DATA_DIR/dataset.json           optional: what the label ids mean (`acis_jax.data.labels`)

Files whose names start with "." are skipped (macOS "._NAME.nii.gz" copies ship in the Decathlon
archives; our own unfinished writes are hidden files too).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

from absl import logging
import numpy as np

from acis_jax.data.labels import read_dataset_json
from acis_jax.data.nifti import Volume, as_ras, load_nifti
from acis_jax.data.preprocess import fit_labels, preprocess_case

_CHANNEL = re.compile(r"^(?P<name>.+)_(?P<channel>\d{4})$")


@dataclasses.dataclass(frozen=True)
class Case:
  """One image and (optionally) its label map; `name` is the file name without extension and
  channel suffix; `label_names`: `(id, name)` pairs, empty when the source does not say."""

  name: str
  image_path: Path
  label_path: Path | None
  label_names: tuple[tuple[int, str], ...] = ()


def _nifti_stem(path: Path) -> str | None:
  """NAME for NAME.nii.gz / NAME.nii, None for anything else."""
  for suffix in (".nii.gz", ".nii"):
    if path.name.endswith(suffix) and not path.name.startswith("."):
      return path.name[: -len(suffix)]
  return None


def _nifti_files(folder: Path) -> dict[str, Path]:
  files: dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    stem = _nifti_stem(path)
    if stem is None or not path.is_file():
      continue
    if stem in files:
      raise ValueError(f"{folder}: both {files[stem].name} and {path.name} exist")
    files[stem] = path
  return files


def find_cases(data_dir: str | os.PathLike, *, require_labels: bool = True) -> list[Case]:
  """Lists the cases under data_dir (layout in the module docstring), sorted by name.

  Raises:
    ValueError for a missing data_dir or imagesTr, an imagesTr without NIfTI files, a
    multi-channel case, or (require_labels=True) an image without labelsTr/NAME.nii(.gz).
  """
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise ValueError(f"{data_dir}: data folder does not exist")
  images_dir, labels_dir = data_dir / "imagesTr", data_dir / "labelsTr"
  if not images_dir.is_dir():
    raise ValueError(
        f"{data_dir}: no imagesTr folder (expected the nnU-Net layout imagesTr/, labelsTr/)")
  images = _nifti_files(images_dir)
  if not images:
    raise ValueError(f"{images_dir}: no .nii or .nii.gz images")
  labels = _nifti_files(labels_dir) if labels_dir.is_dir() else {}

  by_name: dict[str, Path] = {}
  for stem, path in images.items():
    match = _CHANNEL.match(stem)
    # NAME_0000 is channel 0 of NAME unless a label is named after the full stem (a case
    # whose own name ends in four digits).
    if match and stem not in labels:
      if match["channel"] != "0000":
        raise ValueError(
            f"{path}: channel {match['channel']} found; only single-channel images are supported")
      stem = match["name"]
    if stem in by_name:
      raise ValueError(
          f"{images_dir}: two images for case {stem}: {by_name[stem].name} and {path.name}")
    by_name[stem] = path

  table = read_dataset_json(data_dir) or {}
  cases = []
  for name, image_path in sorted(by_name.items()):
    label_path = labels.get(name)
    if label_path is None and require_labels:
      raise ValueError(f"{image_path}: no label map; expected {labels_dir / (name + '.nii.gz')}")
    cases.append(Case(name=name, image_path=image_path, label_path=label_path,
                      label_names=tuple(sorted(table.items()))))
  for name in sorted(set(labels) - set(by_name)):
    logging.warning("%s: a label map with no image (expected %s); it is not used",
                    labels[name], images_dir / f"{name}.nii.gz")
  return cases


def check_label_map(label: Volume, *, require_foreground: bool = True) -> Volume:
  """The label map in the smallest of uint8 / uint16 / int32 that holds it.

  Raises:
    ValueError naming the file for non-numeric, non-integer or negative values, or (with
    require_foreground) a map that is all background.
  """
  array = label.array
  if array.dtype.kind not in "biuf":
    raise ValueError(f"{label.path}: label map has dtype {array.dtype}")
  if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
    raise ValueError(f"{label.path}: label map has non-integer values")
  if array.size and array.min() < 0:
    raise ValueError(f"{label.path}: label map has negative values")
  if require_foreground and not array.any():
    raise ValueError(f"{label.path}: label map is empty (all background)")
  top = int(array.max()) if array.size else 0
  dtype = next(t for t in (np.uint8, np.uint16, np.int32) if top <= np.iinfo(t).max)
  return Volume(array.astype(dtype), label.affine, label.path)


def warn_if_not_ct(image: Volume) -> None:
  """Warns about an image that loads but is almost certainly not a CT in HU: constant, all
  air, 8-bit, no negative values (stored values without the rescale to HU?) or a range of a
  few units (already normalised?). Training goes on: the user decides."""
  array = image.array
  name = image.path or "image"
  low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
  if low == high:
    logging.warning("%s: the image is constant (%g everywhere)", name, low)
  elif array.dtype in (np.int8, np.uint8):
    logging.warning("%s: %s values in [%g, %g]: CT in HU needs at least int16 (air -1000, "
                    "bone > 1000); is this a CT in HU?", name, array.dtype, low, high)
  elif high - low < 50:
    logging.warning("%s: values span only [%g, %g]; CT in HU spans about -1000 (air) to "
                    "> 1000 (bone): already normalised?", name, low, high)
  elif low >= 0:
    logging.warning("%s: no negative values (range [%g, %g]); CT in HU has air at -1000: "
                    "stored values without the rescale to HU (often HU = value - 1024)?",
                    name, low, high)
  elif np.mean(array > -900) < 0.001:
    logging.warning("%s: all air (fewer than 0.1%% of voxels above -900 HU)", name)


def load_case(
    case: Case, shape: Sequence[int] | None, *, require_labels: bool = True
) -> tuple[Volume, Volume | None]:
  """Loads a case, checks it and preprocesses it (window to [0, 1], resize to `shape`).

  Returns:
    image: float32 in [0, 1] on the resized grid (affine updated, field of view kept).
    label: unsigned integer labels on the same grid, or None when the case has none.

  Raises:
    ValueError naming the file for unreadable or bad volumes (see load_nifti), a missing label
    map when require_labels, a non-integer, negative or all-background label map, image and
    label on different grids, or a `shape` whose rank differs from the image's.
  """
  image = load_nifti(case.image_path)
  warn_if_not_ct(image)
  label = None
  if case.label_path is not None:
    label = check_label_map(load_nifti(case.label_path), require_foreground=require_labels)
  elif require_labels:
    raise ValueError(f"{case.image_path}: case {case.name} has no label map")
  if shape is not None and len(shape) != image.array.ndim:
    raise ValueError(
        f"{case.image_path}: image is {image.array.ndim}-D, cannot resize to {tuple(shape)}")
  return preprocess_case(image, label, shape)


def load_label_maps(folder: str | os.PathLike, shape: tuple[int, ...], num_classes: int,
                    spacing: Sequence[float] = ()) -> tuple[list[str], np.ndarray]:
  """The label maps of a folder (an nnU-Net `labelsTr`: NAME.nii.gz), as the run's examples
  are made (RAS+ axes, nearest neighbour onto the grid of `shape` and `spacing`, see
  `preprocess.fit_labels`): `(names, int32 (n, *shape))`.

  Raises:
    ValueError, before anything is made, naming the folder or the file: a missing folder or
    one without NIfTI files, a map of another dimension than the run's, one that is empty or
    not integer, or labels at or above `num_classes`.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise ValueError(f"{folder}: label folder does not exist (synthesize.labels_dir)")
  files = _nifti_files(folder)
  if not files:
    raise ValueError(f"{folder}: no .nii or .nii.gz label maps")
  names, maps = [], []
  for name, path in files.items():
    label = check_label_map(load_nifti(path))
    if label.array.ndim != len(shape):
      raise ValueError(f"{path}: a {label.array.ndim}-D label map for a {len(shape)}-D run "
                       f"(data.image_shape={tuple(shape)})")
    if int(label.array.max()) >= num_classes:
      raise ValueError(f"{path}: labels go up to {int(label.array.max())} but the run has "
                       f"data.num_classes={num_classes} (with the background)")
    names.append(name)
    maps.append(fit_labels(as_ras(label), shape, spacing).array.astype(np.int32))
  return names, np.stack(maps)
