"""Canny, KDE and seed sampling at 192x192x160 against scipy/skimage, timed in the same run.

    python benchmarks/pseudomask_stages.py             # the sample chest CT (cached after one fetch)
    python benchmarks/pseudomask_stages.py --phantom   # the procedural phantom, no network
    python benchmarks/pseudomask_stages.py --repeats 7

Stages (ours jitted, timed after compilation with block_until_ready), each next to its reference:
- canny: 3-D `canny` and `canny_slicewise` (sigma 1, thresholds 0.1 / 0.2) against
  `skimage.feature.canny` slice by slice along axis 0 (the tuned reference).
- kde: n = 4096 points drawn from the 3-D edges, h = 6 voxels, methods "fft" and "matmul",
  against the points binned with numpy and blurred by `scipy.ndimage.gaussian_filter(sigma=h,
  mode="constant")` (its kernel cut at 4 h, so less accurate than ours).
- seeds: N = 1000, 8192, 20000 from the density, against numpy's Gumbel top-k
  (`rng.gumbel` + `np.argpartition`, tuned) and `rng.choice(replace=False, p=...)` (textbook).
Runs alternate between ours and the references; medians of --repeats. Columns: wall time,
process CPU time (all threads; steadier than wall time on a loaded machine), and the ratio
ours / reference for both (< 1: ours is faster).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage
from skimage.feature import canny as skimage_canny

from acis_jax.data import (
    Volume, chest_phantom, load_nifti, resize_image, sample_chest_ct, window_hu)
from acis_jax.pseudomask import canny, canny_slicewise, kde, sample_edge_points, sample_seeds

SHAPE = (192, 192, 160)
NUM_POINTS = 4096
BANDWIDTH = 6.0
NUM_SEEDS = (1000, 8192, 20000)


def _volume(phantom: bool) -> np.ndarray:
  if phantom:
    hu, _ = chest_phantom(SHAPE, seed=0)
    return window_hu(hu)
  ct = load_nifti(sample_chest_ct().image_path)
  return resize_image(Volume(window_hu(ct.array), ct.affine), SHAPE).array


def _time(fn, repeats: int) -> tuple[float, float]:
  """Median (wall, cpu) seconds of `repeats` calls of fn after one warm-up call."""
  jax.block_until_ready(fn())
  wall, cpu = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return float(np.median(wall)), float(np.median(cpu))


def _compare(title: str, ours: dict, references: dict, repeats: int) -> None:
  """Times every function, alternating rounds, and prints ours against each reference."""
  fns = {**references, **ours}
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(_time(fn, 1))
  median = {name: np.median(np.array(t), axis=0) for name, t in times.items()}
  print(f"\n{title}")
  for name in fns:
    wall, cpu = median[name]
    line = f"  {name:34s} wall {wall * 1e3:8.1f} ms   cpu {cpu * 1e3:8.1f} ms"
    if name in ours:
      line += "".join(f"   /{ref}: wall {wall / median[ref][0]:.2f} cpu {cpu / median[ref][1]:.2f}"
                      for ref in references)
    print(line)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--phantom", action="store_true", help="use the phantom, not the CT")
  args = parser.parse_args()

  image_np = _volume(args.phantom)
  image = jnp.asarray(image_np)
  print(f"{'phantom' if args.phantom else 'chest CT'} {image.shape}, devices {jax.devices()}")

  _compare("canny (sigma 1, thresholds 0.1 / 0.2)",
           {"canny 3-D": lambda: canny(image), "canny_slicewise": lambda: canny_slicewise(image)},
           {"skimage slice-wise": lambda: np.stack([skimage_canny(s) for s in image_np])},
           args.repeats)

  edges = canny(image)
  print(f"  edge voxels: 3-D {int(edges.sum())}, skimage slice-wise "
        f"{int(sum(skimage_canny(s).sum() for s in image_np))}")
  points, weights = sample_edge_points(jax.random.key(0), edges, NUM_POINTS)
  points_np = np.asarray(points)[np.asarray(weights) > 0]

  def scipy_kde():
    grid = np.zeros(SHAPE, np.float32)
    np.add.at(grid, tuple(points_np.T), 1.0 / len(points_np))
    return ndimage.gaussian_filter(grid, BANDWIDTH, mode="constant")

  _compare(f"kde (n = {NUM_POINTS}, h = {BANDWIDTH:g})",
           {f"kde {m}": (lambda m=m: kde(points, SHAPE, BANDWIDTH, method=m, weights=weights))
            for m in ("fft", "matmul")},
           {"binned + gaussian_filter": scipy_kde}, args.repeats)

  density = kde(points, SHAPE, BANDWIDTH, method="matmul", weights=weights)
  density_np = np.asarray(density, np.float64).reshape(-1)
  rng = np.random.default_rng(0)
  for num_seeds in NUM_SEEDS:
    _compare(f"sample_seeds (N = {num_seeds})",
             {"sample_seeds": lambda n=num_seeds: sample_seeds(jax.random.key(1), density, n)},
             {"numpy gumbel top-k": lambda n=num_seeds: np.argpartition(
                 np.log(density_np) + rng.gumbel(size=density_np.size), -n)[-n:],
              "numpy choice": lambda n=num_seeds: rng.choice(
                  density_np.size, n, replace=False, p=density_np / density_np.sum())},
             args.repeats)


if __name__ == "__main__":
  main()
