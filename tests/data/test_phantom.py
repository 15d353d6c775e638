"""The procedural chest phantom: every label, plausible HU, anatomical layout, determinism."""
import numpy as np
import pytest

from acis_jax.data.nifti import load_nifti
from acis_jax.data.phantom import PHANTOM_LABELS, chest_phantom, phantom_case

SHAPES = [(64, 64), (48, 48, 40), (96, 64)]
# (low, high) bounds on the median HU inside each label.
PLAUSIBLE_HU = {1: (0, 300), 2: (150, 400), 3: (-950, -700), 4: (-950, -700), 5: (500, 900)}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_label_with_plausible_hu(shape):
  hu, labels = chest_phantom(shape)
  assert hu.shape == labels.shape == shape
  assert hu.dtype == np.float32 and labels.dtype == np.uint8
  assert set(np.unique(labels)) == set(PHANTOM_LABELS)
  for label, (low, high) in PLAUSIBLE_HU.items():
    assert low <= np.median(hu[labels == label]) <= high, PHANTOM_LABELS[label]
  # The corners are air, outside the body.
  corners = hu[(0, -1), ...][:, (0, -1), ...]
  assert np.all(np.abs(corners + 1000) < 100)


@pytest.mark.parametrize("shape", SHAPES)
def test_layout(shape):
  _, labels = chest_phantom(shape)

  def centre(label):
    return np.argwhere(labels == label).mean(axis=0)

  heart, aorta, left, right, spine = (centre(k) for k in (1, 2, 3, 4, 5))
  # Axis 0 runs left -> right (RAS+), axis 1 posterior -> anterior.
  assert left[0] < heart[0] < right[0]
  assert spine[1] < aorta[1] < heart[1]
  assert aorta[0] < spine[0]  # the descending aorta lies left of the spine


def test_2d_is_the_middle_slice_of_3d():
  _, labels_2d = chest_phantom((64, 64))
  _, labels_3d = chest_phantom((64, 64, 32))
  middle = labels_3d[:, :, 15:17]  # z = 0 lies between slices 15 and 16
  agree = np.mean((labels_2d[:, :, None] == middle).any(axis=-1))
  assert agree > 0.97


def test_seed_controls_noise_and_vessels():
  a, _ = chest_phantom((48, 48), seed=0)
  b, _ = chest_phantom((48, 48), seed=0)
  c, _ = chest_phantom((48, 48), seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_bad_shapes():
  with pytest.raises(ValueError, match="2-D or 3-D"):
    chest_phantom((8, 8, 8, 8))
  with pytest.raises(ValueError, match="too small"):
    chest_phantom((8, 8))


def test_phantom_case_files(tmp_path):
  case = phantom_case(tmp_path, (40, 40, 24), name="p")
  assert case.image_path == tmp_path / "imagesTr" / "p.nii.gz"
  image, label = load_nifti(case.image_path), load_nifti(case.label_path)
  hu, labels = chest_phantom((40, 40, 24))
  assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
  np.testing.assert_array_equal(image.array, np.round(hu))
  np.testing.assert_array_equal(label.array, labels)
  assert image.spacing == label.spacing == (1.5, 1.5, 1.5)
