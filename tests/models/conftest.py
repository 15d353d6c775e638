"""Helpers for the model tests.

Keys use the "rbg" PRNG: XLA compiles its generator far faster on CPU than threefry's, and
every new parameter shape (and every dropout mask inside a jit) is a new compile.
"""
import functools

import jax
import pytest
from flax import nnx


def _key(seed: int = 0) -> jax.Array:
  return jax.random.key(seed, impl="rbg")


def _rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(_key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, args, kwargs):
  return nnx.merge(graphdef, state)(*args, **kwargs)


def _jit_apply(model, *args, **kwargs):
  """Runs `model(*args, **kwargs)` as one compiled call (cached per model structure)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, args, kwargs)


@pytest.fixture
def key():
  return _key


@pytest.fixture
def rngs():
  return _rngs


@pytest.fixture
def jit_apply():
  return _jit_apply
