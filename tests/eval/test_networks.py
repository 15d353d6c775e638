"""Downstream networks: shapes in 2-D and 3-D, the U-Net's depth, MedNeXt's residual blocks,
RED-CNN's shortcuts and ESRT's feature-split attention."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from acis_jax.eval import recon_nets, seg_nets


def _output_shape(model: nnx.Module, shape: tuple[int, ...], dtype=jnp.float32):
  """The model's output shape and dtype on an input of `shape`, traced without running it."""
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct(shape, dtype))
  return out.shape, out.dtype


def _tiny_nets(spatial_dims: int) -> dict:
  """Makers `rngs -> module` of every network at tiny widths, 2 input channels."""
  return {
      "unet": lambda rngs: seg_nets.SegUNet(2, 3, spatial_dims=spatial_dims,
                                            features=(2, 4, 4, 4), rngs=rngs),
      "mednext": lambda rngs: seg_nets.MedNeXt(2, 3, spatial_dims=spatial_dims, width=2,
                                               blocks=(1,) * 9, rngs=rngs),
      "resnet": lambda rngs: recon_nets.ResNet(2, spatial_dims=spatial_dims, features=4,
                                               num_blocks=2, rngs=rngs),
      "redcnn": lambda rngs: recon_nets.REDCNN(2, spatial_dims=spatial_dims, features=4,
                                               rngs=rngs),
      "esrt": lambda rngs: recon_nets.ESRT(2, spatial_dims=spatial_dims, features=8, num_hpb=1,
                                           heads=2, split_size=64, rngs=rngs),
  }


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_output_shapes(spatial_dims):
  shape = (2,) + (32,) * spatial_dims + (2,)
  for name, make in _tiny_nets(spatial_dims).items():
    net = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    out_channels = 3 if name in ("unet", "mednext") else 2
    assert _output_shape(net, shape) == (shape[:-1] + (out_channels,), jnp.float32), name


def test_nets_run_and_are_finite(numpy_initialised):
  """A real forward pass of the nets no other test runs whole (the rest train in
  test_downstream or run in the tests below)."""
  x = np.random.default_rng(0).uniform(size=(1, 32, 32, 2)).astype(np.float32)
  for name in ("mednext", "esrt"):
    make = _tiny_nets(2)[name]
    out = nnx.jit(lambda m, v: m(v))(numpy_initialised(make), x)
    assert np.all(np.isfinite(np.asarray(out))), name


def test_unet_has_four_levels_and_a_bottleneck():
  net = nnx.eval_shape(lambda: seg_nets.SegUNet(1, 2, spatial_dims=2, features=(2, 3, 4, 5),
                                                 rngs=nnx.Rngs(0)))
  assert len(net.trunk.downs) == 4 and len(net.trunk.decoder) == 4
  # Encoder widths as given, bottleneck twice the last (the last conv's kernel is (3, 3, in, out)).
  widths = [stage.blocks[-1].conv.kernel.shape[-1] for stage in net.trunk.encoder]
  assert widths == [2, 3, 4, 5, 10]
  # Four halvings: 16 (and 32) fit, 24 (a multiple of 8 only) does not.
  assert _output_shape(net, (1, 16, 32, 1))[0] == (1, 16, 32, 2)
  with pytest.raises(ValueError, match="multiple of 16"):
    _output_shape(net, (1, 24, 24, 1))


def test_bfloat16_compute():
  net = nnx.eval_shape(lambda: seg_nets.SegUNet(1, 2, spatial_dims=3, features=(2, 2, 2, 2),
                                                 dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  assert _output_shape(net, (1, 16, 16, 16, 1)) == ((1, 16, 16, 16, 2), jnp.bfloat16)


def test_mednext_small_defaults():
  """MedNeXt-S: width 32, 2 blocks in every stage, expansion 2 everywhere, 3-wide kernels,
  and the parameter counts the paper reports."""
  net = nnx.eval_shape(lambda: seg_nets.MedNeXt(1, 4, spatial_dims=3, rngs=nnx.Rngs(0)))
  assert [len(stage) for stage in net.stages] == [2] * 9
  widths = [32, 64, 128, 256, 512, 256, 128, 64, 32]
  for stage, width in zip(net.stages, widths):
    for block in stage:
      assert block.depthwise.kernel.shape == (3, 3, 3, 1, width)  # depthwise: 1 input / group
      assert block.expand.kernel.shape == (1, 1, 1, width, 2 * width)
  # Roy et al. 2023, Table 1 (3x3x3 kernels): MedNeXt-S 5.6 M parameters, MedNeXt-B 10.5 M.
  base = nnx.eval_shape(lambda: seg_nets.MedNeXt(1, 4, spatial_dims=3, rngs=nnx.Rngs(0),
                                                 expansion=(2, 3, 4, 4, 4, 4, 4, 3, 2)))
  for model, millions in ((net, 5.6), (base, 10.5)):
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count / 1e6 - millions) < 0.05
  with pytest.raises(ValueError, match="multiple of 16"):
    _output_shape(nnx.eval_shape(lambda: seg_nets.MedNeXt(1, 2, spatial_dims=2, width=2,
                                                          blocks=(1,) * 9, rngs=nnx.Rngs(0))),
                  (1, 24, 24, 1))


def _zero(conv: nnx.Conv) -> None:
  conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
  conv.bias[...] = jnp.zeros_like(conv.bias[...])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mednext_blocks_are_residual(spatial_dims, numpy_initialised):
  x = np.random.default_rng(0).standard_normal((2,) + (4,) * spatial_dims + (3,))
  x = x.astype(np.float32)
  same = numpy_initialised(lambda r: seg_nets.MedNeXtBlock(3, 3, spatial_dims, expansion=2,
                                                           rngs=r))
  assert not np.allclose(same(x), x)
  _zero(same.compress)  # a zero residual branch leaves exactly the identity
  np.testing.assert_array_equal(same(x), x)

  # Down: with the branch zeroed, the output is the 1x1 stride-2 conv of the input.
  down = numpy_initialised(lambda r: seg_nets.MedNeXtBlock(3, 5, spatial_dims, expansion=2,
                                                           resample="down", rngs=r))
  _zero(down.compress)
  w = np.asarray(down.shortcut.kernel[...]).reshape(3, 5)
  b = np.asarray(down.shortcut.bias[...])
  every_other = np.asarray(x)[(slice(None),) + (slice(None, None, 2),) * spatial_dims]
  np.testing.assert_allclose(down(x), every_other @ w + b, rtol=1e-5, atol=1e-5)

  # Up: sizes double; input voxel i lands on 2i + 1 through the 1x1 transposed conv, the
  # other voxels get the bias only.
  up = numpy_initialised(lambda r: seg_nets.MedNeXtBlock(3, 5, spatial_dims, expansion=2,
                                                         resample="up", rngs=r))
  _zero(up.compress)
  w = np.asarray(up.shortcut.kernel[...]).reshape(3, 5)
  b = np.asarray(up.shortcut.bias[...])
  expected = np.broadcast_to(b, (2,) + (8,) * spatial_dims + (5,)).copy()
  expected[(slice(None),) + (slice(1, None, 2),) * spatial_dims] += np.asarray(x) @ w
  np.testing.assert_allclose(up(x), expected, rtol=1e-5, atol=1e-5)


def test_resnet_is_edsr_style(numpy_initialised):
  net = numpy_initialised(lambda r: recon_nets.ResNet(1, spatial_dims=2, features=4,
                                                      num_blocks=3, res_scale=0.1, rngs=r))
  # No normalisation layer anywhere (EDSR drops BatchNorm).
  kinds = {type(node) for _, node in nnx.iter_graph(net)}
  assert not kinds & {nnx.BatchNorm, nnx.GroupNorm, nnx.LayerNorm}
  block = net.blocks[0]
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
  body = block.conv2(jax.nn.relu(block.conv1(x)))
  np.testing.assert_allclose(block(x), x + 0.1 * body, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "esrt"])
def test_resnet_and_esrt_start_as_the_identity(name, numpy_initialised):
  """Global residual: a fresh net returns its input; with its last convs zeroed, any net does."""
  x = np.random.default_rng(0).standard_normal((1, 16, 16, 2)).astype(np.float32)
  fresh = _tiny_nets(2)[name](nnx.Rngs(0))
  np.testing.assert_array_equal(fresh(x), x)
  net = numpy_initialised(_tiny_nets(2)[name])  # every kernel random, the tail's too
  assert not np.allclose(net(x), x)
  _zero(net.tail)
  if name == "esrt":
    _zero(net.skip)
  np.testing.assert_array_equal(net(x), x)


def test_redcnn_shortcuts_pass_the_input(numpy_initialised):
  """With every layer zeroed, only the input shortcut is left: output = ReLU(input)."""
  net = numpy_initialised(lambda r: recon_nets.REDCNN(1, spatial_dims=2, features=4, rngs=r))
  for layer in list(net.encoder) + list(net.decoder):
    _zero(layer)
  x = np.random.default_rng(0).standard_normal((1, 24, 24, 1)).astype(np.float32)
  np.testing.assert_array_equal(net(x), jax.nn.relu(x))
  with pytest.raises(ValueError, match="must exceed 20"):
    net(jnp.zeros((1, 20, 32, 1)))


def test_esrt_attention_stays_within_its_split(numpy_initialised):
  """Feature split: a token attends only to its own segment of `split_size` tokens."""
  block = numpy_initialised(
      lambda r: recon_nets.EfficientTransformer(8, heads=2, split_size=64, rngs=r))
  x = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)  # 128 tokens
  changed = x.copy()
  changed[:, 8:] += 1.0  # rows 8.. are the second segment (row-major order)
  before, after = np.asarray(block(x)), np.asarray(block(changed))
  np.testing.assert_allclose(after[:, :8], before[:, :8], rtol=1e-6, atol=1e-6)
  assert not np.allclose(after[:, 8:], before[:, 8:])
  one_segment = numpy_initialised(
      lambda r: recon_nets.EfficientTransformer(8, heads=2, split_size=128, rngs=r))
  assert not np.allclose(one_segment(changed)[:, :8], one_segment(x)[:, :8])


@pytest.mark.parametrize("make,message", [
    (lambda: seg_nets.SegUNet(1, 2, spatial_dims=4, rngs=nnx.Rngs(0)), "spatial_dims"),
    (lambda: seg_nets.MedNeXt(1, 2, spatial_dims=1, rngs=nnx.Rngs(0)), "spatial_dims"),
    (lambda: seg_nets.MedNeXt(1, 2, spatial_dims=2, blocks=(2,) * 5, rngs=nnx.Rngs(0)),
     "9 entries"),
    (lambda: seg_nets.MedNeXtBlock(4, 8, 2, expansion=2, rngs=nnx.Rngs(0)), "in == out"),
    (lambda: recon_nets.ResNet(1, spatial_dims=2, num_blocks=0, rngs=nnx.Rngs(0)), "num_blocks"),
    (lambda: recon_nets.ESRT(1, spatial_dims=2, features=8, heads=3, rngs=nnx.Rngs(0)), "heads"),
])
def test_bad_configurations_raise(make, message):
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(make)
