"""Stops asked for by Ctrl-C (SIGINT) or a scheduler (SIGTERM), ended where nothing is lost.

`main` runs every job inside `stops_raise()`: a signal raises `Stopped` in the main thread, and
each job's writes are atomic (`acis_jax.workdir`), so nothing half-written stays behind. The
training loop, whose checkpoint saves run in background threads, polls `stops_deferred()`
instead: it finishes the step, saves a checkpoint, waits for it, then raises `Stopped` saying
where the same command resumes. A second signal while that happens stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from typing import Callable, Iterator

from absl import logging

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Outside a training loop (between stages, loading, synthesizing) every write is atomic.
RESUME_HINT = ("outside a training loop; everything written so far is kept, and the same "
               "command goes on from there")


class Stopped(BaseException):
  """The run was asked to stop (a BaseException, so `except Exception` lets it pass)."""

  def __init__(self, signum: int, detail: str = ""):
    super().__init__(signum, detail)
    self.signum, self.detail = signum, detail

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

  def __str__(self) -> str:
    return f"stopped by {signal.Signals(self.signum).name}" + (
        f": {self.detail}" if self.detail else "")


@dataclasses.dataclass
class StopRequest:
  signum: int | None = None


@contextlib.contextmanager
def _handling(handler: Callable) -> Iterator[None]:
  if threading.current_thread() is not threading.main_thread():  # signals reach the main one
    yield
    return
  previous = {s: signal.signal(s, handler) for s in SIGNALS}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def stops_raise() -> Iterator[None]:
  """Inside, SIGINT and SIGTERM raise `Stopped` where the main thread is."""
  def handler(signum, frame):
    raise Stopped(signum, RESUME_HINT)
  with _handling(handler):
    yield


@contextlib.contextmanager
def stops_deferred() -> Iterator[StopRequest]:
  """Inside, a first signal is only recorded in the request, for a loop to act on where
  stopping loses nothing; a second one raises `Stopped` at once."""
  request = StopRequest()

  def handler(signum, frame):
    if request.signum is not None:
      raise Stopped(signum, "asked again, so stopped before the checkpoint was written")
    request.signum = signum
    logging.warning("%s: finishing this step and saving a checkpoint (send it again to stop "
                    "at once)", signal.Signals(signum).name)
  with _handling(handler):
    yield request
