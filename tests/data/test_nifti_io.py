"""NIfTI round trips, atomic saving and the loader's errors, checked against nibabel itself."""
import errno
import gzip
import re

import nibabel as nib
import numpy as np
import pytest

from acis_jax.data.nifti import Volume, load_nifti, save_nifti


def oblique_affine(spacing=(0.8, 1.2, 2.5), angle=0.3, shift=(-90.0, 12.5, 40.0)):
  """A rotated, anisotropic, translated voxel -> mm affine."""
  c, s = np.cos(angle), np.sin(angle)
  rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
  affine = np.eye(4)
  affine[:3, :3] = rotation * np.asarray(spacing)
  affine[:3, 3] = shift
  return affine


@pytest.mark.parametrize(
    "array, stored",
    [
      (np.random.default_rng(0).normal(size=(7, 6, 5)), np.float32),
      (np.random.default_rng(1).integers(-1000, 2000, size=(7, 6, 5)), np.int16),
      (np.random.default_rng(2).integers(0, 6, size=(7, 6, 5)), np.uint8),
      (np.random.default_rng(3).integers(0, 2, size=(9, 8)).astype(bool), np.uint8),
      (np.random.default_rng(4).normal(size=(9, 8)).astype(np.float32), np.float32),
    ],
)
def test_round_trip_keeps_array_affine_spacing_dtype(tmp_path, array, stored):
  affine = oblique_affine()
  path = save_nifti(tmp_path / "sub" / "x.nii.gz", array, affine)
  volume = load_nifti(path)

  assert volume.array.dtype == stored
  assert volume.array.shape == array.shape
  np.testing.assert_allclose(volume.array, array.astype(stored), rtol=1e-6)
  np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
  header = nib.load(path).header
  np.testing.assert_allclose(volume.spacing, header.get_zooms()[: array.ndim], rtol=1e-5)
  assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
  np.testing.assert_allclose(header.get_qform(), affine, atol=1e-4)
  assert volume.path == str(path)


def test_explicit_dtype_and_values_that_do_not_fit(tmp_path):
  whole = np.array([[0.0, 3.0], [7.0, 1.0]])
  path = save_nifti(tmp_path / "x.nii", whole, np.eye(4), dtype=np.int16)
  assert load_nifti(path).array.dtype == np.int16
  with pytest.raises(ValueError, match="cannot be stored exactly"):
    save_nifti(tmp_path / "y.nii", np.array([[0.5, 300.0]]), np.eye(4), dtype=np.uint8)
  with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
    save_nifti(tmp_path / "x.png", np.zeros((2, 2)), np.eye(4))
  with pytest.raises(ValueError, match="singular"):
    save_nifti(tmp_path / "z.nii", np.zeros((2, 2)), np.diag([1.0, 1.0, 0.0, 1.0]))


def test_save_leaves_only_the_target(tmp_path):
  save_nifti(tmp_path / "a.nii.gz", np.ones((3, 3, 3)), np.eye(4))
  save_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3)), np.eye(4))  # overwrite
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]
  assert not load_nifti(tmp_path / "a.nii.gz").array.any()


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  path = save_nifti(tmp_path / "a.nii.gz", np.arange(27).reshape(3, 3, 3), np.eye(4))

  def write_half_then_fail(self, filename, **kwargs):
    with open(filename, "wb") as f:
      f.write(b"\x1f\x8b half a file")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(nib.Nifti1Image, "to_filename", write_half_then_fail)
  with pytest.raises(OSError, match=f"{path}: cannot be written \\(No space left on device\\)"):
    save_nifti(path, np.zeros((3, 3, 3)), np.eye(4))
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]
  np.testing.assert_array_equal(load_nifti(path).array, np.arange(27).reshape(3, 3, 3))


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match="nothere.nii.gz: no such file"):
    load_nifti(tmp_path / "nothere.nii.gz")


@pytest.mark.parametrize("name, content", [
    ("text.nii.gz", b"not gzip"),
    ("text.nii.gz", gzip.compress(b"x" * 400)),
    ("notes.txt", b"hello"),
], ids=["not-gzip", "gzip-not-nifti", "text"])
def test_not_nifti(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(str(path))):
    load_nifti(path)


def test_four_d_is_refused_and_trailing_singletons_are_dropped(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "four.nii.gz")
  with pytest.raises(ValueError, match=r"four\.nii\.gz: array is 4-D"):
    load_nifti(tmp_path / "four.nii.gz")

  single = nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), np.eye(4))
  nib.save(single, tmp_path / "single.nii.gz")
  assert load_nifti(tmp_path / "single.nii.gz").array.shape == (4, 5, 6)

  nib.save(nib.Nifti1Image(np.zeros((4, 5, 1), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
  assert load_nifti(tmp_path / "slice.nii.gz", allow_ndim=(2,)).array.shape == (4, 5)
  with pytest.raises(ValueError, match=r"slice\.nii\.gz: array is 3-D"):
    load_nifti(tmp_path / "slice.nii.gz", allow_ndim=(4,))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
  array = np.zeros((4, 4, 4), np.float32)
  array[1, 2, 3] = bad
  nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "nan.nii.gz")
  with pytest.raises(ValueError, match=r"nan\.nii\.gz: 1 voxels are NaN or infinite"):
    load_nifti(tmp_path / "nan.nii.gz")
  with pytest.raises(ValueError, match="NaN or infinite"):
    save_nifti(tmp_path / "out.nii.gz", array, np.eye(4))


def test_volume_spacing_is_column_norms():
  affine = oblique_affine(spacing=(0.7, 1.1, 3.0))
  assert Volume(np.zeros((2, 3, 4)), affine).spacing == pytest.approx((0.7, 1.1, 3.0))
  assert Volume(np.zeros((2, 3)), affine).spacing == pytest.approx((0.7, 1.1))
