"""The generation chain of sec 2.2: noise -> pseudo-mask -> labels -> image, and its variant
from real anatomy: real case -> random diffeomorphism -> pseudo-mask and labels -> image.
The comparison synthesizers' links live here too (`from_noise`, `generated_labels`); each one's
chain is in its module (`acis_jax.synthesizers`), which `sample` calls.

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
from acis_jax.synthesizers import comparison_module, uses_pseudo_masks


@dataclasses.dataclass(frozen=True)
class Chain:
  """Graph definitions of a run's networks and the sizes that shape the chain."""

  graphdefs: Mapping[str, nnx.GraphDef]
  num_classes: int  # 0: label-free (no annotation generator)
  latent_dim: int
  synthesizer: str = "acis"  # config.synthesizer

  @property
  def uses_masks(self) -> bool:
    """Whether images are painted from pseudo-masks (ACIS's chain, not the comparison
    synthesizers' label-only or joint ones)."""
    return uses_pseudo_masks(self.synthesizer)

  def net(self, name: str, params) -> nnx.Module:
    """Network `name` with parameters `params`."""
    return nnx.merge(self.graphdefs[name], params)

  def masks(self, params: Mapping, key: jax.Array, size: int) -> jax.Array:
    """`size` pseudo-masks `(size, *spatial, 1)` from the mask generator."""
    return self.from_noise("mask_generator", params, key, size)

  def from_noise(self, generator: str, params: Mapping, key: jax.Array, size: int,
                 z: jax.Array | None = None) -> jax.Array:
    """`size` samples of a generator from noise, as its critic sees them: pseudo-masks
    `(size, *spatial, 1)`; one-hot labels `(size, *spatial, num_classes)` (label generator);
    an image and one-hot labels on the channel axis (joint generator). One-hot labels are
    straight-through (`straight_through_one_hot`), so they carry the softmax's gradient.
    `z`: the latents, drawn from `key` when not given."""
    if z is None:
      z = jax.random.normal(key, (size, self.latent_dim))
    out = self.net(generator, params[generator])(z)
    if generator == "label_generator":
      return straight_through_one_hot(out)
    if generator == "joint_generator":
      return jnp.concatenate([jax.nn.sigmoid(out[..., :1]),
                              straight_through_one_hot(out[..., 1:])], -1)
    return out

  def generated_labels(self, params: Mapping, key: jax.Array, size: int) -> jax.Array:
    """Hard labels `(size, *spatial)` of the label generator (labels-first synthesizer)."""
    return jnp.argmax(self.from_noise("label_generator", params, key, size), axis=-1)

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

  def condition(self, masks: jax.Array | None, labels: jax.Array | None) -> jax.Array:
    """What the image generator and discriminator see beside the image: the pseudo-mask (None
    for a synthesizer without) and the one-hot labels (integer `labels`) on the channel axis."""
    if labels is None:
      return masks
    one_hot = self.one_hot(labels)
    return one_hot if masks is None else jnp.concatenate([masks, one_hot], -1)

  def image(self, params: Mapping, condition: jax.Array, key: jax.Array | None) -> jax.Array:
    """Images `(b, *spatial, 1)` from a condition (`condition`'s layout; soft labels allowed).
    The generator's dropout, its noise source, runs when `key` is given."""
    mask_channels = int(self.uses_masks)
    labels = condition[..., mask_channels:] if self.num_classes else None
    return self.net("image_generator", params["image_generator"])(
        condition[..., :1] if mask_channels else None, labels, key=key)

  def sample(self, params: Mapping, key: jax.Array, size: int):
    """`(pseudo-masks or None, labels or None, images)` of `size` samples: the whole chain
    of the synthesizer (no pseudo-masks in the comparison synthesizers')."""
    if not self.uses_masks:
      return comparison_module(self.synthesizer).sample(self, params, key, size)
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


def straight_through_one_hot(logits: jax.Array) -> jax.Array:
  """One-hot of the argmax forward, the softmax's gradient backward: what a discriminator sees
  of generated labels, hard like the real ones it is compared with (soft fakes against
  one-hot reals are told apart by their values alone)."""
  probs = jax.nn.softmax(logits)
  hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=probs.dtype)
  return probs + jax.lax.stop_gradient(hard - probs)
