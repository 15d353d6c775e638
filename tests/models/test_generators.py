"""Generators: shapes and ranges in 2-D and 3-D, gradients, dropout as a noise source, tree mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from acis_jax.models import AnnotationGenerator, ImageGenerator, MaskGenerator

SIZES = {2: (48, 32), 3: (32, 32, 32)}


def _check_grads(model, loss_fn):
  """All parameter gradients finite, not all zero, and the first conv's kernel reached."""
  graphdef, state = nnx.split(model)
  grads = jax.jit(jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s))))(state)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(sum(jnp.sum(jnp.abs(g)) for g in leaves)) > 0
  return grads


@pytest.mark.parametrize("ndim", [2, 3])
def test_mask_generator(ndim, rngs, jit_apply):
  shape = SIZES[ndim]
  gen = MaskGenerator(8, shape, features=(8, 8, 4), rngs=rngs())
  assert gen.base_shape == tuple(s // 4 for s in shape)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32)
  m = jit_apply(gen, z)
  assert m.shape == (2, *shape, 1) and m.dtype == jnp.float32
  assert float(m.min()) >= 0 and float(m.max()) <= 1
  assert float(jnp.std(m[0] - m[1])) > 0  # different latents, different masks
  if ndim == 2:
    grads = _check_grads(gen, lambda g: jnp.mean(g(z)))
    assert float(jnp.abs(grads["project"]["kernel"][...]).sum()) > 0


def test_mask_generator_rejects_bad_shapes(rngs):
  with pytest.raises(ValueError, match="multiple of 8"):
    MaskGenerator(8, (48, 36), features=(8, 8, 4, 4), rngs=rngs())
  gen = MaskGenerator(8, (16, 16), features=(4, 4), rngs=rngs())
  with pytest.raises(ValueError, match="latent"):
    gen(jnp.ones((2, 7)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_annotation_generator(ndim, rngs, jit_apply):
  shape = SIZES[ndim]
  gen = AnnotationGenerator(4, ndim, features=(4, 8, 8), convs_per_level=1, rngs=rngs())
  mask = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *shape, 1)), jnp.float32)
  logits = jit_apply(gen, mask)
  assert logits.shape == (2, *shape, 4) and logits.dtype == jnp.float32
  if ndim == 2:
    labels = jnp.zeros((2, *shape), jnp.int32)
    grads = _check_grads(gen, lambda g: -jnp.mean(
        jnp.take_along_axis(jax.nn.log_softmax(g(mask)), labels[..., None], -1)))
    assert float(jnp.abs(grads["unet"]["encoder"][0]["blocks"][0]["conv"]["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_image_generator(ndim, rngs, key, jit_apply):
  shape = SIZES[ndim]
  gen = ImageGenerator(3, ndim, features=(4, 8, 8), dropout=0.5, rngs=rngs())
  data = np.random.default_rng(0)
  mask = jnp.asarray(data.uniform(size=(2, *shape, 1)), jnp.float32)
  labels = jax.nn.one_hot(data.integers(0, 3, (2, *shape)), 3)
  a = jit_apply(gen, mask, labels, key=key(2))
  b = jit_apply(gen, mask, labels, key=key(3))
  assert a.shape == (2, *shape, 1) and a.dtype == jnp.float32
  assert float(a.min()) >= 0 and float(a.max()) <= 1
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4  # dropout on: a noise source
  np.testing.assert_array_equal(jit_apply(gen, mask, labels), jit_apply(gen, mask, labels))
  if ndim == 2:
    _check_grads(gen, lambda g: jnp.mean(jnp.square(g(mask, labels, key=key(2)) - 0.5)))


def test_image_generator_label_free_and_errors(rngs, jit_apply):
  gen = ImageGenerator(0, 2, features=(4, 8), rngs=rngs())
  mask = jnp.full((1, 16, 16, 1), 0.5)
  assert jit_apply(gen, mask).shape == (1, 16, 16, 1)
  with pytest.raises(ValueError, match="label-free"):
    gen(mask, jnp.ones((1, 16, 16, 2)))
  gen = ImageGenerator(2, 2, features=(4, 8), rngs=rngs())
  with pytest.raises(ValueError, match="needs labels"):
    gen(mask)
  with pytest.raises(ValueError, match="labels"):
    gen(mask, jnp.ones((1, 16, 16, 3)))


def test_generators_in_tree_mode_match_graph_mode(rngs, key, jit_apply):
  """A pure step over `nnx.split(model, graph=False)` state gives the graph-mode output."""
  gen = ImageGenerator(2, 2, features=(4, 8), remat=True, rngs=rngs())
  mask = jnp.full((1, 16, 16, 1), 0.5)
  labels = jnp.ones((1, 16, 16, 2)) / 2
  graphdef, state = nnx.split(gen, graph=False)

  @jax.jit
  def step(state):
    with nnx.set_graph_mode(False):
      return nnx.merge(graphdef, state)(mask, labels, key=key(0))

  np.testing.assert_allclose(step(state), jit_apply(gen, mask, labels, key=key(0)),
                             rtol=1e-5)


def test_bfloat16_compute_tracks_float32(rngs, key, jit_apply):
  """Same parameters, bf16 compute: float32 output in [0, 1], close to the float32 result."""
  mask = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 16, 16, 1)), jnp.float32)
  labels = jnp.concatenate([mask, 1 - mask], -1)
  full = ImageGenerator(2, 2, features=(4, 8), rngs=rngs(4))
  half = ImageGenerator(2, 2, features=(4, 8), dtype=jnp.bfloat16, rngs=rngs(4))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
  out = jit_apply(half, mask, labels)
  assert out.dtype == jnp.float32 and float(out.min()) >= 0 and float(out.max()) <= 1
  np.testing.assert_allclose(out, jit_apply(full, mask, labels), atol=3e-2)


@pytest.mark.parametrize("features, dropped", [((4, 8, 8), [1]), ((4, 8, 8, 8), [1, 2]),
                                               ((4, 8, 8, 8, 8, 8), [2, 3, 4]), ((4, 8), [])])
def test_image_generator_dropout_stays_off_the_full_resolution_stage(rngs, features, dropped):
  """pix2pix's dropout is on its innermost decoder levels: never on the stage at full
  resolution that feeds the output layer, where it would be per-voxel noise in the image."""
  gen = ImageGenerator(3, 2, features=features, dropout=0.5, rngs=rngs())
  with_dropout = [i for i, stage in enumerate(gen.unet.decoder) if stage.dropout is not None]
  assert with_dropout == dropped
