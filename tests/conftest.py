"""Test setup: several forced CPU devices (sharding paths run everywhere) and strict promotion."""

import atexit
import collections
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


# pytest-xdist hands out whole files (`--dist loadfile`), most tests first: these few-test,
# long files (seconds in the suite, `--durations`) then started last and one worker finished
# them alone. They go first instead, in this order, the rest as pytest-xdist orders them.
FIRST = (
    "test_multihost_pipeline.py",  # 115
    "test_notebook.py",  # 90
    "test_device_check.py",  # 80
)


def pytest_configure(config):
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False  # the order is set here instead


def pytest_collection_modifyitems(config, items):
    # pytest-xdist's own order (files with more tests first), then FIRST ahead of them.
    counts = collections.Counter(item.path.name for item in items)
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -counts[item.path.name]))
