"""Per-case evaluation metrics, 2-D and 3-D: Dice, surface distances (mm), PSNR, SSIM.

Shapes. Every function takes arrays of shape `(*batch, *spatial)`: `spatial_dims` (2 or 3) says
how many trailing axes are spatial; `None` means all axes are, i.e. one 2-D or 3-D case. Channel
axes are the caller's to drop (`x[..., 0]`). The surface metrics take one case at a time.

Where they run. Dice, PSNR and SSIM are written in JAX: they are used as training metrics on
device, under `jit`, on batches. The surface metrics are NumPy/SciPy: they need a Euclidean
distance transform and a sort, both on the CPU already and exact there, and they are computed
once per case at evaluation time, never inside a training step.

Surfaces (`surface_metrics`). A mask's surface is what marching cubes (marching squares in 2-D)
puts through the edge midpoints of the grid of 2^n-voxel cells: a cell whose voxels are neither
all inside nor all outside is a surface cell, located at its centre, and it carries the area
(3-D, mm^2) or length (2-D, mm) of the surface inside it. Distances run between surface cell
centres (`scipy.ndimage.distance_transform_edt` with `sampling=spacing`) and every distance is
weighted by its cell's area. This is the definition of the DeepMind `surface-distance` package
(Nikolov et al. 2021, arXiv:1809.04430) and the areas are the same: ambiguous cell faces
separate the minority corners, and each surface polygon is split into the triangles of largest
total area in voxel units (what the package's marching-cubes table holds, checked code by code
in the tests). Voxels beyond the image border count as background.

  * `msd`: symmetric mean surface distance, area-weighted over both surfaces together,
    `(sum_a w_a d(a, T) + sum_t w_t d(t, P)) / (sum_a w_a + sum_t w_t)`, in mm.
  * `hd95`: the larger of the two directed area-weighted 95th percentiles of the distances, mm.
  * `nsd`: normalised surface Dice: the share of both surfaces' area lying within
    `tolerance_mm` of the other surface, in [0, 1].

Empty masks. A metric of one case must always be a finite number, so that a mean over cases
stays a mean rather than turning into nan (which silently drops the case) or inf (which swamps
every other case):

  * both empty (the structure is absent and none was predicted: a correct answer):
    dice 1, msd 0, hd95 0, nsd 1;
  * exactly one empty (a structure missed, or one hallucinated: the worst answer):
    dice 0, nsd 0, and msd = hd95 = the diagonal of the field of view, `|shape * spacing|` in
    mm. No two points of the image are farther apart, so a missed structure scores worse than
    any prediction that finds it, and the cap is a fixed, reported property of the image.

PSNR and SSIM follow Wang et al. 2004 as `skimage.metrics` computes them with
`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`: an 11-tap Gaussian window
(truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, and the mean SSIM taken over the voxels at
least 5 away from every border, where the window fits inside the image (so no border padding
enters the result). Identical images have PSNR = +inf, as in scikit-image.
"""
import functools
import itertools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

# Wang et al. 2004: Gaussian window of sigma 1.5 cut at 3.5 sigma (11 taps), K1, K2.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_HD_PERCENT = 95.0


def _spatial_axes(ndim: int, spatial_dims: int | None, name: str) -> tuple[int, ...]:
  """Axes of the trailing `spatial_dims` axes of an `ndim`-axis array (all axes if None)."""
  rank = ndim if spatial_dims is None else spatial_dims
  if rank not in (2, 3):
    raise ValueError(f"{name}: the spatial rank must be 2 or 3, got {rank} "
                     f"(array with {ndim} axes, spatial_dims={spatial_dims})")
  if rank > ndim:
    raise ValueError(f"{name}: spatial_dims={spatial_dims} but the array has only {ndim} axes")
  return tuple(range(ndim - rank, ndim))


def _check_same_shape(a, b, name: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name}: the two inputs differ in shape, {a.shape} vs {b.shape}")


# ---------------------------------------------------------------------------------------------
# Dice


@functools.partial(jax.jit, static_argnames=("labels", "axes"))
def _dice_per_label(pred: jax.Array, target: jax.Array, labels: tuple[int, ...],
                    axes: tuple[int, ...]) -> jax.Array:
  scores = []
  for label in labels:
    p, t = pred == label, target == label
    overlap = jnp.sum(p & t, axis=axes).astype(jnp.float32)
    total = (jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes)).astype(jnp.float32)
    # Both empty: the absence was predicted correctly (module docstring).
    scores.append(jnp.where(total > 0, 2.0 * overlap / jnp.maximum(total, 1.0), 1.0))
  return jnp.stack(scores, axis=-1)


def _array_module(x):
  """jax.numpy for JAX arrays (traced ones too), else NumPy: one body for a host-side set of
  cases in float64 and for a batch inside a jitted step."""
  return jnp if isinstance(x, jax.Array) else np


def image_distances(a, b):
  """`(len(a), len(b))` root mean squared differences between the cases of `a` and `b`."""
  xp = _array_module(a)
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  if xp is np:
    a, b = a.astype(np.float64), b.astype(np.float64)
  squared = (a ** 2).mean(1)[:, None] + (b ** 2).mean(1)[None] - 2 * a @ b.T / a.shape[1]
  return xp.sqrt(xp.maximum(squared, 0.0))


def label_distances(a, b, num_classes: int):
  """`(len(a), len(b))` 1 - Dice between integer label maps, averaged over the foreground
  classes present in either map."""
  xp = _array_module(a)
  dtype = np.float64 if xp is np else jnp.float32
  one_hot = lambda x: xp.stack([(x == c).reshape(len(x), -1) for c in range(1, num_classes)],
                               1).astype(dtype)  # (n, C-1, V)
  oa, ob = one_hot(a), one_hot(b)
  overlap = xp.einsum("icv,jcv->ijc", oa, ob)
  sizes = oa.sum(2)[:, None, :] + ob.sum(2)[None, :, :]
  present = sizes > 0
  dice = xp.where(present, 2 * overlap / xp.where(present, sizes, 1), 0.0)
  return 1.0 - dice.sum(2) / xp.maximum(present.sum(2), 1)


def dice(pred: jax.Array, target: jax.Array, labels: Sequence[int] | None = None, *,
         spatial_dims: int | None = None) -> dict[str, jax.Array]:
  """Dice overlap per label and its mean over the labels, per case.

  Args:
    pred, target: integer (or bool) label maps of shape `(*batch, *spatial)`.
    labels: the foreground labels to score. `None`: every nonzero label found in `pred` or
      `target`; that needs concrete arrays, so pass `labels` when calling under `jit`/`vmap`.
    spatial_dims: the number of trailing spatial axes (2 or 3); `None` means all axes.

  Returns:
    `{str(label): dice, ..., "mean": mean over labels}`, each a float32 array of shape `batch`
    (a scalar for one case). String keys keep the dict a JAX pytree and a JSON object. A label
    absent from both maps scores 1 (module docstring); with no foreground label at all,
    `"mean"` is 1 and there is no other key.
  """
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  _check_same_shape(pred, target, "dice")
  for name, a in (("pred", pred), ("target", target)):
    if not (jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_):
      raise ValueError(f"dice: {name} must hold integer labels, got dtype {a.dtype} "
                       "(take an argmax of probabilities first)")
  axes = _spatial_axes(pred.ndim, spatial_dims, "dice")
  batch_shape = pred.shape[:axes[0]]
  if labels is None:
    if isinstance(pred, jax.core.Tracer) or isinstance(target, jax.core.Tracer):
      raise ValueError("dice: pass `labels` explicitly when tracing (jit/vmap): "
                       "they cannot be read from traced arrays")
    found = np.union1d(np.unique(np.asarray(pred)), np.unique(np.asarray(target)))
    labels = tuple(int(v) for v in found if v != 0)
  else:
    labels = tuple(int(v) for v in labels)
    if not labels:
      raise ValueError("dice: `labels` is empty; pass None to score every nonzero label")
    if len(set(labels)) != len(labels):
      raise ValueError(f"dice: `labels` has repeated entries: {labels}")
  if not labels:
    return {"mean": jnp.ones(batch_shape, jnp.float32)}
  per_label = _dice_per_label(pred, target, labels, axes)
  scores = {str(label): per_label[..., i] for i, label in enumerate(labels)}
  scores["mean"] = jnp.mean(per_label, axis=-1)
  return scores


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM


def _as_float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_data_range(data_range, name: str) -> None:
  # A traced data_range cannot be checked; a concrete one can.
  if isinstance(data_range, numbers.Real) and not data_range > 0:
    raise ValueError(f"{name}: data_range must be > 0, got {data_range}")


@functools.partial(jax.jit, static_argnames=("axes",))
def _psnr(x: jax.Array, y: jax.Array, data_range, axes: tuple[int, ...]) -> jax.Array:
  mse = jnp.mean(jnp.square(x - y), axis=axes)
  return 10.0 * jnp.log10(jnp.square(data_range) / mse)


def psnr(x: jax.Array, y: jax.Array, data_range: float = 1.0, *,
         spatial_dims: int | None = None) -> jax.Array:
  """Peak signal-to-noise ratio `10 log10(data_range^2 / MSE)` in dB, per case.

  Args:
    x, y: images of shape `(*batch, *spatial)`, intensities on a scale where `data_range` is
      the full range (1 for images in [0, 1]).
    data_range: the peak-to-peak range of the intensity scale, > 0.
    spatial_dims: the number of trailing spatial axes (2 or 3); `None` means all axes.

  Returns:
    `batch`-shaped PSNR in dB (a scalar for one case); +inf where the images are identical.
  """
  x, y = _as_float(x), _as_float(y)
  _check_same_shape(x, y, "psnr")
  _check_data_range(data_range, "psnr")
  return _psnr(x, y, data_range, _spatial_axes(x.ndim, spatial_dims, "psnr"))


def high_frequency_energy(images: jax.Array, *, spatial_dims: int | None = None) -> jax.Array:
  """The mean squared Laplacian (the 2n + 1-point stencil, borders reflected as
  `scipy.ndimage.laplace` reflects them) of each case: `(*batch,)`. Texture in the quality
  report, and a term of the refinement, where dropout noise inflates it and blur lowers it.

  Args:
    images: `(*batch, *spatial)`.
    spatial_dims: the number of trailing spatial axes (2 or 3); `None` means all axes.
  """
  images = _as_float(images)
  axes = _spatial_axes(images.ndim, spatial_dims, "high_frequency_energy")
  pad = [(1, 1) if a in axes else (0, 0) for a in range(images.ndim)]
  padded = jnp.pad(images, pad, mode="symmetric")
  centre = [slice(1, -1) if a in axes else slice(None) for a in range(images.ndim)]
  laplacian = -2.0 * len(axes) * images
  for axis in axes:
    for start in (0, 2):  # the two neighbours along `axis`
      index = list(centre)
      index[axis] = slice(start, start + images.shape[axis])
      laplacian += padded[tuple(index)]
  return jnp.mean(laplacian ** 2, axis=axes)


def _gaussian_blur_valid(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Separable Gaussian filter (sigma 1.5, 11 taps) where the window fits inside the image.

  Each axis in `axes` shrinks by 10: SSIM averages only over those voxels, so no border
  padding ever enters the result.
  """
  offsets = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1)
  taps = np.exp(-0.5 * (offsets / _SSIM_SIGMA) ** 2)
  taps = taps / taps.sum()
  for axis in axes:
    size = x.shape[axis] - 2 * _SSIM_RADIUS
    # An 11-tap sum of shifted slices: cheaper on CPU than XLA's general convolution.
    x = sum(float(w) * jax.lax.slice_in_dim(x, k, k + size, axis=axis)
            for k, w in enumerate(taps))
  return x


@functools.partial(jax.jit, static_argnames=("axes",))
def _ssim(x: jax.Array, y: jax.Array, data_range, axes: tuple[int, ...]) -> jax.Array:
  c1 = jnp.square(_SSIM_K1 * data_range)
  c2 = jnp.square(_SSIM_K2 * data_range)
  # One blur pass for all five local moments: stack them on a new leading axis.
  moments = _gaussian_blur_valid(jnp.stack([x, y, x * x, y * y, x * y]),
                                 tuple(a + 1 for a in axes))
  mu_x, mu_y, xx, yy, xy = moments
  var_x = xx - mu_x * mu_x
  var_y = yy - mu_y * mu_y
  cov = xy - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
              / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
  return jnp.mean(ssim_map, axis=axes)


def ssim(x: jax.Array, y: jax.Array, data_range: float = 1.0, *,
         spatial_dims: int | None = None) -> jax.Array:
  """Mean structural similarity (Wang et al. 2004, Gaussian window), per case.

  Args:
    x, y: images of shape `(*batch, *spatial)`; every spatial axis needs >= 11 voxels.
    data_range: the peak-to-peak range of the intensity scale, > 0 (1 for images in [0, 1]).
    spatial_dims: the number of trailing spatial axes (2 or 3); `None` means all axes.

  Returns:
    `batch`-shaped mean SSIM (a scalar for one case), 1 for identical images.
  """
  x, y = _as_float(x), _as_float(y)
  _check_same_shape(x, y, "ssim")
  _check_data_range(data_range, "ssim")
  axes = _spatial_axes(x.ndim, spatial_dims, "ssim")
  window = 2 * _SSIM_RADIUS + 1
  if min(x.shape[a] for a in axes) < window:
    raise ValueError(f"ssim: every spatial axis needs >= {window} voxels (the Gaussian window), "
                     f"got spatial shape {tuple(x.shape[a] for a in axes)}")
  return _ssim(x, y, data_range, axes)


# ---------------------------------------------------------------------------------------------
# Surface elements: which part of the surface each 2^n-voxel cell holds
#
# A cell's code has bit i set when corner i (in `itertools.product((0, 1), repeat=ndim)` order,
# offset from the cell's low corner) is inside the mask.


def _face_cycles(ndim: int) -> list[list[tuple[int, ...]]]:
  """The square faces of the unit cell, each as its 4 corners in cyclic order."""
  cycles = []
  for fixed_axes in itertools.combinations(range(ndim), ndim - 2):
    free = [a for a in range(ndim) if a not in fixed_axes]
    for fixed_values in itertools.product((0, 1), repeat=ndim - 2):
      cycle = []
      for u, v in ((0, 0), (0, 1), (1, 1), (1, 0)):
        corner = [0] * ndim
        for a, value in zip(fixed_axes, fixed_values):
          corner[a] = value
        corner[free[0]], corner[free[1]] = u, v
        cycle.append(tuple(corner))
      cycles.append(cycle)
  return cycles


def _midpoint(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[float, ...]:
  return tuple((p + q) / 2 for p, q in zip(a, b))


def _cell_segments(inside: dict, ndim: int) -> list[tuple[tuple[float, ...], ...]]:
  """Marching-squares segments on every face of a cell, between edge midpoints."""
  # A face with alternating corners is ambiguous: cut off the corners of the cell's minority
  # side (inside when at most half the corners are inside), as the package's table does.
  cut_inside = 2 * sum(inside.values()) <= 2**ndim
  segments = []
  for cycle in _face_cycles(ndim):
    crossings = [_midpoint(cycle[i], cycle[(i + 1) % 4]) for i in range(4)
                 if inside[cycle[i]] != inside[cycle[(i + 1) % 4]]]
    if len(crossings) == 2:
      segments.append(tuple(crossings))
    elif len(crossings) == 4:
      for i in range(4):
        if inside[cycle[i]] == cut_inside:
          segments.append((_midpoint(cycle[i - 1], cycle[i]),
                           _midpoint(cycle[i], cycle[(i + 1) % 4])))
  return segments


def _closed_loops(segments) -> list[list[tuple[float, ...]]]:
  """Chains segments (each point shared by exactly two) into closed polygons."""
  neighbours = {}
  for a, b in segments:
    neighbours.setdefault(a, []).append(b)
    neighbours.setdefault(b, []).append(a)
  loops, visited = [], set()
  for start in neighbours:
    if start in visited:
      continue
    loop, previous, current = [start], None, start
    visited.add(start)
    while True:
      step = [p for p in neighbours[current] if p != previous and p not in visited]
      if not step:
        break
      previous, current = current, step[0]
      loop.append(current)
      visited.add(current)
    loops.append(loop)
  return loops


def _triangle_area(a, b, c) -> float:
  return float(np.linalg.norm(np.cross(np.subtract(b, a), np.subtract(c, a)))) / 2


def _largest_area_triangulation(polygon: list) -> list[tuple]:
  """Triangles of the triangulation of a (possibly skew) polygon with the largest total area."""
  n = len(polygon)
  best = {(i, i + 1): (0.0, None) for i in range(n - 1)}
  for gap in range(2, n):
    for i in range(n - gap):
      j = i + gap
      best[i, j] = max((best[i, k][0] + best[k, j][0]
                        + _triangle_area(polygon[i], polygon[k], polygon[j]), k)
                       for k in range(i + 1, j))
  triangles, pending = [], [(0, n - 1)]
  while pending:
    i, j = pending.pop()
    k = best[i, j][1]
    if k is not None:
      triangles.append((polygon[i], polygon[k], polygon[j]))
      pending += [(i, k), (k, j)]
  return triangles


@functools.cache
def _surface_elements(ndim: int) -> tuple[np.ndarray, np.ndarray]:
  """Every cell code's surface as simplices in voxel units.

  Returns:
    `(codes (E,), vertices (E, ndim, ndim))`: segments in 2-D, triangles in 3-D, with the code
    of the cell each belongs to; coordinates relative to the cell's low corner.
  """
  corners = list(itertools.product((0, 1), repeat=ndim))
  codes, simplices = [], []
  for code in range(2**len(corners)):
    inside = {c: (code >> i) & 1 for i, c in enumerate(corners)}
    segments = _cell_segments(inside, ndim)
    if ndim == 3:
      segments = [t for loop in _closed_loops(segments) for t in _largest_area_triangulation(loop)]
    codes += [code] * len(segments)
    simplices += segments
  return np.asarray(codes), np.asarray(simplices, np.float64).reshape(-1, ndim, ndim)


def _surfel_areas(spacing: tuple[float, ...]) -> np.ndarray:
  """`(2^(2^ndim),)` surface area (mm^2, 3-D) or length (mm, 2-D) held by a cell of each code."""
  ndim = len(spacing)
  codes, vertices = _surface_elements(ndim)
  edges = (vertices[:, 1:] - vertices[:, :1]) * np.asarray(spacing)
  # Measure of a (ndim-1)-simplex from its edge vectors: sqrt(Gram determinant) / (ndim-1)!.
  gram = np.linalg.det(edges @ np.swapaxes(edges, 1, 2))
  measures = np.sqrt(np.maximum(gram, 0.0)) / math.factorial(ndim - 1)
  return np.bincount(codes, weights=measures, minlength=2**2**ndim)


# ---------------------------------------------------------------------------------------------
# Surface distances


def _cell_codes(mask: np.ndarray) -> np.ndarray:
  """Code of every cell of the zero-padded mask: shape `mask.shape + 1`."""
  padded = np.pad(mask, 1).astype(np.uint8)
  codes = np.zeros(tuple(s + 1 for s in mask.shape), np.uint8)
  for bit, corner in enumerate(itertools.product((0, 1), repeat=mask.ndim)):
    view = padded[tuple(slice(c, c + s + 1) for c, s in zip(corner, mask.shape))]
    codes |= view << bit
  return codes


def _weighted_percentile(distances: np.ndarray, weights: np.ndarray, percent: float) -> float:
  """Smallest distance at which the cumulative weight reaches `percent` % of the total."""
  order = np.lexsort((weights, distances))  # ties in distance ordered by weight: deterministic
  cumulative = np.cumsum(weights[order]) / np.sum(weights)
  index = min(int(np.searchsorted(cumulative, percent / 100.0)), len(order) - 1)
  return float(distances[order][index])


def _as_mask(mask, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
    raise ValueError(f"surface_metrics: {name} must be a bool or integer mask (nonzero = "
                     f"inside), got dtype {mask.dtype}")
  return mask != 0


def surface_metrics(pred_mask: np.ndarray, target_mask: np.ndarray, spacing: Sequence[float],
                    tolerance_mm: float) -> dict[str, float]:
  """Mean surface distance, normalised surface Dice and 95 % Hausdorff distance of one case.

  Args:
    pred_mask, target_mask: 2-D or 3-D masks of the same shape, bool or integer (nonzero is
      inside).
    spacing: voxel size in mm along each array axis (length = number of axes), > 0.
    tolerance_mm: distance in mm within which a surface point counts as matched (NSD), >= 0.

  Returns:
    `{"msd": mm, "nsd": in [0, 1], "hd95": mm}` as Python floats; definitions and the empty-mask
    convention in the module docstring.
  """
  pred, target = _as_mask(pred_mask, "pred_mask"), _as_mask(target_mask, "target_mask")
  _check_same_shape(pred, target, "surface_metrics")
  _spatial_axes(pred.ndim, None, "surface_metrics")
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != pred.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"surface_metrics: spacing must be {pred.ndim} positive numbers (mm), "
                     f"got {spacing}")
  if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
    raise ValueError(f"surface_metrics: tolerance_mm must be >= 0, got {tolerance_mm}")

  pred_empty, target_empty = not pred.any(), not target.any()
  if pred_empty and target_empty:
    return {"msd": 0.0, "nsd": 1.0, "hd95": 0.0}
  if pred_empty or target_empty:
    diagonal = math.hypot(*(n * s for n, s in zip(pred.shape, spacing)))
    return {"msd": diagonal, "nsd": 0.0, "hd95": diagonal}

  # Only the joint bounding box matters: distances are Euclidean, not paths through the grid.
  occupied = np.nonzero(pred | target)
  box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in occupied)
  areas_by_code = _surfel_areas(spacing)
  surfaces = []
  for mask in (pred[box], target[box]):
    codes = _cell_codes(mask)
    on_surface = (codes != 0) & (codes != 2**2**mask.ndim - 1)
    distance_map = ndimage.distance_transform_edt(~on_surface, sampling=spacing)
    surfaces.append((on_surface, distance_map, areas_by_code[codes[on_surface]]))
  (pred_surface, pred_map, pred_areas), (target_surface, target_map, target_areas) = surfaces
  pred_to_target = target_map[pred_surface]
  target_to_pred = pred_map[target_surface]

  total_area = pred_areas.sum() + target_areas.sum()
  msd = (pred_areas @ pred_to_target + target_areas @ target_to_pred) / total_area
  matched = (pred_areas[pred_to_target <= tolerance_mm].sum()
             + target_areas[target_to_pred <= tolerance_mm].sum())
  hd95 = max(_weighted_percentile(pred_to_target, pred_areas, _HD_PERCENT),
             _weighted_percentile(target_to_pred, target_areas, _HD_PERCENT))
  return {"msd": float(msd), "nsd": float(matched / total_area), "hd95": hd95}
