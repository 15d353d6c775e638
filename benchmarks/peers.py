"""Our training and inference steps against MONAI / PyTorch networks of the same shape, same run.

    pip install -e ".[bench]"            # torch and MONAI: for this script only
    python benchmarks/peers.py           # every row below (about 5 minutes on 2 CPU cores)
    python benchmarks/peers.py --nets registration --shapes 256x256:4,64x64x64:1
    python benchmarks/peers.py --ours-only --shapes 256x256:4,192x192x160:1   # GPU/TPU machines

Rows (`--nets`), each at `--shapes` (spatial shape:batch) of its rank:
- registration: our `RegistrationNet` (VoxelMorph widths, dropout 0, 7 squarings) against
  MONAI's `VoxelMorph` with a `VoxelMorphUNet` of the same levels and widths (the parameter
  counts printed must agree); loss local NCC (window 9) of the moved image + 0.01 x the
  smoothness of the field; Adam 1e-4.
- image_generator: our pix2pix `ImageGenerator` (default widths 64-512, instance norm, 4x4
  strided-conv down, transposed-conv up, 3 + 1 inputs) against the same U-Net written in
  torch below (`TorchUNet`); loss L1 to a target image; Adam 2e-4.
- segmentation: our `SegUNet` (16-128, bottleneck 256, GroupNorm, ReLU) against MONAI's
  `BasicUNet` of the same widths, GroupNorm and ReLU; loss cross-entropy; Adam 1e-4.

Both sides run float32 on the same inputs, the two alternating step by step so that load on
the machine hits both alike; torch is held to as many threads as XLA uses (`--threads`,
default all cores). Columns: median seconds per training step (forward, backward, Adam) and per
inference (forward), after one warm-up; `MONAI / ours` > 1 means ours is faster. Our compile
time is printed apart. `--breakdown` adds, for registration, the U-Net (forward + backward) and
the integration of the velocity (scaling and squaring, forward + backward) on their own.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from acis_jax.eval.seg_nets import SegUNet
from acis_jax.models.generators import ImageGenerator
from acis_jax.models.registration import RegistrationNet
from acis_jax.spatial import integrate_velocity, warp
from acis_jax.train import losses
from acis_jax.train.networks import parameter_count

NETS = ("registration", "image_generator", "segmentation")
DEFAULT_SHAPES = {
    "registration": "256x256:4,64x64x64:1,96x96x80:1",
    "image_generator": "256x256:2,32x32x32:1",
    "segmentation": "64x64:4,256x256:4,64x64x64:1",  # 64x64:4, the few-shot experiments' steps
}
NUM_CLASSES = 4  # segmentation outputs, and the image generator's label channels
SMOOTHNESS = 0.01


def parse_shapes(text: str) -> list[tuple[tuple[int, ...], int]]:
  """"256x256:4,64x64x64:1" -> [((256, 256), 4), ((64, 64, 64), 1)]."""
  out = []
  for item in text.split(","):
    shape, _, batch = item.partition(":")
    out.append((tuple(int(n) for n in shape.split("x")), int(batch or 1)))
  return out


def inputs(net: str, shape: tuple[int, ...], batch: int) -> dict[str, np.ndarray]:
  """Channel-last float32 inputs, the same for both sides (torch gets them channel-first)."""
  rng = np.random.default_rng(0)
  smooth = lambda: np.cumsum(np.cumsum(rng.normal(size=(batch, *shape, 1)), 1), 2)
  norm = lambda x: ((x - x.min()) / (np.ptp(x) + 1e-6)).astype(np.float32)
  if net == "registration":
    return {"moving": norm(smooth()), "fixed": norm(smooth())}
  if net == "image_generator":
    labels = rng.integers(0, NUM_CLASSES, size=(batch, *shape))
    return {"mask": norm(smooth()), "labels": np.eye(NUM_CLASSES, dtype=np.float32)[labels],
            "target": norm(smooth())}
  return {"image": norm(smooth()),
          "labels": rng.integers(0, NUM_CLASSES, size=(batch, *shape)).astype(np.int32)}


# ------------------------------------------------------------------------------------- ours

def our_model(net: str, ndim: int):
  rngs = nnx.Rngs(0)
  if net == "registration":
    return RegistrationNet(ndim, rngs=rngs)
  if net == "image_generator":
    return ImageGenerator(NUM_CLASSES, ndim, dropout=0.0, rngs=rngs)
  return SegUNet(1, NUM_CLASSES, spatial_dims=ndim, rngs=rngs)


def our_loss(net: str, model, batch) -> jax.Array:
  if net == "registration":
    velocity, disp = model.fields(batch["moving"], batch["fixed"])
    moved = warp(batch["moving"], disp)
    return (losses.ncc_loss(batch["fixed"], moved)
            + SMOOTHNESS * losses.smoothness_loss(velocity))
  if net == "image_generator":
    return jnp.mean(jnp.abs(model(batch["mask"], batch["labels"]) - batch["target"]))
  logits = model(batch["image"])
  return losses.cross_entropy(logits, batch["labels"], NUM_CLASSES)


def our_forward(net: str, model, batch) -> jax.Array:
  if net == "registration":
    return model(batch["moving"], batch["fixed"])
  if net == "image_generator":
    return model(batch["mask"], batch["labels"])
  return model(batch["image"])


LEARNING_RATES = {"registration": 1e-4, "image_generator": 2e-4, "segmentation": 1e-4}


def our_steps(net: str, ndim: int, batch):
  """(train step thunk, inference thunk, parameter count, compile seconds)."""
  graphdef, params = nnx.split(our_model(net, ndim), nnx.Param)
  optimizer = optax.adam(LEARNING_RATES[net])

  @jax.jit
  def train(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: our_loss(net, nnx.merge(graphdef, p), batch))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  infer = jax.jit(lambda params, batch: our_forward(net, nnx.merge(graphdef, params), batch))
  state = {"params": params, "opt": optimizer.init(params)}
  start = time.perf_counter()
  train_compiled = train.lower(params, state["opt"], batch).compile()
  infer_compiled = infer.lower(params, batch).compile()
  compile_s = time.perf_counter() - start

  def train_thunk():
    state["params"], state["opt"], loss = train_compiled(state["params"], state["opt"], batch)
    jax.block_until_ready(loss)

  def infer_thunk():
    jax.block_until_ready(infer_compiled(state["params"], batch))

  return train_thunk, infer_thunk, parameter_count(params), compile_s


def our_breakdown(ndim: int, batch):
  """Registration parts alone: U-Net (+ final convs, flow head) and integration, fwd + bwd."""
  graphdef, params = nnx.split(our_model("registration", ndim), nnx.Param)
  velocity = jax.jit(lambda p, b: nnx.merge(graphdef, p).velocity(b["moving"], b["fixed"]))
  unet = jax.jit(jax.grad(lambda p, b: jnp.sum(velocity(p, b) ** 2)))
  v = 2.0 * jax.random.normal(jax.random.key(0), batch["moving"].shape[:-1] + (ndim,))
  integrate = jax.jit(jax.grad(lambda v: jnp.sum(integrate_velocity(v, 7) ** 2)))
  return {"unet fwd+bwd": lambda: jax.block_until_ready(unet(params, batch)),
          "integrate fwd+bwd": lambda: jax.block_until_ready(integrate(v))}


# ------------------------------------------------------------------------------------ torch

def torch_side(net: str, ndim: int, batch_np, threads: int):
  """(train step thunk, inference thunk, parameter count, breakdown thunks) with torch."""
  import torch
  from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
  from monai.networks.blocks import DVF2DDF
  from monai.networks.nets import BasicUNet, VoxelMorph, VoxelMorphUNet

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  t = {k: torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, -1, 1) if v.dtype == np.float32
                                                 else v)) for k, v in batch_np.items()}
  if net == "registration":
    # Pairs of (encoder, decoder) widths: the same 5 levels, 16-32-32-32-32, as ours.
    backbone = VoxelMorphUNet(spatial_dims=ndim, in_channels=2, unet_out_channels=16,
                              channels=(16, 32, 32, 32, 32, 32, 32, 32),
                              final_conv_channels=(16, 16))
    model = VoxelMorph(backbone=backbone, integration_steps=7, spatial_dims=ndim)
    ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=ndim, kernel_size=9)
    smooth = DiffusionLoss()

    def loss_fn():
      moved, ddf = model(t["moving"], t["fixed"])
      return ncc(moved, t["fixed"]) + SMOOTHNESS * smooth(ddf)

    forward = lambda: model(t["moving"], t["fixed"])
  elif net == "image_generator":
    model = TorchUNet(ndim, 1 + NUM_CLASSES)
    x = torch.cat([t["mask"], t["labels"]], 1)
    loss_fn = lambda: (model(x) - t["target"]).abs().mean()
    forward = lambda: model(x)
  else:
    model = BasicUNet(spatial_dims=ndim, in_channels=1, out_channels=NUM_CLASSES,
                      features=(16, 32, 64, 128, 256, 16), act="relu",
                      norm=("group", {"num_groups": 8}), upsample="deconv")
    labels = t["labels"].long()
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(t["image"]), labels)
    forward = lambda: model(t["image"])
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATES[net])

  def train_thunk():
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    optimizer.step()

  def infer_thunk():
    with torch.no_grad():
      forward()

  parts = {}
  if net == "registration":
    def unet_part():
      model.zero_grad(set_to_none=True)
      (model.backbone(torch.cat([t["moving"], t["fixed"]], 1)) ** 2).sum().backward()

    v = torch.from_numpy(2.0 * np.random.default_rng(0).normal(
        size=(batch_np["moving"].shape[0], ndim, *batch_np["moving"].shape[1:-1]))
        .astype(np.float32)).requires_grad_()
    integrate = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="zeros")

    def integrate_part():
      v.grad = None
      (integrate(v) ** 2).sum().backward()

    parts = {"unet fwd+bwd": unet_part, "integrate fwd+bwd": integrate_part}
  return train_thunk, infer_thunk, sum(p.numel() for p in model.parameters()), parts


def TorchUNet(ndim: int, in_channels: int, features=(64, 128, 256, 512)):
  """Our `ImageGenerator` (layers.UNet with its defaults) in torch, for the image_generator row."""
  import torch
  from torch import nn

  conv_cls = [None, nn.Conv1d, nn.Conv2d, nn.Conv3d][ndim]
  up_cls = [None, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][ndim]

  def block(a, b):
    return nn.Sequential(conv_cls(a, b, 3, padding=1), nn.GroupNorm(b, b, eps=1e-5),
                         nn.LeakyReLU(0.2))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      f = features
      self.encoder = nn.ModuleList([block(in_channels, f[0])] +
                                   [block(f[i - 1], f[i]) for i in range(1, len(f))])
      self.downs = nn.ModuleList([conv_cls(f[i], f[i], 4, stride=2, padding=1)
                                  for i in range(len(f) - 1)])
      self.ups = nn.ModuleList([up_cls(f[i + 1], f[i + 1], 2, stride=2)
                                for i in range(len(f) - 1)])
      self.decoder = nn.ModuleList([block(f[i + 1] + f[i], f[i]) for i in range(len(f) - 1)])
      self.head = conv_cls(f[0], 1, 1)

    def forward(self, x):
      skips = []
      for i, stage in enumerate(self.encoder):
        if i:
          x = self.downs[i - 1](x)
        x = stage(x)
        skips.append(x)
      for i in reversed(range(len(self.decoder))):
        x = self.decoder[i](torch.cat([self.ups[i](x), skips[i]], 1))
      return torch.sigmoid(self.head(x))

  return Net()


# ------------------------------------------------------------------------------------ table

def alternate(pairs: dict[str, tuple], runs: int) -> dict[str, tuple[float, float]]:
  """Median seconds of each (ours, theirs) thunk pair, the two alternating, after a warm-up."""
  times = {name: ([], []) for name in pairs}
  for run in range(runs + 1):
    for name, thunks in pairs.items():
      for side, thunk in enumerate(thunks):
        if thunk is None:
          continue
        start = time.perf_counter()
        thunk()
        if run:
          times[name][side].append(time.perf_counter() - start)
  return {name: tuple(float(np.median(t)) if t else float("nan") for t in sides)
          for name, sides in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nets", default=",".join(NETS))
  parser.add_argument("--shapes", help="spatial:batch list for every net, e.g. 256x256:4 "
                                       "(default: each net's own list in DEFAULT_SHAPES)")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--ours-only", action="store_true", help="no torch (GPU/TPU machines)")
  parser.add_argument("--breakdown", action="store_true")
  args = parser.parse_args()
  nets = args.nets.split(",")
  unknown = sorted(set(nets) - set(NETS))
  if unknown:
    raise ValueError(f"unknown nets {unknown}; known: {list(NETS)}")
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        + ("ours only" if args.ours_only else _torch_versions(args.threads))
        + f"; median of {args.runs} after a warm-up")
  header = (f"{'net':<16}{'shape':<14}{'batch':>5}{'params ours':>12}{'theirs':>9}"
            f"{'compile s':>10}{'what':>19}{'ours s':>9}{'theirs s':>10}{'MONAI/ours':>11}")
  print(header)
  print("-" * len(header))
  for net in nets:
    for shape, batch_size in parse_shapes(args.shapes or DEFAULT_SHAPES[net]):
      ndim = len(shape)
      batch_np = inputs(net, shape, batch_size)
      batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
      train, infer, n_ours, compile_s = our_steps(net, ndim, batch)
      pairs = {"train step": [train, None], "inference": [infer, None]}
      n_theirs = "-"
      if args.breakdown and net == "registration":
        for name, thunk in our_breakdown(ndim, batch).items():
          thunk()  # compile
          pairs[name] = [thunk, None]
      if not args.ours_only:
        t_train, t_infer, n_theirs, parts = torch_side(net, ndim, batch_np, args.threads)
        pairs["train step"][1], pairs["inference"][1] = t_train, t_infer
        for name, thunk in parts.items():
          if name in pairs:
            pairs[name][1] = thunk
      for i, (what, (ours, theirs)) in enumerate(alternate(pairs, args.runs).items()):
        lead = (f"{net:<16}{'x'.join(map(str, shape)):<14}{batch_size:>5}{n_ours:>12}"
                f"{n_theirs:>9}{compile_s:>10.1f}" if i == 0 else " " * 66)
        ratio = theirs / ours if np.isfinite(theirs) else float("nan")
        print(f"{lead}{what:>19}{ours:>9.3f}{theirs:>10.3f}{ratio:>11.2f}", flush=True)


def _torch_versions(threads: int) -> str:
  import monai
  import torch
  return f"torch {torch.__version__}, MONAI {monai.__version__}, {threads} threads"


if __name__ == "__main__":
  main()
