"""JAX's persistent compilation cache for the command line.

Every `defuse-jax` command is a new process, so without a cache each one compiles its programs
again (the mixture fit alone takes about 4 s to compile on a 2-core CPU). The pipeline commands
therefore keep XLA executables in a cache directory; a rerun, a resumed run or a second run
directory with the same shapes loads them instead.

The cache directory is, in order: `$DEFUSE_JAX_CACHE_DIR` (`off` disables the cache),
JAX's own `$JAX_COMPILATION_CACHE_DIR` (left to JAX), `$XDG_CACHE_HOME/defuse-jax/xla`, or
`~/.cache/defuse-jax/xla`. Benchmarks and `defuse-jax sweep` never use it (they report compile
times). The library
itself does not turn it on: in a notebook, call `enable_compilation_cache()` if you want it.

Example:
    >>> from defuse_jax.xla_cache import enable_compilation_cache
    >>> enable_compilation_cache()  # before the first jitted call
"""

from __future__ import annotations

import os
import sys

import jax

ENV = "DEFUSE_JAX_CACHE_DIR"
OFF = ("", "0", "off", "none", "false")


def cache_dir() -> str | None:
    """The cache directory the environment asks for, or None if the cache is off / JAX's own."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else os.path.expanduser(value)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None  # JAX reads its own variable
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "defuse-jax", "xla")


def enable_compilation_cache(
    path: str | None = None, *, min_compile_seconds: float = 0.5
) -> str | None:
    """Turns on JAX's persistent compilation cache.

    Args:
        path: cache directory (created if missing); default `cache_dir()`.
        min_compile_seconds: programs that compile faster than this are not stored.

    Returns:
        The directory in use, or None if the cache stays off.
    """
    path = cache_dir() if path is None else path
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home must not stop a run: compile as usual
        print(f"defuse-jax: compilation cache off ({path}: {e.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path
