"""ACIS in JAX: anatomically constrained synthesis of CT image-annotation pairs."""
