"""Test setup: several forced CPU devices (sharding paths run everywhere) and strict promotion."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
# In-process CLI tests must not write the user's compilation cache (test_xla_cache.py tests it).
os.environ["DEFUSE_JAX_CACHE_DIR"] = "off"

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
