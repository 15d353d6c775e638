"""Composition of displacement fields and scaling-and-squaring integration of velocity fields."""
import jax

from acis_jax.spatial.resample import resize_field, warp


def compose(disp_a: jax.Array, disp_b: jax.Array, *, mode: str = "nearest") -> jax.Array:
  """Displacement of the map `phi_a o phi_b`, i.e. `x -> x + b(x) + a(x + b(x))`.

  Order: warping with the result equals warping with `a` first and then warping that output
  with `b`: `warp(image, compose(a, b)) ~= warp(warp(image, a), b)` (exact up to interpolation),
  because `warp(warp(I, a), b)(x) = I(y + a(y))` with `y = x + b(x)`.

  Args:
    disp_a, disp_b: `(*spatial, ndim)` or `(batch, *spatial, ndim)`, voxel units.
    mode: how `a` continues outside the grid when sampled at `x + b(x)` (see `warp`).

  Returns:
    the composed displacement, batched if either input is.
  """
  return disp_b + warp(disp_a, disp_b, order=1, mode=mode)


def integrate_velocity(velocity: jax.Array, steps: int = 7, downsize: int = 1) -> jax.Array:
  """Displacement `exp(v) - id` of a stationary velocity field by scaling and squaring.

  `phi = (id + v / 2**steps)` composed with itself `steps` times, each squaring a linear warp of
  the field by itself (edge values continue outward, so a constant field integrates to an exact
  translation). With `downsize > 1` the field is integrated on a grid `downsize` times coarser
  per axis and the result resampled back with its values rescaled (VoxelMorph's `int_downsize`;
  `downsize**ndim` times less work).

  Args:
    velocity: `(*spatial, ndim)` or `(batch, *spatial, ndim)`, voxel units of the full grid.
    steps: number of squarings (7 in VoxelMorph and the ACIS authors' code); 0 returns `v`.
    downsize: integer coarsening factor of the integration grid, 1 for none.

  Returns:
    displacement field of the same shape as `velocity`, voxel units.
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f"steps must be a non-negative int, got {steps!r}")
  if isinstance(downsize, bool) or not isinstance(downsize, int) or downsize < 1:
    raise ValueError(f"downsize must be an int >= 1, got {downsize!r}")
  ndim = velocity.shape[-1]
  if velocity.ndim not in (ndim + 1, ndim + 2):
    raise ValueError(f"velocity must have shape (*spatial, {ndim}) or (batch, *spatial, {ndim}),"
                     f" got {velocity.shape}")
  spatial = velocity.shape[-1 - ndim:-1]
  disp = velocity
  if downsize > 1:
    disp = resize_field(disp, [max(n // downsize, 1) for n in spatial])
  disp = disp / (2.0 ** steps)
  # fori_loop keeps one traced squaring (fast compile) and stays reverse-differentiable;
  # checkpointing it keeps only each step's field for the backward pass, not the gathers.
  square = jax.checkpoint(lambda d: compose(d, d))
  disp = jax.lax.fori_loop(0, steps, lambda _, d: square(d), disp)
  if downsize > 1:
    disp = resize_field(disp, spatial)
  return disp
