"""Where a run's images come from: an nnU-Net folder, the sample CTs or the phantom.

`load_examples(config.data)` returns preprocessed examples (HU window to [0, 1],
resized to `image_shape`, geometry in the affine). A 2-D `image_shape` takes
axial slices of each volume; a 3-D one takes whole volumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from acis_jax.data.dataset import Case, check_label_map, find_cases, warn_if_not_ct
from acis_jax.data.labels import full_table, select_classes
from acis_jax.data.nifti import Volume, as_ras, axial_axis, load_nifti
from acis_jax.data.phantom import PHANTOM_LABELS, PHANTOM_SPACING_MM, chest_phantom
from acis_jax.data.preprocess import check_same_grid, preprocess_case
from acis_jax.data.sample import sample_abdomen_ct, sample_chest_ct, sample_lobes_ct

BUILT_IN = {"chest": sample_chest_ct, "lobes": sample_lobes_ct, "abdomen": sample_abdomen_ct}


@dataclasses.dataclass(frozen=True)
class Example:
  """One preprocessed case: image in [0, 1], integer labels or None."""

  name: str
  image: Volume
  label: Volume | None


def cases_digest(names: tuple[str, ...], images: np.ndarray, labels: np.ndarray | None) -> str:
  """sha1 of stacked cases (names, images, labels): what a run trained or was tested on."""
  sha = hashlib.sha1("\n".join(names).encode())
  sha.update(np.ascontiguousarray(images).tobytes())
  if labels is not None:
    sha.update(np.ascontiguousarray(labels).tobytes())
  return sha.hexdigest()


def axial_slice(volume: Volume, index: int) -> Volume:
  """The 2-D axial slice `index` of a 3-D volume, with an affine that places it.

  The 2-D array keeps the in-plane axes in their order; the affine's columns
  are those axes, then the slice normal, and its origin moves to the slice.
  """
  axis = axial_axis(volume.affine)
  in_plane = [a for a in range(3) if a != axis]
  affine = np.eye(4)
  affine[:3, :3] = volume.affine[:3, in_plane + [axis]]
  affine[:3, 3] = volume.affine[:3, axis] * index + volume.affine[:3, 3]
  array = np.take(volume.array, index, axis=axis)
  return Volume(array=array, affine=affine, path=volume.path)


def slice_indices(depth: int, num_slices: int, band: tuple[float, float]) -> list[int]:
  """`num_slices` evenly spaced indices inside the fraction `band` of `depth`."""
  low, high = band
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"slice band must satisfy 0 <= low <= high <= 1, got {band}")
  positions = np.linspace(low * (depth - 1), high * (depth - 1), num_slices + 2)[1:-1]
  return sorted({int(round(p)) for p in positions})


def _source_cases(data: Any) -> list[Case]:
  """The cases `data` names: an nnU-Net folder, a built-in sample or the phantom."""
  if data.data_dir:
    return find_cases(data.data_dir, require_labels=data.require_labels)
  if not data.sample:
    raise ValueError("no data: data.data_dir and data.sample are both empty; pass "
                     "--config.data.data_dir=DIR (an nnU-Net folder) or choose a data.sample "
                     f"from {sorted(BUILT_IN) + ['phantom']}")
  names = data.sample.split(",")
  unknown = [n for n in names if n not in BUILT_IN]
  if unknown:
    raise ValueError(f"data.sample={data.sample!r}: unknown {unknown}; one of "
                     f"{sorted(BUILT_IN) + ['phantom']}, or several of {sorted(BUILT_IN)} "
                     "joined by commas")
  return [BUILT_IN[n]() for n in names]


def _chosen_classes(label: Volume, table: dict[int, str], data: Any) -> Volume:
  """The label map with `data.classes` as 1, 2, ... (as it is when no classes are given)."""
  classes = tuple(data.classes)
  if not classes:
    return label
  if not table:
    raise ValueError(f"{label.path}: data.classes={classes} picks classes by name, but this "
                     "dataset does not name its labels (add a dataset.json with a \"labels\" "
                     "entry to its folder)")
  return Volume(select_classes(label.array, table, classes, label.path or "labels"),
                label.affine, label.path)


def _raw_cases(data: Any) -> list[tuple[str, Volume, Volume | None]]:
  """Unprocessed (name, HU image, labels) triples in RAS+ axes, grids checked, classes
  chosen."""
  if data.classes and data.num_classes != len(data.classes) + 1:
    raise ValueError(f"data.classes names {len(data.classes)} classes, so data.num_classes "
                     f"must be {len(data.classes) + 1} (with the background), not "
                     f"{data.num_classes}")
  if data.sample == "phantom" and not data.data_dir:
    hu, labels = chest_phantom(tuple(data.image_shape), seed=data.phantom_seed)
    affine = np.diag([PHANTOM_SPACING_MM] * 3 + [1.0])
    return [("phantom", Volume(hu, affine),
             _chosen_classes(Volume(labels, affine, "phantom"), PHANTOM_LABELS, data))]
  cases = _source_cases(data)
  if data.max_cases:
    cases = cases[:data.max_cases]
  triples = []
  for case in cases:
    image = load_nifti(case.image_path)
    warn_if_not_ct(image)
    label = None
    if case.label_path:
      label = check_label_map(load_nifti(case.label_path), require_foreground=data.require_labels)
      check_same_grid(image, label)
      label = as_ras(_chosen_classes(label, dict(case.label_names), data))
    triples.append((case.name, as_ras(image), label))
  return triples


def label_table(data: Any) -> dict[int, str]:
  """What the run's label ids mean, `{0: "background", 1: ..., num_classes - 1: ...}` (empty
  for a label-free run): `data.classes` when given, else the first case's table; an id that
  no table names is called `class_K`."""
  if not data.num_classes:
    return {}
  if data.classes:
    named = dict(enumerate(data.classes, 1))
  elif data.sample == "phantom" and not data.data_dir:
    named = PHANTOM_LABELS
  else:
    named = dict(_source_cases(data)[0].label_names)
  return full_table(named, data.num_classes)


def slice_name(volume: str, index: int) -> str:
  """The name of axial slice `index` of case `volume` in a 2-D run."""
  return f"{volume}_z{index:03d}"


def parse_slice_name(name: str) -> tuple[str, int] | None:
  """(volume, index) of a name `slice_name` made, None for any other name."""
  volume, _, index = name.rpartition("_z")
  return (volume, int(index)) if volume and index.isdigit() else None


def load_examples(data: Any) -> list[Example]:
  """Loads and preprocesses the examples that `data` (a config section) names.

  Fields: `data_dir` (an nnU-Net folder; empty for a built-in sample),
  `sample` ("chest", "lobes", "abdomen", several joined by commas, or "phantom"), `classes`
  (label names to keep, in order; () = as stored), `image_shape` (2 or 3 ints),
  `spacing_mm` (voxel size of the training grid; () = each volume's field of view resized),
  `require_labels`, `max_cases` (0 = all), and for 2-D runs `num_slices` and
  `slice_band` (fractions of the axial extent to take slices from).
  """
  shape = tuple(data.image_shape)
  if len(shape) not in (2, 3):
    raise ValueError(f"data.image_shape must have 2 or 3 entries, got {shape}")
  examples = []
  for name, image, label in _raw_cases(data):
    if image.array.ndim == len(shape):
      pairs = [(name, image, label)]
    elif image.array.ndim == 3 and len(shape) == 2:
      depth = image.array.shape[axial_axis(image.affine)]
      pairs = [(slice_name(name, index), axial_slice(image, index),
                None if label is None else axial_slice(label, index))
               for index in slice_indices(depth, data.num_slices, tuple(data.slice_band))]
    else:
      raise ValueError(f"{image.path or name}: a {image.array.ndim}-D image cannot feed a "
                       f"{len(shape)}-D run (data.image_shape={shape})")
    for example_name, slice_image, slice_label in pairs:
      image_out, label_out = preprocess_case(slice_image, slice_label, shape,
                                             tuple(data.spacing_mm))
      examples.append(Example(example_name, image_out, label_out))
  return examples
