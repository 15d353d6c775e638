"""smoke.py end to end: killed mid-stage with SIGKILL, re-run, stopped with Ctrl-C, re-run,
finished, synthesized, exported as an nnU-Net dataset."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from acis_jax.data import nnunet
from acis_jax.data.phantom import PHANTOM_LABELS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# experiments/smoke.py: masks 4 GAN + 2 annotation fine-tuning steps, images 3 + 2.
SMOKE_STEPS = {"masks": 6, "images": 5, "registration": 4, "refine": 3}


ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device: the fastest compile


def main_command(workdir):
  return [sys.executable, "-m", "acis_jax.main", "--config=experiments/smoke.py",
          f"--workdir={workdir}"]


def wait_for(ready, what, process, log, timeout=600):
  """Polls `ready()` while `process` runs; fails with the end of its `log` if it exits."""
  deadline = time.time() + timeout
  while not ready():
    assert process.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, f"{what} never happened"
    time.sleep(0.05)


def test_sigkill_mid_stage_then_rerun_finishes_with_the_right_steps(tmp_path):
  first_log = open(tmp_path / "first_run.log", "w")
  first = subprocess.Popen(main_command(tmp_path), cwd=REPO, env=ENV, stdout=first_log,
                           stderr=subprocess.STDOUT)
  # The images stage checkpoints at steps 2 and 4 of 5: kill it after the first.
  checkpoint = tmp_path / "checkpoints" / "images" / "2"
  wait_for(checkpoint.exists, f"{checkpoint} appearing", first, tmp_path / "first_run.log")
  first.send_signal(signal.SIGKILL)
  first.wait()
  first_log.close()
  assert not (tmp_path / "networks" / "images" / "DONE").exists()

  # Ctrl-C in a later stage: one line saying where the same command goes on, exit 130. The
  # registration stage's 4 smoke steps take milliseconds, so the signal lands either in its
  # loop (a checkpoint of that step) or after it, while the next stage loads.
  second_log = open(tmp_path / "second_run.log", "w")
  second = subprocess.Popen(main_command(tmp_path), cwd=REPO, env=ENV, stdout=second_log,
                            stderr=subprocess.STDOUT)
  log_path = tmp_path / "second_run.log"
  wait_for(lambda: "[registration] step compiled" in log_path.read_text(),
           "the registration stage compiling", second, log_path)
  second.send_signal(signal.SIGINT)
  assert second.wait(timeout=300) == 130
  second_log.close()
  log = (tmp_path / "second_run.log").read_text()
  assert "[masks] already trained; skipping" in log
  assert "[images] resuming from step" in log
  stop_line = next(line for line in log.splitlines() if "stopped by SIGINT: " in line)
  assert "the same command" in stop_line
  assert ("[registration]" in stop_line) != ("outside a training loop" in stop_line)
  assert "Traceback" not in log, log[-3000:]
  assert not list((tmp_path / "checkpoints").glob("*/*tmp*"))  # no half-written checkpoint

  third = subprocess.run(main_command(tmp_path), cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=900)
  assert third.returncode == 0, third.stderr[-3000:]

  for stage, steps in SMOKE_STEPS.items():
    done = json.loads((tmp_path / "networks" / stage / "DONE").read_text())
    assert done == {"steps": steps}
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints" / stage).iterdir()
                   if p.name.isdigit())
    assert saved[-1] == steps
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows if r["stage"] == "images") == SMOKE_STEPS["images"]
  assert all(np.isfinite(v) for r in rows for k, v in r.items() if k != "stage")

  # TensorBoard, read by its own reader: the scalars of metrics.jsonl and sample images.
  events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
  events.Reload()
  final = {r["stage"]: r for r in rows}
  for stage, steps in SMOKE_STEPS.items():
    for name, value in final[stage].items():
      if name not in ("stage", "step"):
        last = max(events.Scalars(f"{stage}/{name}"), key=lambda e: e.step)
        assert last.step == steps and last.value == pytest.approx(value, rel=1e-6)
  images = set(events.Tags()["images"])
  assert {"masks/samples/pseudo-mask", "masks/samples/labels", "images/samples/image",
          "refine/samples/image"} <= images
  assert not any(t.startswith("registration/") for t in images)
  sample = events.Images("images/samples/image")[-1]
  assert (sample.height, sample.width) == (32, 4 * 32)  # four 32x32 samples side by side

  grid = json.loads((tmp_path / "networks" / "grid.json").read_text())
  images = sorted((tmp_path / "synthetic" / "imagesTr").iterdir())
  labels = sorted((tmp_path / "synthetic" / "labelsTr").iterdir())
  assert [p.name for p in images] == [f"synth_{i:04d}_0000.nii.gz" for i in range(4)]
  assert [p.name for p in labels] == [f"synth_{i:04d}.nii.gz" for i in range(4)]
  assert nnunet.check_dataset(tmp_path / "synthetic") == []
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

  # The export: the real phantom slice and the 4 pairs, one nnU-Net dataset.
  foreign = tmp_path / "nnunet" / "Dataset502_Theirs"
  foreign.mkdir(parents=True)
  export = main_command(tmp_path) + ["--config.mode=export"]
  refused = subprocess.run(export + ["--config.export.dataset_id=502"], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
  assert refused.returncode != 0 and "already use dataset id 502" in refused.stderr
  assert list(foreign.iterdir()) == []
  for _ in range(2):  # the second export replaces the first
    exported = subprocess.run(export, cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
  dataset = tmp_path / "nnunet" / "Dataset501_ACIS"
  assert nnunet.check_dataset(dataset) == []
  description = json.loads((dataset / "dataset.json").read_text())
  assert description["labels"] == {name: i for i, name in PHANTOM_LABELS.items()}
  assert description["numTraining"] == 5
  assert "no splits_final.json" in exported.stderr  # one real case fills no folds
  real = [p.name for p in (dataset / "imagesTr").iterdir() if not p.name.startswith("synth_")]
  assert real == ["phantom_0000.nii.gz"]

  # The quality report of the pairs against the one real case.
  report = subprocess.run(main_command(tmp_path) + ["--config.mode=quality"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  result = json.loads((tmp_path / "synthetic" / "quality.json").read_text())
  assert result["cases"] == {"real": 1, "synthetic": 4}
  assert set(result["consistency"]["synthetic"]) == {"1", "2", "3", "4", "5"}
  assert "| heart: segmenter Dice |" in (tmp_path / "synthetic" / "quality.md").read_text()
  assert (tmp_path / "synthetic" / "quality.png").stat().st_size > 5_000
