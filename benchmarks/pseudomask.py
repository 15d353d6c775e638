"""The pseudo-mask pipeline against scipy / scikit-image references, timed in the same run.

    python benchmarks/pseudomask.py              # sample chest CT (fetched once), 3-D and 2-D
    python benchmarks/pseudomask.py --phantom    # procedural phantom, no network
    python benchmarks/pseudomask.py --repeats 5 --only 3d

Input: the sample CT windowed to [0, 1] and resized to 192x192x160, and its middle axial
slice resized to 256x256; n = 4096 edge points, bandwidth 6 voxels, N = 1000, 8192, 20000
seeds (the 2-D rows use N <= 8192). Three pipelines, each stage timed on its own (median of
--repeats, after a warm-up call; ours jitted, with block_until_ready):

- ours: `acis_jax.pseudomask` stage by stage, and the whole `pseudo_mask` in one jitted call
  (the number that counts; its compile time is printed separately);
- tuned: slice-wise `skimage.feature.canny`, points binned with numpy and blurred by
  `scipy.ndimage.gaussian_filter`, numpy Gumbel top-k, `distance_transform_edt` with indices;
- textbook: slice-wise `skimage.feature.canny`, `scipy.stats.gaussian_kde` on the grid,
  `numpy.random.Generator.choice(p=..., replace=False)`, `cKDTree.query` of every voxel. In
  3-D, gaussian_kde is timed on a random 1 % of the voxels and extrapolated (printed as such).

Ratios are reference time / our whole-pipeline time (> 1: ours is faster). Targets on a
2-core CPU, 3-D: >= 40x the textbook pipeline and no slower than 1.5x the tuned one
(tuned / ours >= 0.67), at every N.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, stats
from scipy.spatial import cKDTree
from skimage.feature import canny as skimage_canny

from acis_jax.data import (Volume, axial_axis, chest_phantom, load_nifti, resize_image,
                           sample_chest_ct, window_hu)
from acis_jax.pseudomask import (PseudoMaskParams, canny, kde, pseudo_mask, sample_edge_points,
                                 sample_seeds, voronoi)
import timing  # benchmarks/timing.py, beside this script

NUM_POINTS = 4096
BANDWIDTH = 6.0
SHAPES = {"3d": (192, 192, 160), "2d": (256, 256)}
NUM_SEEDS = {"3d": (1000, 8192, 20000), "2d": (1000, 8192)}
KDE_SUBSET = 0.01


def load_images(phantom: bool) -> dict[str, np.ndarray]:
  if phantom:
    volume = Volume(window_hu(chest_phantom(SHAPES["3d"], seed=0)[0]), np.eye(4))
  else:
    ct = load_nifti(sample_chest_ct().image_path)
    volume = resize_image(Volume(window_hu(ct.array), ct.affine), SHAPES["3d"])
  axis = axial_axis(volume.affine)
  middle = np.take(volume.array, volume.array.shape[axis] // 2, axis=axis)
  slice_2d = resize_image(Volume(middle, np.eye(4)), SHAPES["2d"]).array
  return {"3d": volume.array.astype(np.float32), "2d": slice_2d.astype(np.float32)}


def median_time(fn, repeats: int) -> float:
  """Every timing here follows one untimed call (compilation)."""
  return timing.median_time(fn, repeats, warmup=True)


def skimage_edges(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2:
    return skimage_canny(image, sigma=1.0, low_threshold=0.1, high_threshold=0.2)
  return np.stack([skimage_canny(s, sigma=1.0, low_threshold=0.1, high_threshold=0.2)
                   for s in image])


def numpy_edge_points(rng, edges: np.ndarray) -> np.ndarray:
  where = np.argwhere(edges)
  return where[rng.choice(len(where), size=min(NUM_POINTS, len(where)), replace=False)]


def tuned_density(points: np.ndarray, shape) -> np.ndarray:
  binned = np.zeros(shape, np.float32)
  np.add.at(binned, tuple(points.T), 1.0)
  return ndimage.gaussian_filter(binned, BANDWIDTH, mode="constant")


def numpy_gumbel_top_k(rng, density: np.ndarray, k: int) -> np.ndarray:
  with np.errstate(divide="ignore"):
    scores = np.log(density.ravel()) + rng.gumbel(size=density.size)
  return np.stack(np.unravel_index(np.argpartition(-scores, k)[:k], density.shape), -1)


def edt_cells(seeds: np.ndarray, shape) -> np.ndarray:
  seed_index = np.full(shape, -1, np.int32)
  seed_index[tuple(seeds.T)] = np.arange(len(seeds))
  _, nearest = ndimage.distance_transform_edt(seed_index < 0, return_indices=True)
  return seed_index[tuple(nearest)]


def textbook_density_time(points: np.ndarray, shape, rng, repeats: int) -> tuple[float, str]:
  """gaussian_kde evaluated on the grid (or a subset); its cost does not depend on h."""
  data = points.T.astype(np.float64)
  estimator = stats.gaussian_kde(data, bw_method=BANDWIDTH / np.sqrt(np.cov(data).diagonal().mean()))
  size = int(np.prod(shape))
  count = size if len(shape) == 2 else int(size * KDE_SUBSET)
  query = np.stack(np.unravel_index(rng.choice(size, count, replace=False), shape))
  seconds = median_time(lambda: estimator(query), max(1, repeats // 2)) * size / count
  return seconds, "" if count == size else f" (timed on {KDE_SUBSET:.0%} of voxels)"


def run(name: str, image: np.ndarray, repeats: int) -> None:
  shape = image.shape
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  x = jnp.asarray(image)
  print(f"\n=== {name}: {'x'.join(map(str, shape))}, n = {NUM_POINTS}, h = {BANDWIDTH} ===")

  # Shared stages (independent of N).
  canny_jit = jax.jit(lambda x: canny(x, 1.0, 0.1, 0.2))
  edges = canny_jit(x)

  @jax.jit
  def density_jit(edges, key):
    points, weights = sample_edge_points(key, edges, NUM_POINTS)
    return kde(points, shape, BANDWIDTH, method="matmul", weights=weights)

  density = density_jit(edges, key)
  edges_np = skimage_edges(image)
  points_np = numpy_edge_points(rng, edges_np)
  shared = {
      "canny": (median_time(lambda: canny_jit(x), repeats),
                median_time(lambda: skimage_edges(image), repeats)),
      "edge points + density": (median_time(lambda: density_jit(edges, key), repeats),
                                median_time(lambda: tuned_density(
                                    numpy_edge_points(rng, edges_np), shape), repeats)),
  }
  kde_textbook, kde_note = textbook_density_time(points_np, shape, rng, repeats)
  density_np = np.asarray(density)
  print(f"  {'stage':28s} {'ours':>9s} {'tuned':>9s} {'textbook':>9s}")
  for stage, (ours, tuned) in shared.items():
    textbook = tuned if stage == "canny" else kde_textbook
    note = kde_note if stage != "canny" else ""
    print(f"  {stage:28s} {ours:8.3f}s {tuned:8.3f}s {textbook:8.3f}s{note}")

  for num_seeds in NUM_SEEDS[name]:
    params = PseudoMaskParams(num_edge_points=NUM_POINTS, bandwidth=BANDWIDTH,
                              num_seeds=num_seeds)
    start = time.perf_counter()
    jax.block_until_ready(pseudo_mask(key, x, params))
    first_call = time.perf_counter() - start
    whole = median_time(lambda: pseudo_mask(key, x, params), repeats)
    compile_seconds = first_call - whole
    seeds_jit = jax.jit(lambda d, k: sample_seeds(k, d, num_seeds))
    seeds = seeds_jit(density, key)
    voronoi_jit = jax.jit(lambda s: voronoi(s, shape))
    seeds_np = numpy_gumbel_top_k(rng, density_np, num_seeds)
    p = density_np.ravel() / density_np.sum()
    stages = {
        "seeds": (median_time(lambda: seeds_jit(density, key), repeats),
                  median_time(lambda: numpy_gumbel_top_k(rng, density_np, num_seeds), repeats),
                  median_time(lambda: rng.choice(p.size, num_seeds, replace=False, p=p),
                              max(1, repeats // 2))),
        "voronoi": (median_time(lambda: voronoi_jit(seeds), repeats),
                    median_time(lambda: edt_cells(seeds_np, shape), repeats),
                    median_time(lambda: cKDTree(seeds_np).query(
                        np.stack(np.indices(shape), -1).reshape(-1, len(shape))), 1)),
    }
    tuned_total = sum(t for _, t in shared.values()) + sum(s[1] for s in stages.values())
    textbook_total = (shared["canny"][1] + kde_textbook + sum(s[2] for s in stages.values()))
    print(f"\n  N = {num_seeds}")
    for stage, (ours, tuned, textbook) in stages.items():
      print(f"  {stage:28s} {ours:8.3f}s {tuned:8.3f}s {textbook:8.3f}s")
    print(f"  {'whole pipeline':28s} {whole:8.3f}s {tuned_total:8.3f}s {textbook_total:8.3f}s"
          f"   (ours compiles in {compile_seconds:.1f} s)")
    print(f"  speed-up: textbook / ours = {textbook_total / whole:6.1f}x (target >= 40),"
          f"  tuned / ours = {tuned_total / whole:5.2f} (target >= 0.67)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--phantom", action="store_true", help="use the phantom, not the CT")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--only", choices=sorted(SHAPES), help="run one rank only")
  args = parser.parse_args()
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}")
  images = load_images(args.phantom)
  for name in ([args.only] if args.only else ["3d", "2d"]):
    run(name, images[name], args.repeats)


if __name__ == "__main__":
  main()
