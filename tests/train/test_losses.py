"""Losses against closed forms and independent references (numpy, scipy, optax)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from acis_jax.train import losses


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- WGAN-GP

@pytest.mark.parametrize("norm, expected", [(1.0, 0.0), (2.0, 1.0), (0.5, 0.25)])
def test_gradient_penalty_of_linear_critic(norm, expected):
  """f(x) = <w, x> has gradient w everywhere: the penalty is (||w|| - 1)^2 at any mix."""
  w = np.random.default_rng(0).normal(size=(8, 8, 1))
  w = jnp.asarray(norm * w / np.linalg.norm(w), jnp.float32)
  critic = lambda x: jnp.sum(x * w, axis=(1, 2, 3))
  data = np.random.default_rng(1)
  real, fake = (jnp.asarray(data.uniform(size=(4, 8, 8, 1)), jnp.float32) for _ in range(2))
  gp = losses.gradient_penalty(critic, real, fake, jax.random.key(0), weight=1.0)
  np.testing.assert_allclose(gp, expected, atol=1e-5)
  np.testing.assert_allclose(losses.gradient_penalty(critic, real, fake, jax.random.key(0)),
                             10.0 * expected, atol=1e-4)  # default weight 10


def test_gradient_penalty_is_per_sample():
  """A critic with slope 1 on sample 0's pixels and 3 on sample 1's: mean of 0 and 4."""
  def critic(x):
    return jnp.array([1.0, 3.0]) * x[:, 0]
  real, fake = jnp.array([[0.2], [0.7]]), jnp.array([[0.9], [0.1]])
  np.testing.assert_allclose(losses.gradient_penalty(critic, real, fake, jax.random.key(0), 1.0),
                             2.0, rtol=1e-6)


def test_wgan_losses():
  real, fake = jnp.array([1.0, 3.0]), jnp.array([-1.0, 0.0, 2.0])
  np.testing.assert_allclose(losses.wgan_critic_loss(real, fake), 1 / 3 - 2, rtol=1e-6)
  np.testing.assert_allclose(losses.wgan_generator_loss(fake), -1 / 3, rtol=1e-6)
  # With a unit-slope linear critic the full critic loss is the plain one.
  w = jnp.ones((4,)) / 2.0
  critic = lambda x: x @ w
  data = np.random.default_rng(0)
  r, f = (jnp.asarray(data.normal(size=(3, 4)), jnp.float32) for _ in range(2))
  np.testing.assert_allclose(losses.wgan_gp_critic_loss(critic, r, f, jax.random.key(0)),
                             np.mean(np.asarray(f) @ np.full(4, 0.5))
                             - np.mean(np.asarray(r) @ np.full(4, 0.5)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- PatchGAN

def test_lsgan_losses():
  ones, zeros = jnp.ones((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1))
  assert float(losses.lsgan_discriminator_loss(ones, zeros)) == 0
  assert float(losses.lsgan_generator_loss(ones)) == 0
  np.testing.assert_allclose(losses.lsgan_discriminator_loss(jnp.array([0.0, 2.0]),
                                                             jnp.array([1.0, -3.0])),
                             0.5 * (1.0 + 5.0), rtol=1e-6)
  np.testing.assert_allclose(losses.lsgan_generator_loss(jnp.array([0.0, 3.0])), 2.5, rtol=1e-6)


def test_mse():
  a, b = np.arange(6.0).reshape(1, 2, 3, 1), np.ones((1, 2, 3, 1))
  np.testing.assert_allclose(losses.mse(jnp.asarray(a), jnp.asarray(b)), np.mean((a - b) ** 2))
  with pytest.raises(ValueError, match="shapes differ"):
    losses.mse(jnp.ones((1, 2)), jnp.ones((2, 1)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_cross_entropy_matches_optax_and_closed_form(ndim):
  data = np.random.default_rng(0)
  logits = data.normal(size=(2, *(5,) * ndim, 4)).astype(np.float32)
  labels = data.integers(0, 4, (2, *(5,) * ndim))
  ce = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 4)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(ce, np.mean(-np.log(np.take_along_axis(p, labels[..., None], -1))),
                             rtol=1e-5)
  np.testing.assert_allclose(
      ce, jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), rtol=1e-5)


def test_dice_hand_computed():
  """Uniform predictions (p = 1/2) against labels [0, 0, 0, 1]: class 0 scores 2*1.5/(2+3),
  class 1 scores 2*0.5/(2+1)."""
  logits, labels = jnp.zeros((1, 2, 2, 2)), jnp.array([[[0, 0], [0, 1]]])
  dice0, dice1 = 3.0 / 5.0, 1.0 / 3.0
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, 2), 1 - (dice0 + dice1) / 2,
                             atol=1e-5)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, 2, include_background=False),
                             1 - dice1, atol=1e-5)
  ce = losses.cross_entropy(logits, labels, 2)
  np.testing.assert_allclose(losses.dice_ce_loss(logits, labels, 2),
                             1 - (dice0 + dice1) / 2 + np.log(2.0), atol=1e-5)
  np.testing.assert_allclose(losses.dice_ce_per_case(logits, labels, 2,
                                                     include_background=False),
                             [1 - dice1 + np.log(2.0)], atol=1e-5)
  np.testing.assert_allclose(ce, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_of_perfect_logits_is_zero(ndim):
  # Class 2 is absent from labels and prediction: it counts as a perfect match.
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, *(6,) * ndim)))
  logits = 50.0 * jax.nn.one_hot(labels, 3)
  assert float(losses.soft_dice_loss(logits, labels, 3)) < 1e-4
  assert float(losses.soft_dice_loss(-logits, labels, 3)) > 0.5


def test_label_loss_errors():
  with pytest.raises(ValueError, match="integer"):
    losses.cross_entropy(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4)), 2)
  with pytest.raises(ValueError, match="logits must be"):
    losses.soft_dice_loss(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4), jnp.int32), 2)


# ---------------------------------------------------------------- registration

@pytest.mark.parametrize("ndim", [2, 3])
def test_local_ncc_matches_scipy_box_filter(ndim):
  size = 32 if ndim == 2 else 16
  data = np.random.default_rng(0)
  a = ndimage.gaussian_filter(data.normal(size=(size,) * ndim), 1.0)
  b = 0.3 * a + ndimage.gaussian_filter(data.normal(size=(size,) * ndim), 1.5)
  box = lambda x: ndimage.uniform_filter(x, 9, mode="constant")  # zero-padded window means
  cov = box(a * b) - box(a) * box(b)
  ref = cov / np.sqrt((box(a * a) - box(a) ** 2) * (box(b * b) - box(b) ** 2))
  got = losses.local_ncc(jnp.asarray(a[None, ..., None], jnp.float32),
                         jnp.asarray(b[None, ..., None], jnp.float32), eps=0.0)
  assert ref.max() - ref.min() > 0.3  # a range of correlations, not one value
  np.testing.assert_allclose(got[0, ..., 0], ref, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ncc_of_affine_relations(ndim):
  size = 24 if ndim == 2 else 16
  img = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *(size,) * ndim, 1)), jnp.float32)
  interior = (slice(None),) + (slice(4, -4),) * ndim
  np.testing.assert_allclose(losses.local_ncc(img, 3.0 * img + 0.5)[interior], 1.0, atol=1e-4)
  np.testing.assert_allclose(losses.local_ncc(img, -2.0 * img + 1.0)[interior], -1.0, atol=1e-4)
  # Pure scaling keeps the zero padding consistent, so the border agrees too.
  np.testing.assert_allclose(losses.ncc_loss(img, 2.0 * img), -1.0, atol=1e-4)
  np.testing.assert_allclose(losses.ncc_loss(img, -img), 1.0, atol=1e-4)
  with pytest.raises(ValueError, match="odd"):
    losses.local_ncc(img, img, window=8)


@pytest.mark.parametrize("ndim", [2, 3])
def test_smoothness_of_linear_field(ndim):
  """u(x) = A x + c: every forward difference along axis d is column d of A, so the loss is
  mean_d mean_i A[i, d]^2 = ||A||_F^2 / ndim^2."""
  a = np.random.default_rng(0).normal(size=(ndim, ndim))
  grid = np.stack(np.meshgrid(*(np.arange(7.0),) * ndim, indexing="ij"), -1)
  field = grid @ a.T + 0.3
  got = losses.smoothness_loss(jnp.asarray(field[None], jnp.float32))
  np.testing.assert_allclose(got, np.sum(a ** 2) / ndim ** 2, rtol=1e-5)
  assert float(losses.smoothness_loss(jnp.full((1, 5, 5, 2), 4.0))) == 0.0
