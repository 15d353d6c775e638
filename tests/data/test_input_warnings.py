"""Inputs that load but are almost certainly wrong get a warning naming the file."""

import logging

import nibabel as nib
import numpy as np
import pytest

from acis_jax.data.dataset import warn_if_not_ct
from acis_jax.data.nifti import Volume, load_nifti, save_nifti


def _ct(shape=(16, 16, 8)):
  """Air around a body of soft tissue with a bone: what a CT in HU looks like."""
  hu = np.full(shape, -1000, np.int16)
  hu[3:13, 3:13] = 40
  hu[7:9, 7:9] = 1200
  return hu


@pytest.mark.parametrize("array, message", [
    (np.full((8, 8, 4), 7, np.int16), "constant"),
    (np.clip(_ct(), -128, 127).astype(np.int8), "int8 values"),
    (np.clip(_ct() + 1024, 0, 255).astype(np.uint8), "uint8 values"),
    ((_ct() + 1000) / 2200.0, "already normalised"),
    ((_ct() + 1024).astype(np.uint16), "no negative values"),
    (np.where(np.arange(16 * 16 * 8).reshape(16, 16, 8) == 5, 40, -1000).astype(np.int16),
     "all air"),
])
def test_implausible_ct_is_warned_about(caplog, array, message):
  with caplog.at_level(logging.WARNING):
    warn_if_not_ct(Volume(array, np.eye(4), "scan.nii.gz"))
  assert any(message in r.getMessage() and "scan.nii.gz" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_plausible_ct_is_not(caplog):
  with caplog.at_level(logging.WARNING):
    warn_if_not_ct(Volume(_ct(), np.eye(4), "scan.nii.gz"))
  assert not caplog.records


def test_a_nifti_without_qform_or_sform_is_warned_about(tmp_path, caplog):
  image = nib.Nifti1Image(_ct(), np.diag([2.0, 2.0, 3.0, 1.0]))
  image.set_qform(None, code=0)
  image.set_sform(None, code=0)
  nib.save(image, tmp_path / "bare.nii.gz")
  with caplog.at_level(logging.WARNING):
    load_nifti(tmp_path / "bare.nii.gz")
  assert any("neither qform nor sform" in r.getMessage() and "bare.nii.gz" in r.getMessage()
             for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    load_nifti(save_nifti(tmp_path / "placed.nii.gz", _ct(), np.eye(4)))
  assert not caplog.records
