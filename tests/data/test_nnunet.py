"""nnU-Net v2 raw datasets: the integrity rules of nnU-Net's verify_dataset_integrity, each
broken once on a dataset that passes, and the cross-validation folds."""

import json

import nibabel as nib
import numpy as np
import pytest

from acis_jax.data import nnunet
from acis_jax.jobs.export import folds


def _save(path, array, spacing=(1.0, 1.0, 2.0)):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def _dataset(tmp_path, cases=("a", "b")):
  """A valid two-case dataset written with nibabel alone, by nnU-Net's naming rules."""
  root = tmp_path / "Dataset501_Test"
  for case in cases:
    _save(root / "imagesTr" / f"{case}_0000.nii.gz", np.zeros((6, 5, 4), np.int16))
    label = np.zeros((6, 5, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 2
    _save(root / "labelsTr" / f"{case}.nii.gz", label)
  (root / "dataset.json").write_text(json.dumps({
      "channel_names": {"0": "CT"}, "labels": {"background": 0, "heart": 1, "aorta": 2},
      "numTraining": len(cases), "file_ending": ".nii.gz"}))
  return root


def _edit_json(root, **changes):
  description = json.loads((root / "dataset.json").read_text())
  description.update(changes)
  (root / "dataset.json").write_text(json.dumps(description))


def test_a_dataset_by_the_rules_passes(tmp_path):
  assert nnunet.check_dataset(_dataset(tmp_path)) == []


@pytest.mark.parametrize("break_it, message", [
    (lambda r: (r / "dataset.json").unlink(), "dataset.json: missing"),
    (lambda r: _edit_json(r, numTraining=3), "numTraining=3, but imagesTr holds 2"),
    (lambda r: _edit_json(r, labels={"background": 0, "heart": 1, "aorta": 3}),
     "not consecutive"),
    (lambda r: _edit_json(r, labels={"background": 1, "heart": 0, "aorta": 2}),
     "\"background\" to 0"),
    (lambda r: _edit_json(r, labels={"background": 0, "heart": 1}), "label values [2]"),
    (lambda r: (r / "labelsTr" / "b.nii.gz").unlink(), "b.nii.gz: missing"),
    (lambda r: (r / "imagesTr" / "a_0000.nii.gz").rename(r / "imagesTr" / "a_0001.nii.gz"),
     "expected the channel files ['a_0000.nii.gz']"),
    (lambda r: _save(r / "labelsTr" / "a.nii.gz", np.zeros((6, 5, 3), np.uint8)),
     "image shape (6, 5, 4), labels (6, 5, 3)"),
    (lambda r: _save(r / "labelsTr" / "a.nii.gz", np.zeros((6, 5, 4), np.uint8),
                     spacing=(1.0, 1.0, 3.0)), "spacing"),
    (lambda r: _save(r / "imagesTr" / "a_0000.nii.gz", np.full((6, 5, 4), np.nan, np.float32)),
     "NaN"),
    (lambda r: (r / "dataset.json").write_text(json.dumps({"labels": {}})),
     "required keys"),
])
def test_each_broken_rule_is_found(tmp_path, break_it, message):
  root = _dataset(tmp_path)
  break_it(root)
  problems = nnunet.check_dataset(root)
  assert any(message in p for p in problems), problems


def test_dataset_json_as_nnunet_reads_it(tmp_path):
  root = _dataset(tmp_path)
  nnunet.write_dataset_json(root, {1: "heart", 2: "aorta"}, num_training=2, description="x")
  assert json.loads((root / "dataset.json").read_text()) == {
      "channel_names": {"0": "CT"}, "labels": {"background": 0, "heart": 1, "aorta": 2},
      "numTraining": 2, "file_ending": ".nii.gz", "description": "x"}
  assert nnunet.check_dataset(root) == []
  with pytest.raises(ValueError, match="consecutive"):
    nnunet.label_ids({0: "background", 2: "aorta"})


def test_dataset_folder_names():
  assert nnunet.dataset_folder_name(7, "Chest") == "Dataset007_Chest"
  for dataset_id, name in [(0, "A"), (1000, "A"), (5, "has space"), (5, "")]:
    with pytest.raises(ValueError):
      nnunet.dataset_folder_name(dataset_id, name)


def test_folds_keep_patients_whole_and_synthetic_cases_in_training():
  names = [f"p{p}_z{z:03d}" for p in range(7) for z in (10, 20)]
  synthetic = ["synth_0000", "synth_0001"]
  splits = folds(names, synthetic, num_folds=5, is_2d=True)
  assert len(splits) == 5
  validated = [c for fold in splits for c in fold["val"]]
  assert sorted(validated) == sorted(names)  # every real case validated exactly once
  for fold in splits:
    assert set(fold["train"]) | set(fold["val"]) == set(names) | set(synthetic)
    assert not set(fold["train"]) & set(fold["val"])
    assert set(synthetic) <= set(fold["train"])
    patients = {n.split("_z")[0] for n in fold["val"]}
    assert all(f"{p}_z010" in fold["val"] and f"{p}_z020" in fold["val"] for p in patients)


def test_folds_fall_back_to_cases_then_to_none():
  one_patient = [f"p_z{z:03d}" for z in range(6)]
  splits = folds(one_patient, [], num_folds=5, is_2d=True)
  assert sorted(len(f["val"]) for f in splits) == [1, 1, 1, 1, 2]
  assert folds(one_patient[:3], [], num_folds=5, is_2d=True) is None
