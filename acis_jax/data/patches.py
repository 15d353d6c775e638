"""Random patches for training on volumes whose whole-grid steps do not fit in memory.

With `config.data.patch_shape` set, the fully convolutional networks (annotation and image
generators, their discriminators, the registration net) train on random crops of the
augmented image, labels and pseudo-mask, all cut at the same place. The mask generator and its
critic keep the whole grid: a latent code describes a whole anatomy, and they are the small
networks. Synthesis runs the generators on the whole grid (forward only, no stored
activations).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def check_patch_shape(patch_shape: Sequence[int], image_shape: Sequence[int]
                      ) -> tuple[int, ...] | None:
  """`patch_shape` as a tuple, or None for "the whole grid" (empty, or equal to the grid)."""
  patch = tuple(int(p) for p in patch_shape)
  image = tuple(int(s) for s in image_shape)
  if not patch or patch == image:
    return None
  if len(patch) != len(image):
    raise ValueError(f"config.data.patch_shape {patch} has {len(patch)} axes but "
                     f"config.data.image_shape {image} has {len(image)}")
  if any(p < 1 or p > s for p, s in zip(patch, image)):
    raise ValueError(f"config.data.patch_shape {patch} must lie within image_shape {image} "
                     "(every size from 1 to the image's)")
  return patch


def random_origins(key: jax.Array, batch: int, image_shape: Sequence[int],
                   patch_shape: Sequence[int]) -> jax.Array:
  """Per-example corners `(batch, ndim)` int32, uniform over every position the patch fits."""
  room = jnp.asarray([s - p + 1 for s, p in zip(image_shape, patch_shape)], jnp.int32)
  return jax.random.randint(key, (batch, len(room)), 0, room)


def crop(x: jax.Array, origins: jax.Array, patch_shape: Sequence[int]) -> jax.Array:
  """`x[i, o_i : o_i + patch_shape, ...]` for each example `i` of `(b, *spatial, ...)`."""
  ndim = len(patch_shape)
  trailing = x.shape[1 + ndim:]

  def one(example, origin):
    start = tuple(origin) + (0,) * len(trailing)
    return jax.lax.dynamic_slice(example, start, tuple(patch_shape) + trailing)

  return jax.vmap(one)(x, origins)


def random_crops(key: jax.Array, arrays: Sequence[jax.Array | None],
                 patch_shape: Sequence[int] | None) -> list[jax.Array | None]:
  """Crops every array at the same per-example random corner; None entries stay None.

  Arrays are `(b, *spatial, ...)` with one spatial grid. `patch_shape=None` returns them as
  they are. The same key and grid give the same corners, so two calls can cut matching places.
  """
  arrays = list(arrays)
  if patch_shape is None:
    return arrays
  first = next(a for a in arrays if a is not None)
  image_shape = first.shape[1:1 + len(patch_shape)]
  origins = random_origins(key, first.shape[0], image_shape, patch_shape)
  return [None if a is None else crop(a, origins, patch_shape) for a in arrays]
