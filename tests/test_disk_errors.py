"""Full and read-only disks: one line naming the path and what was being written, and no
half-written checkpoint left behind. Small disks are tmpfs mounts (root only; skipped where
mounting is not allowed); the free-space check itself is tested everywhere."""

import collections
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from acis_jax import workdir as workdir_module
from acis_jax.workdir import Workdir, check_free_space

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


@pytest.fixture
def mount_tmpfs(tmp_path):
  mounted = []

  def mount(size: str, read_only: bool = False):
    point = tmp_path / f"disk{len(mounted)}"
    point.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                                            str(point)], capture_output=True).returncode:
      pytest.skip("mounting a small tmpfs needs root")
    mounted.append(point)
    return point

  yield mount
  for point in mounted:
    subprocess.run(["umount", str(point)], check=False)


@pytest.mark.parametrize("size, messages", [
    ("600k", ["the disk has 0.6 MB free"]),  # seen before the first checkpoint
    # Later: seen before a checkpoint, or during its save, as orbax's background writes go.
    ("1000k", ["MB free", "a checkpoint could not be written (No space left on device)"]),
])
def test_a_full_disk_stops_training_with_one_line_and_no_unfinished_checkpoint(
    mount_tmpfs, size, messages):
  disk = mount_tmpfs(size)
  run = subprocess.run([sys.executable, "-m", "acis_jax.main", "--config=experiments/smoke.py",
                        f"--workdir={disk / 'run'}"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 1
  assert any(m in run.stderr.splitlines()[-1] for m in messages), run.stderr[-2000:]
  assert str(disk / "run") in run.stderr.splitlines()[-1]
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  assert not [p for p in disk.rglob("*") if "tmp" in p.name]


def test_a_read_only_workdir_is_refused_naming_it(mount_tmpfs, tmp_path):
  if os.geteuid() == 0:
    root = mount_tmpfs("100k", read_only=True) / "run"
  else:
    root = tmp_path / "locked" / "run"
    root.parent.mkdir()
    root.parent.chmod(0o500)
  with pytest.raises(OSError, match=f"{root}: cannot write the work directory"):
    with Workdir(root).lock():
      pass


def test_the_free_space_check_refuses_before_writing(tmp_path, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(workdir_module.shutil, "disk_usage", lambda path: usage(10, 9, 1_000_000))
  check_free_space(tmp_path / "not" / "yet", 999_999, "x")  # fits; a missing folder is fine
  with pytest.raises(OSError, match=r"writing the checkpoint needs about 2\.0 MB, the disk "
                                    r"has 1\.0 MB free") as error:
    check_free_space(tmp_path, 2_000_000, "the checkpoint")
  assert error.value.errno == errno.ENOSPC


def test_a_save_that_fails_midway_removes_its_unfinished_folder(tmp_path):
  """What tensorstore raises when the disk fills during orbax's write: the unfinished folder
  goes, and the error names the stage's folder."""
  from acis_jax.train.stage_checkpoints import StageCheckpoints

  checkpoints = StageCheckpoints(str(tmp_path / "masks"))

  class FillsTheDisk:
    def save(self, step, **kwargs):
      (tmp_path / "masks" / f"{step}.orbax-checkpoint-tmp" / "d").mkdir(parents=True)
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")

    def wait_until_finished(self):
      pass

    def close(self):
      pass

  checkpoints.manager = FillsTheDisk()
  with pytest.raises(OSError, match=f"{tmp_path / 'masks'}: a checkpoint could not be written "
                                    r"\(No space left on device\)") as error:
    checkpoints.save(2, {"w": np.zeros(3)})
  assert error.value.errno == errno.ENOSPC
  assert list((tmp_path / "masks").iterdir()) == []
