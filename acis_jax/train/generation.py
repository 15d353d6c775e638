"""The generation chain of sec 2.2: noise -> pseudo-mask -> labels -> image, and its variant
from real anatomy: real case -> random diffeomorphism -> pseudo-mask and labels -> image.

One home for it: the training steps (fine-tuning on generated conditions, refinement) and
`synthesize` call the same links. Networks are passed as parameters (`{name: nnx.State}`)
and merged with their graph definitions here, the one place that does it.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from acis_jax.pseudomask import PseudoMaskParams, pseudo_mask
from acis_jax.spatial import integrate_velocity, random_velocity, warp, warp_labels


@dataclasses.dataclass(frozen=True)
class Chain:
  """Graph definitions of a run's networks and the sizes that shape the chain."""

  graphdefs: Mapping[str, nnx.GraphDef]
  num_classes: int  # 0: label-free (no annotation generator)
  latent_dim: int

  def net(self, name: str, params) -> nnx.Module:
    """Network `name` with parameters `params`."""
    return nnx.merge(self.graphdefs[name], params)

  def masks(self, params: Mapping, key: jax.Array, size: int) -> jax.Array:
    """`size` pseudo-masks `(size, *spatial, 1)` from the mask generator."""
    z = jax.random.normal(key, (size, self.latent_dim))
    return self.net("mask_generator", params["mask_generator"])(z)

  def label_logits(self, params: Mapping, masks: jax.Array,
                   key: jax.Array | None = None) -> jax.Array:
    return self.net("annotation_generator", params["annotation_generator"])(masks, key=key)

  def labels(self, params: Mapping, masks: jax.Array) -> jax.Array | None:
    """Hard labels `(b, *spatial)` of pseudo-masks (None when label-free)."""
    if not self.num_classes:
      return None
    return jnp.argmax(self.label_logits(params, masks), axis=-1)

  def one_hot(self, labels: jax.Array) -> jax.Array:
    return jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)

  def condition(self, masks: jax.Array, labels: jax.Array | None) -> jax.Array:
    """What the image generator and discriminator see beside the image: the pseudo-mask and
    the one-hot labels (integer `labels`) on the channel axis."""
    return masks if labels is None else jnp.concatenate([masks, self.one_hot(labels)], -1)

  def image(self, params: Mapping, condition: jax.Array, key: jax.Array | None) -> jax.Array:
    """Images `(b, *spatial, 1)` from a condition (`condition`'s layout; soft labels allowed).
    The generator's dropout, its noise source, runs when `key` is given."""
    labels = condition[..., 1:] if self.num_classes else None
    return self.net("image_generator", params["image_generator"])(
        condition[..., :1], labels, key=key)

  def sample(self, params: Mapping, key: jax.Array, size: int):
    """`(pseudo-masks, labels or None, images)` of `size` samples: the whole chain."""
    mask_key, image_key = jax.random.split(key)
    masks = self.masks(params, mask_key, size)
    labels = self.labels(params, masks)
    return masks, labels, self.image(params, self.condition(masks, labels), image_key)

  def variants(self, params: Mapping, key: jax.Array, images: jax.Array,
               labels: jax.Array | None, pseudomask: PseudoMaskParams, rms: float,
               scale: float):
    """`(pseudo-masks, labels or None, images)`: one new variant of each real case.

    Each real image `(b, *spatial, 1)` and its labels `(b, *spatial)` are moved by their own
    random smooth diffeomorphism (`random_velocity(rms, scale)`, integrated by scaling and
    squaring, as the registration net's fields); the pseudo-mask is a fresh one (new seeds)
    of the moved image, so it stays piecewise constant, and the labels are the real ones
    moved (exact up to resampling); the image generator paints the image.
    """
    size, spatial = images.shape[0], images.shape[1:-1]
    field_keys, mask_keys = jnp.split(jax.random.split(jax.random.fold_in(key, 0), 2 * size), 2)
    disp = integrate_velocity(jax.vmap(lambda k: random_velocity(k, spatial, rms, scale))(
        field_keys))
    moved = warp(images, disp)
    masks = jax.vmap(lambda k, x: pseudo_mask(k, x[..., 0], pseudomask).mask)(
        mask_keys, moved)[..., None]
    if labels is not None and self.num_classes:
      labels = warp_labels(labels, disp, self.num_classes)
    else:
      labels = None
    return masks, labels, self.image(params, self.condition(masks, labels),
                                     jax.random.fold_in(key, 1))
