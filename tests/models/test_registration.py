"""Registration net: shapes, near-identity start, MC dropout passes, and it learns to register."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import ndimage

from acis_jax.models import RegistrationNet, register
from acis_jax.spatial import compose, folding_fraction, warp
from acis_jax.train.losses import ncc_loss, smoothness_loss


def _images(shape, seed=0):
  data = np.random.default_rng(seed)
  return [jnp.asarray(data.uniform(size=(2, *shape, 1)), jnp.float32) for _ in range(2)]


@pytest.mark.parametrize("ndim", [2, 3])
def test_shapes_and_near_identity_start(ndim, rngs, jit_apply):
  shape = (32,) * ndim
  net = RegistrationNet(ndim, features=(4, 8, 8), final_convs=(4,), rngs=rngs())
  moving, fixed = _images(shape)
  disp = jit_apply(net, moving, fixed)
  assert disp.shape == (2, *shape, ndim) and disp.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(disp))) < 1e-2  # head ~ N(0, 1e-5): a near-identity map
  assert float(jnp.max(jnp.abs(disp))) > 0
  if ndim == 2:  # integration on a 2x coarser grid (VoxelMorph's int_downsize)
    coarse = RegistrationNet(ndim, features=(4, 8, 8), final_convs=(4,), int_downsize=2,
                             rngs=rngs())
    assert jit_apply(coarse, moving, fixed).shape == (2, *shape, ndim)


def test_errors(rngs):
  net = RegistrationNet(2, features=(4, 8), final_convs=(), rngs=rngs())
  with pytest.raises(ValueError, match="shapes differ"):
    net(jnp.ones((1, 16, 16, 1)), jnp.ones((1, 16, 8, 1)))
  with pytest.raises(ValueError, match="moving image"):
    net(jnp.ones((1, 16, 16, 2)), jnp.ones((1, 16, 16, 2)))
  with pytest.raises(ValueError, match="passes"):
    register(net, jnp.ones((1, 16, 16, 1)), jnp.ones((1, 16, 16, 1)), jax.random.key(0), 0)


def test_mc_dropout_passes(rngs, jit_apply):
  """T passes with dropout are T different fields, each equal to a direct keyed call.

  Uses a threefry key: its draws are the same inside and outside vmap ("rbg"'s are not).
  """
  net = RegistrationNet(2, features=(4, 8, 8), final_convs=(4,), dropout=0.3, rngs=rngs())
  # Scale the head up so the fields are large enough to compare meaningfully.
  net.flow.kernel[...] = net.flow.kernel[...] * 1e4
  moving, fixed = _images((32, 32))
  disps = register(net, moving, fixed, jax.random.key(5), passes=4)
  assert disps.shape == (4, 2, 32, 32, 2)
  spread = jnp.std(disps, axis=0)
  assert float(jnp.min(jnp.mean(spread, axis=(1, 2, 3)))) > 1e-3
  pass_keys = jax.random.split(jax.random.key(5), 4)
  np.testing.assert_allclose(disps[2], jit_apply(net, moving, fixed, key=pass_keys[2]),
                             rtol=1e-4, atol=1e-5)
  # Without a key dropout is off: repeated calls agree exactly.
  np.testing.assert_array_equal(jit_apply(net, moving, fixed), jit_apply(net, moving, fixed))


def roughness(field: np.ndarray) -> float:
  """Mean squared forward difference over the variance, per field and component: 2 for
  white noise in 2-D, near 0 for a field that varies over many voxels."""
  field = field - field.mean(axis=(1, 2), keepdims=True)
  steps = np.mean([np.mean(np.diff(field, axis=a) ** 2) for a in (1, 2)])
  return float(steps / np.mean(field ** 2))


def test_mc_dropout_passes_differ_by_smooth_fields():
  """Whole feature maps dropped on the coarse levels: two passes differ by a deformation
  that varies smoothly, not by per-voxel noise. Mean over four networks (the demo's widths):
  about 0.4 here; 1.6 to 1.9 with the former dropout of single activations at full
  resolution, 1.1 with single activations on the coarse levels; white noise 2."""
  data = np.random.default_rng(0)
  moving, fixed = (jnp.asarray(ndimage.gaussian_filter(data.uniform(size=(2, 64, 64)),
                                                       (0, 2, 2))[..., None], jnp.float32)
                   for _ in range(2))
  assert roughness(data.normal(size=(2, 64, 64, 2))) == pytest.approx(2.0, rel=0.05)
  values = []
  for seed in range(4):
    net = RegistrationNet(2, features=(16, 32, 32), final_convs=(8, 8), dropout=0.2,
                          rngs=nnx.Rngs(seed))
    net.flow.kernel[...] = net.flow.kernel[...] * 1e4
    disps = np.asarray(register(net, moving, fixed, jax.random.key(1), passes=2))
    difference = disps[1] - disps[0]
    assert np.sqrt(np.mean(difference ** 2)) > 0.02 * np.sqrt(np.mean(disps[0] ** 2))
    values.append(roughness(difference))
  assert np.mean(values) < 0.6, values


def _phantom_pair(size=64):
  """Ellipses, a blob and smooth texture (`fixed`), and `moving = fixed o (id + d)` for a known
  smooth `d` (up to 3 px)."""
  grid = np.mgrid[:size, :size].astype(np.float64)
  y, x = (grid - size / 2) / (size / 2)
  image = 0.3 * ((y / 0.8) ** 2 + (x / 0.65) ** 2 < 1)
  image += 0.4 * (((y + 0.1) / 0.25) ** 2 + ((x - 0.3) / 0.18) ** 2 < 1)
  image += 0.5 * (((y - 0.2) / 0.2) ** 2 + ((x + 0.25) / 0.3) ** 2 < 1)
  image += 0.3 * np.exp(-((y + 0.45) ** 2 + (x + 0.1) ** 2) / 0.01)
  # Texture keeps the local NCC defined away from the edges too.
  image += 0.2 * ndimage.gaussian_filter(np.random.default_rng(0).normal(size=image.shape), 2.0)
  fixed = jnp.asarray(ndimage.gaussian_filter(image, 1.0)[..., None], jnp.float32)
  true_disp = jnp.asarray(np.stack([3.0 * np.sin(np.pi * x) * np.cos(0.5 * np.pi * y),
                                    -2.5 * np.cos(0.5 * np.pi * x) * np.sin(np.pi * y)], -1),
                          jnp.float32)
  return warp(fixed, true_disp)[None], fixed[None], true_disp


def test_training_recovers_a_known_deformation(rngs):
  moving, fixed, true_disp = _phantom_pair()
  net = RegistrationNet(2, features=(8, 16, 16, 16), final_convs=(8,), rngs=rngs())
  graphdef, params = nnx.split(net)
  optimizer = optax.adam(3e-3)

  def loss_fn(params):
    disp = nnx.merge(graphdef, params)(moving, fixed)
    return ncc_loss(fixed, warp(moving, disp)) + 0.1 * smoothness_loss(disp)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      updates, opt_state = optimizer.update(jax.grad(loss_fn)(params), opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, optimizer.init(params)), None, length=150)[0][0]

  disp = nnx.merge(graphdef, train(params))(moving, fixed)
  before = float(ncc_loss(fixed, moving))
  after = float(ncc_loss(fixed, warp(moving, disp)))
  # NCC is negated (-1 = perfect): most of the gap to a perfect match must close.
  assert after < before - 0.8 * (before + 1.0), (before, after)
  assert float(folding_fraction(disp[0])) < 0.01
  # moving(x) = fixed(x + d(x)), so the learned field should invert d: x + phi + d(x + phi) = x,
  # i.e. compose(d, phi) ~ 0 (checked away from the border, where the image says little).
  residual = jnp.linalg.norm(compose(true_disp, disp[0])[8:-8, 8:-8], axis=-1)
  assert float(jnp.mean(residual)) < 0.25 * float(jnp.mean(jnp.linalg.norm(true_disp, axis=-1)))
