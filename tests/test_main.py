"""The command line on the smoke config: files, geometry, figure."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "acis_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("preset,shape", [("2d", (64, 64)), ("", (48, 48, 40))])
def test_pseudomask_mode_writes_nifti_with_geometry_and_a_figure(tmp_path, preset, shape):
  config = "experiments/smoke.py:pseudomask" + (f",{preset}" if preset else "")
  done = run_main(f"--config={config}", f"--workdir={tmp_path}",
                  "--config.pseudomask.num_seeds=200")
  assert done.returncode == 0, done.stderr[-3000:]
  out = tmp_path / "pseudomask"
  image = nib.load(out / "phantom_image.nii.gz")
  assert image.shape == shape
  for name in ("pseudomask", "density", "edges"):
    written = nib.load(out / f"phantom_{name}.nii.gz")
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, image.affine)
  mask = np.asarray(nib.load(out / "phantom_pseudomask.nii.gz").dataobj)
  # 200 seeds give at most 200 distinct cell values, all taken from the image.
  assert 1 < len(np.unique(mask)) <= 200
  assert np.isin(np.unique(mask), np.asarray(image.dataobj)).all()
  assert (out / "phantom.png").stat().st_size > 10_000
  assert "200 seeds" in done.stderr


def test_pseudomask_mode_refuses_a_synthesizer_without_pseudo_masks(tmp_path):
  done = run_main("--config=experiments/smoke.py:pseudomask,2d", f"--workdir={tmp_path}",
                  "--config.synthesizer=joint_gan")
  assert done.returncode != 0
  assert "config.synthesizer='joint_gan' paints no pseudo-masks" in done.stderr
  assert not (tmp_path / "pseudomask").exists()


def test_unknown_mode_is_a_usage_error(tmp_path):
  done = run_main("--config=experiments/smoke.py", f"--workdir={tmp_path}",
                  "--config.mode=painting")
  assert done.returncode != 0
  assert "config.mode='painting': unknown ['painting']" in done.stderr


def test_the_acis_jax_command_is_the_same_entry_point(tmp_path):
  command = os.path.join(os.path.dirname(sys.executable), "acis-jax")
  assert os.path.isfile(command), "pip install -e . installs the acis-jax command"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  done = subprocess.run([command, "--config=experiments/smoke.py", f"--workdir={tmp_path}",
                         "--config.mode=painting"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode != 0
  assert "config.mode='painting': unknown ['painting']" in done.stderr


@pytest.mark.parametrize("override, field, suggestion", [
    ("--config.data.num_clases=3", "num_clases", "num_classes"),
    ("--config.dataa.num_classes=3", "dataa", "data")])
def test_a_misspelt_field_is_one_line_with_the_suggestion(tmp_path, override, field, suggestion):
  done = run_main("--config=experiments/smoke.py", f"--workdir={tmp_path}", override)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [
      f"FATAL Flags parsing error: {override}: the config has no field '{field}'. "
      f'Did you mean "{suggestion}" instead of "{field}"?']
  assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("listing, backend, platforms, warned", [
    ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n", "cpu", "", True),
    ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n", "cpu", "cpu", False),  # asked for
    ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n", "gpu", "", False),     # the CUDA build
    ("No devices found.\n", "cpu", "", False),
    (None, "cpu", "", False),                                                # no nvidia-smi
])
def test_a_gpu_left_unused_by_the_cpu_build_is_warned_about(tmp_path, monkeypatch, listing,
                                                            backend, platforms, warned):
  from acis_jax.main import gpus_unused
  if listing is not None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    smi.chmod(0o755)
  monkeypatch.setenv("PATH", str(tmp_path))
  message = gpus_unused(backend=backend, platforms=platforms)
  assert (message is not None) == warned
  if warned:
    assert "1 GPU(s)" in message and 'pip install -e ".[cuda12]"' in message
