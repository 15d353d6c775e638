"""A stage's checkpoints: orbax CheckpointManager, resume from the latest readable one.

Layout under `Workdir.checkpoints(stage)`: orbax step folders, committed atomically by
orbax, so a killed save leaves only a temporary folder that is ignored. Whether the
checkpoints belong to this run is the work directory's fingerprint's business
(`acis_jax.workdir`), checked before a stage starts.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import orbax.checkpoint as ocp

from acis_jax.train.checkpoint import check_matches, state_bytes
from acis_jax.workdir import check_free_space, orbax_writes


class StageCheckpoints:
  """Saves and restores one stage's state; `restore_latest` resumes."""

  def __init__(self, directory: str, keep: int = 2):
    if keep < 2:
      raise ValueError(f"config.train.keep_checkpoints={keep}: keep at least 2, so that an "
                       "unreadable latest checkpoint can fall back to the one before")
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int:
    return self.manager.latest_step() or 0

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` as `step` (orbax writes in the background)."""
    with self._failing_writes():  # where the previous save's error surfaces
      self.manager.wait_until_finished()  # so that the free space counts the previous one
    check_free_space(self.directory, 2 * state_bytes(state), f"the checkpoint of step {step}")
    with self._failing_writes():
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def _failing_writes(self):
    """Around the manager's writes: a disk error said with the folder, the unfinished
    checkpoint removed."""
    return orbax_writes(self.directory, f"{self.directory}: a checkpoint could not be written "
                        "({reason}); the finished ones are kept, and the same command resumes "
                        "from the latest", before_cleanup=self.manager.close)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state saved at `step`, shaped like `abstract_state` (ValueError if unreadable)."""
    where = os.path.join(self.directory, str(step))
    try:
      stored = self.manager.item_metadata(step)
    except Exception as error:  # orbax raises several types for unreadable metadata
      raise ValueError(f"checkpoint {where} is unreadable (corrupt or partly deleted?): "
                       f"{error}") from error
    check_matches(where, getattr(stored, "tree", stored), abstract_state)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as error:
      raise ValueError(f"checkpoint {where} could not be restored (corrupt?): {error}") from error

  def restore_latest(self, abstract_state: Any, last_step: int) -> tuple[int, Any]:
    """`(step, state)` of the latest readable checkpoint up to `last_step`, or `(0, None)`.

    An unreadable checkpoint is skipped with a warning for the one before it; when every
    kept checkpoint is unreadable, the error of the latest is raised.
    """
    kept = sorted((s for s in self.manager.all_steps() if s <= last_step), reverse=True)
    first_error, unreadable = None, []
    for step in kept:
      try:
        state = self.restore(step, abstract_state)
      except ValueError as error:
        first_error = first_error or error
        unreadable.append(step)
        logging.warning("%s; trying the checkpoint before it", error)
        continue
      # Kept for inspection under another name, out of the way of the steps to come.
      for bad in unreadable:
        where = os.path.join(self.directory, str(bad))
        os.rename(where, f"{where}.unreadable")
      if unreadable:
        self.manager.reload()
      return step, state
    if first_error is not None:
      raise ValueError(f"no checkpoint in {self.directory} can be read: {first_error}. Move "
                       "the folder away to start the stage again.")
    return 0, None

  def close(self) -> None:
    with self._failing_writes():
      self.manager.wait_until_finished()
      self.manager.close()
