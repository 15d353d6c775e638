"""Shared helpers of the evaluation tests."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


def _numpy_initialised(make, seed: int = 0) -> nnx.Module:
  """`make(rngs)` with parameters drawn by NumPy: LeCun-normal kernels, zero biases, unit scales.

  JAX's random initialisers compile a program per parameter shape: minutes on the shared test
  CPU. What these tests check does not depend on how the parameters were drawn.
  """
  model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      shape = node.get_value().shape
      if path[-1] == "kernel":
        value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
      else:
        value = np.zeros(shape) if path[-1] == "bias" else np.ones(shape)
      node.set_value(jnp.asarray(value, jnp.float32))
  return model


@pytest.fixture(name="numpy_initialised")
def numpy_initialised_fixture():
  """`numpy_initialised(make, seed=0)`: a model whose parameters NumPy drew (see above)."""
  return _numpy_initialised
