"""Test setup: several forced CPU devices (sharding paths run everywhere) and strict promotion."""

import atexit
import os
import shutil
import tempfile

from xla_flags import xla_flags  # tests/ is on the path (pytest puts conftest.py's folder there)

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
# In-process CLI tests must not write the user's compilation cache (test_xla_cache.py tests it).
os.environ["DEFUSE_JAX_CACHE_DIR"] = "off"
# One persistent compilation cache for the whole test session instead: many tests compile the
# same programs (each pipeline run builds its jitted functions anew, and the CLI, notebook,
# device-check and multi-process tests are other processes). The pytest-xdist workers and every
# subprocess inherit the directory from the process that made it, which removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="defuse-jax-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
