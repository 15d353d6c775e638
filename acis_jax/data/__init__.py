"""Data: NIfTI volumes with geometry, preprocessing, nnU-Net datasets, sample data, phantom."""
from acis_jax.data.dataset import Case, check_label_map, find_cases, load_case
from acis_jax.data.nifti import Volume, axial_axis, load_nifti, save_nifti
from acis_jax.data.phantom import PHANTOM_LABELS, chest_phantom, phantom_case
from acis_jax.data.preprocess import (
    check_same_grid,
    preprocess_case,
    resample_to,
    resize_image,
    resize_labels,
    resize_volume,
    resized_affine,
    window_hu,
)
from acis_jax.data.sample import (
    SAMPLE_LABELS,
    cache_root,
    derive_lungs,
    LOBES_LABELS,
    fetch_package,
    sample_lobes_ct,
    sample_abdomen_ct,
    sample_chest_ct,
)

__all__ = [
    "Case",
    "PHANTOM_LABELS",
    "SAMPLE_LABELS",
    "Volume",
    "axial_axis",
    "cache_root",
    "check_label_map",
    "check_same_grid",
    "chest_phantom",
    "derive_lungs",
    "fetch_package",
    "LOBES_LABELS",
    "sample_lobes_ct",
    "find_cases",
    "load_case",
    "load_nifti",
    "phantom_case",
    "preprocess_case",
    "resample_to",
    "resize_image",
    "resize_labels",
    "resize_volume",
    "resized_affine",
    "sample_abdomen_ct",
    "sample_chest_ct",
    "save_nifti",
    "window_hu",
]
