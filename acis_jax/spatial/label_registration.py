"""Registration of one label map onto another: the diffeomorphism that moves a real case's
anatomy onto a label map a user gives (`synthesize.source="labels"`)."""
import jax
import jax.numpy as jnp
import optax

from acis_jax.spatial.integrate import integrate_velocity
from acis_jax.spatial.random_field import smooth_periodic
from acis_jax.spatial.resample import one_hot_labels, resize_field, warp
from acis_jax.train.losses import smoothness_loss


def register_labels(moving: jax.Array, fixed: jax.Array, num_classes: int, *,
                    steps: int = 300, learning_rate: float = 0.2, smoothness: float = 0.1,
                    blur: float = 1.5, downsize: int = 4) -> jax.Array:
  """Displacement `(*spatial, ndim)` (voxels) such that `warp_labels(moving, phi)` matches
  `fixed`, both integer label maps `(*spatial)`.

  The stationary velocity lives on a grid `downsize` times coarser per axis (linearly
  resampled up), is integrated by scaling and squaring, so the map is a diffeomorphism, and
  is fitted by Adam to the mean squared difference of the foreground classes' one-hot maps,
  smoothed by a Gaussian of `blur` voxels (so that the mismatch has a gradient beyond the
  edges) and divided by the fixed maps' mean square, plus `smoothness` times the mean
  squared difference of neighbouring velocities.
  """
  spatial = tuple(moving.shape)
  if tuple(fixed.shape) != spatial:
    raise ValueError(f"label maps of shapes {spatial} and {tuple(fixed.shape)} differ")
  ndim = len(spatial)
  coarse = tuple(max(2, -(-n // downsize)) for n in spatial)
  moving_soft = smooth_periodic(one_hot_labels(moving, num_classes), blur)[..., 1:]
  fixed_soft = smooth_periodic(one_hot_labels(fixed, num_classes), blur)[..., 1:]
  # Squared differences, not a soft Dice: the Dice of blurred maps is not largest where
  # they coincide, so it would move identical maps. Scaled by the maps' own energy.
  scale = jnp.maximum(jnp.mean(jnp.square(fixed_soft)), 1e-12)

  def displacement(velocity):
    return integrate_velocity(resize_field(velocity, spatial))

  def loss(velocity):
    moved = warp(moving_soft, displacement(velocity))
    mismatch = jnp.mean(jnp.square(moved - fixed_soft)) / scale
    return mismatch + smoothness * smoothness_loss(velocity[None])

  optimizer = optax.adam(learning_rate)

  def step(carry, _):
    velocity, state = carry
    grads = jax.grad(loss)(velocity)
    updates, state = optimizer.update(grads, state)
    return (optax.apply_updates(velocity, updates), state), None

  velocity = jnp.zeros((*coarse, ndim), jnp.float32)
  (velocity, _), _ = jax.lax.scan(step, (velocity, optimizer.init(velocity)), None, steps)
  return displacement(velocity)
