"""Nearest-seed labelling: JAX methods against scipy, timed in the same run.

  python benchmarks/voronoi.py                       # 192x192x160 and 256x256, separable
  python benchmarks/voronoi.py --methods separable,jfa --grids 3d --seeds 8192

References, each run in this process on the same seeds:
- "edt" (tuned): `scipy.ndimage.distance_transform_edt(seedmask == 0,
  return_indices=True)`, then the seed id looked up at the returned voxel.
- "kdtree" (textbook): `scipy.spatial.cKDTree(seeds).query(all voxels)`.
Two seed layouts: "uniform" (distinct voxels, uniform) and "body" (inside an
ellipsoid, denser near its surface, like seeds drawn from a CT edge density:
the corners are 80+ voxels from any seed, the hard case for the windowed
passes). Times are medians of --repeats runs after compilation (block_until_ready);
compilation is reported apart. The machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from acis_jax.pseudomask.voronoi import voronoi
from timing import median_time  # benchmarks/timing.py, beside this script

GRIDS = {"3d": ((192, 192, 160), (1000, 8192, 20000)), "2d": ((256, 256), (500, 2048, 8192))}


def make_seeds(shape, n, layout, rng):
  if layout == "uniform":
    weights = None
  else:
    centre = (np.asarray(shape) - 1) / 2
    voxels = np.indices(shape).reshape(len(shape), -1).T
    radius = np.sqrt((((voxels - centre) / (0.45 * np.asarray(shape))) ** 2).sum(axis=1))
    weights = np.where(radius < 1, 0.2 + np.exp(-(((radius - 0.9) / 0.05) ** 2)), 0.0)
    weights /= weights.sum()
  flat = rng.choice(int(np.prod(shape)), n, replace=False, p=weights)
  return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="separable", help="comma list of JAX methods")
  parser.add_argument("--grids", default="3d,2d")
  parser.add_argument("--layouts", default="uniform,body")
  parser.add_argument("--seeds", default="", help="comma list of N (default per grid)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-kdtree", action="store_true", help="skip the slow textbook reference")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f"backend {jax.default_backend()}, devices {jax.devices()}")
  print(f"{'grid':>12} {'layout':>8} {'N':>6} {'method':>10} {'compile s':>9} {'run s':>7} "
        f"{'edt s':>6} {'kdtree s':>8} {'/edt':>6} {'/kdtree':>7} {'exact %':>8}")
  for grid in args.grids.split(","):
    shape, counts = GRIDS[grid]
    if args.seeds:
      counts = [int(n) for n in args.seeds.split(",")]
    voxels = np.indices(shape).reshape(len(shape), -1).T
    for layout in args.layouts.split(","):
      for n in counts:
        seeds = make_seeds(shape, n, layout, rng)
        empty = np.ones(shape, bool)
        empty[tuple(seeds.T)] = False
        ids = np.full(shape, -1, np.int32)
        ids[tuple(seeds.T)] = np.arange(n, dtype=np.int32)

        def edt():
          distance, where = ndimage.distance_transform_edt(empty, return_indices=True)
          return ids[tuple(where)], distance

        def kdtree():
          return cKDTree(seeds).query(voxels)[1]

        labels_ref, distance = edt()
        t_edt = median_time(lambda: edt()[0], args.repeats)
        t_kd = float("nan") if args.no_kdtree else median_time(kdtree, args.repeats)
        for method in args.methods.split(","):
          fn = jax.jit(functools.partial(voronoi, shape=shape, method=method))
          start = time.perf_counter()
          compiled = fn.lower(seeds).compile()
          t_compile = time.perf_counter() - start
          labels = np.asarray(compiled(seeds))
          t_run = median_time(lambda: compiled(seeds), args.repeats)
          found = ((voxels - seeds[labels.reshape(-1)]) ** 2).sum(axis=1)
          exact = 100 * np.mean(found == np.rint(distance.reshape(-1) ** 2))
          print(f"{'x'.join(map(str, shape)):>12} {layout:>8} {n:>6} {method:>10} "
                f"{t_compile:>9.2f} {t_run:>7.3f} {t_edt:>6.3f} {t_kd:>8.3f} "
                f"{t_run / t_edt:>6.2f} {t_run / t_kd:>7.2f} {exact:>8.4f}", flush=True)


if __name__ == "__main__":
  main()
