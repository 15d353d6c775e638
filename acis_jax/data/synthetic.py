"""The synthetic pairs `synthesize` writes (`acis_jax.workdir.SYNTHETIC_FOLDERS`): their names,
whether a folder holds them all, reading them back, and the label table they carry.

  SYNTHETIC/imagesTr/synth_NNNN_0000.nii.gz, SYNTHETIC/labelsTr/synth_NNNN.nii.gz
"""

from __future__ import annotations

import os

import numpy as np

from acis_jax.data.labels import full_table
from acis_jax.data.nifti import load_nifti
from acis_jax.data.nnunet import image_file, label_file
from acis_jax.data.preprocess import window_hu


def run_labels(grid: dict, num_classes: int) -> dict[int, str]:
  """The label table `train` recorded in the grid (runs from before it was recorded: class_K)."""
  return full_table({int(k): v for k, v in grid.get("labels", {}).items()}, num_classes)


def synthetic_name(index: int) -> str:
  return f"synth_{index:04d}"


def synthetic_files(folder: str, count: int, labelled: bool) -> list[tuple[str, str | None]]:
  names = [synthetic_name(i) for i in range(count)]
  return [(str(image_file(folder, name)), str(label_file(folder, name)) if labelled else None)
          for name in names]


def synthetic_complete(folder: str, count: int, labelled: bool) -> bool:
  """Whether `folder` holds the `count` pairs synth_0000.. that `synthesize` writes."""
  return all(os.path.isfile(image) and (label is None or os.path.isfile(label))
             for image, label in synthetic_files(folder, count, labelled))


def load_synthetic(folder: str, count: int, config) -> tuple[np.ndarray, np.ndarray | None]:
  """The first `count` synthetic pairs of `folder`.

  Returns:
    images `(count, *image_shape, 1)` float32 in [0, 1] (HU windowed as in training) and
    labels `(count, *image_shape)` int32, or None in label-free runs.
  """
  shape = tuple(config.data.image_shape)
  num_classes = config.data.num_classes
  images, labels = [], []
  for image_path, label_path in synthetic_files(folder, count, num_classes > 0):
    image = load_nifti(image_path).array
    if image.shape != shape:
      raise ValueError(f"{image_path}: synthetic image of shape {image.shape}, but "
                       f"data.image_shape={shape}")
    images.append(window_hu(image))
    if label_path is not None:
      label = load_nifti(label_path).array
      if label.shape != shape or label.min() < 0 or label.max() >= num_classes:
        raise ValueError(f"{label_path}: labels must have shape {shape} and lie in "
                         f"[0, {num_classes}), got shape {label.shape}, range "
                         f"[{label.min()}, {label.max()}]")
      labels.append(label.astype(np.int32))
  return np.stack(images)[..., None], (np.stack(labels) if labels else None)
