"""Test setup: several forced CPU devices (sharding paths run everywhere) and strict promotion."""

import atexit
import os
import shutil
import tempfile

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
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


# The longest files first. `pytest -n 2 --dist loadfile` hands whole files to the workers in
# collection order, so a long file collected late finishes alone: 785 s of wall time for 1,383 s
# of work on 2 workers, with tests/test_pipeline.py (300 s) handed out last. Longest first
# balances the two workers. Seconds of work per file, 2-core CPU, 2026-12-03.
SLOW_FIRST = (
    "test_pipeline.py",  # 304
    "test_multihost_pipeline.py",  # 184 (two more processes)
    "test_notebook.py",  # 122
    "test_mixture_properties.py",  # 110
    "test_device_check.py",  # 104
    "test_sweep.py",  # 71
    "test_training.py",  # 69
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
