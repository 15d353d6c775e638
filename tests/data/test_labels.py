"""Label tables from dataset.json, and classes chosen and ordered by name."""
import json

import numpy as np
import pytest

from acis_jax.data.labels import available_names, read_dataset_json, select_classes

LOBES = {0: "background", 1: "lung_upper_lobe_left", 2: "lung_lower_lobe_left",
         3: "lung_upper_lobe_right", 4: "lung_middle_lobe_right", 5: "lung_lower_lobe_right",
         6: "heart"}


@pytest.mark.parametrize("labels", [
    {"background": 0, "heart": 1, "aorta": 2},           # nnU-Net v2: name -> id
    {"0": "background", "1": "heart", "2": "aorta"}])    # the Decathlon: "id" -> name
def test_dataset_json_in_either_layout(tmp_path, labels):
  (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
  assert read_dataset_json(tmp_path) == {0: "background", 1: "heart", 2: "aorta"}


def test_dataset_json_absent_or_bad(tmp_path):
  assert read_dataset_json(tmp_path) is None
  (tmp_path / "dataset.json").write_text("{not json")
  with pytest.raises(ValueError, match="dataset.json"):
    read_dataset_json(tmp_path)
  (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"heart": 1, "aorta": 1}}))
  with pytest.raises(ValueError, match="id 1 is named both"):
    read_dataset_json(tmp_path)


def test_classes_are_reordered_and_others_dropped():
  labels = np.array([0, 1, 2, 3, 4])
  table = {0: "background", 1: "heart", 2: "aorta", 3: "left_lung", 4: "right_lung"}
  np.testing.assert_array_equal(
      select_classes(labels, table, ("right_lung", "heart"), "f.nii.gz"), [0, 2, 0, 0, 1])


def test_lungs_derived_from_lobes():
  labels = np.arange(7)
  out = select_classes(labels, LOBES, ("heart", "left_lung", "right_lung"), "f.nii.gz")
  np.testing.assert_array_equal(out, [0, 2, 2, 3, 3, 3, 1])
  assert available_names(LOBES)[-2:] == ["left_lung", "right_lung"]
  # A table with only some lobes cannot make a lung.
  partial = {0: "background", 1: "lung_upper_lobe_left"}
  assert "left_lung" not in available_names(partial)


def test_unknown_class_lists_the_names_of_that_file():
  with pytest.raises(ValueError, match=r"f\.nii\.gz: no class 'liver'; its labels are "
                                       r"\['heart', 'aorta'\]"):
    select_classes(np.zeros(3, int), {0: "background", 1: "heart", 2: "aorta"}, ("liver",),
                   "f.nii.gz")
  with pytest.raises(ValueError, match="more than once"):
    select_classes(np.zeros(3, int), {1: "heart"}, ("heart", "heart"), "f.nii.gz")
