"""Training progress: one JSON object per line in the run's metrics file, a readable console
line, and TensorBoard event files (scalars, sample images) beside them.

TensorBoard files are written with tensorboardX, which needs protobuf alone (no TensorFlow or
PyTorch; protobuf comes with orbax anyway) and is kept up to date for TensorBoard's format.
Only process 0 writes, so a multi-host run logs once.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import time
from typing import Mapping

from absl import logging
import jax
import numpy as np
from tensorboardX import SummaryWriter


def _ours_or_warning(record: py_logging.LogRecord) -> bool:
  if "/orbax/" in record.pathname and record.exc_info:
    # orbax's background threads log the traceback of a failed save; the save's caller
    # re-raises that error with the folder named (acis_jax.train.stage_checkpoints).
    record.exc_info, record.exc_text = None, None
  return record.levelno >= py_logging.WARNING or "acis_jax" in record.pathname


def show_progress_logs() -> None:
  """INFO lines of acis_jax and every library's warnings, orbax's without tracebacks;
  libraries' INFO chatter dropped.

  The filter sits on the "absl" logger (where absl.logging, hence orbax, writes),
  so it also works in notebooks, whose handlers are not absl's.
  """
  logging.set_verbosity(logging.INFO)
  py_logging.getLogger("absl").addFilter(_ours_or_warning)


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
  """Logs a stage's steps: `metrics.jsonl` rows and a console line with rate and ETA.

  The rate counts steps since this object was made, so a resumed run reports
  its own speed, not one diluted by the steps restored from a checkpoint.
  """

  def __init__(self, path: str, stage: str, first_step: int, total_steps: int,
               events_dir: str | None = None):
    self.path = path
    self.stage = stage
    self.first_step = first_step
    self.total_steps = total_steps
    self.start = time.perf_counter()
    self.enabled = jax.process_index() == 0
    self.events = None
    if self.enabled:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if events_dir:
        self.events = SummaryWriter(events_dir, flush_secs=10)

  def close(self) -> None:
    if self.events is not None:
      self.events.close()
      self.events = None

  def images(self, step: int, tiles: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images `STAGE/samples/KIND` after `step` steps, from (H, W, 3) uint8."""
    if self.events is None:
      return
    for kind, tile in tiles.items():
      self.events.add_image(f"{self.stage}/samples/{kind}", tile, step, dataformats="HWC")

  def restart_clock(self, steps_taken: int) -> None:
    """Counts the rate from now on (e.g. after compiling), `steps_taken` steps in."""
    self.start = time.perf_counter()
    self.first_step = steps_taken

  def steps_per_second(self, step: int) -> float:
    elapsed = time.perf_counter() - self.start
    return (step - self.first_step) / elapsed if elapsed > 0 else 0.0

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records the metrics after `step` steps of this stage (1-based count)."""
    if not self.enabled:
      return
    rate = self.steps_per_second(step)
    row = {"stage": self.stage, "step": step, **{k: float(v) for k, v in metrics.items()},
           "steps_per_s": rate}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.events is not None:
      for name, value in row.items():
        if name not in ("stage", "step"):
          self.events.add_scalar(f"{self.stage}/{name}", value, step)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    losses = "  ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
    logging.info("[%s] step %d/%d  %s  (%.2f steps/s, ETA %s)", self.stage, step,
                 self.total_steps, losses, rate,
                 _format_duration(eta) if eta == eta else "?")
