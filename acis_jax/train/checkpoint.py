"""Save and restore one pytree of arrays (e.g. `nnx.state(model)`) with orbax.

Writes are atomic by orbax's design: the checkpoint goes to a temporary directory that is
renamed into place on commit, so an interrupted save never leaves a half-written `path`.
Restoring first checks every array's path and shape against the target and names the ones
that differ (e.g. a model built with other widths).

Typical use with flax.nnx:

  save_state(path, nnx.state(model))
  abstract = nnx.state(nnx.eval_shape(lambda: Model(..., rngs=nnx.Rngs(0))))
  nnx.update(model, restore_state(path, abstract))
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from acis_jax.workdir import check_free_space, orbax_writes

# How many mismatching arrays a restore error lists before "and N more".
_MAX_LISTED = 8


def _path_str(path: tuple) -> str:
  """A key path as `a/b/0/kernel/value`, independent of dict/attribute/index key types."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(leaf.shape) for p, leaf in leaves}


def save_state(path: str | os.PathLike, state: Any, *, force: bool = False) -> None:
  """Saves the arrays of `state` under directory `path` (blocks until committed).

  Raises orbax's error if `path` exists, unless `force=True` (then it is replaced).
  """
  path = os.path.abspath(path)
  check_free_space(os.path.dirname(path), 2 * state_bytes(state), f"the network {path}")
  with orbax_writes(os.path.dirname(path), f"{path}: the network could not be written "
                    "({reason})", pattern=os.path.basename(path)):
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, state, force=force)
      checkpointer.wait_until_finished()


def state_bytes(state: Any) -> int:
  """The bytes of the arrays of `state`, what a checkpoint of it holds."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def restore_state(path: str | os.PathLike, abstract_state: Any) -> Any:
  """Restores a checkpoint into the structure, shapes and dtypes of `abstract_state`.

  Args:
    path: a directory written by `save_state`.
    abstract_state: a pytree like the saved one whose leaves have `.shape` and `.dtype`
      (e.g. `nnx.state(nnx.eval_shape(...))`, or a real state).

  Returns:
    The restored pytree, with the structure of `abstract_state`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: arrays are missing, unexpected, or of another shape than in `abstract_state`.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  with ocp.StandardCheckpointer() as checkpointer:
    check_matches(path, checkpointer.metadata(path).item_metadata.tree, abstract_state)
    return checkpointer.restore(path, abstract_state)


def check_matches(path: str, stored_tree: Any, abstract_state: Any) -> None:
  """Raises a ValueError listing the arrays of `stored_tree` that `abstract_state` lacks,
  has extra, or shapes differently (e.g. a model built with other widths or rank)."""
  stored = _shapes(stored_tree)
  wanted = _shapes(abstract_state)
  problems = [f"missing from checkpoint: {k}" for k in wanted if k not in stored]
  problems += [f"not in target: {k}" for k in stored if k not in wanted]
  problems += [f"{k}: checkpoint has shape {stored[k]}, target {wanted[k]}"
               for k in wanted if k in stored and stored[k] != wanted[k]]
  if problems:
    more = len(problems) - _MAX_LISTED
    listed = "\n  ".join(problems[:_MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0
                                                     else "")
    raise ValueError(f"checkpoint {path} does not match the target state "
                     f"(e.g. a model built with other widths):\n  {listed}")
