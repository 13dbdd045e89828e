"""Host-device setup shared by the benchmarks (`--devices n`)."""

from __future__ import annotations

import os

import jax


def ensure_devices(n: int) -> None:
    """On CPU, asks XLA for n host devices if the backend has not started yet (--devices n)."""
    if n <= 1:
        return
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except Exception:  # private API moved: leave the flags alone
        started = True
    flags = os.environ.get("XLA_FLAGS", "")
    if not started and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    if len(jax.devices()) < n:
        raise ValueError(
            f"--devices {n} but {len(jax.devices())} device(s) are available; on CPU start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
