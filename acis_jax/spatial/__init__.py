"""Spatial transforms: warping, scaling-and-squaring integration, composition, Jacobians and
the registration-uncertainty terms of ACIS (eq. 3). Conventions are in `resample.py`."""
from acis_jax.spatial.integrate import compose, integrate_velocity
from acis_jax.spatial.jacobian import folding_fraction, jacobian_determinant
from acis_jax.spatial.label_registration import register_labels
from acis_jax.spatial.random_field import random_velocity, smooth_periodic
from acis_jax.spatial.resample import (identity_grid, one_hot_labels, resize, resize_field,
                                       sample, warp, warp_labels)
from acis_jax.spatial.uncertainty import appearance_uncertainty, label_consistency

__all__ = [
    "appearance_uncertainty", "compose", "folding_fraction", "identity_grid", "integrate_velocity",
    "jacobian_determinant", "label_consistency", "one_hot_labels", "random_velocity",
    "register_labels", "resize", "resize_field", "sample", "smooth_periodic", "warp",
    "warp_labels",
]
