"""A procedural chest CT with labels, for tests that must not touch the network.

Array axes follow the NIfTI convention with a positive diagonal affine (RAS+): axis 0 runs from
the patient's left to right, axis 1 from posterior to anterior, axis 2 (3-D only) from inferior to
superior. A 2-D phantom is the axial slice through the middle of the 3-D one.

Structures are ellipses / ellipsoids in coordinates normalised to [-1, 1] per axis, so any shape
works (anisotropic ones included) as long as it is large enough to draw every label.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from acis_jax.data.dataset import Case
from acis_jax.data.nnunet import write_dataset_json
from acis_jax.data.nifti import save_nifti

PHANTOM_LABELS = {
    0: "background", 1: "heart", 2: "aorta", 3: "left_lung", 4: "right_lung", 5: "spine"}
PHANTOM_SPACING_MM = 1.5

# HU values, roughly those of a contrast-enhanced chest CT.
_AIR, _FAT, _SOFT, _LUNG, _VESSEL, _BLOOD, _AORTA, _BONE = -1000, -100, 40, -850, 50, 200, 250, 700
_NOISE_HU = 15.0


def _inside(
    coords: list[np.ndarray], centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
  """Ellipsoid test; a radius of inf makes the shape a cylinder along that axis."""
  return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0


def chest_phantom(shape: Sequence[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Draws a chest phantom.

  Args:
    shape: (I, J) for an axial slice or (I, J, K) for a volume; I, J >= 32 voxels recommended.
    seed: seeds the numpy Generator for vessel positions and noise.

  Returns:
    hu: float32 of `shape`, Hounsfield units: air outside, body (soft tissue with a fat rim),
    lungs with a few small vessels, heart with a contrast blood pool, aorta, spine.
    labels: uint8 of `shape`, values as in PHANTOM_LABELS (vessels count as lung).

  Raises:
    ValueError if the shape is not 2-D or 3-D or too small to draw every label.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) not in (2, 3):
    raise ValueError(f"phantom shape must be 2-D or 3-D, got {shape}")
  rng = np.random.default_rng(seed)
  axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in shape]
  coords = list(np.meshgrid(*axes, indexing="ij", sparse=True))
  if len(shape) == 2:
    coords.append(np.zeros((1, 1)))  # the axial slice z = 0
  x, y, z = coords
  along_z = np.inf

  hu = np.full(shape, _AIR, dtype=np.float32)
  labels = np.zeros(shape, dtype=np.uint8)

  def paint(mask: np.ndarray, value: float, label: int | None = None) -> None:
    mask = np.broadcast_to(mask, shape)
    hu[mask] = value
    if label is not None:
      labels[mask] = label

  paint(_inside(coords, (0.0, 0.0, 0.0), (0.9, 0.7, along_z)), _FAT)
  paint(_inside(coords, (0.0, 0.0, 0.0), (0.82, 0.62, along_z)), _SOFT)
  for label, side in ((3, -1.0), (4, 1.0)):  # patient's left is -x in RAS+
    lung = np.broadcast_to(_inside(coords, (0.4 * side, 0.05, 0.1), (0.28, 0.45, 0.8)), shape)
    paint(lung, _LUNG, label)
    # Vessels: small bright spheres (discs in 2-D) centred on random lung voxels.
    for centre in np.argwhere(lung)[rng.choice(np.count_nonzero(lung), size=4)]:
      position = [a[i] for a, i in zip(axes, centre)] + [0.0] * (3 - len(shape))
      paint(_inside(coords, position, (0.04, 0.04, 0.04)) & lung, _VESSEL)
  heart = (-0.08, 0.22, -0.25)
  paint(_inside(coords, heart, (0.3, 0.26, 0.45)), _SOFT, 1)
  paint(_inside(coords, heart, (0.2, 0.17, 0.32)), _BLOOD)
  paint(_inside(coords, (-0.15, -0.3, 0.0), (0.07, 0.07, along_z)), _AORTA, 2)
  paint(_inside(coords, (0.0, -0.52, 0.0), (0.12, 0.12, along_z)), _BONE, 5)

  hu += rng.normal(0.0, _NOISE_HU, shape).astype(np.float32)
  missing = sorted(set(PHANTOM_LABELS) - set(np.unique(labels).tolist()))
  if missing:
    raise ValueError(f"phantom shape {shape} is too small to draw labels {missing}")
  return hu, labels


def phantom_case(
    tmpdir: str | os.PathLike, shape: Sequence[int], name: str = "phantom", seed: int = 0
) -> Case:
  """Writes a phantom as tmpdir/imagesTr/NAME.nii.gz (int16 HU) and tmpdir/labelsTr/NAME.nii.gz
  (uint8) with a 1.5 mm isotropic diagonal affine, and returns its Case."""
  hu, labels = chest_phantom(shape, seed=seed)
  affine = np.diag([PHANTOM_SPACING_MM] * 3 + [1.0])
  root = Path(tmpdir)
  image_path = save_nifti(
      root / "imagesTr" / f"{name}.nii.gz", np.round(hu), affine, dtype=np.int16)
  label_path = save_nifti(root / "labelsTr" / f"{name}.nii.gz", labels, affine)
  write_dataset_json(root, PHANTOM_LABELS, num_training=1)
  return Case(name=name, image_path=image_path, label_path=label_path,
              label_names=tuple(PHANTOM_LABELS.items()))
