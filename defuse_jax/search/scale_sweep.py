"""`latent_search_sweep`: one compiled search program for several perturbation scales.

The sources are replicated once per scale and every row carries its own noise scale as a traced
input (as in every search program), so the whole list of scales is one program (compiled once for
any list of that length) and one dispatch. The RNG of a row is derived from its *original* source
index: the same chain of the same source draws the same unit noise at every scale (common random
numbers), so differences between scales are not drowned in sampling noise, and each scale's
result is exactly what `latent_search` returns with that scale.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh

from defuse_jax.search.api import dispatch_scales
from defuse_jax.search.config import SearchConfig
from defuse_jax.search.perturb import SCALED_DISTRIBUTIONS
from defuse_jax.search.result import SearchResult


def check_sweep(config: SearchConfig, scales: Sequence[float]) -> tuple[float, ...]:
    """Validates a scale sweep before anything is traced or compiled.

    Args:
      config: the search configuration (its `scale` is replaced by each swept scale).
      scales: the perturbation scales.

    Returns:
      The scales as Python floats.

    Raises:
      ValueError: the setting has no scale to sweep (`"iterative"` mode; the `"uniform_ball"`
        and `"beta_offset"` laws), or `scales` is empty, not numbers, non-finite or <= 0.
    """
    if not isinstance(config, SearchConfig):
        raise ValueError(f"config must be a SearchConfig, got {type(config).__name__}.")
    if config.mode == "iterative":
        raise ValueError(
            "mode='iterative' does not use `scale` (its radii come from radius_step); sweep "
            "radius_step with separate latent_search calls instead."
        )
    if config.mode == "sample" and config.distribution not in SCALED_DISTRIBUTIONS:
        raise ValueError(
            f"distribution={config.distribution!r} does not use `scale` (only "
            f"{SCALED_DISTRIBUTIONS} do); there is nothing to sweep."
        )
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise ValueError(f"scales must be a sequence of numbers, got {scales!r}.")
    if len(scales) == 0:
        raise ValueError("scales is empty: give at least one perturbation scale.")
    out = []
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise ValueError(f"scales must be numbers; got {s!r}.")
        if not (math.isfinite(float(s)) and float(s) > 0.0):
            raise ValueError(f"every scale must be finite and > 0; got {s!r}.")
        out.append(float(s))
    return tuple(out)


def latent_search_sweep(
    decode_fn: Callable[[jax.Array], jax.Array],
    classify_fn: Callable[[jax.Array], jax.Array],
    z0,
    y0,
    *,
    key: jax.Array | None,
    config: SearchConfig | None = None,
    scales: Sequence[float],
    mesh: Mesh | None = None,
    validity_fn: Callable[[jax.Array], jax.Array] | None = None,
    free_dims: int | None = None,
) -> list[SearchResult]:
    """`latent_search` at several perturbation scales, as one compiled program.

    Result `i` equals `latent_search(..., key=key, config=dataclasses.replace(config,
    scale=scales[i]))` (same codes, labels and counts), because chain randomness is indexed by
    the original source and the scale only multiplies the unit noise. Work and memory grow with
    `len(scales) * N` like one search over that many sources; the program is compiled once per
    number of scales (not per value), so sweeping other values of the same length reuses it.

    Args:
      decode_fn: z [B, L] -> x [B, ...], JAX-traceable.
      classify_fn: x [B, ...] -> logits [B, C], JAX-traceable.
      z0: [N, L] latent means of the source points.
      y0: [N] their true labels.
      key: root PRNG key (None uses `config.seed`), shared by every scale.
      config: search configuration (None: `SearchConfig()`); `"sample"` mode with the
        gaussian or laplace law, or `"gradient"` mode (scale = initial jitter).
      scales: perturbation scales, each finite and > 0.
      mesh: devices to shard over (default: all devices).
      validity_fn: the auxiliary classifier of `latent_search`, or None.
      free_dims: the coordinates perturbed, as in `latent_search`.

    Returns:
      One `SearchResult` per scale, in the order of `scales`. Each result's `wall_time_s` is the
      wall time of the whole sweep call (the scales share one program).

    Raises:
      ValueError: bad scales or a setting without a scale (see `check_sweep`), or bad inputs as
        in `latent_search`; raised before anything is compiled.

    Example:
      >>> results = latent_search_sweep(decode, classify, mu, y, key=jax.random.key(0),
      ...                               config=SearchConfig(num_samples=100),
      ...                               scales=[0.25, 0.5, 1.0, 2.0])
      >>> [r.num_flips for r in results]
    """
    start = time.perf_counter()
    config = SearchConfig() if config is None else config
    scales = check_sweep(config, scales)
    return dispatch_scales(
        decode_fn, classify_fn, z0, y0, key=key, config=config, scales=scales, mesh=mesh,
        start=start, validity_fn=validity_fn, free_dims=free_dims,
    ).results()  # fmt: skip
