"""smoke.py end to end: killed mid-stage with SIGKILL, re-run, finished, synthesized."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_STEPS = {"masks": 4, "images": 5, "registration": 4, "refine": 3}  # experiments/smoke.py


ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device: the fastest compile


def main_command(workdir):
  return [sys.executable, "-m", "acis_jax.main", "--config=experiments/smoke.py",
          f"--workdir={workdir}"]


def wait_for(path, process, log, timeout=600):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert process.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.2)


def test_sigkill_mid_stage_then_rerun_finishes_with_the_right_steps(tmp_path):
  first_log = open(tmp_path / "first_run.log", "w")
  first = subprocess.Popen(main_command(tmp_path), cwd=REPO, env=ENV, stdout=first_log,
                           stderr=subprocess.STDOUT)
  # The images stage checkpoints at steps 2 and 4 of 5: kill it after the first.
  wait_for(tmp_path / "checkpoints" / "images" / "2", first, tmp_path / "first_run.log")
  first.send_signal(signal.SIGKILL)
  first.wait()
  first_log.close()
  assert not (tmp_path / "networks" / "images" / "DONE").exists()

  second = subprocess.run(main_command(tmp_path), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  log = second.stderr
  assert "[masks] already trained; skipping" in log
  assert "[images] resuming from step" in log

  for stage, steps in SMOKE_STEPS.items():
    done = json.loads((tmp_path / "networks" / stage / "DONE").read_text())
    assert done == {"steps": steps}
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints" / stage).iterdir()
                   if p.name.isdigit())
    assert saved[-1] == steps
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows if r["stage"] == "images") == SMOKE_STEPS["images"]
  assert all(np.isfinite(v) for r in rows for k, v in r.items() if k != "stage")

  grid = json.loads((tmp_path / "networks" / "grid.json").read_text())
  images = sorted((tmp_path / "synthetic" / "imagesTr").iterdir())
  labels = sorted((tmp_path / "synthetic" / "labelsTr").iterdir())
  assert [p.name for p in images] == [p.name for p in labels] == [
      f"synth_{i:04d}.nii.gz" for i in range(4)]
  for image_path, label_path in zip(images, labels):
    image, label = nib.load(image_path), nib.load(label_path)
    assert image.shape == label.shape == (32, 32)
    np.testing.assert_allclose(image.affine, np.asarray(grid["affine"]))
    np.testing.assert_allclose(label.affine, image.affine)
    hu = np.asarray(image.dataobj)
    assert hu.dtype == np.int16 and -1000 <= hu.min() and hu.max() <= 600
    classes = np.asarray(label.dataobj)
    assert classes.dtype == np.uint8 and classes.max() < 6
  assert (tmp_path / "synthetic" / "contact_sheet.png").stat().st_size > 10_000
