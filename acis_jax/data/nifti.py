"""NIfTI volumes with their geometry: loading, checking and atomic saving.

Arrays keep nibabel's voxel axis order (i, j, k): array axis a is column a of the affine,
which maps voxel indices to world millimetres (RAS+). A 2-D array is an (i, j) slice whose
affine is still 4x4; its third column gives the slice normal and thickness.
"""
from __future__ import annotations

import dataclasses
import os
import uuid
import zlib
from pathlib import Path
from typing import Sequence

from absl import logging
import nibabel as nib
import numpy as np
import numpy.typing as npt

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """An image or label array on a grid in world space.

  Attributes:
    array: (I, J) or (I, J, K) voxel values (HU, [0, 1] intensities or integer labels).
    affine: (4, 4) voxel index -> world mm (RAS+).
    path: the file the array came from; kept through preprocessing so errors can name it.
  """

  array: np.ndarray
  affine: np.ndarray
  path: str | None = None

  def __post_init__(self):
    affine = np.asarray(self.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
      raise ValueError(f"{self._name()}: affine must be a finite 4x4 matrix, got {affine!r}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
      raise ValueError(f"{self._name()}: affine is singular:\n{affine}")
    object.__setattr__(self, "affine", affine)

  def _name(self) -> str:
    return self.path or "volume"

  @property
  def spacing(self) -> tuple[float, ...]:
    """Voxel size in mm along each array axis (norms of the affine's columns)."""
    norms = np.linalg.norm(self.affine[:3, :3], axis=0)
    return tuple(float(s) for s in norms[: self.array.ndim])


def axial_axis(affine: np.ndarray) -> int:
  """The array axis that runs closest to the world's superior-inferior (z) axis."""
  return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def as_ras(volume: Volume) -> Volume:
  """The 3-D volume with its array axes reordered and flipped to run along world R, A, S
  (nibabel's closest canonical), the affine changed to match: the same voxels in the same
  places, so that index-based choices (slice bands, crops) pick the same anatomy however a
  file stores its axes. 2-D volumes are returned as they are."""
  if volume.array.ndim != 3:
    return volume
  ornt = nib.orientations.io_orientation(volume.affine)
  array = nib.orientations.apply_orientation(volume.array, ornt)
  affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.array.shape)
  return Volume(np.ascontiguousarray(array), affine, volume.path)


def _check_nifti_name(path: Path) -> None:
  if not path.name.endswith(_NIFTI_SUFFIXES):
    raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")


def load_nifti(path: str | os.PathLike, *, allow_ndim: Sequence[int] = (2, 3)) -> Volume:
  """Reads a NIfTI file into a Volume.

  The array has the file's stored dtype (float if the header scales the values). Trailing
  singleton axes beyond max(allow_ndim) are dropped, so an (I, J, K, 1) file reads as 3-D and,
  with allow_ndim=(2,), an (I, J, 1) file as 2-D.

  Raises:
    ValueError naming the file if it is missing, unreadable or not NIfTI, if its rank is not in
    allow_ndim, or if it holds NaN or infinite voxels.
  """
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"{path}: no such file")
  try:
    image = nib.load(path, mmap=False)  # no open map, so the file can be replaced after loading
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
      raise ValueError(f"{path}: not a NIfTI file (nibabel read it as {type(image).__name__})")
    array = np.asanyarray(image.dataobj)
  except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
  if not (int(image.header["qform_code"]) or int(image.header["sform_code"])):
    logging.warning("%s: neither qform nor sform is set, so the file does not say where its "
                    "voxels are; nibabel's stand-in (voxel sizes, no orientation or origin) is "
                    "used, and every file written from it carries that geometry", path)
  while array.ndim > max(allow_ndim) and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in allow_ndim:
    allowed = " or ".join(f"{n}-D" for n in allow_ndim)
    raise ValueError(
        f"{path}: array is {array.ndim}-D with shape {array.shape}; expected {allowed}")
  if array.dtype.kind == "f":
    bad = np.count_nonzero(~np.isfinite(array))
    if bad:
      raise ValueError(f"{path}: {bad} voxels are NaN or infinite")
  return Volume(array=np.asarray(array), affine=image.affine, path=str(path))


def _storage_dtype(array: np.ndarray) -> np.dtype:
  """float32 for floats; the smallest of uint8 / int16 / int32 that holds integers and bools."""
  if array.dtype.kind == "f":
    return np.dtype(np.float32)
  if array.dtype.kind not in "biu":
    raise ValueError(f"cannot save an array of dtype {array.dtype} as NIfTI")
  low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
  for candidate in (np.uint8, np.int16, np.int32):
    info = np.iinfo(candidate)
    if info.min <= low and high <= info.max:
      return np.dtype(candidate)
  raise ValueError(f"integer values in [{low}, {high}] do not fit int32")


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: npt.DTypeLike | None = None,
) -> Path:
  """Writes array with its (4, 4) voxel -> mm affine as NIfTI-1, atomically.

  The file is written under a hidden temporary name in the target folder and renamed over
  `path`, so readers never see a half-written file and a failed write leaves any previous file
  intact. Parent folders are created. qform and sform both hold the affine with code 1 (scanner)
  and units are mm. Without `dtype`, floats are stored as float32 and bools / integers in the
  smallest of uint8, int16, int32 that holds them.

  Returns:
    The path written.
  """
  path = Path(path)
  _check_nifti_name(path)
  array = np.asarray(array)
  volume = Volume(array=array, affine=affine, path=str(path))  # checks the affine
  if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
    raise ValueError(f"{path}: refusing to save NaN or infinite values")
  target = np.dtype(dtype) if dtype is not None else _storage_dtype(array)
  stored = array.astype(target)
  if target.kind in "iu" and not np.array_equal(stored, array):
    raise ValueError(
        f"{path}: values in [{array.min()}, {array.max()}] cannot be stored exactly as {target}")
  image = nib.Nifti1Image(stored, volume.affine)
  image.set_qform(volume.affine, code=1)
  image.set_sform(volume.affine, code=1)
  image.header.set_xyzt_units("mm")

  path.parent.mkdir(parents=True, exist_ok=True)
  suffix = next(s for s in _NIFTI_SUFFIXES if path.name.endswith(s))
  temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}"
  try:
    image.to_filename(temporary)
    with open(temporary, "rb") as f:
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as error:  # named by the file meant, not the temporary one
    raise OSError(error.errno, f"{path}: cannot be written ({error.strerror})") from error
  finally:
    temporary.unlink(missing_ok=True)
  return path
