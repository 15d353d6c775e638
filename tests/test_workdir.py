"""The work directory: one lock holder, refusal of foreign runs, outputs swapped in whole."""

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest

from acis_jax.config_utils import load_config_file
from acis_jax.jobs import synthesize
from acis_jax.train import trainer
from acis_jax.workdir import FingerprintMismatch, Workdir, WorkdirLocked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = textwrap.dedent("""
    import sys, time
    from acis_jax.workdir import Workdir
    with Workdir(sys.argv[1]).lock():
      print("locked", flush=True)
      time.sleep(60)
""")


def holder(workdir):
  process = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "locked"
  return process


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path):
  process = holder(tmp_path)
  try:
    start = time.perf_counter()
    with pytest.raises(WorkdirLocked, match=f"in use by another run \\(pid {process.pid}\\)"):
      with Workdir(str(tmp_path)).lock():
        pass
    assert time.perf_counter() - start < 1.0
  finally:
    process.kill()
    process.wait()
  # The killed holder's lock file is still there; the kernel dropped its lock.
  assert (tmp_path / ".lock").exists()
  with Workdir(str(tmp_path)).lock():
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def zero_step_config():
  """experiments/smoke.py with no training steps: a finished run in seconds."""
  config = load_config_file(os.path.join(REPO, "experiments", "smoke.py"))
  for field in ("masks_steps", "annotation_finetune_steps", "images_steps",
                "images_finetune_steps", "registration_steps"):
    config.train[field] = 0
  config.refine.steps = 0
  config.train.batch_size = 8  # tests/conftest.py fakes 8 devices
  return config


def digests(root):
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished")
  trainer.train(zero_step_config(), str(workdir))
  return workdir


@pytest.mark.parametrize("change, field", [
    (lambda c: c.update_from_flattened_dict({"seed": 5}), "seed"),
    (lambda c: c.update_from_flattened_dict({"model.registration_features": (8, 8, 16)}),
     "model.registration_features"),
    (lambda c: c.update_from_flattened_dict({"data.phantom_seed": 1}), "data.digest"),
])
def test_a_finished_workdir_refuses_another_run_and_stays_byte_identical(finished, change,
                                                                         field):
  before = digests(finished)
  assert "networks/masks/DONE" in before and "config.json" in before
  config = zero_step_config()
  change(config)
  with pytest.raises(FingerprintMismatch, match=field.replace(".", r"\.")):
    trainer.train(config, str(finished))
  assert digests(finished) == before


def test_synthesize_twice_with_fewer_samples_leaves_only_the_new_files(finished):
  config = zero_step_config()
  synthesize.run(config, str(finished))
  folder = finished / "synthetic" / "imagesTr"
  assert sorted(p.name for p in folder.iterdir()) == [f"synth_{i:04d}_0000.nii.gz"
                                                      for i in range(4)]
  config.synthesize.num_samples = 2
  synthesize.run(config, str(finished))
  assert sorted(p.name for p in folder.iterdir()) == ["synth_0000_0000.nii.gz",
                                                      "synth_0001_0000.nii.gz"]
  assert sorted(p.name for p in (finished / "synthetic" / "labelsTr").iterdir()) == [
      "synth_0000.nii.gz", "synth_0001.nii.gz"]
  assert not [p for p in finished.iterdir() if p.name.startswith(".synthetic")]
  assert oct(os.stat(finished / "fingerprint.json").st_mode & 0o777) == "0o644"


def test_synthesize_refuses_networks_of_other_widths(finished):
  config = zero_step_config()
  config.model.image_features = (8, 32)
  with pytest.raises(FingerprintMismatch, match=r"model\.image_features"):
    synthesize.run(config, str(finished))


def test_acis_and_acis_minus_share_their_draws(finished):
  """With no refinement steps the refined generators are the unrefined ones, so the two arms,
  drawn from the same latents and dropout keys, must be the same pairs."""
  config = zero_step_config()
  config.synthesize.unrefined = True
  synthesize.run(config, str(finished))
  for kind, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
    for i in range(config.synthesize.num_samples):
      name = f"synth_{i:04d}{suffix}.nii.gz"
      refined = np.asarray(nib.load(finished / "synthetic" / kind / name).dataobj)
      unrefined = np.asarray(nib.load(finished / "synthetic_unrefined" / kind / name).dataobj)
      np.testing.assert_array_equal(refined, unrefined)
