"""A stage's checkpoints: orbax CheckpointManager, resume, refusal of foreign checkpoints.

Layout under `WORKDIR/checkpoints/<stage>/`: orbax step folders (committed
atomically by orbax, so a killed save leaves only a temporary folder that is
ignored) and `config.json`, the config fields that fix the shapes of the state.
A checkpoint written with other fields is refused before anything is loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import orbax.checkpoint as ocp

from acis_jax.train.checkpoint import check_matches


def write_json_atomically(path: str, value: Any) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json.tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class StageCheckpoints:
  """Saves and restores one stage's state; `latest_step()` tells where to resume."""

  def __init__(self, directory: str, fingerprint: Mapping[str, Any], keep: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self._check_fingerprint(json.loads(json.dumps(dict(fingerprint))))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def _check_fingerprint(self, fingerprint: dict) -> None:
    path = os.path.join(self.directory, "config.json")
    if not os.path.exists(path):
      write_json_atomically(path, fingerprint)
      return
    with open(path) as f:
      stored = json.load(f)
    differences = [f"{k}: checkpoint {stored.get(k)!r}, this run {fingerprint.get(k)!r}"
                   for k in sorted(set(stored) | set(fingerprint))
                   if stored.get(k) != fingerprint.get(k)]
    if differences:
      raise ValueError(
          f"{self.directory} holds checkpoints of another configuration; use another --workdir "
          "or the config they were made with:\n  " + "\n  ".join(differences))

  def latest_step(self) -> int:
    return self.manager.latest_step() or 0

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state saved at `step`, shaped like `abstract_state`."""
    where = os.path.join(self.directory, str(step))
    try:
      stored = self.manager.item_metadata(step)
    except Exception as error:  # orbax raises several types for unreadable metadata
      raise ValueError(f"checkpoint {where} is unreadable (corrupt or partly deleted?): {error}. "
                       "Move it away to resume from an earlier one.") from error
    check_matches(where, getattr(stored, "tree", stored), abstract_state)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as error:
      raise ValueError(f"checkpoint {where} could not be restored (corrupt?): {error}. "
                       "Move it away to resume from an earlier one.") from error

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
