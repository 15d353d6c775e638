"""Pseudo-masks (paper sec 2.1): edges -> density -> seeds -> Voronoi cells; or, for the
V2UM2I-like comparison arm (`method="superpixel"`), SLIC superpixels filled with their means.

`pseudo_mask(key, image, params)` is a pure function of a key and one image
(`(H, W)` or `(D, H, W)`, values in [0, 1]); it is jit-compiled with the
parameters static, and `jax.vmap` over keys and images gives a batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from acis_jax.config_utils import dataclass_from_config
from acis_jax.pseudomask.canny import canny, canny_slicewise
from acis_jax.pseudomask.kde import kde
from acis_jax.pseudomask.sampling import sample_edge_points, sample_seeds
from acis_jax.pseudomask.superpixel import slic
from acis_jax.pseudomask.voronoi import voronoi

METHODS = ("voronoi", "superpixel")


@dataclasses.dataclass(frozen=True)
class PseudoMaskParams:
  """Static settings of the pipeline (hashable, so jit can key on them).

  Thresholds are in the units of `canny`: absolute gradient magnitudes of the
  [0, 1] image, or quantiles when `canny_use_quantiles`. The bandwidth is in
  voxels. `density_cutoff` zeroes densities below that fraction of the peak:
  the FFT's round-off (~1e-7 of the peak) must not count as anatomy.
  """

  canny_sigma: float = 1.0
  canny_low: float = 0.1
  canny_high: float = 0.2
  canny_use_quantiles: bool = False
  canny_slicewise: bool = False
  num_edge_points: int = 4096
  bandwidth: float = 6.0
  kde_method: str = "matmul"  # binned points, dense Gaussian blur: 2-3x faster than "fft" on CPU
  density_cutoff: float = 1e-6
  num_seeds: int = 8192
  voronoi_method: str = "auto"
  cell_value: str = "seed"
  body_threshold: float = 0.3
  # "voronoi" (sec 2.1) or "superpixel" (SLIC with about num_seeds cells, each its mean;
  # acis_jax.pseudomask.superpixel). Set by the synthesizer (acis_jax.synthesizers), not by
  # config.pseudomask.
  method: str = "voronoi"
  superpixel_compactness: float = 0.1  # of the intensity range, per grid step
  superpixel_iterations: int = 10
  superpixel_jitter: float = 1.0       # initial centres moved up to this * step / 2

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    if self.cell_value not in ("seed", "mean"):
      raise ValueError(f"cell_value must be 'seed' or 'mean', got {self.cell_value!r}")
    if self.num_seeds < 1 or self.num_edge_points < 1:
      raise ValueError("num_seeds and num_edge_points must be positive")
    if self.bandwidth <= 0:
      raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")

  @classmethod
  def from_config(cls, config: Any) -> "PseudoMaskParams":
    """Builds the params from a mapping (e.g. `config.pseudomask`)."""
    return dataclass_from_config(cls, config, "pseudo-mask")


class PseudoMask(NamedTuple):
  """One pseudo-mask and the intermediate maps it was made from.

  mask: float32 `shape`, the pseudo-mask (cell value per voxel).
  seeds: int32 `(num_seeds, ndim)`, seed voxel coordinates.
  cells: int32 `shape`, index of each voxel's Voronoi cell (its nearest seed).
  density: float32 `shape`, the edge density of eq. 1 (peak-relative cutoff applied).
  edges: bool `shape`, the Canny edge map.
  """

  mask: jax.Array
  seeds: jax.Array
  cells: jax.Array
  density: jax.Array
  edges: jax.Array


def warn_if_no_edges(result: PseudoMask, name: str) -> bool:
  """Warns, on the host, when a pseudo-mask's image had no Canny edges; True if so.

  (A host callback inside the jitted pipeline would keep JAX's persistent compilation
  cache from storing every program that makes pseudo-masks.)
  """
  if np.asarray(result.edges).any():
    return False
  logging.warning("%s: the image has no Canny edges (constant or all air); seeds are drawn "
                  "uniformly over the body instead", name)
  return True


def edge_density(key: jax.Array, image: jax.Array, params: PseudoMaskParams):
  """Canny edges and their kernel density (eq. 1), with the no-edge fallback.

  Returns `(edges, density)`. Without edges, the density is uniform over the
  body (`image > body_threshold`), or over the whole image when the body has
  fewer voxels than seeds, so that sampling still has its support.
  """
  edge_fn = canny_slicewise if params.canny_slicewise else canny
  edges = edge_fn(image, sigma=params.canny_sigma, low_threshold=params.canny_low,
                  high_threshold=params.canny_high,
                  use_quantiles=params.canny_use_quantiles)
  points, weights = sample_edge_points(key, edges, params.num_edge_points)
  density = kde(points, image.shape, params.bandwidth, method=params.kde_method,
                weights=weights)
  density = jnp.maximum(density, 0.0)
  density = jnp.where(density >= params.density_cutoff * density.max(), density, 0.0)

  no_edges = ~jnp.any(edges)
  body = image > params.body_threshold
  support = jnp.where(jnp.sum(body) >= params.num_seeds, body, True)
  density = jnp.where(no_edges, support.astype(density.dtype), density)
  return edges, density


def cell_values(image: jax.Array, seeds: jax.Array, cells: jax.Array, how: str) -> jax.Array:
  """Value of each voxel's cell: the seed's intensity (eq. 2) or the cell mean."""
  num_seeds = seeds.shape[0]
  if how == "seed":
    per_cell = image[tuple(seeds.T)]
  else:
    flat_cells = cells.reshape(-1)
    sums = jax.ops.segment_sum(image.reshape(-1), flat_cells, num_segments=num_seeds)
    counts = jax.ops.segment_sum(jnp.ones_like(flat_cells, image.dtype), flat_cells,
                                 num_segments=num_seeds)
    per_cell = sums / jnp.maximum(counts, 1)
  return per_cell[cells]


def _superpixel_mask(key, image, params: PseudoMaskParams) -> PseudoMask:
  """SLIC superpixels as a `PseudoMask`: the centres as its seeds, no edges or density."""
  cells, centres = slic(key, image, params.num_seeds, params.superpixel_compactness,
                        params.superpixel_iterations, params.superpixel_jitter)
  seeds = jnp.round(centres).astype(jnp.int32)
  mask = cell_values(image, seeds, cells, "mean")
  return PseudoMask(mask=mask, seeds=seeds, cells=cells, density=jnp.zeros_like(image),
                    edges=jnp.zeros(image.shape, bool))


@jax.jit(static_argnames="params")
def _pseudo_mask(key, image, params: PseudoMaskParams) -> PseudoMask:
  if params.method == "superpixel":
    return _superpixel_mask(key, image, params)
  edge_key, seed_key = jax.random.split(key)
  edges, density = edge_density(edge_key, image, params)
  seeds = sample_seeds(seed_key, density, params.num_seeds)
  cells = voronoi(seeds, image.shape, method=params.voronoi_method)
  mask = cell_values(image, seeds, cells, params.cell_value)
  return PseudoMask(mask=mask, seeds=seeds, cells=cells, density=density, edges=edges)


def pseudo_mask(key: jax.Array, image: jax.Array, params: Any) -> PseudoMask:
  """Makes one pseudo-mask of `image` (`(H, W)` or `(D, H, W)`, values in [0, 1]).

  `params` is a `PseudoMaskParams` or a mapping of its fields (such as
  `config.pseudomask`). The same key gives the same mask; `jax.vmap` over keys
  and images works.
  """
  params = PseudoMaskParams.from_config(params)
  if image.ndim not in (2, 3):
    raise ValueError(f"pseudo_mask takes a 2-D or 3-D image, got shape {image.shape}")
  if params.num_seeds > image.size:
    raise ValueError(
        f"num_seeds={params.num_seeds} exceeds the {image.size} voxels of an image of shape "
        f"{image.shape}")
  return _pseudo_mask(key, jnp.asarray(image, jnp.float32), params)
