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
import math
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


def _nearest_nodes(coord: jax.Array, size: int, mode: str):
  """The nearest node along one axis: (index inside [0, size), weight or None)."""
  # Half away from zero, like jax.scipy.ndimage (ties are measure-zero for real fields).
  index = (jnp.sign(coord) * jnp.floor(jnp.abs(coord) + 0.5)).astype(jnp.int32)
  weight = None
  if mode == "constant":
    weight = ((index >= 0) & (index < size)).astype(coord.dtype)
  return jnp.clip(index, 0, size - 1), weight


def _linear_nodes(coord: jax.Array, size: int, mode: str):
  """The two linear nodes along one axis: indices, weights and the weights' d/d coord.

  Indices are clipped into [0, size); in "constant" mode a node outside the grid weighs 0 (zero
  outside, interpolated across the border: scipy's "grid-constant").
  """
  lower = jnp.floor(coord)
  frac = coord - lower
  lower = lower.astype(jnp.int32)
  indices = (lower, lower + 1)
  weights = (1.0 - frac, frac)
  slopes = (-jnp.ones_like(frac), jnp.ones_like(frac))
  if mode == "constant":
    inside = [((i >= 0) & (i < size)).astype(coord.dtype) for i in indices]
    weights = tuple(w * m for w, m in zip(weights, inside))
    slopes = tuple(d * m for d, m in zip(slopes, inside))
  return tuple(jnp.clip(i, 0, size - 1) for i in indices), weights, slopes


def _flat_strides(spatial: Sequence[int]) -> list[int]:
  strides = [1] * len(spatial)
  for a in range(len(spatial) - 2, -1, -1):
    strides[a] = strides[a + 1] * spatial[a + 1]
  return strides


def _image_offsets(points: int, images: int, spatial: tuple[int, ...]) -> jax.Array | int:
  """Flat-index offset of each of `points` points that fall in `images` equal runs, run `g`
  reading the `g`-th of `images` images stacked in one flat `(images * prod(spatial), C)`."""
  if images == 1:
    return 0
  run = points // images
  return (jnp.arange(points, dtype=jnp.int32) // run) * math.prod(spatial)


def _linear_corners(coords: jax.Array, spatial: tuple[int, ...], mode: str, images: int):
  """Per corner of the interpolation cell: `(flat index, weight, [d weight / d coord_a])`.

  `coords` is `(M, ndim)`, in `images` equal runs (see `_image_offsets`); every array returned
  is `(M,)`, one per axis or corner, because XLA:CPU reduces and broadcasts over a short minor
  axis (ndim or C) 10x slower than it adds separate arrays.
  """
  nodes = [_linear_nodes(coords[:, a], n, mode) for a, n in enumerate(spatial)]
  strides = _flat_strides(spatial)
  offsets = _image_offsets(coords.shape[0], images, spatial)
  corners = []
  for bits in itertools.product((0, 1), repeat=len(spatial)):
    index = offsets + sum(nodes[a][0][b] * stride
                          for a, (b, stride) in enumerate(zip(bits, strides)))
    weights = [nodes[a][1][b] for a, b in enumerate(bits)]
    slopes = [functools.reduce(operator.mul, [
        nodes[a][2][b] if a == axis else weights[a] for a, b in enumerate(bits)])
        for axis in range(len(spatial))]
    corners.append((index, functools.reduce(operator.mul, weights), slopes))
  return corners


def _gather(flat: jax.Array, index: jax.Array, dtype) -> jax.Array:
  # Indices are clipped: "promise_in_bounds" spares the gather its bounds handling.
  return flat.at[index].get(mode="promise_in_bounds").astype(dtype)


def _channel_sum(x: jax.Array) -> jax.Array:
  """`x.sum(-1)` for `(M, C)`, as C - 1 additions (see `_linear_corners`)."""
  return functools.reduce(operator.add, [x[:, c] for c in range(x.shape[1])])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _linear_sample(flat: jax.Array, coords: jax.Array, spatial: tuple[int, ...],
                   mode: str, images: int) -> jax.Array:
  """Multilinear interpolation of `images` flat images `(images * N, C)` at `(M, ndim)` coords
  -> `(M, C)`, the coords in `images` equal runs, one per image (`_image_offsets`).

  One gather of whole C-vectors per corner. The gradient is written out (`_linear_sample_bwd`):
  autodiff's transpose of the corner sum (2**ndim scatter-adds into separate buffers, then
  summed, and sums over the short channel axis) made scaling and squaring forward + backward
  4.2x slower at 64x64x64 and 1.2-1.5x at 4x256x256 on CPU (benchmarks/peers.py).
  """
  result = None
  for index, weight, _ in _linear_corners(coords, spatial, mode, images):
    term = _gather(flat, index, coords.dtype) * weight[:, None]
    result = term if result is None else result + term
  return result


def _linear_sample_fwd(flat, coords, spatial, mode, images):
  return _linear_sample(flat, coords, spatial, mode, images), (flat, coords)


def _linear_sample_bwd(spatial, mode, images, residuals, cotangent):
  """d flat: every corner's weighted cotangent scatter-added into one accumulator (a loop, so
  that it is updated in place); d coords: each corner's value against the cotangent, times
  the slopes of its weight (gathers only). The values autodiff gives, in another order."""
  flat, coords = residuals
  corners = _linear_corners(coords, spatial, mode, images)
  cotangent = cotangent.astype(coords.dtype)
  index = jnp.stack([i for i, _, _ in corners])
  weight = jnp.stack([w for _, w, _ in corners])
  d_flat = jax.lax.fori_loop(
      0, len(corners),
      lambda j, acc: acc.at[index[j]].add(cotangent * weight[j][:, None],
                                          mode="promise_in_bounds"),
      jnp.zeros(flat.shape, coords.dtype))
  d_coords = [0.0] * len(spatial)
  for corner_index, _, slopes in corners:
    along = _channel_sum(_gather(flat, corner_index, coords.dtype) * cotangent)
    d_coords = [d + slope * along for d, slope in zip(d_coords, slopes)]
  return d_flat.astype(flat.dtype), jnp.stack(d_coords, axis=-1)


_linear_sample.defvjp(_linear_sample_fwd, _linear_sample_bwd)


def _sample_runs(image: jax.Array, coords: jax.Array, images: int, order: int,
                 mode: str) -> jax.Array:
  """`images` images `(images, *spatial, C)` (or one, `(*spatial, C)`, for `images == 1`)
  sampled at `coords` `(..., ndim)`, whose points fall in `images` equal runs, one per image.

  The images are stacked in one flat `(images * N, C)` array and every point's flat index
  carries its image's offset, so a batch takes one gather per corner. Vmapped, each gather
  and scatter-add also built `(image, voxel)` index pairs: scaling and squaring's forward +
  backward at 4x256x256 took 121 ms on CPU against 60-66 ms now.
  """
  _check_order_mode(order, mode)
  spatial, channels = tuple(image.shape[-1 - coords.shape[-1]:-1]), image.shape[-1]
  ndim = len(spatial)
  if not jnp.issubdtype(image.dtype, jnp.floating):
    image = image.astype(jnp.float32)
  # Coordinates and weights in at least float32: bf16 cannot address voxels beyond ~256.
  coords = coords.astype(jnp.promote_types(coords.dtype, jnp.float32))
  # Gathers of whole C-vectors from a flat (N, C) view: on CPU 3-5x faster than jax.scipy's
  # map_coordinates per channel (benchmarks/spatial.py).
  flat = image.reshape(-1, channels)
  points = coords.reshape(-1, ndim)
  if order == 1:
    result = _linear_sample(flat, points, spatial, mode, images)
  else:
    nodes = [_nearest_nodes(points[:, a], n, mode) for a, n in enumerate(spatial)]
    index = _image_offsets(points.shape[0], images, spatial) + sum(
        i * stride for (i, _), stride in zip(nodes, _flat_strides(spatial)))
    result = _gather(flat, index, coords.dtype)
    weights = [w for _, w in nodes if w is not None]
    if weights:
      result = result * functools.reduce(operator.mul, weights)[:, None]
  return result.reshape(*coords.shape[:-1], channels).astype(image.dtype)


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
  image, coords = jnp.asarray(image), jnp.asarray(coords)
  if coords.shape[-1] != image.ndim - 1:
    raise ValueError(f"coords last axis must be {image.ndim - 1} for an image of shape "
                     f"{image.shape}, got coords of shape {coords.shape}")
  return _sample_runs(image, coords, 1, order, mode)


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
  if image_batched and disp_batched and image.shape[0] != disp.shape[0]:
    raise ValueError(f"batch sizes differ: {image.shape[0]} vs displacement {disp.shape[0]}")
  coords = identity_grid(disp_spatial, jnp.promote_types(disp.dtype, jnp.float32)) + disp
  if image_batched and not disp_batched:
    coords = jnp.broadcast_to(coords, (image.shape[0], *coords.shape))
  return _sample_runs(image, coords, image.shape[0] if image_batched else 1, order, mode)


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
  if batched:
    coords = jnp.broadcast_to(coords, (image.shape[0], *coords.shape))
  return _sample_runs(image, coords, image.shape[0] if batched else 1, order, "nearest")


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
