"""Times scaling-and-squaring integration + image warp against scipy.ndimage in the same run.

    python benchmarks/spatial.py                 # 3-D 192x192x160 and 2-D 256x256
    python benchmarks/spatial.py --sizes 256x256 --runs 10

For each size it times `warp(image, integrate_velocity(v, steps))` (3-channel velocity in 3-D,
2-channel in 2-D, 1-channel image), jitted, median of `--runs` runs after compilation:
- forward, and forward+backward (gradient of an MSE w.r.t. both velocity and image);
- with `downsize=2` (VoxelMorph's int_downsize), forward and forward+backward;
- the same pipeline sampling with `jax.scipy.ndimage.map_coordinates` per channel, the
  alternative our gather-based `sample` was chosen over;
- the reference: `scipy.ndimage.map_coordinates(order=1, mode="nearest")` doing the same warps
  (the `steps` squaring warps of every field component, then the image warp), forward only.
Ratios are scipy's forward time / this row's time (> 1: faster than scipy's forward). Compile
time (lower + compile) is printed apart.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from acis_jax.spatial import identity_grid, integrate_velocity, warp


def _smooth_field(shape, amplitude, seed):
  """Smooth random velocity, `(*shape, ndim)`, max |component| = amplitude voxels."""
  ndim = len(shape)
  coarse = np.random.default_rng(seed).normal(size=(*[max(n // 16, 2) for n in shape], ndim))
  zoom = [n / c for n, c in zip(shape, coarse.shape[:-1])]
  field = np.stack([ndimage.zoom(coarse[..., i], zoom, order=3) for i in range(ndim)], -1)
  return (field / np.abs(field).max() * amplitude).astype(np.float32)


def _map_coordinates_warp(image, disp):
  """Warp with jax.scipy.ndimage.map_coordinates, one call per channel."""
  coords = identity_grid(disp.shape[:-1]) + disp
  axes = [coords[..., a] for a in range(disp.shape[-1])]
  return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], axes, order=1,
                                                      mode="nearest")
                    for c in range(image.shape[-1])], -1)


def _integrate_with(warp_fn, velocity, steps):
  """integrate_velocity's loop (checkpointed squaring) around another warp."""
  square = jax.checkpoint(lambda d: d + warp_fn(d, d))
  return jax.lax.fori_loop(0, steps, lambda _, d: square(d), velocity / 2.0**steps)


def _scipy_pipeline(image, velocity, steps):
  """The same warps with scipy.ndimage.map_coordinates (float64 arithmetic inside)."""
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in image.shape[:-1]],
                              indexing="ij"), 0)
  disp = velocity / 2.0**steps
  for _ in range(steps):
    coords = grid + np.moveaxis(disp, -1, 0)
    disp = disp + np.stack([ndimage.map_coordinates(disp[..., i], coords, order=1, mode="nearest")
                            for i in range(disp.shape[-1])], -1)
  coords = grid + np.moveaxis(disp, -1, 0)
  return ndimage.map_coordinates(image[..., 0], coords, order=1, mode="nearest")[..., None]


def _time(fn, args, runs):
  """(compile seconds, median seconds of `runs` runs of the compiled function)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up: first-run allocations
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times))


def bench(shape, steps, runs):
  velocity = _smooth_field(shape, 6.0, 0)
  image = _smooth_field(shape, 1.0, 1)[..., :1]
  target = _smooth_field(shape, 1.0, 2)[..., :1]

  def pipeline(warp_fn, downsize):
    if warp_fn is warp:
      return lambda v, img: warp(img, integrate_velocity(v, steps, downsize))
    return lambda v, img: warp_fn(img, _integrate_with(warp_fn, v, steps))

  def with_grad(fn):
    return jax.value_and_grad(lambda v, img: jnp.mean((fn(v, img) - target) ** 2), argnums=(0, 1))

  reference = _scipy_pipeline(image, velocity, steps)
  scipy_times = []
  for _ in range(runs):
    start = time.perf_counter()
    _scipy_pipeline(image, velocity, steps)
    scipy_times.append(time.perf_counter() - start)
  scipy_s = float(np.median(scipy_times))

  rows = [
      ("ours, forward", jax.jit(pipeline(warp, 1))),
      ("ours, forward+backward", jax.jit(with_grad(pipeline(warp, 1)))),
      ("ours downsize=2, forward", jax.jit(pipeline(warp, 2))),
      ("ours downsize=2, forward+backward", jax.jit(with_grad(pipeline(warp, 2)))),
      ("jax map_coordinates, forward", jax.jit(pipeline(_map_coordinates_warp, 1))),
      ("jax map_coordinates, forward+backward",
       jax.jit(with_grad(pipeline(_map_coordinates_warp, 1)))),
  ]
  name = "x".join(map(str, shape))
  print(f"\n{name}, {steps} steps, {runs} runs, {jax.devices()[0].platform}")
  print(f"{'':40s} {'compile s':>10s} {'median s':>9s} {'scipy fwd / this':>17s}")
  print(f"{'scipy map_coordinates, forward':40s} {'-':>10s} {scipy_s:9.4f} {1.0:17.2f}")
  for label, fn in rows:
    compile_s, median = _time(fn, (velocity, image), runs)
    print(f"{label:40s} {compile_s:10.2f} {median:9.4f} {scipy_s / median:17.2f}",
          flush=True)
  err = float(np.abs(np.asarray(rows[0][1](velocity, image)) - reference).max())
  print(f"max |ours - scipy| on the warped image: {err:.1e}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="192x192x160,256x256")
  parser.add_argument("--steps", type=int, default=7)
  parser.add_argument("--runs", type=int, default=None,
                      help="timed runs per row (default 3 in 3-D, 20 in 2-D)")
  args = parser.parse_args()
  for size in args.sizes.split(","):
    shape = tuple(int(n) for n in size.split("x"))
    bench(shape, args.steps, args.runs or (3 if len(shape) == 3 else 20))


if __name__ == "__main__":
  main()
