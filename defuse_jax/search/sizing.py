"""The sizes a search leaves to None: its chunk (by backend and model) and its samples per source
(by the number of sources).

`num_samples=None` spreads `SAMPLE_BUDGET` samples over the sources, 100 to 1,000 per source:
1,000 for the 450 digits test points, 250 for 2,000 Fashion-MNIST ones, 100 for 10,000. A
validity search (`SearchConfig.validity`) keeps few of its samples (on digits about five codes
per source at 1,000 samples, under one at 100), so small test sets need many per source, while
on a large one the budget, not the sources, bounds the search's time.

`chunk_size=None`: how many chains a device evaluates per step, chosen by backend and model.

The chunk size changes speed only (every chain's randomness is its own, so results do not
depend on it). What is fast differs by orders of magnitude between machines:

- a CPU wants a chunk whose work stays near its caches: on a 2-core CPU `defuse-jax bench
  search` found ~1,024-2,048 chains best for the digits MLPs (0.34 MFLOP per sample) and
  ~64-128 for the 28x28 conv models (22 MFLOP);
- an accelerator wants enough work per step to fill the chip and amortise a step's fixed cost:
  on one H200 the best were 262,144 (MLP) and 32,768 (conv).

Both are met by a FLOP budget per step (about 2 GFLOP on a CPU, 550 GFLOP on an accelerator),
rounded to a power of two and clamped, then capped by the device's memory: the sum of every
intermediate value of one sample's forward pass (an over-estimate of what is live at once, so a
safe bound) times the chunk must fit in the device's memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax.search.config import SearchConfig

SAMPLE_BUDGET = 500_000  # samples evaluated in all, when num_samples is None
SAMPLES_PER_SOURCE = (100, 1000)  # [min, max] per source


def samples_per_source(num_sources: int) -> int:
    """Samples per source for `num_samples=None`: `SAMPLE_BUDGET` over the sources, clamped."""
    lo, hi = SAMPLES_PER_SOURCE
    return int(min(hi, max(lo, SAMPLE_BUDGET // max(1, num_sources))))


def with_samples(config: SearchConfig, num_sources: int) -> SearchConfig:
    """`config` with `num_samples=None` resolved for `num_sources` sources."""
    if config.num_samples is not None:
        return config
    return dataclasses.replace(config, num_samples=samples_per_source(num_sources))


# Rows of the sizing table: a FLOP budget per device step and the [min, max] chunk.
_PROFILES = {
    "cpu": (2.0**31, 32, 2048),
    "accelerator": (2.0**39, 256, 262_144),
}
# Gradient chains run a forward and a backward pass per round: about three forward passes.
_GRADIENT_COST = 3.0
_PROBE_BATCH = 64  # per-sample costs are read at this batch (weights' own ops amortised)


class ForwardCost(NamedTuple):
    """Per-sample cost of decode + classify, read from its jaxpr (no compilation)."""

    flops: float  # multiply-adds x 2 of every dot and convolution
    bytes: float  # every intermediate value written once


def _walk(jaxpr, acc: list[float]) -> None:
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval if eqn.outvars else None
        for v in eqn.outvars:
            if hasattr(v.aval, "shape"):
                acc[1] += math.prod(v.aval.shape) * v.aval.dtype.itemsize
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            acc[0] += 2.0 * math.prod(out.shape) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            acc[0] += 2.0 * math.prod(out.shape) * math.prod(rhs) / out_features
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    _walk(inner, acc)


@functools.lru_cache(maxsize=64)
def forward_cost(decode_fn, classify_fn, latent_dim: int, compute_dtype: str) -> ForwardCost:
    """FLOPs and intermediate bytes per sample of `classify_fn(decode_fn(z))`."""
    spec = jax.ShapeDtypeStruct((_PROBE_BATCH, latent_dim), jnp.dtype(compute_dtype))
    closed = jax.make_jaxpr(lambda z: classify_fn(decode_fn(z)))(spec)
    acc = [0.0, 0.0]
    _walk(closed.jaxpr, acc)
    return ForwardCost(acc[0] / _PROBE_BATCH, acc[1] / _PROBE_BATCH)


def _nearest_power_of_two(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def pick_chunk_size(
    cost: ForwardCost, *, backend: str, memory_bytes: int | None, gradient: bool = False
) -> int:
    """The chunk size for one sample's `cost` on `backend` ("cpu", "gpu", "tpu", ...).

    Args:
      cost: per-sample forward cost (`forward_cost`).
      backend: `jax.default_backend()`; anything but "cpu" is an accelerator.
      memory_bytes: the device's memory (None: unknown, no cap).
      gradient: gradient-mode chains (a backward pass per round too).
    """
    budget, lo, hi = _PROFILES["cpu" if backend == "cpu" else "accelerator"]
    factor = _GRADIENT_COST if gradient else 1.0
    chunk = min(max(_nearest_power_of_two(budget / (cost.flops * factor + 1.0)), lo), hi)
    if memory_bytes:
        fits = memory_bytes / (cost.bytes * factor + 1.0)
        chunk = min(chunk, 1 << max(0, int(math.floor(math.log2(max(fits, 1.0))))))
    return int(chunk)


def device_memory(device: jax.Device) -> int | None:
    """The device's memory limit in bytes, where the backend reports one (not on CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def auto_chunk_size(
    decode_fn, classify_fn, latent_dim: int, *, compute_dtype: str, mode: str, devices
) -> int:
    """`pick_chunk_size` for these functions on the first of `devices` (a mesh's devices)."""
    device = np.asarray(devices).ravel()[0]
    cost = forward_cost(decode_fn, classify_fn, latent_dim, compute_dtype)
    return pick_chunk_size(
        cost,
        backend=device.platform,
        memory_bytes=device_memory(device),
        gradient=mode == "gradient",
    )
