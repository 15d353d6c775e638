"""Rank-agnostic building blocks: one code path for 2-D `(b, H, W, C)` and 3-D `(b, D, H, W, C)`.

Every block takes the spatial rank `ndim` as a constructor argument; kernels are `(k,) * ndim`.
`dtype` is the compute dtype (e.g. `jnp.bfloat16` for 3-D memory); parameters stay float32.
Dropout is driven by an explicit key at call time: `key=None` means deterministic, so a module
holds parameters only (no RNG state) and works in NNX graph and tree mode alike.
"""
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("group", "instance", "layer", "none")
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2),
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
}
DOWN_MODES = ("conv", "pool")
UP_MODES = ("nearest", "linear", "transpose")
# At most this many groups in "group" norm (fewer when the width is not a multiple).
MAX_GROUPS = 8


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  """Raises a ValueError naming `name` unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_ndim(ndim: int) -> None:
  if ndim not in (1, 2, 3):
    raise ValueError(f"ndim (spatial rank) must be 1, 2 or 3, got {ndim!r}")


def check_input(x: jax.Array, ndim: int, channels: int, name: str) -> None:
  """Raises a ValueError unless `x` is `(batch, *spatial, channels)` with `ndim` spatial axes."""
  if x.ndim != ndim + 2 or x.shape[-1] != channels:
    raise ValueError(f"{name} must have shape (batch, *spatial[{ndim}], {channels}), "
                     f"got {x.shape}")


def check_divisible(spatial: Sequence[int], factor: int, name: str) -> None:
  """Raises a ValueError unless every spatial size is a multiple of `factor`."""
  if any(s % factor for s in spatial):
    raise ValueError(f"{name}: every spatial size must be a multiple of {factor} "
                     f"(2 ** number of down-sampling levels), got {tuple(spatial)}")


def make_norm(kind: str, features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.GroupNorm | None:
  """A per-sample normalisation over spatial axes (no batch statistics), or None for "none".

  "instance": one group per channel; "layer": one group for all channels; "group": up to
  `MAX_GROUPS` groups. Per-sample statistics keep the WGAN-GP gradient penalty well defined.
  """
  check_choice("norm", kind, NORMS)
  if kind == "none":
    return None
  groups = {"instance": features, "layer": 1, "group": math.gcd(MAX_GROUPS, features)}[kind]
  return nnx.GroupNorm(features, num_groups=groups, epsilon=1e-5, dtype=dtype, rngs=rngs)


# lax's dimension specs of channel-last convolutions, by spatial rank.
CHANNEL_LAST_SPECS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
                      3: ("NDHWC", "DHWIO", "NDHWC")}


def _depth_folded_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                       precision=None, **kwargs):
  """A channel-last 3-D convolution computed as one 2-D convolution (same result).

  The `kd` depth taps are folded into the channels: the input's depth-shifted (and strided)
  copies are concatenated along the channel axis, the depth is folded into the batch, and the
  kernel `(kd, kh, kw, I, O)` becomes `(kh, kw, kd * I, O)`. XLA:CPU runs 2-D convolutions and
  their gradients 2-4x faster than 3-D ones (benchmarks/peers.py); the sums are the same up to
  float rounding order.
  """
  del dimension_numbers, lhs_dilation, rhs_dilation  # checked by the caller: NDHWC, DHWIO, 1
  b, depth, _, _, channels = lhs.shape
  kd = rhs.shape[0]
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], window_strides, padding)
  (lo, hi), hw_padding = padding[0], tuple(padding[1:])
  stride = window_strides[0]
  out_depth = (depth + lo + hi - kd) // stride + 1
  x = jnp.pad(lhs, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
  taps = [x[:, t:t + stride * (out_depth - 1) + 1:stride] for t in range(kd)]
  x = taps[0] if kd == 1 else jnp.concatenate(taps, axis=-1)
  x = x.reshape(b * out_depth, *x.shape[2:])
  kernel = jnp.moveaxis(rhs, 0, 2).reshape(*rhs.shape[1:3], kd * channels, rhs.shape[-1])
  y = conv_general_dilated(
      x, kernel, tuple(window_strides[1:]), hw_padding,
      dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                        CHANNEL_LAST_SPECS[2]),
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  return y.reshape(b, out_depth, *y.shape[1:])


def cpu_rewrites() -> bool:
  """Whether convolutions take the CPU forms below (decided at trace time, by backend): on GPU
  and TPU, XLA's own convolutions are the fast path and run unchanged."""
  return jax.default_backend() == "cpu"


def _fold_blocks(a: jax.Array, first: int, factors: Sequence[int]) -> jax.Array:
  """Cuts axes `first .. first + n` of `a` into blocks of `factors` and folds the offsets in a
  block into axis `first + n` (in front of its own index): `(..., L_1, .., L_n, C, ...)` ->
  `(..., L_1 / f_1, .., L_n / f_n, prod(f) * C, ...)`."""
  n = len(factors)
  lead, sizes, rest = a.shape[:first], a.shape[first:first + n], a.shape[first + n:]
  blocks = [size // f for size, f in zip(sizes, factors)]
  a = a.reshape(*lead, *[v for b, f in zip(blocks, factors) for v in (b, f)], *rest)
  a = a.transpose(*range(first), *range(first, first + 2 * n, 2),
                  *range(first + 1, first + 2 * n, 2), *range(first + 2 * n, a.ndim))
  return a.reshape(*lead, *blocks, math.prod(factors) * rest[0], *rest[1:])


def _space_to_depth_conv(lhs, rhs, window_strides, padding, **kwargs):
  """A channel-last strided convolution computed as a stride-1 one (same result).

  Each axis is cut into blocks of its stride, and the block offsets become channels
  (space-to-depth); a kernel of `k` taps becomes `ceil(k / stride)` taps over the blocks, the
  missing taps zero. So `out[i] = sum_k w[k] x[s i + k]` is read as
  `sum_q sum_r w[s q + r] blocks[i + q, r]`. The gradient of a strided convolution is one
  with a dilated input; this form has plain convolutions both ways. Used in 3-D only: there
  the pix2pix generator's step at 32x32x32 took 0.93x the time of depth-folding the strided
  convolutions directly; in 2-D, XLA:CPU's own strided convolution was the faster one (this
  form took 1.2-1.6x longer per convolution, 2.5x in the WGAN-GP second-order gradient).
  """
  ndim = lhs.ndim - 2
  spatial = lhs.shape[1:-1]
  kernel = rhs.shape[:ndim]
  strides = tuple(window_strides)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(spatial, kernel, strides, padding)
  out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(spatial, padding, kernel, strides)]
  taps = [-(-k // s) for k, s in zip(kernel, strides)]
  blocked = [(o + t - 1) * s for o, t, s in zip(out, taps, strides)]
  # Pad in front as asked, then pad or crop the end to whole blocks.
  x = jnp.pad(lhs, [(0, 0)] + [(lo, max(L - n - lo, 0)) for n, (lo, _), L in
                               zip(spatial, padding, blocked)] + [(0, 0)])
  x = _fold_blocks(x[(slice(None), *(slice(0, L) for L in blocked))], 1, strides)
  w = _fold_blocks(jnp.pad(rhs, [(0, t * s - k) for t, s, k in zip(taps, strides, kernel)]
                           + [(0, 0)] * 2), 0, strides)
  return conv_general_dilated(
      x, w, (1,) * ndim, "VALID", dimension_numbers=jax.lax.conv_dimension_numbers(
          x.shape, w.shape, CHANNEL_LAST_SPECS[ndim]), **kwargs)


# A stride-1 2-D convolution computes its kernel gradient as one matrix product per tap when
# its kernel is 2x2 (`nearest_up_conv`'s), or when it has at least this many output channels,
# input channels times output channels and input voxels (batch x height x width). With jaxlib
# 0.10.2 (README "Speed"), idle: XLA:CPU's own kernel gradient of a 2x2 one took 1.4-4x
# longer at every size measured (4x130x130, 32 -> 64: 51 against 37 ms; 33x34x34, 64 -> 256:
# 250 against 59 ms); the pix2pix image generator's step at 4x256x256 (128 -> 64, 256 -> 128
# channels of 3x3) took 1.2x longer without it, while narrower 3x3 ones ran 1.7-3x faster
# forward + backward with XLA's (16 -> 32, 32 -> 32, 96 -> 32 at 4x128x128, beside another
# job) and the segmentation U-Net's step at 4x256x256 6 % faster.
MATMUL_KERNEL_GRAD_FEATURES = 32
MATMUL_KERNEL_GRAD_WEIGHTS = 8192
MATMUL_KERNEL_GRAD_VOXELS = 65536


def _lax_conv2d(x, kernel, padding, precision):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=CHANNEL_LAST_SPECS[2],
                                      precision=precision)


def _contract_leading(a: jax.Array, b: jax.Array, precision) -> jax.Array:
  """`a.T @ b` for `(M, P)` and `(M, Q)`, float32, as a product contracting both leading axes:
  1.1-1.6x faster on XLA:CPU than a product with a transposed copy."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_matmul_kernel_grad(x, kernel, padding, precision):
  """A stride-1 channel-last 2-D convolution whose kernel gradient is `kh * kw` products of the
  input shifted by each tap `(M, C)` with the cotangent `(M, O)`, contracted over `M`; the
  input gradient is lax's."""
  return _lax_conv2d(x, kernel, padding, precision)


def _conv2d_fwd(x, kernel, padding, precision):
  return _lax_conv2d(x, kernel, padding, precision), (x, kernel)


def _conv2d_bwd(padding, precision, residuals, cotangent):
  x, kernel = residuals
  d_x = jax.vjp(lambda x: _lax_conv2d(x, kernel, padding, precision), x)[1](cotangent)[0]
  (top, bottom), (left, right) = padding
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w, out_c = cotangent.shape[1:]
  rows = cotangent.reshape(-1, out_c)
  d_kernel = jnp.stack([jnp.stack([
      _contract_leading(padded[:, i:i + out_h, j:j + out_w].reshape(-1, x.shape[-1]), rows,
                        precision)
      for j in range(kernel.shape[1])]) for i in range(kernel.shape[0])])
  return d_x, d_kernel.astype(kernel.dtype)


_conv2d_matmul_kernel_grad.defvjp(_conv2d_fwd, _conv2d_bwd)


# A stride-1 2-D convolution whose taps times output channels are at most this many times
# its input channels runs as `_tap_channels_conv`. XLA:CPU's convolutions with few output
# channels run at 2-27 GFLOP/s against about 100 with 16 or more (jaxlib 0.10.2, README
# "Speed"); forward + backward at 4x256x256, 3x3, idle: 16 -> 2 (the registration net's
# velocity head) 41 against 23 ms, 32 -> 4 85 against 64, 48 -> 3 (its 3-D head, depth
# folded) 119 against 65, 16 -> 3 42 against 37, but 16 -> 4 43 against 47 and 32 -> 8 108
# against 121; 4x4, 512 -> 1 (the PatchGAN's last) at 2x32x32 28 against 2.5 ms.
TAP_CHANNELS_RATIO = 2


def _tap_weights(rhs: jax.Array) -> jax.Array:
  """`(*k, C, O)` -> `(C, taps * O)`, the taps in row-major order."""
  return jnp.moveaxis(rhs, -2, 0).reshape(rhs.shape[-2], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap_channels_conv(lhs, rhs, padding, precision):
  """A stride-1 channel-last convolution as one matrix product and a sum of shifted slices
  (same sums): `z = x @ w`, `w` reshaped `(C, taps * O)`, gives every tap's contribution at
  once; output voxel `p` adds tap `t`'s channels of `z` at `p + t - lo` (zero outside). For
  few output channels, far less work than the convolution. `padding`: `(lo, hi)` per axis.

  The gradient is written out (`_tap_channels_bwd`): autodiff's transposes of the slices
  became one full-size padded array per tap, and a transposed copy of the cotangent fed the
  weight product (the registration net's step at 4x256x256 took about 1.4x as long).
  """
  ndim = lhs.ndim - 2
  kernel, out = rhs.shape[:ndim], rhs.shape[-1]
  z = jnp.einsum("...c,ct->...t", lhs, _tap_weights(rhs).astype(lhs.dtype), precision=precision)
  z = jnp.pad(z.reshape(*lhs.shape[:-1], *kernel, out),
              ((0, 0), *padding, *((0, 0),) * (ndim + 1)))
  sizes = [n - k + 1 for n, k in zip(z.shape[1:1 + ndim], kernel)]
  y = None
  for tap in itertools.product(*(range(k) for k in kernel)):
    term = z[(slice(None), *(slice(t, t + n) for t, n in zip(tap, sizes)), *tap)]
    y = term if y is None else y + term
  return y


def _tap_channels_fwd(lhs, rhs, padding, precision):
  return _tap_channels_conv(lhs, rhs, padding, precision), (lhs, rhs)


def _tap_channels_bwd(padding, precision, residuals, cotangent):
  """`dz[r, t] = dy[r + lo - t]` (zero outside), as slices of one padded cotangent; then
  `dx = dz @ w.T` and `dw = x.T @ dz` (`_contract_leading`)."""
  lhs, rhs = residuals
  ndim = lhs.ndim - 2
  kernel, spatial = rhs.shape[:ndim], lhs.shape[1:-1]
  # Negative pads crop: the padding may exceed the kernel.
  padded = jax.lax.pad(cotangent, jnp.zeros((), cotangent.dtype),
                       [(0, 0, 0), *((k - 1 - lo, k - 1 - hi, 0)
                                     for k, (lo, hi) in zip(kernel, padding)), (0, 0, 0)])
  d_z = jnp.stack([
      padded[(slice(None), *(slice(k - 1 - t, k - 1 - t + n)
                             for k, t, n in zip(kernel, tap, spatial)))]
      for tap in itertools.product(*(range(k) for k in kernel))], axis=-2)
  d_z = d_z.reshape(-1, math.prod(kernel) * rhs.shape[-1])
  weights = _tap_weights(rhs).astype(lhs.dtype)
  d_x = jnp.einsum("mt,ct->mc", d_z, weights, precision=precision).reshape(lhs.shape)
  d_w = _contract_leading(lhs.reshape(-1, lhs.shape[-1]), d_z, precision)
  d_w = jnp.moveaxis(d_w.reshape(rhs.shape[-2], *kernel, rhs.shape[-1]), 0, -2)
  return d_x.astype(lhs.dtype), d_w.astype(rhs.dtype)


_tap_channels_conv.defvjp(_tap_channels_fwd, _tap_channels_bwd)


def _depthwise_shifted_sum(lhs, rhs, window_strides, padding, lhs_dilation):
  """A channel-last depthwise convolution (one feature group per channel, kernel
  `(*k, 1, C)`) as a sum over the taps of strided slices times the tap's weights (same sums).

  An input dilation (a transposed convolution) interleaves zeros explicitly. XLA:CPU runs
  grouped convolutions as slow loops, slowest with an input dilation; these slices and
  products are elementwise work (MedNeXt's blocks, benchmarks/peers.py).
  """
  ndim = lhs.ndim - 2
  dilation = tuple(lhs_dilation or (1,) * ndim)
  if any(d != 1 for d in dilation):
    lhs = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype),
                      [(0, 0, 0), *((0, 0, d - 1) for d in dilation), (0, 0, 0)])
  kernel = rhs.shape[:ndim]
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], kernel, window_strides, padding)
  x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  out = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:-1], kernel, window_strides)]
  weights = rhs.astype(lhs.dtype)
  y = None
  for tap in itertools.product(*(range(k) for k in kernel)):
    window = x[(slice(None), *(slice(t, t + s * (o - 1) + 1, s)
                               for t, s, o in zip(tap, window_strides, out)))]
    term = window * weights[tap][0]
    y = term if y is None else y + term
  return y


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`jax.lax.conv_general_dilated`, with rewrites on CPU that compute the same sums.

  Channel-last depthwise convolutions run as shifted sums (`_depthwise_shifted_sum`). Of the
  others only plain channel-last ones (no dilation, one feature group) are rewritten: 3-D
  convolutions run as 2-D ones with the depth taps folded into the channels, strided 3-D ones
  first becoming stride-1 ones over space-to-depth blocks; stride-1 2-D ones with few output
  channels (`TAP_CHANNELS_RATIO`) run as one matrix product and shifted sums; other stride-1
  2-D ones with a 2x2 kernel, or large and wide (`MATMUL_KERNEL_GRAD_*`), get a kernel
  gradient of matrix products (`cpu_rewrites`).
  Everything else, strided 1-D and 2-D ones included, goes to lax.
  """
  ndim = lhs.ndim - 2
  channel_last = (cpu_rewrites() and ndim in CHANNEL_LAST_SPECS
                  and dimension_numbers == jax.lax.conv_dimension_numbers(
                      lhs.shape, rhs.shape, CHANNEL_LAST_SPECS[ndim]))
  no_extras = not any(v is not None for v in kwargs.values())
  if (channel_last and no_extras and feature_group_count > 1
      and feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[-2] == 1
      and not any(d != 1 for d in (rhs_dilation or ()))):
    return _depthwise_shifted_sum(lhs, rhs, tuple(window_strides), padding, lhs_dilation)
  dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if channel_last and not dilated and feature_group_count == 1:
    strided = any(s != 1 for s in window_strides)
    if strided and ndim == 3:
      return _space_to_depth_conv(lhs, rhs, window_strides, padding, precision=precision,
                                  **kwargs)
    if ndim == 3:
      return _depth_folded_conv(lhs, rhs, window_strides, padding, precision=precision,
                                **kwargs)
    if ndim == 2 and not strided and no_extras:
      if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
      pads = tuple(tuple(int(p) for p in pair) for pair in padding)
      if math.prod(rhs.shape[:2]) * rhs.shape[-1] <= TAP_CHANNELS_RATIO * lhs.shape[-1]:
        return _tap_channels_conv(lhs, rhs, pads, precision)
      wide = (rhs.shape[-1] >= MATMUL_KERNEL_GRAD_FEATURES
              and lhs.shape[-1] * rhs.shape[-1] >= MATMUL_KERNEL_GRAD_WEIGHTS
              and math.prod(lhs.shape[:3]) >= MATMUL_KERNEL_GRAD_VOXELS)
      if wide or tuple(rhs.shape[:2]) == (2, 2):
        return _conv2d_matmul_kernel_grad(lhs, rhs, pads, precision)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, **kwargs)


def _depth_to_space(y: jax.Array) -> jax.Array:
  """`(b, *n, 2, .., 2, O)` (a 2 per spatial axis) -> `(b, *(2 n), O)`: offset `r` of block `i`
  along an axis becomes voxel `2 i + r`."""
  ndim = (y.ndim - 2) // 2
  b, spatial, out = y.shape[0], y.shape[1:1 + ndim], y.shape[-1]
  y = y.transpose(0, *[a for i in range(ndim) for a in (1 + i, 1 + ndim + i)], 1 + 2 * ndim)
  return y.reshape(b, *(2 * n for n in spatial), out)


def nearest_upsample(x: jax.Array) -> jax.Array:
  """Doubles every spatial size of `(b, *spatial, C)` by repeating each voxel."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, 2, axis=axis)
  return x


def nearest_up_conv(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """`conv(nearest_upsample(x), kernel)` for a 3-wide, stride-1 "SAME" kernel (same sums).

  Computed on the coarse grid: per axis 2 taps and `2 * O` outputs (one set per parity), one
  "VALID" convolution of `x` padded by one voxel; parity `r` of coarse voxel `i` is output
  window `i + r`. That is `(2/3)**ndim` of the multiply-adds on `1 / 2**ndim` of the voxels,
  and the up-sampled, concatenated input is never formed. The registration net's training step
  (VoxelMorph's nearest up-sampling) took 1.2x less time at 4x256x256 and 1.3x at 64x64x64 on
  XLA:CPU (the step of benchmarks/peers.py, alternating). The padding is explicit: given to
  the convolution instead, that step took 1.7x longer.
  """
  ndim = x.ndim - 2
  channels, out = kernel.shape[-2:]
  # Along one axis, parity 0 (voxel 2i) reads coarse voxels i - 1, i with weights w0, w1 + w2;
  # parity 1 (2i + 1) reads i, i + 1 with w0 + w1, w2. Folded in float32, then cast.
  w = kernel.astype(jnp.float32)  # (k_1, .., k_n, C, O) -> (q_1, .., q_n, C, r_1, .., r_n, O)
  for axis in range(ndim):
    w0, w1, w2 = (jnp.take(w, k, axis=axis) for k in range(3))
    w = jnp.stack([jnp.stack([w0, w1 + w2], axis), jnp.stack([w0 + w1, w2], axis)], axis=-2)
  w = w.reshape(*(2,) * ndim, channels, 2 ** ndim * out).astype(x.dtype)
  padded = jnp.pad(x, ((0, 0), *((1, 1),) * ndim, (0, 0)))
  y = conv_general_dilated(
      padded, w, (1,) * ndim, "VALID", precision=precision,
      dimension_numbers=jax.lax.conv_dimension_numbers(padded.shape, w.shape,
                                                       CHANNEL_LAST_SPECS[ndim]))
  y = y.reshape(*y.shape[:-1], *(2,) * ndim, out)
  spatial = x.shape[1:-1]
  parities = [y[(slice(None), *(slice(r, r + n) for r, n in zip(parity, spatial)), *parity)]
              for parity in itertools.product((0, 1), repeat=ndim)]
  y = jnp.stack(parities, axis=-2).reshape(x.shape[0], *spatial, *(2,) * ndim, out)
  return _depth_to_space(y)


def up_concat_conv(layer: nnx.Conv, x: jax.Array, skip: jax.Array) -> jax.Array:
  """`layer(concat([nearest_upsample(x), skip]))`: a U-Net decoder level's first convolution.

  On CPU (`cpu_rewrites`), a 3-wide stride-1 "SAME" layer convolves the coarse `x` by
  `nearest_up_conv` and `skip` on its own, and adds the two (same sums); anything else, and
  other backends, up-sample and concatenate.
  """
  ndim = x.ndim - 2
  plain = (not cpu_rewrites() or tuple(layer.kernel_size) != (3,) * ndim
           or layer.padding != "SAME" or tuple(layer.strides) != (1,) * ndim
           or layer.feature_group_count != 1 or layer.input_dilation not in (None, 1)
           or layer.kernel_dilation not in (None, 1))
  if plain:
    x = nearest_upsample(x)
    return layer(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))
  bias = None if layer.bias is None else layer.bias[...]
  split = x.shape[-1]
  # Only the skip's half of the kernel is cast here: the coarse half's taps are summed from
  # the float32 parameters (see nearest_up_conv).
  x, skip, skip_kernel, bias = layer.promote_dtype(
      (x, skip, layer.kernel[..., split:, :], bias), dtype=layer.dtype)
  y = nearest_up_conv(x, layer.kernel[..., :split, :], layer.precision) + conv_general_dilated(
      skip, skip_kernel, (1,) * ndim, "SAME", precision=layer.precision,
      dimension_numbers=jax.lax.conv_dimension_numbers(skip.shape, skip_kernel.shape,
                                                       CHANNEL_LAST_SPECS[ndim]))
  return y if bias is None else y + bias


def upsample_transpose_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
  """nnx.ConvTranspose with kernel = stride = 2 and "VALID" padding, as one matrix product.

  The blocks do not overlap: output voxel `2 i + r` is `x[i] @ kernel[1 - r] + bias` (lax's
  conv_transpose reads the kernel flipped), so a product with all `2**ndim` taps at once and
  a depth-to-space rearrangement give the same values; the lax form convolves an input
  dilated by 2, XLA:CPU's slow case (see `_space_to_depth_conv`).
  """
  ndim = x.ndim - 2
  flipped = kernel[(slice(None, None, -1),) * ndim]
  taps = jnp.moveaxis(flipped.reshape(2 ** ndim, *kernel.shape[-2:]), 0, 1)  # (I, 2**nd, O)
  y = jnp.einsum("...i,ito->...to", x, taps.astype(x.dtype))
  y = _depth_to_space(y.reshape(*x.shape[:-1], *(2,) * ndim, kernel.shape[-1]))
  return y if bias is None else y + bias.astype(y.dtype)


def conv(in_features: int, out_features: int, ndim: int, *, kernel_size: int = 3,
         stride: int = 1, padding: str | int = "SAME", dtype: Any = None,
         kernel_init: Any = None, rngs: nnx.Rngs) -> nnx.Conv:
  """An `ndim`-D convolution; an int `padding` pads that many voxels on both sides."""
  if isinstance(padding, int):
    padding = ((padding, padding),) * ndim
  extra = {} if kernel_init is None else {"kernel_init": kernel_init}
  return nnx.Conv(in_features, out_features, (kernel_size,) * ndim, (stride,) * ndim,
                  padding=padding, dtype=dtype, param_dtype=jnp.float32,
                  conv_general_dilated=conv_general_dilated, rngs=rngs, **extra)


class ConvBlock(nnx.Module):
  """Convolution -> normalisation -> activation."""

  def __init__(self, in_features: int, out_features: int, ndim: int, *, kernel_size: int = 3,
               stride: int = 1, padding: str | int = "SAME", norm: str = "group",
               activation: str = "leaky_relu", dtype: Any = None, rngs: nnx.Rngs):
    check_choice("activation", activation, tuple(ACTIVATIONS))
    self.conv = conv(in_features, out_features, ndim, kernel_size=kernel_size, stride=stride,
                     padding=padding, dtype=dtype, rngs=rngs)
    self.norm = make_norm(norm, out_features, dtype=dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    """With `skip`, the input is `concat([nearest_upsample(x), skip])` (`up_concat_conv`)."""
    x = self.conv(x) if skip is None else up_concat_conv(self.conv, x, skip)
    if self.norm is not None:
      x = self.norm(x)
    return ACTIVATIONS[self.activation](x)


class ConvStage(nnx.Module):
  """`num_convs` 3-wide ConvBlocks at one resolution, then optional dropout.

  `channel_dropout=True` drops whole feature maps (one draw per channel, shared over space:
  SpatialDropout, Tompson et al. 2015) instead of single activations.

  Dropout runs only when a key is given. `remat=True` recomputes the stage's activations in
  the backward pass instead of storing them (memory for compute, for 3-D volumes).
  With `skip`, the stage's input is `concat([nearest_upsample(x), skip])` (`ConvBlock`).
  """

  def __init__(self, in_features: int, out_features: int, ndim: int, *, num_convs: int = 2,
               norm: str = "group", activation: str = "leaky_relu", dropout: float = 0.0,
               channel_dropout: bool = False, remat: bool = False, dtype: Any = None,
               rngs: nnx.Rngs):
    if num_convs < 1:
      raise ValueError(f"num_convs must be at least 1, got {num_convs}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout rate must be in [0, 1), got {dropout}")
    widths = [in_features] + [out_features] * num_convs
    self.blocks = nnx.List([
        ConvBlock(a, b, ndim, norm=norm, activation=activation, dtype=dtype, rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:])])
    spatial_axes = tuple(range(1, ndim + 1)) if channel_dropout else ()
    self.dropout = nnx.Dropout(dropout, broadcast_dims=spatial_axes) if dropout > 0 else None
    self.remat = remat

  def _forward(self, x: jax.Array, key: jax.Array | None,
               skip: jax.Array | None = None) -> jax.Array:
    for i, block in enumerate(self.blocks):
      x = block(x, skip if i == 0 else None)
    if self.dropout is not None:
      x = self.dropout(x, deterministic=key is None, rngs=key)
    return x

  def __call__(self, x: jax.Array, key: jax.Array | None = None,
               skip: jax.Array | None = None) -> jax.Array:
    if self.remat:
      # Tree mode: nothing to write back to the module, so it also works inside transforms
      # entered after the module was merged (the refine step's checkpointed, vmapped passes).
      return nnx.remat(ConvStage._forward, graph=False)(self, x, key, skip)
    return self._forward(x, key, skip)


def _pool_blocks(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  """`(b, *spatial, C)` -> its 2-wide blocks `(b, h_1, 2, .., h_n, 2, C)` (an odd last voxel
  dropped) and the block axes."""
  ndim = x.ndim - 2
  halves = [n // 2 for n in x.shape[1:-1]]
  x = x[(slice(None), *(slice(0, 2 * h) for h in halves))]
  x = x.reshape(x.shape[0], *[v for h in halves for v in (h, 2)], x.shape[-1])
  return x, tuple(2 + 2 * a for a in range(ndim))


@jax.custom_vjp
def block_max_pool(x: jax.Array) -> jax.Array:
  """2x max pooling of `(b, *spatial, C)` ("VALID": an odd last voxel is dropped) as a max over
  the axes of 2-wide blocks. Same values as `nnx.max_pool`; the gradient goes to the block's
  maximum (shared equally where several voxels tie) as elementwise work, where the pooling
  window's gradient is a select-and-scatter that XLA:CPU ran 5x slower (4x256x256x16:
  62 against 12 ms). The gradient is written out (`_block_max_pool_bwd`): autodiff stored a
  tie mask in the forward pass and counted it with a reduction, 20 ms of the registration
  net's step at 4x256x256 against 1.5 ms now (profile)."""
  blocks, axes = _pool_blocks(x)
  return blocks.max(axis=axes)


def _block_max_pool_fwd(x):
  y = block_max_pool(x)
  return y, (x, y)


def _block_max_pool_bwd(residuals, cotangent):
  x, y = residuals
  blocks, axes = _pool_blocks(x)
  at_max = blocks == jnp.expand_dims(y, axes)
  # Counted as sums of the blocks' halves: XLA:CPU's reduction over the 2-wide axes took
  # 10.6 ms at 4x256x256x16, the whole backward pass now 1.5 ms (profile).
  ties = at_max.astype(cotangent.dtype)
  for axis in axes:
    ties = (jax.lax.slice_in_dim(ties, 0, 1, axis=axis)
            + jax.lax.slice_in_dim(ties, 1, 2, axis=axis))
  d_blocks = jnp.where(at_max, jnp.expand_dims(cotangent, axes) / ties, 0).astype(x.dtype)
  d_x = d_blocks.reshape(x.shape[0], *(2 * n for n in y.shape[1:-1]), x.shape[-1])
  return (jnp.pad(d_x, [(0, 0), *((0, n % 2) for n in x.shape[1:-1]), (0, 0)]),)


block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


class Down(nnx.Module):
  """Halves every spatial size, keeping the channels: strided conv (kernel 4, pad 1) or max pool."""

  def __init__(self, features: int, ndim: int, *, mode: str = "conv", dtype: Any = None,
               rngs: nnx.Rngs):
    check_choice("down", mode, DOWN_MODES)
    self.ndim = ndim
    self.conv = (conv(features, features, ndim, kernel_size=4, stride=2, padding=1, dtype=dtype,
                      rngs=rngs) if mode == "conv" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.conv is not None:
      return self.conv(x)
    if cpu_rewrites():
      return block_max_pool(x)
    return nnx.max_pool(x, (2,) * self.ndim, strides=(2,) * self.ndim)


class Up(nnx.Module):
  """Doubles every spatial size, keeping the channels: nearest/linear resize or transposed conv."""

  def __init__(self, features: int, ndim: int, *, mode: str = "nearest", dtype: Any = None,
               rngs: nnx.Rngs):
    check_choice("up", mode, UP_MODES)
    self.ndim = ndim
    self.mode = mode
    self.conv = (nnx.ConvTranspose(features, features, (2,) * ndim, (2,) * ndim, padding="VALID",
                                   dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
                 if mode == "transpose" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.conv is not None:
      if not cpu_rewrites():
        return self.conv(x)
      x, kernel, bias = self.conv.promote_dtype(
          (x, self.conv.kernel[...], self.conv.bias[...]), dtype=self.conv.dtype)
      return upsample_transpose_conv(x, kernel, bias)
    if self.mode == "nearest":
      return nearest_upsample(x)
    shape = (x.shape[0], *(2 * s for s in x.shape[1:-1]), x.shape[-1])
    return jax.image.resize(x, shape, "linear")


class UNet(nnx.Module):
  """A U-Net trunk: `(b, *spatial, in_features)` -> `(b, *spatial, features[0])`.

  Level `i` works at `spatial / 2**i` with `features[i]` channels; every spatial size must be a
  multiple of `2 ** (len(features) - 1)`. Encoder: a ConvStage per level, `Down` between levels.
  Decoder: `Up`, concatenate the encoder's skip, a ConvStage. Dropout (when a key is given)
  follows the `dropout_stages` deepest decoder stages (None: every decoder stage); pix2pix uses 3.
  `channel_dropout`: whole feature maps are dropped (`ConvStage`).
  `remat=True` recomputes each encoder stage, and each decoder level from its coarse input
  and skip, in the backward pass: the full-resolution concatenation is never stored.
  """

  def __init__(self, in_features: int, ndim: int, *, features: Sequence[int] = (32, 64, 128, 256),
               convs_per_level: int = 2, norm: str = "group", activation: str = "leaky_relu",
               down: str = "conv", up: str = "nearest", dropout: float = 0.0,
               dropout_stages: int | None = None, channel_dropout: bool = False,
               remat: bool = False, dtype: Any = None,
               rngs: nnx.Rngs):
    check_ndim(ndim)
    features = tuple(int(f) for f in features)
    if len(features) < 2:
      raise ValueError(f"features needs at least two levels, got {features}")
    self.ndim = ndim
    self.in_features = in_features
    self.features = features
    levels = len(features)
    n_drop = levels - 1 if dropout_stages is None else min(dropout_stages, levels - 1)
    self.remat = remat
    stage = dict(num_convs=convs_per_level, norm=norm, activation=activation, dtype=dtype,
                 rngs=rngs)
    self.encoder = nnx.List([ConvStage(in_features, features[0], ndim, remat=remat, **stage)] + [
        ConvStage(features[i - 1], features[i], ndim, remat=remat, **stage)
        for i in range(1, levels)])
    self.downs = nnx.List([Down(features[i], ndim, mode=down, dtype=dtype, rngs=rngs)
                           for i in range(levels - 1)])
    self.ups = nnx.List([Up(features[i + 1], ndim, mode=up, dtype=dtype, rngs=rngs)
                         for i in range(levels - 1)])
    # decoder[i] produces level i; the n_drop deepest ones (largest i) carry dropout. Their
    # remat is the whole level's (see `__call__`).
    self.decoder = nnx.List([
        ConvStage(features[i + 1] + features[i], features[i], ndim,
                  dropout=dropout if i >= levels - 1 - n_drop else 0.0,
                  channel_dropout=channel_dropout, **stage)
        for i in range(levels - 1)])

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    check_input(x, self.ndim, self.in_features, "UNet input")
    check_divisible(x.shape[1:-1], 2 ** (len(self.features) - 1), "UNet input")
    skips = []
    for i, stage in enumerate(self.encoder):
      if i > 0:
        x = self.downs[i - 1](x)
      x = stage(x)
      skips.append(x)
    decode = nnx.remat(_decode, graph=False) if self.remat else _decode
    for i in reversed(range(len(self.decoder))):
      x = decode(self.ups[i], self.decoder[i], x, skips[i],
                 None if key is None else jax.random.fold_in(key, i))
    return x


def _decode(up: Up, stage: ConvStage, x: jax.Array, skip: jax.Array,
            key: jax.Array | None) -> jax.Array:
  """One U-Net decoder level: up-sample `x`, concatenate the encoder's `skip`, a ConvStage.

  Nearest up-sampling is left to the stage's first convolution (`up_concat_conv`), which can
  then work on the coarse grid."""
  if up.mode == "nearest":
    return stage(x, key, skip)
  x = up(x)
  return stage(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), key)
