"""Pseudo-mask generation (paper sec 2.1): Canny -> KDE -> seeds -> Voronoi."""

from acis_jax.pseudomask.canny import canny, canny_slicewise
from acis_jax.pseudomask.kde import kde
from acis_jax.pseudomask.pipeline import PseudoMask, PseudoMaskParams, edge_density, pseudo_mask
from acis_jax.pseudomask.sampling import sample_edge_points, sample_seeds
from acis_jax.pseudomask.voronoi import voronoi

__all__ = [
    "PseudoMask", "PseudoMaskParams", "canny", "canny_slicewise", "edge_density", "kde",
    "pseudo_mask", "sample_edge_points", "sample_seeds", "voronoi",
]
