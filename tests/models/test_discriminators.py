"""Critic and PatchGAN: shapes in 2-D and 3-D, any channel count, the 70x70 receptive field."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from acis_jax.models import Critic, PatchDiscriminator
from acis_jax.train.losses import gradient_penalty


@pytest.mark.parametrize("ndim", [2, 3])
def test_critic_scores_and_penalty_gradients(ndim, rngs, key, jit_apply):
  shape = (32,) * ndim
  critic = Critic(2, shape, features=(4, 8, 8), rngs=rngs())
  data = np.random.default_rng(0)
  real = jnp.asarray(data.uniform(size=(3, *shape, 2)), jnp.float32)
  fake = jnp.asarray(data.uniform(size=(3, *shape, 2)), jnp.float32)
  scores = jit_apply(critic, real)
  assert scores.shape == (3,) and scores.dtype == jnp.float32
  # Samples are scored independently (no batch statistics): scoring one alone agrees.
  np.testing.assert_allclose(jit_apply(critic, real[1:2]), scores[1:2], rtol=1e-5, atol=1e-6)
  # The WGAN-GP objective differentiates through the critic's input gradient.
  graphdef, state = nnx.split(critic)

  def loss(s):
    model = nnx.merge(graphdef, s)
    return jnp.mean(model(fake)) - jnp.mean(model(real)) + gradient_penalty(model, real, fake,
                                                                            key(1))

  grads = jax.jit(jax.grad(loss))(state)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # Every kernel learns (the head's bias cancels between the real and fake means).
  kernels = jax.tree.leaves(nnx.filter_state(grads, lambda path, _: path[-1] == "kernel"))
  assert len(kernels) == 4 and all(float(jnp.abs(g).sum()) > 0 for g in kernels)


def test_critic_rejects_wrong_channels_and_grids(rngs):
  critic = Critic(2, (16, 16), features=(4, 8), rngs=rngs())
  with pytest.raises(ValueError, match="critic input"):
    critic(jnp.ones((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"built for \(16, 16\)"):
    critic(jnp.ones((1, 16, 32, 2)))


def test_critic_sees_where_things_are(rngs, jit_apply):
  """The same blob at two places scores differently: the head reads the whole grid."""
  critic = Critic(1, (32, 32), features=(4, 8, 8), rngs=rngs())
  blob = jnp.zeros((1, 32, 32, 1)).at[:, 4:10, 4:10].set(1.0)
  moved = jnp.roll(blob, (16, 16), axis=(1, 2))
  scores = jit_apply(critic, jnp.concatenate([blob, moved]))
  assert abs(float(scores[0] - scores[1])) > 1e-4


@pytest.mark.parametrize("ndim, size", [(2, 48), (2, 37), (3, 32)])
def test_patch_discriminator_grid(ndim, size, rngs, jit_apply):
  # 2 stride-2 layers then 2 stride-1 layers (kernel 4, pad 1): n -> n//2 -> n//4 -> -1 -> -1.
  disc = PatchDiscriminator(5, ndim, features=(4, 8, 8), rngs=rngs())
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *(size,) * ndim, 5)), jnp.float32)
  logits = jit_apply(disc, x)
  assert logits.shape == (2, *(size // 4 - 2,) * ndim, 1)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_default_patch_discriminator_is_the_70x70_patchgan(rngs):
  """Default depth: a 256 input gives a 30 grid, and each logit sees exactly 70 pixels a side.

  Checked by the support of the gradient of one logit with respect to the input (norm "none",
  since per-sample normalisation couples every pixel).
  """
  disc = PatchDiscriminator(1, 2, features=(2, 2, 2, 2), norm="none", rngs=rngs())
  graphdef, state = nnx.split(disc)
  assert jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                        jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)).shape == (1, 30, 30, 1)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 96, 96, 1)), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: nnx.merge(graphdef, state)(x)[0, 5, 5, 0]))(x)
  rows, cols = np.nonzero(np.asarray(grad[0, ..., 0]))
  assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
