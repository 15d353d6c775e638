"""Rank-agnostic layers: norms, resampling, U-Net trunk, remat, dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from acis_jax.models import ConvBlock, ConvStage, Down, UNet, Up, make_norm


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_instance_and_layer_norm_match_numpy(ndim, rngs):
  x = np.random.default_rng(0).normal(2.0, 3.0, (2, *(6,) * ndim, 4)).astype(np.float32)
  spatial = tuple(range(1, ndim + 1))
  inst = make_norm("instance", 4, dtype=None, rngs=rngs())(x)
  ref = (x - x.mean(spatial, keepdims=True)) / np.sqrt(x.var(spatial, keepdims=True) + 1e-5)
  np.testing.assert_allclose(inst, ref, atol=1e-4)
  layer = make_norm("layer", 4, dtype=None, rngs=rngs())(x)
  every = spatial + (ndim + 1,)
  ref = (x - x.mean(every, keepdims=True)) / np.sqrt(x.var(every, keepdims=True) + 1e-5)
  np.testing.assert_allclose(layer, ref, atol=1e-4)
  assert make_norm("none", 4, dtype=None, rngs=rngs()) is None
  with pytest.raises(ValueError, match="norm"):
    make_norm("batch", 4, dtype=None, rngs=rngs())


@pytest.mark.parametrize("ndim", [2, 3])
def test_down_up_shapes_and_values(ndim, rngs):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *(8,) * ndim, 3)), jnp.float32)
  for mode in ("conv", "pool"):
    assert Down(3, ndim, mode=mode, rngs=rngs())(x).shape == (2, *(4,) * ndim, 3)
  for mode in ("nearest", "linear", "transpose"):
    assert Up(3, ndim, mode=mode, rngs=rngs())(x).shape == (2, *(16,) * ndim, 3)
  # Nearest up-sampling repeats every voxel; pooling after it gives the input back.
  up = Up(3, ndim, mode="nearest", rngs=rngs())(x)
  ref = np.asarray(x)
  for axis in range(1, ndim + 1):
    ref = np.repeat(ref, 2, axis=axis)
  np.testing.assert_array_equal(up, ref)
  np.testing.assert_array_equal(Down(3, ndim, mode="pool", rngs=rngs())(up), x)
  const = jnp.full((1, *(4,) * ndim, 1), 0.7)
  np.testing.assert_allclose(Up(1, ndim, mode="linear", rngs=rngs())(const), 0.7, rtol=1e-6)
  with pytest.raises(ValueError, match="up"):
    Up(3, ndim, mode="cubic", rngs=rngs())


def test_unet_shapes_and_errors(rngs, jit_apply):
  net = UNet(2, 2, features=(4, 8, 8), rngs=rngs())
  assert jit_apply(net, jnp.ones((1, 16, 12, 2))).shape == (1, 16, 12, 4)
  with pytest.raises(ValueError, match="multiple of 4"):
    net(jnp.ones((1, 16, 10, 2)))
  with pytest.raises(ValueError, match="shape"):
    net(jnp.ones((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="at least two"):
    UNet(2, 2, features=(4,), rngs=rngs())


def test_remat_gives_same_values_and_gradients(rngs):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 8, 2)), jnp.float32)
  plain = ConvStage(2, 4, 3, rngs=rngs(3))
  remat = ConvStage(2, 4, 3, remat=True, rngs=rngs(3))

  def loss(model):
    return jnp.mean(jnp.square(model(x)))

  np.testing.assert_allclose(plain(x), remat(x), rtol=1e-6)
  gradient = nnx.jit(nnx.grad(loss))
  g_plain, g_remat = gradient(plain), gradient(remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_plain, g_remat)


def test_bfloat16_compute_keeps_float32_params(rngs):
  block = ConvBlock(2, 4, 3, dtype=jnp.bfloat16, rngs=rngs())
  y = block(jnp.ones((1, 4, 4, 4, 2)))
  assert y.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(block, nnx.Param)))


def _input_and_kernel_gradients(f, x, w, cotangent):
  """d sum(f(x, w) * cotangent) / d(x, w), compiled whole: op by op, the rewritten
  convolutions' many small operations take far longer."""
  return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), argnums=(0, 1)))(x, w)


# The CPU path for 3-D convolutions (depth taps folded into channels, one 2-D convolution)
# against XLA's own 3-D convolution: values and gradients w.r.t. input and kernel.
@pytest.mark.parametrize("kernel,stride,padding,depth", [
    (3, 1, "SAME", 8), (4, 2, ((1, 1),) * 3, 8), (1, 1, "SAME", 5), (3, 1, "VALID", 7),
    (3, 2, "SAME", 9)])
def test_depth_folded_conv_matches_lax(kernel, stride, padding, depth):
  from acis_jax.models.layers import _depth_folded_conv
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (2, depth, 6, 10, 3))
  w = jax.random.normal(k2, (kernel,) * 3 + (3, 5))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NDHWC", "DHWIO", "NDHWC"))

  def reference(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride,) * 3, padding, dimension_numbers=dn,
                                        precision="highest")

  def folded(x, w):
    return _depth_folded_conv(x, w, (stride,) * 3, padding, dimension_numbers=dn,
                              precision="highest")

  want, got = jax.jit(reference)(x, w), jax.jit(folded)(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  cotangent = jax.random.normal(k3, want.shape)
  grads = [_input_and_kernel_gradients(f, x, w, cotangent) for f in (reference, folded)]
  for want_g, got_g in zip(*grads):
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-4)


# The layers' convolution (on CPU: strided 3-D ones over space-to-depth blocks, 3-D ones
# folded to 2-D, 2-D ones with few output channels as a product and shifted sums, 2x2 and
# large 2-D ones with a matrix-product kernel gradient) and the space-to-depth form itself,
# in every rank, against lax's own: values, gradients and second order, odd sizes and uneven
# padding.
@pytest.mark.parametrize("ndim,spatial", [(1, (13,)), (2, (12, 9)), (3, (8, 7, 6))])
@pytest.mark.parametrize("kernel,stride,padding", [
    (4, 2, 1), (3, 2, "SAME"), (4, 2, "VALID"), (5, 3, ((2, 1),)), (2, 2, 0), (3, 1, "SAME"),
    (2, 1, "VALID")])
# 1: stride-1 ones as one matrix product and shifted sums (few output channels); 40: the
# matrix-product kernel gradient.
@pytest.mark.parametrize("features", [1, 40])
def test_layers_convolution_matches_lax(ndim, spatial, kernel, stride, padding, features,
                                        monkeypatch):
  from acis_jax.models import layers
  from acis_jax.models.layers import _space_to_depth_conv, conv_general_dilated
  # Test sizes take that path.
  monkeypatch.setattr(layers, "MATMUL_KERNEL_GRAD_VOXELS", 1)
  monkeypatch.setattr(layers, "MATMUL_KERNEL_GRAD_WEIGHTS", 1)
  if isinstance(padding, int):
    padding = ((padding, padding),) * ndim
  elif isinstance(padding, tuple):
    padding = padding * ndim
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k1, (2, *spatial, 8))
  w = jax.random.normal(k2, (kernel,) * ndim + (8, features))
  spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
          3: ("NDHWC", "DHWIO", "NDHWC")}[ndim]
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, spec)
  convs = [lambda x, w, f=f: f(x, w, (stride,) * ndim, padding, dimension_numbers=dn,
                               precision="highest")
           for f in (jax.lax.conv_general_dilated, conv_general_dilated)]
  convs.append(lambda x, w: _space_to_depth_conv(x, w, (stride,) * ndim, padding,
                                                 precision="highest"))
  reference, rewritten = convs[0], convs[1:] if stride > 1 else convs[1:2]
  want = jax.jit(reference)(x, w)
  cotangent = jax.random.normal(k3, want.shape)
  grad = lambda f: _input_and_kernel_gradients(f, x, w, cotangent)
  # Second order, as in the WGAN-GP gradient penalty: d/dw of |d loss / dx|^2.
  penalty = lambda f: jax.jit(jax.grad(lambda w: jnp.sum(jax.grad(
      lambda x: jnp.sum(jnp.sin(f(x, w)) * cotangent))(x) ** 2)))(w)
  want_grads, want_penalty = grad(reference), penalty(reference)
  for f in rewritten:
    got = jax.jit(f)(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for want_g, got_g in zip(want_grads, grad(f)):
      np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(penalty(f), want_penalty, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want_penalty).max()))


# Depthwise convolutions (MedNeXt's blocks: plain, strided, and transposed as an input
# dilation) through the layers' convolution (on CPU: sums of strided slices) against lax's.
@pytest.mark.parametrize("ndim,spatial", [(1, (11,)), (2, (9, 8)), (3, (6, 5, 7))])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 1, "SAME", 1), (3, 2, 1, 1), (3, 1, ((2, 1),), 2), (1, 1, 0, 2)])
def test_depthwise_convolution_matches_lax(ndim, spatial, kernel, stride, padding, dilation):
  from acis_jax.models.layers import conv_general_dilated
  if isinstance(padding, int):
    padding = ((padding, padding),) * ndim
  elif isinstance(padding, tuple):
    padding = padding * ndim
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  channels = 6
  x = jax.random.normal(k1, (2, *spatial, channels))
  w = jax.random.normal(k2, (kernel,) * ndim + (1, channels))
  spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
          3: ("NDHWC", "DHWIO", "NDHWC")}[ndim]
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, spec)
  reference, rewritten = (
      lambda x, w, f=f: f(x, w, (stride,) * ndim, padding, lhs_dilation=(dilation,) * ndim,
                          dimension_numbers=dn, feature_group_count=channels,
                          precision="highest")
      for f in (jax.lax.conv_general_dilated, conv_general_dilated))
  want, got = jax.jit(reference)(x, w), jax.jit(rewritten)(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(k3, want.shape)
  grads = [_input_and_kernel_gradients(f, x, w, cotangent) for f in (reference, rewritten)]
  for want_g, got_g in zip(*grads):
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_transposed_upsampling_matches_conv_transpose(ndim):
  """Up("transpose") on CPU (one matrix product, depth-to-space) against nnx.ConvTranspose's
  lax path: values and gradients w.r.t. input, kernel and bias."""
  up = Up(3, ndim, mode="transpose", rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(4), (2, *(5, 4, 3)[:ndim], 3))
  cotangent = jax.random.normal(jax.random.key(5), (2, *(10, 8, 6)[:ndim], 3))
  graphdef, params = nnx.split(up)

  def loss(params, x, lax_path):
    module = nnx.merge(graphdef, params)
    y = module.conv(x) if lax_path else module(x)
    return jnp.sum(y * cotangent), y

  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                           static_argnums=2)
  (_, want), want_g = value_and_grad(params, x, True)
  (_, got), got_g = value_and_grad(params, x, False)
  assert got.shape == want.shape == cotangent.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ndim, coarse", [(1, (7,)), (2, (5, 4)), (3, (3, 4, 2))])
def test_up_concat_conv_matches_upsample_concat_and_lax(ndim, coarse, monkeypatch):
  """A decoder level's first conv over `concat([nearest up-sampling, skip])`, computed on the
  coarse grid on CPU, against lax on the explicitly up-sampled, concatenated input: values and
  gradients w.r.t. both inputs, kernel and bias."""
  from acis_jax.models import layers
  calls = []
  original = layers.nearest_up_conv
  monkeypatch.setattr(layers, "nearest_up_conv", lambda *a: calls.append(1) or original(*a))
  block = ConvBlock(3 + 2, 4, ndim, norm="none", rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(block)
  x = jax.random.normal(jax.random.key(1), (2, *coarse, 3))
  skip = jax.random.normal(jax.random.key(2), (2, *(2 * n for n in coarse), 2))
  cotangent = jax.random.normal(jax.random.key(3), (2, *(2 * n for n in coarse), 4))

  def reference(params, x, skip):
    conv = nnx.merge(graphdef, params).conv
    up = x
    for axis in range(1, ndim + 1):
      up = jnp.repeat(up, 2, axis=axis)
    y = jax.lax.conv_general_dilated(
        jnp.concatenate([up, skip], -1), conv.kernel[...], (1,) * ndim, "SAME",
        dimension_numbers=layers.CHANNEL_LAST_SPECS[ndim]) + conv.bias[...]
    return jnp.sum(y * cotangent), y

  def ours(params, x, skip):
    y = layers.up_concat_conv(nnx.merge(graphdef, params).conv, x, skip)
    return jnp.sum(y * cotangent), y

  (_, want), want_g = jax.jit(jax.value_and_grad(reference, (0, 1, 2), has_aux=True))(
      params, x, skip)
  (_, got), got_g = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(params, x, skip)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # The stage form (ConvBlock with a skip) is the same function.
  np.testing.assert_allclose(block(x, skip), jax.nn.leaky_relu(want, 0.2), rtol=1e-5, atol=1e-5)
  assert len(calls) == (2 if jax.default_backend() == "cpu" else 0)


@pytest.mark.parametrize("spatial", [(7,), (6, 5), (4, 5, 7)])
def test_block_max_pool_matches_max_pool(spatial):
  """Down("pool")'s CPU form: the values and (without ties) gradients of nnx.max_pool, odd sizes
  cropped; where a block ties, each tied voxel gets an equal share of the block's cotangent."""
  from acis_jax.models.layers import block_max_pool
  ndim = len(spatial)
  window = (2,) * ndim
  x = jax.random.normal(jax.random.key(0), (2, *spatial, 3))
  cotangent = jax.random.normal(jax.random.key(1), (2, *(n // 2 for n in spatial), 3))
  want, want_vjp = jax.vjp(lambda x: nnx.max_pool(x, window, strides=window), x)
  got, got_vjp = jax.vjp(block_max_pool, x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0], rtol=1e-6)
  flat = jnp.zeros((1, *(2,) * ndim, 1))
  share = jax.grad(lambda x: 8.0 * block_max_pool(x).sum())(flat)
  np.testing.assert_allclose(share, 8.0 / 2 ** ndim)
  lower = flat.at[(0,) * (ndim + 2)].set(-1.0)  # the other 2**ndim - 1 voxels tie
  share = jax.grad(lambda x: 8.0 * block_max_pool(x).sum())(lower)
  want = np.full(share.shape, 8.0 / (2 ** ndim - 1))
  want[(0,) * (ndim + 2)] = 0.0
  np.testing.assert_allclose(share, want, rtol=1e-6)


def test_conv_layers_take_the_folded_path_on_cpu_only(monkeypatch):
  """The layers' conv routes plain 3-D convolutions through the folded path on CPU."""
  from acis_jax.models import layers
  calls = []
  original = layers._depth_folded_conv
  monkeypatch.setattr(layers, "_depth_folded_conv",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  x = jax.random.normal(jax.random.key(1), (1, 4, 4, 4, 2))
  block = ConvBlock(2, 3, 3, norm="none", rngs=nnx.Rngs(0))
  out = block(x)
  assert len(calls) == (1 if jax.default_backend() == "cpu" else 0)
  want = jax.nn.leaky_relu(jax.lax.conv_general_dilated(
      x, block.conv.kernel[...], (1, 1, 1), "SAME",
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + block.conv.bias[...], 0.2)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  block2d = ConvBlock(2, 3, 2, norm="none", rngs=nnx.Rngs(0))
  block2d(x[:, 0])
  assert len(calls) == (1 if jax.default_backend() == "cpu" else 0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_channel_dropout_drops_whole_feature_maps(ndim, rngs):
  """Each channel is kept everywhere (scaled by 1 / (1 - rate)) or dropped everywhere."""
  stage = ConvStage(2, 16, ndim, num_convs=1, dropout=0.5, channel_dropout=True, rngs=rngs())
  x = jax.random.normal(jax.random.key(0), (2, *(8,) * ndim, 2))
  plain, dropped = stage(x), stage(x, jax.random.key(1))
  ratio = np.asarray(dropped / plain).reshape(2, -1, 16)
  kept = np.isclose(ratio, 2.0, rtol=1e-4)
  assert (kept | (ratio == 0)).all()
  assert (kept.all(axis=1) | (~kept).all(axis=1)).all()  # one draw per channel
  assert 0 < kept[:, 0].mean() < 1
