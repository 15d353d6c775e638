"""Jacobian determinant of `identity + disp` and the share of folded voxels."""
import jax
import jax.numpy as jnp


def jacobian_determinant(disp: jax.Array) -> jax.Array:
  """`det(I + grad disp)` at every voxel, derivatives by central differences.

  Central differences in the interior, one-sided at the border (`jnp.gradient`), unit voxel
  spacing. Differentiable.

  Args:
    disp: `(*spatial, ndim)` or `(batch, *spatial, ndim)` with ndim 2 or 3, voxel units; every
      spatial axis needs at least 2 voxels.

  Returns:
    `(*spatial)` or `(batch, *spatial)` determinants (1 = volume kept, <= 0 = folded).
  """
  ndim = disp.shape[-1]
  if ndim not in (2, 3):
    raise ValueError(f"jacobian_determinant supports 2-D and 3-D fields, got {ndim} components")
  if disp.ndim not in (ndim + 1, ndim + 2):
    raise ValueError(f"disp must have shape (*spatial, {ndim}) or (batch, *spatial, {ndim}), "
                     f"got {disp.shape}")
  first = disp.ndim - 1 - ndim
  if min(disp.shape[first:-1]) < 2:
    raise ValueError(f"every spatial axis needs >= 2 voxels, got shape {disp.shape}")
  # j[i][k] = d(x_i + disp_i) / d x_k
  j = [[jnp.gradient(disp[..., i], axis=first + k) + (1.0 if i == k else 0.0)
        for k in range(ndim)] for i in range(ndim)]
  if ndim == 2:
    return j[0][0] * j[1][1] - j[0][1] * j[1][0]
  return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
          - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
          + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def folding_fraction(disp: jax.Array) -> jax.Array:
  """Share of voxels whose Jacobian determinant is <= 0.

  A step function of `disp`: jit/vmap/grad-safe, with a zero gradient.

  Args:
    disp: `(*spatial, ndim)` or `(batch, *spatial, ndim)`, ndim 2 or 3, voxel units.

  Returns:
    a scalar in [0, 1], or `(batch,)`.
  """
  det = jacobian_determinant(disp)
  ndim = disp.shape[-1]
  return jnp.mean((det <= 0).astype(disp.dtype), axis=tuple(range(det.ndim - ndim, det.ndim)))
