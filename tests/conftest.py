"""Shared test settings: double precision off, deterministic CPU runs."""
import os

# Tests run on the CPU; a fixed device count keeps sharding tests meaningful.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The persistent compilation cache, as `python -m acis_jax.main` uses it (user cache folder,
# or JAX_COMPILATION_CACHE_DIR): a second run of the suite compiles little.
# ACIS_JAX_TEST_COMPILATION_CACHE=off runs without it.
from acis_jax.main import enable_compilation_cache  # noqa: E402  (after the JAX settings)

enable_compilation_cache(os.environ.get("ACIS_JAX_TEST_COMPILATION_CACHE", "auto"))
