"""Data parallelism by mesh: the batch axis is split over every device, parameters replicated.

Single host: all local devices. Multi-host (TPU pods, multi-node GPU): call
`maybe_initialize_distributed` first; each process then feeds its own rows of
the global batch (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed(config) -> None:
  """Starts `jax.distributed` when the config or the environment asks for it.

  `config.distributed.enabled = True` (with coordinator address, process count
  and id, or none of them where JAX detects the cluster, e.g. Cloud TPU), or the
  environment variable `ACIS_JAX_DISTRIBUTED=1`.
  """
  settings = config.get("distributed")
  wanted = bool(settings and settings.enabled) or os.environ.get("ACIS_JAX_DISTRIBUTED") == "1"
  if not wanted:
    return
  kwargs = {}
  if settings:
    kwargs = {k: v for k, v in (("coordinator_address", settings.coordinator_address),
                                ("num_processes", settings.num_processes),
                                ("process_id", settings.process_id)) if v not in (None, "", -1)}
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: XLA partitions the step from the input shardings (GSPMD), so the
  # step's code carries no sharding annotations.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh) -> None:
  devices = mesh.devices.size
  if global_batch % devices:
    raise ValueError(f"config.train.batch_size={global_batch} must be a multiple of the "
                     f"{devices} devices it is split over")


def process_rows(global_batch: int) -> slice:
  """The rows of the global batch that this process feeds."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (the full batch on a single host)."""
  sharding = batch_sharded(mesh)
  out = {}
  for name, local in batch.items():
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def replicate(tree: Any, mesh) -> Any:
  """`tree` copied to every device of `mesh`; every process passes the same values."""
  # Through host memory: JAX places host values on every process's devices, but
  # refuses to move a committed array (e.g. one orbax restored) to another host.
  return jax.device_put(jax.device_get(tree), replicated(mesh))
