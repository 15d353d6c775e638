"""Downstream segmentation networks of the evaluation (paper sec 3.1): a 3D U-Net and MedNeXt.

Both map `(batch, *spatial, in_channels)` images to `(batch, *spatial, num_classes)` logits,
are rank-agnostic (`spatial_dims=2` or `3` builds the 2-D or 3-D network from the same class,
kernels `(k,) * spatial_dims`), channel-last, and are trained with the soft Dice loss
(`acis_jax.eval.downstream.case_losses`). Widths are constructor arguments, so tests use tiny ones.
Both down-sample four times: every spatial size must be a multiple of 16 (192x192x160 and
256x256 are).
"""
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from acis_jax.models import layers

# MedNeXt-S (Roy et al., MICCAI 2023, and their `create_mednextv1_small`): base width C = 32,
# and for the 9 stages (4 encoder, bottleneck, 4 decoder) block counts
# B = [2, 2, 2, 2, 2, 2, 2, 2, 2] and expansion ratios R = [2, 2, 2, 2, 2, 2, 2, 2, 2]; 5.6 M
# parameters with 3x3x3 kernels (their Table 1; ours count the same, see the tests).
# The B/M/L variants use R = [2,3,4,4,4,4,4,3,2] (B, M), [3,4,8,8,8,8,8,4,3] (L).
MEDNEXT_S_WIDTH = 32
MEDNEXT_S_BLOCKS = (2,) * 9
MEDNEXT_S_EXPANSION = (2,) * 9


def _check_spatial_dims(spatial_dims: int, name: str) -> None:
  if spatial_dims not in (2, 3):
    raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")


class SegUNet(nnx.Module):
  """The paper's "3DUNet": 4 encoder and 4 decoder levels, encoder features [16, 32, 64, 128].

  Reading of the paper (sec 3.1, after Qamar et al. 2020 and Cicek et al. 2016): encoder level
  `i` has `features[i]` channels (two 3-wide conv blocks) and ends in a 2x max-pool; a bottleneck
  at `2 * features[-1]` channels follows; decoder level `i` up-samples by a 2x transposed conv,
  concatenates encoder level `i` and applies two conv blocks at `features[i]`; a 1x1 conv gives
  the logits. So there are `len(features)` down-samplings (4: inputs a multiple of 16).
  Normalisation is per-sample GroupNorm (no batch statistics, so the train step stays a pure
  function of parameters; Cicek et al. used BatchNorm). The trunk is `acis_jax.models.layers.UNet`.
  """

  def __init__(self, in_channels: int, num_classes: int, *, spatial_dims: int,
               features: Sequence[int] = (16, 32, 64, 128), norm: str = "group",
               remat: bool = False, dtype: Any = None, rngs: nnx.Rngs):
    _check_spatial_dims(spatial_dims, "SegUNet")
    features = tuple(int(f) for f in features)
    if not features:
      raise ValueError("SegUNet: features needs at least one encoder level")
    self.num_levels = len(features)
    self.trunk = layers.UNet(in_channels, spatial_dims, features=features + (2 * features[-1],),
                             norm=norm, activation="relu", down="pool", up="transpose",
                             remat=remat, dtype=dtype, rngs=rngs)
    self.head = layers.conv(features[0], num_classes, spatial_dims, kernel_size=1, dtype=dtype,
                            rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`(b, *spatial, in_channels)` -> logits `(b, *spatial, num_classes)`."""
    return self.head(self.trunk(x))


class MedNeXtBlock(nnx.Module):
  """A ConvNeXt-style block (Roy et al. 2023): depthwise conv k -> GroupNorm -> 1x1 expansion
  (x `expansion`) -> GELU -> 1x1 compression, plus a residual path.

  `resample`: "none" keeps the size (identity residual, `in == out` features); "down" uses a
  stride-2 depthwise conv and a stride-2 1x1 conv on the residual path; "up" uses a stride-2
  depthwise transposed conv and a stride-2 1x1 transposed conv on the residual path (the
  MedNeXt up/down blocks with `do_res_up_down=True`). GroupNorm has one group per channel.
  """

  def __init__(self, in_features: int, out_features: int, spatial_dims: int, *,
               expansion: int, kernel_size: int = 3, resample: str = "none", dtype: Any = None,
               rngs: nnx.Rngs):
    layers.check_choice("resample", resample, ("none", "down", "up"))
    if resample == "none" and in_features != out_features:
      raise ValueError(f"MedNeXtBlock: a same-size block needs in == out features, got "
                       f"{in_features} -> {out_features}")
    if kernel_size % 2 != 1:
      raise ValueError(f"MedNeXtBlock: kernel_size must be odd, got {kernel_size}")
    k, half = kernel_size, kernel_size // 2
    conv = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    depthwise = dict(conv, feature_group_count=in_features,
                     conv_general_dilated=layers.conv_general_dilated)
    if resample == "up":
      # A stride-2 transposed conv is a conv over the input dilated by 2; the padding (half+1,
      # half) makes every size exactly double (PyTorch pads the first voxel after its
      # ConvTranspose for the same reason).
      self.depthwise = nnx.Conv(in_features, in_features, (k,) * spatial_dims,
                                input_dilation=2, padding=((half + 1, half),) * spatial_dims,
                                **depthwise)
      self.shortcut = nnx.Conv(in_features, out_features, (1,) * spatial_dims,
                               input_dilation=2, padding=((1, 0),) * spatial_dims, **conv)
    else:
      stride = 2 if resample == "down" else 1
      self.depthwise = nnx.Conv(in_features, in_features, (k,) * spatial_dims, stride,
                                padding=((half, half),) * spatial_dims, **depthwise)
      self.shortcut = (nnx.Conv(in_features, out_features, (1,) * spatial_dims, 2,
                                padding="VALID", **conv) if resample == "down" else None)
    self.norm = layers.make_norm("instance", in_features, dtype=dtype, rngs=rngs)
    self.expand = nnx.Conv(in_features, expansion * in_features, (1,) * spatial_dims, **conv)
    self.compress = nnx.Conv(expansion * in_features, out_features, (1,) * spatial_dims, **conv)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.norm(self.depthwise(x))
    y = self.compress(jax.nn.gelu(self.expand(y), approximate=False))
    return y + (x if self.shortcut is None else self.shortcut(x))


class MedNeXt(nnx.Module):
  """MedNeXt (Roy et al., MICCAI 2023), default sizes MedNeXt-S with 3x3(x3) kernels.

  A 1x1 stem to `width` channels; 4 encoder stages at `width * 2**i` (i = 0..3), each followed
  by a down block (a MedNeXtBlock with stride 2, doubling the channels); a bottleneck stage at
  `16 * width`; 4 decoder stages, each preceded by an up block (stride-2 transposed, halving the
  channels) whose output is ADDED to the encoder stage's output (MedNeXt sums skips rather than
  concatenating); a 1x1 conv to the logits. `blocks[s]` and `expansion[s]` give stage s's block
  count and expansion ratio, s = 0..8 from the first encoder stage to the last decoder stage;
  the down block into stage s and the up block into stage s use `expansion[s]`. Deep supervision
  (an option in MedNeXt) is not built. `remat=True` recomputes each stage in the backward pass.
  """

  def __init__(self, in_channels: int, num_classes: int, *, spatial_dims: int,
               width: int = MEDNEXT_S_WIDTH, kernel_size: int = 3,
               blocks: Sequence[int] = MEDNEXT_S_BLOCKS,
               expansion: Sequence[int] = MEDNEXT_S_EXPANSION, remat: bool = False,
               dtype: Any = None, rngs: nnx.Rngs):
    _check_spatial_dims(spatial_dims, "MedNeXt")
    blocks, expansion = tuple(int(b) for b in blocks), tuple(int(r) for r in expansion)
    if len(blocks) != 9 or len(expansion) != 9:
      raise ValueError(f"MedNeXt: blocks and expansion need 9 entries (4 encoder stages, "
                       f"bottleneck, 4 decoder stages), got {blocks} and {expansion}")
    if min(blocks) < 1 or min(expansion) < 1:
      raise ValueError(f"MedNeXt: block counts and expansion ratios must be >= 1, got "
                       f"{blocks} and {expansion}")
    self.spatial_dims = spatial_dims
    self.in_channels = in_channels
    self.remat = remat
    block = dict(kernel_size=kernel_size, dtype=dtype, rngs=rngs)
    # Stage s works at level min(s, 8 - s) with width * 2**level channels.
    widths = [width * 2 ** min(s, 8 - s) for s in range(9)]
    self.stem = layers.conv(in_channels, width, spatial_dims, kernel_size=1, dtype=dtype,
                            rngs=rngs)
    self.stages = nnx.List([
        nnx.List([MedNeXtBlock(widths[s], widths[s], spatial_dims, expansion=expansion[s],
                               **block) for _ in range(blocks[s])])
        for s in range(9)])
    # resamplers[s - 1] leads into stage s: down blocks for s = 1..4, up blocks for s = 5..8.
    self.resamplers = nnx.List([
        MedNeXtBlock(widths[s - 1], widths[s], spatial_dims, expansion=expansion[s],
                     resample="down" if s <= 4 else "up", **block)
        for s in range(1, 9)])
    self.head = layers.conv(width, num_classes, spatial_dims, kernel_size=1, dtype=dtype,
                            rngs=rngs)

  def _stage(self, s: int, x: jax.Array) -> jax.Array:
    for blk in self.stages[s]:
      x = blk(x)
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    """`(b, *spatial, in_channels)` -> logits `(b, *spatial, num_classes)`."""
    layers.check_input(x, self.spatial_dims, self.in_channels, "MedNeXt input")
    layers.check_divisible(x.shape[1:-1], 16, "MedNeXt input")
    stage = nnx.remat(MedNeXt._stage, static_argnums=(1,)) if self.remat else MedNeXt._stage
    x = self.stem(x)
    skips = []
    for s in range(9):
      if s > 0:
        x = self.resamplers[s - 1](x)
      if s > 4:
        x = x + skips[8 - s]
      x = stage(self, s, x)
      if s < 4:
        skips.append(x)
    return self.head(x)
