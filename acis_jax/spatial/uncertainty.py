"""Registration-uncertainty terms of the ACIS refinement (paper sec. 2.3, eq. 3)."""
import jax
import jax.numpy as jnp

from acis_jax.spatial.resample import one_hot_labels, warp


def _check_passes(disps: jax.Array, name: str) -> None:
  """A stack of T passes has one axis more than a (possibly batched) displacement field."""
  ndim = disps.shape[-1]
  if disps.ndim not in (ndim + 2, ndim + 3):
    raise ValueError(f"{name} must have shape (T, *spatial, ndim) or (T, batch, *spatial, ndim),"
                     f" got {disps.shape}")


def appearance_uncertainty(x: jax.Array, x_hat: jax.Array, fwd_disps: jax.Array,
                           bwd_disps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 3: `mean_t (x o phi_t - x_hat)^2 + (x_hat o varphi_t - x)^2` over T stochastic passes.

  Args:
    x: real image, `(*spatial, C)` or `(batch, *spatial, C)`.
    x_hat: synthesized image, same shape as `x`.
    fwd_disps: `(T, *spatial, ndim)` or `(T, batch, *spatial, ndim)`, voxel units: `phi_t`, the
      registration of `x` onto `x_hat` (so `warp(x, phi_t) ~ x_hat`).
    bwd_disps: same shape: `varphi_t`, the registration of `x_hat` onto `x`.

  Returns:
    `(voxel_map, mean)`: the map has the shape of `x` (squared intensity units); the mean is
    over spatial and channel axes, a scalar or `(batch,)`.
  """
  if x.shape != x_hat.shape:
    raise ValueError(f"x and x_hat shapes differ: {x.shape} vs {x_hat.shape}")
  if fwd_disps.shape != bwd_disps.shape:
    raise ValueError(f"fwd_disps and bwd_disps shapes differ: {fwd_disps.shape} vs "
                     f"{bwd_disps.shape}")
  _check_passes(fwd_disps, "fwd_disps")
  fwd = jax.vmap(lambda d: warp(x, d))(fwd_disps)
  bwd = jax.vmap(lambda d: warp(x_hat, d))(bwd_disps)
  voxel_map = jnp.mean((fwd - x_hat) ** 2 + (bwd - x) ** 2, axis=0)
  ndim = fwd_disps.shape[-1]
  return voxel_map, jnp.mean(voxel_map, axis=tuple(range(-1 - ndim, 0)))


def label_consistency(y: jax.Array, y_hat: jax.Array, disps: jax.Array, num_classes: int, *,
                      include_background: bool = False, smooth: float = 1e-6) -> jax.Array:
  """Mean over passes of the soft Dice between `y o phi_t` (one-hot, linearly warped) and `y_hat`.

  Per class `(2 sum(a b) + smooth) / (sum a + sum b + smooth)` over voxels, and 1 (with zero
  gradient) for a class absent from both maps; classes averaged with equal weight.
  Differentiable in `disps` and in probabilistic `y_hat`.

  Args:
    y: real labels, integer `(*spatial)` or `(batch, *spatial)`.
    y_hat: synthesized labels, integer with the shape of `y`, or class probabilities
      `(*spatial, K)` / `(batch, *spatial, K)`.
    disps: `(T, *spatial, ndim)` or `(T, batch, *spatial, ndim)`: `phi_t`, voxel units.
    num_classes: K, class 0 being background.
    include_background: average class 0 too.
    smooth: added to numerator and denominator (voxel counts).

  Returns:
    Dice in [0, 1]: a scalar, or `(batch,)`.
  """
  if y_hat.shape == y.shape:
    target = one_hot_labels(y_hat, num_classes)
  elif y_hat.shape == (*y.shape, num_classes):
    target = y_hat
  else:
    raise ValueError(f"y_hat must be labels of shape {y.shape} or probabilities of shape "
                     f"{(*y.shape, num_classes)}, got {y_hat.shape}")
  _check_passes(disps, "disps")
  warped = jax.vmap(lambda d: warp(one_hot_labels(y, num_classes), d))(disps)
  ndim = disps.shape[-1]
  spatial_axes = tuple(range(-1 - ndim, -1))
  inter = jnp.sum(warped * target, axis=spatial_axes)
  total = jnp.sum(warped, axis=spatial_axes) + jnp.sum(target, axis=spatial_axes)
  # A class absent from both maps scores 1 with no gradient: through the smoothed ratio its
  # derivative would be 1 / smooth per voxel (1e6), which blew up the refinement's gradients
  # whenever a slice lacked a class (the demo's aorta).
  present = total > 0
  dice = jnp.where(present, (2.0 * inter + smooth) / jnp.where(present, total + smooth, 1.0),
                   1.0)  # (T, [batch,] K)
  if not include_background:
    dice = dice[..., 1:]
  return jnp.mean(dice, axis=(0, -1))
