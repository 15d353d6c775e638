"""Resampling: images, label maps and displacement fields sampled at displaced voxel positions.

Conventions shared by the whole `acis_jax.spatial` package:

- A displacement field has shape `(*spatial, ndim)` (optionally `(batch, *spatial, ndim)`), in
  voxel units; component `i` moves along array axis `i`.
- `warp(image, disp)(x) = image(x + disp(x))`: the moved image is the input sampled at
  `identity + disp` (a "pull" / backward warp, as in VoxelMorph).
- Images are channel-last, `(*spatial, C)` or `(batch, *spatial, C)`.
"""
import functools
import itertools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp

MODES = ("nearest", "constant")


def _check_order_mode(order: int, mode: str) -> None:
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _axis_nodes(coord: jax.Array, size: int, order: int, mode: str):
  """Interpolation nodes along one axis: a list of (index, weight), indices inside [0, size)."""
  if order == 0:
    # Half away from zero, like jax.scipy.ndimage (ties are measure-zero for real fields).
    rounded = jnp.sign(coord) * jnp.floor(jnp.abs(coord) + 0.5)
    nodes = [(rounded.astype(jnp.int32), None)]
  else:
    lower = jnp.floor(coord)
    frac = coord - lower
    lower = lower.astype(jnp.int32)
    nodes = [(lower, 1.0 - frac), (lower + 1, frac)]
  fixed = []
  for index, weight in nodes:
    if mode == "constant":
      # Zero outside the grid, interpolated across the border (scipy's "grid-constant").
      inside = ((index >= 0) & (index < size)).astype(coord.dtype)
      weight = inside if weight is None else weight * inside
    fixed.append((jnp.clip(index, 0, size - 1), weight))
  return fixed


def sample(
    image: jax.Array, coords: jax.Array, *, order: int = 1, mode: str = "nearest"
) -> jax.Array:
  """Samples `image` at continuous voxel coordinates.

  Args:
    image: `(*spatial, C)` array.
    coords: `(*out, ndim)` voxel coordinates (component `i` indexes array axis `i`),
      `ndim = image.ndim - 1`.
    order: 1 for (multi)linear interpolation, 0 for nearest neighbour.
    mode: "nearest" repeats the edge voxels (scipy `mode="nearest"`); "constant" treats the
      outside as 0 (scipy `mode="grid-constant"`).

  Returns:
    `(*out, C)` array of `image.dtype` (float images) or float32 (integer images); the
    arithmetic runs in at least float32.
  """
  _check_order_mode(order, mode)
  image, coords = jnp.asarray(image), jnp.asarray(coords)
  spatial, channels = image.shape[:-1], image.shape[-1]
  ndim = len(spatial)
  if coords.shape[-1] != ndim:
    raise ValueError(f"coords last axis must be {ndim} for an image of shape {image.shape}, "
                     f"got coords of shape {coords.shape}")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    image = image.astype(jnp.float32)
  # Coordinates and weights in at least float32: bf16 cannot address voxels beyond ~256.
  coords = coords.astype(jnp.promote_types(coords.dtype, jnp.float32))
  out_shape = coords.shape[:-1]
  strides = [1] * ndim
  for a in range(ndim - 2, -1, -1):
    strides[a] = strides[a + 1] * spatial[a + 1]
  # One gather of whole C-vectors per corner from a flat (N, C) view; "promise_in_bounds"
  # (indices are clipped above) also spares the gradient's scatter-add its bounds handling.
  # On CPU the forward pass is 3-5x faster than jax.scipy's map_coordinates per channel, the
  # backward (scatter-bound) on par; per-channel gathers and one stacked gather of all corners
  # were slower (benchmarks/spatial.py).
  flat = image.reshape(-1, channels)
  per_axis = [_axis_nodes(coords[..., a].reshape(-1), spatial[a], order, mode)
              for a in range(ndim)]
  result = None
  for corner in itertools.product(*per_axis):
    flat_index = sum(index * stride for (index, _), stride in zip(corner, strides))
    weights = [w for _, w in corner if w is not None]
    term = flat.at[flat_index].get(mode="promise_in_bounds").astype(coords.dtype)
    if weights:
      term = term * functools.reduce(operator.mul, weights)[:, None]
    result = term if result is None else result + term
  return result.reshape(*out_shape, channels).astype(image.dtype)


def identity_grid(spatial_shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Voxel coordinates of every voxel, `(*spatial_shape, ndim)`."""
  axes = [jnp.arange(n, dtype=dtype) for n in spatial_shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _split_batch(x: jax.Array, ndim: int, name: str, what: str) -> bool:
  """True when `x` carries a leading batch axis in front of `(*spatial, last)`."""
  if x.ndim == ndim + 1:
    return False
  if x.ndim == ndim + 2:
    return True
  raise ValueError(f"{name} must have shape (*spatial, {what}) or (batch, *spatial, {what}) "
                   f"with {ndim} spatial axes, got shape {x.shape}")


def _batched(fn, x: jax.Array, disp: jax.Array, x_batched: bool, d_batched: bool):
  """Applies `fn(x, disp)` over whichever of `x` and `disp` carries a batch axis."""
  if x_batched and d_batched and x.shape[0] != disp.shape[0]:
    raise ValueError(f"batch sizes differ: {x.shape[0]} vs displacement {disp.shape[0]}")
  if not (x_batched or d_batched):
    return fn(x, disp)
  return jax.vmap(fn, in_axes=(0 if x_batched else None, 0 if d_batched else None))(x, disp)


def warp(image: jax.Array, disp: jax.Array, *, order: int = 1,
         mode: str = "nearest") -> jax.Array:
  """Moves `image` by the displacement field `disp`: `out(x) = image(x + disp(x))`.

  Args:
    image: `(*spatial, C)` or `(batch, *spatial, C)`.
    disp: `(*spatial, ndim)` or `(batch, *spatial, ndim)`, voxel units. Either input may carry a
      batch axis the other lacks; the unbatched one is shared across the batch.
    order: 1 linear, 0 nearest neighbour.
    mode: "nearest" (edge values continue outward) or "constant" (zero outside).

  Returns:
    `(*spatial, C)`, or `(batch, *spatial, C)` if either input is batched.
  """
  image, disp = jnp.asarray(image), jnp.asarray(disp)
  ndim = disp.shape[-1]
  image_batched = _split_batch(image, ndim, "image", "C")
  disp_batched = _split_batch(disp, ndim, "disp", str(ndim))
  image_spatial = image.shape[1:-1] if image_batched else image.shape[:-1]
  disp_spatial = disp.shape[1:-1] if disp_batched else disp.shape[:-1]
  if image_spatial != disp_spatial:
    raise ValueError(f"image spatial shape {image_spatial} differs from displacement spatial "
                     f"shape {disp_spatial}")

  def one(img, d):
    grid = identity_grid(d.shape[:-1], jnp.promote_types(d.dtype, jnp.float32))
    return sample(img, grid + d, order=order, mode=mode)

  return _batched(one, image, disp, image_batched, disp_batched)


def one_hot_labels(labels: jax.Array, num_classes: int, dtype=jnp.float32) -> jax.Array:
  """Integer labels `(...)` -> one-hot `(..., num_classes)`."""
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.floating):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def warp_labels(labels: jax.Array, disp: jax.Array, num_classes: int, *,
                mode: str = "nearest") -> jax.Array:
  """Moves a label map by `disp` with one-hot -> linear warp -> argmax, so labels stay labels.

  Args:
    labels: integer `(*spatial)` or `(batch, *spatial)`, values in `[0, num_classes)`.
    disp: `(*spatial, ndim)` or `(batch, *spatial, ndim)`, voxel units.
    num_classes: number of classes K.
    mode: see `warp`; with "constant" the outside counts as no class and falls to class 0.

  Returns:
    int32 labels with the batch/spatial shape of the output of `warp`.
  """
  soft = warp(one_hot_labels(labels, num_classes), disp, order=1, mode=mode)
  return jnp.argmax(soft, axis=-1).astype(jnp.int32)


def resize(image: jax.Array, spatial_shape: Sequence[int], *, order: int = 1) -> jax.Array:
  """Resamples an image onto a grid of `spatial_shape` covering the same extent.

  Corner voxels map onto corner voxels (PyTorch's `align_corners=True`, what VoxelMorph uses),
  no anti-aliasing.

  Args:
    image: `(*spatial, C)` or `(batch, *spatial, C)`.
    spatial_shape: the new spatial shape.
    order: 1 linear, 0 nearest neighbour.

  Returns:
    `(*spatial_shape, C)` or `(batch, *spatial_shape, C)`.
  """
  image = jnp.asarray(image)
  spatial_shape = tuple(int(n) for n in spatial_shape)
  ndim = len(spatial_shape)
  batched = _split_batch(image, ndim, "image", "C")
  old = image.shape[1:-1] if batched else image.shape[:-1]
  axes = [jnp.linspace(0.0, o - 1.0, n) for o, n in zip(old, spatial_shape)]
  coords = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)

  def one(img):
    return sample(img, coords, order=order, mode="nearest")

  return jax.vmap(one)(image) if batched else one(image)


def resize_field(disp: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Resamples a displacement field to `spatial_shape` and rescales its voxel-unit values.

  Component `i` is multiplied by `(new_i - 1) / (old_i - 1)`, the voxel-size ratio of the
  corner-aligned grids, so the field describes the same physical motion on the new grid.

  Args:
    disp: `(*spatial, ndim)` or `(batch, *spatial, ndim)`, voxel units.
    spatial_shape: the new spatial shape.

  Returns:
    `(*spatial_shape, ndim)` or `(batch, *spatial_shape, ndim)`, voxel units of the new grid.
  """
  disp = jnp.asarray(disp)
  ndim = disp.shape[-1]
  if len(spatial_shape) != ndim:
    raise ValueError(f"spatial_shape {tuple(spatial_shape)} needs {ndim} axes for a field "
                     f"with {ndim} components")
  old = disp.shape[-1 - ndim:-1]
  scale = jnp.asarray([(n - 1) / max(o - 1, 1) for o, n in zip(old, spatial_shape)],
                      disp.dtype)
  return resize(disp, spatial_shape, order=1) * scale
