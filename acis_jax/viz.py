"""Figures a person can read: orthogonal views in patient orientation."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

VIEW_NAMES = ("axial", "coronal", "sagittal")


def to_display(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorders a 3-D array to LAS axes; also returns the spacing in that order.

  RAS+ with x flipped, so the patient's right appears on the left of axial and
  coronal views, as radiologists read CT.
  """
  ornt = nib.orientations.io_orientation(affine)
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  ras = nib.orientations.apply_orientation(array, ornt)
  return ras[::-1], spacing[np.argsort(ornt[:, 0])]


def orthogonal_views(las: np.ndarray, spacing: np.ndarray, centre: Sequence[int]):
  """(name, 2-D image, aspect) for axial, coronal and sagittal planes through `centre`.

  `las` comes from `to_display`. Images are rows-by-columns for
  `imshow(origin="lower")`: axial has anterior up, coronal and sagittal
  superior up.
  """
  x, y, z = centre
  sx, sy, sz = spacing
  return [("axial", las[:, :, z].T, sy / sx),
          ("coronal", las[:, y, :].T, sz / sx),
          ("sagittal", las[x, :, :].T, sz / sy)]


def save_figure(fig, path: str) -> None:
  """Saves atomically: a reader never sees half a PNG."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)


def pseudomask_figure(path: str, image, edges, density, mask, seeds, affine, title: str) -> None:
  """Rows: views (one row in 2-D); columns: CT, edges, density + seeds, pseudo-mask.

  Seeds shown on a plane are those within 1.5 voxels of it.
  """
  columns = ("CT", "Canny edges", "density + seeds", "pseudo-mask")
  seeds = np.asarray(seeds)
  if image.ndim == 2:
    planes = [display_plane(np.asarray(a, np.float32), affine) for a in
              (image, edges, density, mask)]
    seed_map = to_display(_seed_volume(seeds[:, :2], image.shape)[..., None], affine)[0]
    rows = [("slice", [p for p, _ in planes], planes[0][1], np.argwhere(seed_map[:, :, 0] > 0))]
  else:
    volumes = [to_display(np.asarray(a, np.float32), affine)[0] for a in (image, edges, density, mask)]
    spacing = to_display(np.asarray(image), affine)[1]
    seed_map = to_display(_seed_volume(seeds, image.shape), affine)[0]
    # The plane through the densest part of the seed cloud shows the most detail.
    centre = [int(np.argmax(seed_map.sum(axis=tuple(a for a in range(3) if a != k))))
              for k in range(3)]
    rows = []
    for view_index, name in enumerate(VIEW_NAMES):
      planes = [orthogonal_views(v, spacing, centre)[view_index] for v in volumes]
      near = _seeds_near_plane(seed_map, view_index, centre)
      rows.append((name, [p[1] for p in planes], planes[0][2], near))
  fig, axes = plt.subplots(len(rows), 4, figsize=(13, 3.3 * len(rows)), squeeze=False)
  for row, (name, planes, aspect, row_seeds) in zip(axes, rows):
    for col, (ax, plane, label) in enumerate(zip(row, planes, columns)):
      cmap = {1: "gray_r", 2: "magma"}.get(col, "gray")
      ax.imshow(plane, cmap=cmap, origin="lower", aspect=aspect, interpolation="nearest")
      if col == 2 and len(row_seeds):
        ax.scatter(row_seeds[:, 0], row_seeds[:, 1], s=2, c="cyan", linewidths=0)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(label if name == "slice" else f"{label} ({name})", fontsize=9)
  fig.suptitle(title, fontsize=10)
  save_figure(fig, path)


def _seed_volume(seeds: np.ndarray, shape) -> np.ndarray:
  volume = np.zeros(shape, np.float32)
  volume[tuple(seeds.T)] = 1.0
  return volume


def _seeds_near_plane(seed_map: np.ndarray, view_index: int, centre) -> np.ndarray:
  """Column/row positions (imshow x, y) of seeds within 1.5 voxels of a view's plane."""
  fixed_axis = (2, 1, 0)[view_index]
  lo, hi = max(centre[fixed_axis] - 1, 0), centre[fixed_axis] + 2
  slab = np.take(seed_map, np.arange(lo, min(hi, seed_map.shape[fixed_axis])), axis=fixed_axis)
  coords = np.argwhere(slab.max(axis=fixed_axis) > 0)
  # The first remaining axis is the plane's x (columns), the second its y.
  return coords


def display_plane(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
  """The central axial plane of a 3-D array, or a 2-D axial slice (its affine's third column
  the slice normal, as `acis_jax.data.sources.axial_slice` makes it), ready for
  `imshow(origin="lower", aspect=...)` in the radiological convention (anterior up, the
  patient's right on the viewer's left); and its aspect."""
  if array.ndim == 2:
    las, spacing = to_display(array[..., None], affine)
    return las[:, :, 0].T, float(spacing[1] / spacing[0])
  las, spacing = to_display(array, affine)
  centre = [s // 2 for s in las.shape]
  _, plane, aspect = orthogonal_views(las, spacing, centre)[0]
  return plane, aspect


def contact_sheet(path: str, samples, affine, title: str) -> None:
  """One row per sample `(name, pseudo-mask or None, labels or None, image)`: central axial
  planes (no pseudo-mask column for a synthesizer without pseudo-masks)."""
  has_labels = samples and samples[0][2] is not None
  has_masks = samples and samples[0][1] is not None
  columns = (["pseudo-mask"] if has_masks else []) + (["labels"] if has_labels else []) + [
      "image"]
  # Rows as tall as the displayed planes (plus their titles): no blank bands between them.
  plane, aspect = display_plane(np.asarray(samples[0][3], np.float32), affine)
  panel_height = 3.2 * aspect * plane.shape[0] / plane.shape[1] + 0.4
  fig, axes = plt.subplots(len(samples), len(columns), figsize=(3.2 * len(columns),
                                                                 panel_height * len(samples)),
                           squeeze=False)
  for row, (name, mask, labels, image) in zip(axes, samples):
    planes = ([mask] if has_masks else []) + ([labels] if has_labels else []) + [image]
    for ax, array, label in zip(row, planes, columns):
      plane, aspect = display_plane(np.asarray(array, np.float32), affine)
      is_labels = label == "labels"
      ax.imshow(plane, cmap="tab10" if is_labels else "gray", origin="lower", aspect=aspect,
                interpolation="nearest", vmin=0, vmax=9 if is_labels else 1)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f"{name}: {label}", fontsize=9)
  # Just above the first row's titles: fixed-aspect axes shrink inside their boxes, and a
  # default suptitle would float over a blank band.
  fig.canvas.draw()
  top = max(ax.get_position().y1 for ax in axes[0])
  fig.suptitle(title, fontsize=10, y=min(1.0, top + 0.45 / fig.get_figheight()),
               va="bottom")
  save_figure(fig, path)


def preview_tiles(samples: dict[str, np.ndarray | None], affine) -> dict[str, np.ndarray]:
  """`kind -> (H, W, 3)` uint8: the central axial planes of each kind's samples side by side,
  radiological convention, rows from the top (for TensorBoard). Kinds: "pseudo-mask" and
  "image" in [0, 1], "labels" as integers (tab10 colours, as in the contact sheet)."""
  tiles = {}
  for kind, batch in samples.items():
    if batch is None:
      continue
    planes = [np.flipud(display_plane(np.asarray(x, np.float32), affine)[0]) for x in batch]
    strip = np.concatenate(planes, axis=1)
    if kind == "labels":
      rgb = plt.get_cmap("tab10")(np.clip(strip, 0, 9) / 9.0)[..., :3]
    else:
      rgb = np.repeat(np.clip(strip, 0, 1)[..., None], 3, axis=-1)
    tiles[kind] = (rgb * 255).round().astype(np.uint8)
  return tiles
