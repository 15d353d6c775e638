"""find_cases on nnU-Net / Decathlon layouts and load_case's checks."""
import re

import numpy as np
import pytest

from acis_jax.data.dataset import Case, check_label_map, find_cases, load_case
from acis_jax.data.nifti import Volume
from acis_jax.data.nifti import save_nifti
from acis_jax.data.phantom import PHANTOM_LABELS, phantom_case

AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def write(path, array=None, affine=AFFINE):
  return save_nifti(path, np.ones((4, 4, 4), np.int16) if array is None else array, affine)


def test_find_cases_on_a_mixed_layout(tmp_path):
  write(tmp_path / "imagesTr" / "lung_002.nii.gz")  # Decathlon naming
  write(tmp_path / "imagesTr" / "lung_001_0000.nii.gz")  # nnU-Net channel 0
  write(tmp_path / "imagesTr" / "scan_1234.nii")  # a name that ends in four digits
  (tmp_path / "imagesTr" / "._lung_003.nii.gz").write_bytes(b"macOS metadata")
  (tmp_path / "imagesTr" / "README.txt").write_text("not an image")
  for name in ("lung_001", "lung_002", "scan_1234"):
    write(tmp_path / "labelsTr" / f"{name}.nii.gz")

  cases = find_cases(tmp_path)
  assert [c.name for c in cases] == ["lung_001", "lung_002", "scan_1234"]
  assert cases[0] == Case("lung_001", tmp_path / "imagesTr" / "lung_001_0000.nii.gz",
                          tmp_path / "labelsTr" / "lung_001.nii.gz")
  assert cases[2].image_path.name == "scan_1234.nii"


def test_find_cases_errors(tmp_path):
  with pytest.raises(ValueError, match="data folder does not exist"):
    find_cases(tmp_path / "missing")
  with pytest.raises(ValueError, match="no imagesTr folder"):
    find_cases(tmp_path)
  (tmp_path / "imagesTr").mkdir()
  with pytest.raises(ValueError, match="no .nii or .nii.gz images"):
    find_cases(tmp_path)

  image = write(tmp_path / "imagesTr" / "case_a.nii.gz")
  with pytest.raises(ValueError, match=re.escape(str(image)) + ".*no label map"):
    find_cases(tmp_path)
  assert find_cases(tmp_path, require_labels=False) == [Case("case_a", image, None)]

  write(tmp_path / "imagesTr" / "case_b_0000.nii.gz")
  write(tmp_path / "imagesTr" / "case_b_0001.nii.gz")
  with pytest.raises(ValueError, match=r"case_b_0001\.nii\.gz: channel 0001"):
    find_cases(tmp_path, require_labels=False)


def test_find_cases_rejects_two_images_for_one_case(tmp_path):
  write(tmp_path / "imagesTr" / "x.nii.gz")
  write(tmp_path / "imagesTr" / "x_0000.nii.gz")
  with pytest.raises(ValueError, match="two images for case x"):
    find_cases(tmp_path, require_labels=False)


@pytest.mark.parametrize("shape, new_shape", [((64, 64), (32, 32)), ((48, 48, 40), (32, 32, 24))])
def test_load_phantom_case(tmp_path, shape, new_shape):
  written = phantom_case(tmp_path, shape, name="chest")
  (case,) = find_cases(tmp_path)
  assert case == written
  image, label = load_case(case, new_shape)
  assert image.array.shape == label.array.shape == new_shape
  assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
  assert 0.0 <= image.array.min() < 0.05 and image.array.max() > 0.9
  assert set(np.unique(label.array)) <= set(PHANTOM_LABELS)
  assert {1, 3, 4, 5} <= set(np.unique(label.array))
  np.testing.assert_allclose(image.spacing, 1.5 * np.asarray(shape) / np.asarray(new_shape))

  same_grid, _ = load_case(case, None)
  assert same_grid.array.shape == shape
  with pytest.raises(ValueError, match="cannot resize"):
    load_case(case, new_shape + (5,))


def test_load_case_label_errors(tmp_path):
  image = write(tmp_path / "img.nii.gz")
  empty = write(tmp_path / "empty.nii.gz", np.zeros((4, 4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"empty\.nii\.gz: label map is empty"):
    load_case(Case("a", image, empty), None)
  # Without required labels, an empty map is fine (e.g. a healthy scan).
  assert not load_case(Case("a", image, empty), None, require_labels=False)[1].array.any()

  with pytest.raises(ValueError, match=r"img\.nii\.gz: case a has no label map"):
    load_case(Case("a", image, None), None)
  assert load_case(Case("a", image, None), None, require_labels=False)[1] is None

  shifted = AFFINE.copy()
  shifted[:3, 3] = 3.0
  moved = write(tmp_path / "moved.nii.gz", np.ones((4, 4, 4), np.uint8), shifted)
  with pytest.raises(ValueError, match=r"img\.nii\.gz.*moved\.nii\.gz.*different grids"):
    load_case(Case("a", image, moved), None)

  fractional = write(tmp_path / "fractional.nii.gz", np.full((4, 4, 4), 0.5, np.float32))
  with pytest.raises(ValueError, match=r"fractional\.nii\.gz: label map has non-integer values"):
    load_case(Case("a", image, fractional), None)

  float_labels = write(tmp_path / "float_labels.nii.gz", np.full((4, 4, 4), 2.0, np.float32))
  label = load_case(Case("a", image, float_labels), None)[1]
  assert label.array.dtype == np.uint8 and set(np.unique(label.array)) == {2}


def test_check_label_map_dtypes_and_values():
  big = Volume(np.array([[0, 300], [2, 1]], np.int64), AFFINE, path="big.nii.gz")
  assert check_label_map(big).array.dtype == np.uint16
  with pytest.raises(ValueError, match=r"neg\.nii\.gz: label map has negative values"):
    check_label_map(Volume(np.array([[0, -1]], np.int16), AFFINE, path="neg.nii.gz"))
  with pytest.raises(ValueError, match=r"c\.nii\.gz: label map has dtype complex"):
    check_label_map(Volume(np.zeros((2, 2), np.complex64), AFFINE, path="c.nii.gz"))


def test_a_label_map_without_an_image_is_warned_about(tmp_path, caplog):
  phantom_case(tmp_path, (16, 16, 8), name="case_a")
  stray = tmp_path / "labelsTr" / "case_b.nii.gz"
  stray.write_bytes((tmp_path / "labelsTr" / "case_a.nii.gz").read_bytes())
  with caplog.at_level("WARNING"):
    assert [c.name for c in find_cases(tmp_path)] == ["case_a"]
  assert f"{stray}: a label map with no image" in caplog.text
