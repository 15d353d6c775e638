"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

import time

import jax
import numpy as np


def median_time(fn, repeats: int, warmup: bool = False) -> float:
  """Median wall seconds of `repeats` calls of `fn`, each waited for with block_until_ready.

  `warmup` makes one untimed call first (compilation, caches).
  """
  if warmup:
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))
