"""The work directory of a run: its layout, its lock, its fingerprint, atomic writes.

Every file a run reads or writes under `--workdir` is named here and nowhere else:

  WORKDIR/
    .lock                          held (flock) by the one process that may write here
    fingerprint.json               what makes the run (data digest, shapes, widths, seed, steps)
    config.json                    the whole config of the last run allowed to go on
    metrics.jsonl                  one JSON object per logged step
    tensorboard/                   the same as TensorBoard event files, and sample images
    checkpoints/<stage>/<step>/    orbax checkpoints of a stage in progress
    networks/<stage>/<network>/    a finished stage's networks (orbax)
    networks/<stage>/DONE          written last: the stage is finished
    networks/grid.json             the grid synthetic volumes are written on, the label names
    synthetic/, synthetic_unrefined/   synthesized pairs (ACIS, ACIS-), swapped in whole
    synthetic_from_real/           the evaluation's ACIS pairs from real anatomy
    synth_n<N>[_seed<S>]/          the evaluation's synthesizer trained on N cases (a workdir);
    <synthesizer>_n<N>[_seed<S>]/  the same for another config.synthesizer ("superpixel")
    eval/                          the evaluation's results
    nnunet/                        the export mode's nnU-Net dataset (unless export.out_dir)
    pseudomask/                    the pseudomask mode's maps and figures
    quality/                       the quality report's segmenters, cached per set of real cases

A run first takes the lock, then compares its fingerprint with the stored one: a work
directory that holds a run of other data, shapes, widths, seed or step counts is refused,
listing the differing fields, before anything in it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

LOCK_FILE = ".lock"
FINGERPRINT_FILE = "fingerprint.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
GRID_FILE = "grid.json"
DONE_FILE = "DONE"
# Synthetic folders by arm: the refined generators (ACIS), those before refinement (ACIS-), and
# the refined image generator painting real cases moved by random diffeomorphisms.
SYNTHETIC_FOLDERS = {"acis": "synthetic", "acis-": "synthetic_unrefined",
                     "acis-real": "synthetic_from_real"}


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
  """Writes `value` as JSON to `path` through a temporary file renamed into place (mode 0644)."""
  write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file renamed into place (mode 0644)."""
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


# What a full, read-only or forbidden disk raises; `main` reports these in one line.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def disk_error_code(error: BaseException) -> int | None:
  """The errno of a full, read-only or forbidden disk behind `error`, else None; orbax's
  tensorstore reports a full disk as a ValueError saying RESOURCE_EXHAUSTED."""
  if isinstance(error, OSError) and error.errno in DISK_ERRORS:
    return error.errno
  if "RESOURCE_EXHAUSTED" in str(error) or "No space left" in str(error):
    return errno.ENOSPC
  return None


def check_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
  """Refuses (OSError ENOSPC) to start writing `what`, about `needed_bytes`, where the disk
  under `folder` has less free, so that a full disk does not leave a half-written file."""
  probe = os.path.abspath(os.fspath(folder))
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  free = shutil.disk_usage(probe).free
  if free < needed_bytes:
    raise OSError(errno.ENOSPC, f"{folder}: writing {what} needs about "
                  f"{needed_bytes / 1e6:.1f} MB, the disk has {free / 1e6:.1f} MB free; free "
                  "some space or use another --workdir")


@contextlib.contextmanager
def orbax_writes(folder: str | os.PathLike, failure: str, pattern: str = "*",
                 before_cleanup=None) -> Iterator[None]:
  """Around orbax writes into `folder`: on an error, `before_cleanup()` (e.g. closing a
  manager, so that its threads stop), then the unfinished `PATTERN.orbax-checkpoint-tmp*`
  folders removed; a full, read-only or forbidden disk (`disk_error_code`) is raised again as
  an OSError whose message is `failure` with `{reason}` filled in."""
  try:
    yield
  except (OSError, ValueError) as error:
    if before_cleanup is not None:
      with contextlib.suppress(Exception):
        before_cleanup()
    for path in glob.glob(os.path.join(os.fspath(folder), f"{pattern}.orbax-checkpoint-tmp*")):
      shutil.rmtree(path, ignore_errors=True)
    code = disk_error_code(error)
    if code is None:
      raise
    raise OSError(code, failure.replace("{reason}", os.strerror(code))) from error


def read_json(path: str | os.PathLike) -> Any:
  with open(path) as f:
    return json.load(f)


class WorkdirLocked(RuntimeError):
  """Another live process holds the work directory."""


class FingerprintMismatch(ValueError):
  """The work directory holds a run that differs from this one."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """`{"a.b": leaf}` of nested dicts, so that differences name the exact field."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
  """`field: stored X, this run Y` for every field where two fingerprints differ."""
  stored, current = _flatten(stored), _flatten(json.loads(json.dumps(current)))
  return [f"{k}: work directory {stored.get(k)!r}, this run {current.get(k)!r}"
          for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]


@dataclasses.dataclass(frozen=True)
class Workdir:
  """Paths of one work directory (nothing is created by asking for a path)."""

  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", os.path.abspath(os.fspath(self.root)))

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  # Training.
  def checkpoints(self, stage: str) -> str:
    return self.path("checkpoints", stage)

  def network(self, stage: str, network: str) -> str:
    return self.path("networks", stage, network)

  def done_marker(self, stage: str) -> str:
    return self.path("networks", stage, DONE_FILE)

  def stage_done(self, stage: str) -> bool:
    return os.path.exists(self.done_marker(stage))

  def mark_done(self, stage: str, steps: int) -> None:
    write_json_atomically(self.done_marker(stage), {"steps": steps})

  @property
  def grid(self) -> str:
    return self.path("networks", GRID_FILE)

  def read_grid(self) -> dict:
    if not os.path.exists(self.grid):
      raise FileNotFoundError(f"{self.grid} is missing: train the networks first (mode=train)")
    return read_json(self.grid)

  @property
  def config(self) -> str:
    return self.path(CONFIG_FILE)

  @property
  def metrics(self) -> str:
    return self.path(METRICS_FILE)

  @property
  def tensorboard(self) -> str:
    return self.path("tensorboard")

  @property
  def fingerprint(self) -> str:
    return self.path(FINGERPRINT_FILE)

  # Outputs.
  def synthetic(self, arm: str = "acis") -> str:
    return self.path(SYNTHETIC_FOLDERS[arm])

  def synthesizer(self, n: int, seed: int | None = None, name: str = "acis") -> "Workdir":
    """The work directory of the evaluation's synthesizer `name` (`config.synthesizer`)
    trained on `n` real cases (with `seed`: the one trained with that seed)."""
    prefix = "synth" if name == "acis" else name
    return Workdir(self.path(f"{prefix}_n{n}" if seed is None else f"{prefix}_n{n}_seed{seed}"))

  @property
  def eval(self) -> str:
    return self.path("eval")

  @property
  def nnunet_export(self) -> str:
    """Where `export` writes its DatasetNNN_Name folder when export.out_dir is empty."""
    return self.path("nnunet")

  @property
  def quality(self) -> str:
    """The quality report's cached segmenters (the reports go into the synthetic folders)."""
    return self.path("quality")

  @property
  def pseudomask(self) -> str:
    return self.path("pseudomask")

  # A run's claim on the directory.
  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Holds the directory's exclusive lock; a second process is refused at once.

    The lock is an `flock` on WORKDIR/.lock, which the kernel releases when its holder dies,
    so a lock left by a killed process is simply taken over.
    """
    path = self.path(LOCK_FILE)
    try:
      os.makedirs(self.root, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
      raise OSError(error.errno, f"{self.root}: cannot write the work directory "
                    f"({error.strerror}); use a writable --workdir") from error
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        raise WorkdirLocked(
            f"{self.root} is in use by another run (pid {holder}); wait for it to finish or "
            "use another --workdir") from None
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
      yield
    finally:
      os.close(fd)  # closing releases the flock

  def check_fingerprint(self, fingerprint: dict, fields: tuple[str, ...] | None = None) -> None:
    """Refuses (FingerprintMismatch) a run whose fingerprint differs from the stored one.

    `fields`: compare only these top-level fields (e.g. a job that does not load the data).
    Nothing is written.
    """
    if not os.path.exists(self.fingerprint):
      return
    stored = read_json(self.fingerprint)
    if fields is not None:
      stored = {k: v for k, v in stored.items() if k in fields}
      fingerprint = {k: v for k, v in fingerprint.items() if k in fields}
    differences = fingerprint_differences(stored, fingerprint)
    if differences:
      raise FingerprintMismatch(
          f"{self.root} holds a run of another configuration; use another --workdir, or the "
          "settings it was made with:\n  " + "\n  ".join(differences))

  def claim(self, fingerprint: dict, config_json: dict, grid: dict) -> None:
    """Checks the fingerprint, then records the run: fingerprint, config and grid."""
    self.check_fingerprint(fingerprint)
    os.makedirs(self.path("networks"), exist_ok=True)
    write_json_atomically(self.fingerprint, json.loads(json.dumps(fingerprint)))
    write_json_atomically(self.config, config_json)
    write_json_atomically(self.grid, grid)

  def require_trained(self, fields: dict) -> None:
    """A job that reads trained networks: they exist, and were made with these settings."""
    if not os.path.exists(self.fingerprint):
      raise FileNotFoundError(f"{self.fingerprint} is missing: {self.root} holds no trained "
                              "run (mode=train first)")
    self.check_fingerprint(fields, fields=tuple(fields))


@contextlib.contextmanager
def replaced_folder(final: str) -> Iterator[str]:
  """A fresh temporary folder beside `final` that replaces `final` whole on success.

  On an error the temporary folder is removed and `final` is left as it was, so `final`
  never mixes the files of two runs.
  """
  parent = os.path.dirname(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.tmp-")
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.chmod(tmp, 0o755)
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.old-")
    os.rename(final, os.path.join(old, "previous"))
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)
