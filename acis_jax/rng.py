"""Named random streams: every consumer of randomness draws from a key of its own name.

`stream_key(seed, "train/masks")` folds a stable hash of the name into the run's key, so
two consumers never share keys by accident (and adding a stream changes no other), and
`step_key(seed, name, step)` folds the step in after it. The same names seed NumPy's
generators (`numpy_rng`) for host-side draws such as batch indices.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def stream_id(name: str) -> int:
  """A stable 31-bit integer for `name` (the same in every process and Python version)."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFFFFFF


def stream_key(seed: int, name: str, impl: str | None = None) -> jax.Array:
  """The key of stream `name` of a run seeded with `seed`."""
  return jax.random.fold_in(jax.random.key(seed, impl=impl), stream_id(name))


def step_key(seed: int, name: str, step: int) -> jax.Array:
  """The key of step `step` of stream `name`."""
  return jax.random.fold_in(stream_key(seed, name), step)


def numpy_rng(seed: int, name: str, *more: int) -> np.random.Generator:
  """A NumPy generator for stream `name`, optionally of one step (`more`)."""
  return np.random.default_rng((seed, stream_id(name), *more))
