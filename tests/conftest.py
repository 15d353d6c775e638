"""Shared test settings: double precision off, deterministic CPU runs."""
import os

# Tests run on the CPU; a fixed device count keeps sharding tests meaningful.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
