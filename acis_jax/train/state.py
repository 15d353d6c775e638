"""The train state: what a training step updates and donates, as one typed pytree.

Used by the ACIS stages (`params` and `opt_state` map network names to their parts) and by
the downstream networks of the evaluation (one network: `params` is its `nnx.State`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainState:
  """step: int32 scalar, steps taken; params, opt_state: pytrees; extras: other carried
  arrays by name (e.g. the refinement's reward baseline)."""

  step: jax.Array
  params: Any
  opt_state: Any
  extras: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, params: Any, opt_state: Any, **extras: jax.Array) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
               extras=extras)

  def replace(self, **changes: Any) -> "TrainState":
    return dataclasses.replace(self, **changes)

  def next_step(self) -> "TrainState":
    return self.replace(step=self.step + 1)


def apply_update(params: Any, opt_state: Any, grads: Any,
                 optimizer: optax.GradientTransformation) -> tuple[Any, Any]:
  """One optimizer update: `(new params, new optimizer state)`."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
