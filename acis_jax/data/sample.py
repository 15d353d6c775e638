"""Real CT sample data with no manual setup.

Two CT volumes ship inside the source distribution of `totalsegmentator==2.18.0` on PyPI (pinned
by sha256). On first use the sdist is fetched with `pip download` into a user cache
(`cache_dir` argument, else $ACIS_JAX_CACHE, else $XDG_CACHE_HOME/acis_jax or ~/.cache/acis_jax),
the members we need are read from it in memory and written as NIfTI in the nnU-Net layout:

  CACHE/downloads/totalsegmentator-2.18.0.tar.gz
  CACHE/sample/{imagesTr,labelsTr}/chest_ct.nii.gz              sample_chest_ct()
  CACHE/sample_abdomen/{imagesTr,labelsTr}/abdomen_ct.nii.gz    sample_abdomen_ct()

Later calls only check that the files exist.

Chest labels (SAMPLE_LABELS): heart and aorta come from TotalSegmentator's reference outputs;
the LUNGS ARE DERIVED HERE BY THRESHOLDING AND CONNECTED COMPONENTS, NOT ANNOTATED (see
`derive_lungs`). Heart and aorta take precedence over lung where they overlap.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

from acis_jax.data.dataset import Case
from acis_jax.data.nifti import Volume, axial_axis, save_nifti
from acis_jax.data.preprocess import check_same_grid, resample_to

SDIST_REQUIREMENT = "totalsegmentator==2.18.0"
SDIST_FILE = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
SDIST_URL = "https://pypi.org/project/totalsegmentator/2.18.0/#files"

_MEMBERS = "totalsegmentator-2.18.0/tests/reference_files/"
CHEST_CT_MEMBER = _MEMBERS + "aorta_report/example_ct.nii.gz"  # 233x167x191, 1.5 mm, int16 HU
CHEST_HEART_MEMBER = _MEMBERS + "pulmonary_report/models/heart.nii.gz"  # on the CT grid
CHEST_AORTA_MEMBER = _MEMBERS + "aorta_report/test_result/models/aorta.nii.gz"  # on a crop
ABDOMEN_CT_MEMBER = _MEMBERS + "example_ct.nii.gz"  # 122x101x112, 3 mm
ABDOMEN_LABELS_MEMBER = _MEMBERS + "example_seg_fast_force_split.nii.gz"  # TotalSegmentator classes

# Labels of the chest sample. Heart and aorta are TotalSegmentator's; the lungs are derived here.
SAMPLE_LABELS = {0: "background", 1: "heart", 2: "aorta", 3: "left lung", 4: "right lung"}

# Lung derivation: thresholds in HU, and the size ratio at which the two largest eroded air
# components count as two lungs.
_BODY_HU = -500.0
_AIR_HU = -400.0
_SECOND_LUNG_FRACTION = 0.25
_MAX_EROSIONS = 10


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
  """The cache folder: cache_dir, else $ACIS_JAX_CACHE, else $XDG_CACHE_HOME/acis_jax
  (~/.cache/acis_jax when XDG_CACHE_HOME is unset)."""
  if cache_dir is not None:
    return Path(cache_dir).expanduser()
  if os.environ.get("ACIS_JAX_CACHE"):
    return Path(os.environ["ACIS_JAX_CACHE"]).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "acis_jax"


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _verify(path: Path) -> Path:
  """Returns path if its sha256 is the pinned one; otherwise deletes it and raises ValueError."""
  found = _sha256(path)
  if found != SDIST_SHA256:
    path.unlink()
    raise ValueError(
        f"{path}: sha256 {found} does not match the pinned {SDIST_SHA256}; the file was deleted, "
        "call again to download it again"
    )
  return path


def fetch_sdist(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path of the verified totalsegmentator sdist in the cache, downloading it with pip if needed.

  Raises:
    RuntimeError if pip cannot download it (with pip's message and how to fix it).
    ValueError if the file's sha256 is not the pinned one (the file is deleted).
  """
  target = cache_root(cache_dir) / "downloads" / SDIST_FILE
  if target.is_file():
    return _verify(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  # Download into a temporary folder next to the target so the final rename is atomic.
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SDIST_REQUIREMENT, "-d", tmp]
    try:
      result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
      failure = (None if result.returncode == 0
                 else f"exit code {result.returncode}:\n{result.stderr[-2000:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
      failure = f"{type(e).__name__}: {e}"
    downloaded = Path(tmp) / SDIST_FILE
    if failure is None and not downloaded.is_file():
      failure = f"pip reported success but {SDIST_FILE} is not in {tmp}"
    if failure is not None:
      raise RuntimeError(
          f"Could not fetch the sample CT data: `{' '.join(command)}` failed ({failure})\n"
          "Check the network connection and proxy settings (pip honours HTTPS_PROXY and pip.conf) "
          f"and that pip works for {sys.executable}; or download {SDIST_FILE} by hand from "
          f"{SDIST_URL} and put it at {target}."
      )
    _verify(downloaded)
    os.replace(downloaded, target)
  return target


def read_members(sdist: str | os.PathLike, members: list[str]) -> dict[str, Volume]:
  """Reads NIfTI members of the sdist into memory (nothing is extracted to disk, so member paths
  never touch the file system). Volume.path is "SDIST:MEMBER"."""
  found: dict[str, Volume] = {}
  with tarfile.open(sdist, "r:gz") as archive:
    for info in archive:
      if info.name in members and info.isfile() and info.name not in found:
        image = nib.Nifti1Image.from_bytes(gzip.decompress(archive.extractfile(info).read()))
        found[info.name] = Volume(
            np.asanyarray(image.dataobj), image.affine, path=f"{sdist}:{info.name}")
  missing = [m for m in members if m not in found]
  if missing:
    raise ValueError(f"{sdist}: members {missing} not found")
  return found


def _largest_components(mask: np.ndarray, count: int) -> list[np.ndarray]:
  """The `count` largest face-connected components of mask, largest first (fewer if fewer)."""
  components, n = ndi.label(mask)
  sizes = np.bincount(components.ravel())[1:]
  return [components == i + 1 for i in np.argsort(sizes)[::-1][: min(count, n)]]


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
  """Fills holes in every 2-D slice of mask perpendicular to `axis`."""
  filled = [ndi.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)]
  return np.moveaxis(np.stack(filled), 0, axis)


def derive_lungs(ct: Volume) -> tuple[np.ndarray, np.ndarray]:
  """Left and right lung masks of a chest CT, DERIVED BY THRESHOLDING (not annotated).

  1. body: largest connected component of > -500 HU, holes filled in each axial slice (so the
     lungs and airways count as inside; air outside the patient does not).
  2. air inside the body: < -400 HU. The lungs are joined through the airways, so the air is
     eroded (k = 0, 1, ... face-connected steps) until its two largest components are both
     substantial (the smaller at least a quarter of the larger): these are the two lung seeds.
  3. each air voxel within k voxels of a seed goes to the nearest seed; this rebuilds the lungs
     without the trachea, which lies further from them.
  4. vessels inside each lung are filled in by a small closing and per-slice hole filling.
  5. the lung whose centre has the smaller world x (RAS+) is the patient's left.

  Args:
    ct: 3-D chest CT in HU with its affine.

  Returns:
    (left, right): boolean arrays of ct's shape.
  """
  if ct.array.ndim != 3:
    raise ValueError(f"{ct.path}: lungs are derived from a 3-D CT, got shape {ct.array.shape}")
  hu = ct.array
  axial = axial_axis(ct.affine)
  (body,) = _largest_components(hu > _BODY_HU, 1)
  body = _fill_slices(body, axial)
  air = (hu < _AIR_HU) & body

  seeds, eroded = None, air
  for erosions in range(_MAX_EROSIONS + 1):
    largest = _largest_components(eroded, 2)
    if len(largest) == 2 and largest[1].sum() >= _SECOND_LUNG_FRACTION * largest[0].sum():
      seeds = largest
      break
    eroded = ndi.binary_erosion(eroded)
  if seeds is None:
    raise RuntimeError(f"{ct.path}: could not separate two lungs after {_MAX_EROSIONS} erosions")

  seed_label = np.zeros(hu.shape, dtype=np.uint8)
  seed_label[seeds[0]], seed_label[seeds[1]] = 1, 2
  distance, nearest = ndi.distance_transform_edt(seed_label == 0, return_indices=True)
  owner = seed_label[tuple(nearest)]
  near_air = air & (distance <= erosions)

  ball = ndi.generate_binary_structure(3, 1)
  lungs = []
  for which in (1, 2):
    lung = ndi.binary_closing(near_air & (owner == which), structure=ball, iterations=2)
    lungs.append(_fill_slices(lung, axial) & body)
  lungs[1] &= ~lungs[0]

  world_x = [ct.affine[0, :3] @ np.argwhere(s).mean(axis=0) for s in seeds]
  left, right = (lungs[0], lungs[1]) if world_x[0] < world_x[1] else (lungs[1], lungs[0])
  return left, right


def _cached_case(root: Path, name: str, build) -> Case:
  """The Case NAME at root in nnU-Net layout; build() -> (image, labels) Volumes runs only when
  a file is missing."""
  case = Case(name=name, image_path=root / "imagesTr" / f"{name}.nii.gz",
              label_path=root / "labelsTr" / f"{name}.nii.gz")
  if not (case.image_path.is_file() and case.label_path.is_file()):
    image, labels = build()
    save_nifti(case.label_path, labels.array, labels.affine)
    save_nifti(case.image_path, image.array, image.affine)
  return case


def sample_chest_ct(cache_dir: str | os.PathLike | None = None) -> Case:
  """A contrast chest CT, 233x167x191 voxels at 1.5 mm (int16 HU), with labels SAMPLE_LABELS
  (heart, aorta from TotalSegmentator's reference outputs; lungs derived, see `derive_lungs`).

  Files: CACHE/sample/imagesTr/chest_ct.nii.gz and CACHE/sample/labelsTr/chest_ct.nii.gz, so
  `find_cases(CACHE / "sample")` finds it. Fetches the sdist on first use (module docstring).
  """
  root = cache_root(cache_dir)

  def build() -> tuple[Volume, Volume]:
    members = [CHEST_CT_MEMBER, CHEST_HEART_MEMBER, CHEST_AORTA_MEMBER]
    volumes = read_members(fetch_sdist(root), members)
    ct, heart = volumes[CHEST_CT_MEMBER], volumes[CHEST_HEART_MEMBER]
    check_same_grid(ct, heart)
    # The aorta mask covers a crop: map it onto the CT grid through world coordinates.
    aorta = resample_to(volumes[CHEST_AORTA_MEMBER], ct.array.shape, ct.affine, order=0,
                        mode="constant")
    left, right = derive_lungs(ct)
    labels = np.zeros(ct.array.shape, dtype=np.uint8)
    labels[left], labels[right] = 3, 4
    labels[heart.array > 0] = 1
    labels[aorta.array > 0] = 2
    return ct, Volume(labels, ct.affine)

  return _cached_case(root / "sample", "chest_ct", build)


def sample_abdomen_ct(cache_dir: str | os.PathLike | None = None) -> Case:
  """An abdomen CT, 122x101x112 voxels at 3 mm (HU), with TotalSegmentator's multi-class
  segmentation on its grid, labels kept as they are (TotalSegmentator's class ids).

  Files: CACHE/sample_abdomen/{imagesTr,labelsTr}/abdomen_ct.nii.gz.
  """
  root = cache_root(cache_dir)

  def build() -> tuple[Volume, Volume]:
    volumes = read_members(fetch_sdist(root), [ABDOMEN_CT_MEMBER, ABDOMEN_LABELS_MEMBER])
    ct, labels = volumes[ABDOMEN_CT_MEMBER], volumes[ABDOMEN_LABELS_MEMBER]
    check_same_grid(ct, labels)
    return ct, labels

  return _cached_case(root / "sample_abdomen", "abdomen_ct", build)
