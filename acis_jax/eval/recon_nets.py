"""Downstream reconstruction networks of the evaluation (paper sec 3.1): ResNet (EDSR-style),
RED-CNN and a compact ESRT.

All three map a degraded image `(batch, *spatial, channels)` to a restored image of the same
shape, are rank-agnostic (`spatial_dims=2` or `3`, kernels `(k,) * spatial_dims`), channel-last,
and are trained with the L2 loss. Input size = output size for every task: for super-resolution
the low-resolution image is re-sampled onto the full grid before the network
(`acis_jax.eval.degrade`), so EDSR's and ESRT's pixel-shuffle up-samplers are left out.
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from acis_jax.models import layers


def _check_spatial_dims(spatial_dims: int, name: str) -> None:
  if spatial_dims not in (2, 3):
    raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")


def _conv(in_features: int, out_features: int, spatial_dims: int, kernel_size: int,
          rngs: nnx.Rngs, dtype: Any = None, kernel_init: Any = None) -> nnx.Conv:
  return layers.conv(in_features, out_features, spatial_dims, kernel_size=kernel_size,
                     dtype=dtype, kernel_init=kernel_init, rngs=rngs)


# For the last convs of the global-residual nets (biases start at zero anyway): an untrained
# net is then the identity.
_ZEROS = nnx.initializers.zeros_init()


class ResidualBlock(nnx.Module):
  """EDSR's block: conv -> ReLU -> conv, no BatchNorm, output `x + res_scale * body(x)`."""

  def __init__(self, features: int, spatial_dims: int, *, kernel_size: int, res_scale: float,
               dtype: Any = None, rngs: nnx.Rngs):
    self.conv1 = _conv(features, features, spatial_dims, kernel_size, rngs, dtype)
    self.conv2 = _conv(features, features, spatial_dims, kernel_size, rngs, dtype)
    self.res_scale = res_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.res_scale * self.conv2(jax.nn.relu(self.conv1(x)))


class ResNet(nnx.Module):
  """The paper's "ResNet" (ref [31], EDSR, Lim et al. 2017) without the up-sampler.

  head conv -> `num_blocks` ResidualBlocks -> conv, plus a long skip from the head -> tail conv,
  plus the input: the degraded image is already on the output grid (no up-sampler), so the
  network predicts the correction to it, as VDSR (Kim et al. 2016) does. The tail conv starts
  at zero, so the untrained network is the identity and training only has to learn the
  correction.
  EDSR-baseline has 16 blocks of 64 features with res_scale 1; EDSR 32 blocks of 256 features
  with res_scale 0.1, the residual scaling that keeps wide residual stacks stable. Defaults:
  16 blocks, 64 features, res_scale 0.1.
  """

  def __init__(self, channels: int, *, spatial_dims: int, features: int = 64,
               num_blocks: int = 16, res_scale: float = 0.1, kernel_size: int = 3,
               dtype: Any = None, rngs: nnx.Rngs):
    _check_spatial_dims(spatial_dims, "ResNet")
    if num_blocks < 1:
      raise ValueError(f"ResNet: num_blocks must be >= 1, got {num_blocks}")
    self.spatial_dims, self.channels = spatial_dims, channels
    self.head = _conv(channels, features, spatial_dims, kernel_size, rngs, dtype)
    self.blocks = nnx.List([
        ResidualBlock(features, spatial_dims, kernel_size=kernel_size, res_scale=res_scale,
                      dtype=dtype, rngs=rngs) for _ in range(num_blocks)])
    self.body_end = _conv(features, features, spatial_dims, kernel_size, rngs, dtype)
    self.tail = _conv(features, channels, spatial_dims, kernel_size, rngs, dtype,
                      kernel_init=_ZEROS)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`(b, *spatial, channels)` -> `(b, *spatial, channels)`."""
    layers.check_input(x, self.spatial_dims, self.channels, "ResNet input")
    head = self.head(x)
    y = head
    for block in self.blocks:
      y = block(y)
    return x + self.tail(head + self.body_end(y))


class REDCNN(nnx.Module):
  """RED-CNN (Chen et al., IEEE TMI 2017): 5 convs + 5 transposed convs with 3 shortcuts.

  All layers have `kernel_size` (5) wide kernels, `features` (96) channels, stride 1 and no
  padding, so each conv shrinks every spatial size by `kernel_size - 1` and each transposed conv
  grows it back. Shortcuts: the input is added to the last transposed conv's output, conv2's
  output to transposed conv 3's, conv4's to transposed conv 1's; ReLU follows every layer, after
  the shortcut sums. Every spatial size must exceed `5 * (kernel_size - 1)`.
  """

  def __init__(self, channels: int, *, spatial_dims: int, features: int = 96,
               kernel_size: int = 5, dtype: Any = None, rngs: nnx.Rngs):
    _check_spatial_dims(spatial_dims, "REDCNN")
    self.spatial_dims, self.channels, self.kernel_size = spatial_dims, channels, kernel_size
    kernel = (kernel_size,) * spatial_dims
    common = dict(padding="VALID", dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    widths = [channels] + [features] * 5
    self.encoder = nnx.List([nnx.Conv(a, b, kernel, **common)
                             for a, b in zip(widths[:-1], widths[1:])])
    self.decoder = nnx.List([nnx.ConvTranspose(b, a, kernel, **common)
                             for a, b in reversed(list(zip(widths[:-1], widths[1:])))])

  def __call__(self, x: jax.Array) -> jax.Array:
    """`(b, *spatial, channels)` -> `(b, *spatial, channels)`, non-negative (final ReLU)."""
    layers.check_input(x, self.spatial_dims, self.channels, "REDCNN input")
    shrink = 5 * (self.kernel_size - 1)
    if min(x.shape[1:-1]) <= shrink:
      raise ValueError(f"REDCNN input: every spatial size must exceed {shrink} (five unpadded "
                       f"{self.kernel_size}-wide convs), got {x.shape[1:-1]}")
    shortcuts = [x]
    y = x
    for i, conv in enumerate(self.encoder):
      y = jax.nn.relu(conv(y))
      if i in (1, 3):  # the outputs of conv2 and conv4
        shortcuts.append(y)
    for i, deconv in enumerate(self.decoder):
      y = deconv(y)
      if i in (0, 2, 4):  # deconv1 + conv4, deconv3 + conv2, deconv5 + input
        y = y + shortcuts.pop()
      y = jax.nn.relu(y)
    return y


class AdaptiveResidualBlock(nnx.Module):
  """ESRT's ARFB, simplified: `lambda_res * x + lambda_x * conv(ReLU(conv(x)))`, both learnt.

  (ESRT's ARFB has two reduction/expansion residual units and a 1x1 + 3x3 fusion inside;
  the adaptive weighting of the two paths is what we keep.)
  """

  def __init__(self, features: int, spatial_dims: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(features, features, spatial_dims, 3, rngs)
    self.conv2 = _conv(features, features, spatial_dims, 3, rngs)
    self.lambda_res = nnx.Param(jnp.ones((), jnp.float32))
    self.lambda_x = nnx.Param(jnp.ones((), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.lambda_res[...] * x + self.lambda_x[...] * self.conv2(jax.nn.relu(self.conv1(x)))


class ChannelAttention(nnx.Module):
  """Squeeze-and-excitation: a per-channel sigmoid gate from the spatial mean."""

  def __init__(self, features: int, *, reduction: int = 16, rngs: nnx.Rngs):
    hidden = max(1, features // reduction)
    self.squeeze = nnx.Linear(features, hidden, rngs=rngs)
    self.excite = nnx.Linear(hidden, features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
    return x * jax.nn.sigmoid(self.excite(jax.nn.relu(self.squeeze(mean))))


def _pool2(x: jax.Array) -> jax.Array:
  ndim = x.ndim - 2
  return nnx.avg_pool(x, (2,) * ndim, strides=(2,) * ndim)


class HighPreservingBlock(nnx.Module):
  """ESRT's HPB, simplified: ARFB; split into a high-frequency part (features minus their 2x
  average-pooled, nearest-up-sampled copy: ESRT's HFM) and the half-resolution part; an ARFB on
  each; the low part up-sampled (linear), the two fused by a 1x1 conv; ARFB; channel attention;
  a residual connection around it all. Spatial sizes must be even.
  """

  def __init__(self, features: int, spatial_dims: int, *, rngs: nnx.Rngs):
    self.first = AdaptiveResidualBlock(features, spatial_dims, rngs=rngs)
    self.high = AdaptiveResidualBlock(features, spatial_dims, rngs=rngs)
    self.low = AdaptiveResidualBlock(features, spatial_dims, rngs=rngs)
    self.fuse = _conv(2 * features, features, spatial_dims, 1, rngs)
    self.last = AdaptiveResidualBlock(features, spatial_dims, rngs=rngs)
    self.attention = ChannelAttention(features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    y = self.first(x)
    low = _pool2(y)
    nearest = low
    for axis in range(1, ndim + 1):
      nearest = jnp.repeat(nearest, 2, axis=axis)
    high = self.high(y - nearest)
    low = jax.image.resize(self.low(low), y.shape, "linear")
    y = self.fuse(jnp.concatenate([high, low], axis=-1))
    return x + self.attention(self.last(y))


class EfficientTransformer(nnx.Module):
  """ESRT's ET: a 1x1 reduction to `features // 2` channels; pre-norm efficient multi-head
  attention (EMHA) and an MLP, each residual; a 1x1 expansion back, residual to the input.

  EMHA's feature split: the token sequence (voxels in row-major order) is cut into contiguous
  segments of `split_size` tokens and attention runs within each segment, so memory grows as
  `N * split_size` instead of `N^2` (ESRT splits into s = 4 segments of its small training
  patches; at 256x256 a fixed segment length is what keeps the memory bounded). Simplified:
  tokens are single voxels (ESRT unfolds 3x3 neighbourhoods into each token).
  """

  def __init__(self, features: int, *, heads: int, split_size: int, mlp_ratio: int = 2,
               rngs: nnx.Rngs):
    dim = max(1, features // 2)
    if dim % heads:
      raise ValueError(f"EfficientTransformer: the reduced width {dim} (features // 2) must be "
                       f"a multiple of heads={heads}")
    self.heads, self.split_size = heads, split_size
    self.reduce = nnx.Linear(features, dim, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)
    self.expand = nnx.Linear(dim, features, rngs=rngs)

  def _attention(self, t: jax.Array) -> jax.Array:
    b, n, dim = t.shape
    length = min(self.split_size, n)
    if n % length:
      raise ValueError(f"EfficientTransformer: the number of voxels {n} must be a multiple of "
                       f"split_size={length}")
    q, k, v = jnp.split(self.qkv(t), 3, axis=-1)
    # (b, segments, tokens per segment, heads, head width)
    q, k, v = (a.reshape(b, n // length, length, self.heads, dim // self.heads) for a in (q, k, v))
    scores = jnp.einsum("bsqhd,bskhd->bshqk", q, k) / jnp.sqrt(dim // self.heads)
    out = jnp.einsum("bshqk,bskhd->bsqhd", jax.nn.softmax(scores, axis=-1), v)
    return self.proj(out.reshape(b, n, dim))

  def __call__(self, x: jax.Array) -> jax.Array:
    t = self.reduce(x.reshape(x.shape[0], -1, x.shape[-1]))
    t = t + self._attention(self.norm1(t))
    t = t + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(t))))
    return x + self.expand(t).reshape(x.shape)


class ESRT(nnx.Module):
  """A compact ESRT (Lu et al., CVPRW 2022) for super-resolution, without the up-sampler.

  head conv -> lightweight CNN backbone (`num_hpb` HighPreservingBlocks; ESRT uses 3) ->
  lightweight transformer backbone (`num_transformers` EfficientTransformers; ESRT uses 1) ->
  tail conv, plus ESRT's second path: a conv on the head features added to the tail, plus the
  input (a global residual with zero-initialised tail and skip convs, as in `ResNet`). ESRT's
  width is 32 channels. What is simplified is said in each block's docstring; the input is the
  low-resolution image re-sampled onto the full grid (module docstring), so both of ESRT's
  pixel-shuffle up-samplers are left out. Spatial sizes must be even and the voxel count a
  multiple of `split_size` (or smaller than it).
  """

  def __init__(self, channels: int, *, spatial_dims: int, features: int = 32, num_hpb: int = 3,
               num_transformers: int = 1, heads: int = 4, split_size: int = 256,
               rngs: nnx.Rngs):
    _check_spatial_dims(spatial_dims, "ESRT")
    self.spatial_dims, self.channels = spatial_dims, channels
    self.head = _conv(channels, features, spatial_dims, 3, rngs)
    self.cnn = nnx.List([HighPreservingBlock(features, spatial_dims, rngs=rngs)
                         for _ in range(num_hpb)])
    self.transformers = nnx.List([
        EfficientTransformer(features, heads=heads, split_size=split_size, rngs=rngs)
        for _ in range(num_transformers)])
    self.tail = _conv(features, channels, spatial_dims, 3, rngs, kernel_init=_ZEROS)
    self.skip = _conv(features, channels, spatial_dims, 3, rngs, kernel_init=_ZEROS)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`(b, *spatial, channels)` -> `(b, *spatial, channels)`."""
    layers.check_input(x, self.spatial_dims, self.channels, "ESRT input")
    layers.check_divisible(x.shape[1:-1], 2, "ESRT input")
    head = self.head(x)
    y = head
    for block in self.cnn:
      y = block(y)
    for block in self.transformers:
      y = block(y)
    return x + self.tail(y) + self.skip(head)
