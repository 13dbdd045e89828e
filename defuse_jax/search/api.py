"""`latent_search` and `start_search`: validate, lay out, dispatch the compiled program once,
read the device-compacted candidates on the host."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from defuse_jax._plumbing.keys import key_data_words
from defuse_jax.search import engine
from defuse_jax.search.config import SearchConfig
from defuse_jax.search.input_checks import check_inputs
from defuse_jax.search.modes import VALIDITY_SLICES
from defuse_jax.search.perturb import check_counter_range, noise_scale
from defuse_jax.search.result import SearchResult, compact
from defuse_jax.search.sizing import auto_chunk_size, with_samples


def latent_search(
    decode_fn: Callable[[jax.Array], jax.Array],
    classify_fn: Callable[[jax.Array], jax.Array],
    z0,
    y0,
    *,
    key: jax.Array | None,
    config: SearchConfig | None = None,
    mesh: Mesh | None = None,
    validity_fn: Callable[[jax.Array], jax.Array] | None = None,
    free_dims: int | None = None,
) -> SearchResult:
    """Searches the latent space around each source point for codes the classifier gets wrong.

    The whole search is one jitted program: chains of all sources are vmapped in blocks of
    `config.chunk_size`, blocks are scanned, and blocks are sharded over every device of `mesh`.
    Every chain's random words are a counter-based hash of (key, source, chain, round)
    (`perturb.ChainRng`), so the result does not depend on the chunk size or the number of
    devices.

    Args:
      decode_fn: z [B, L] -> x [B, ...], JAX-traceable (parameters closed over).
      classify_fn: x [B, ...] -> logits [B, C], JAX-traceable.
      z0: [N, L] latent means of the N source points.
      y0: [N] their true labels in [0, C).
      key: root PRNG key (`jax.random.key` or a raw `PRNGKey`); None uses `config.seed`.
      config: search configuration; None means `SearchConfig()`.
      mesh: devices to shard the sources over (every mesh axis is used); default all devices.
      validity_fn: x [B, ...] -> logits [B, C] of an auxiliary classifier, or None. With one, a
        decoded sample counts as an error only where the classifier's prediction differs from
        the source label *and* the auxiliary classifier still reads the source label (a validity
        constraint in the spirit of Song et al. 2018: the image kept its class), and sources it
        misreads are skipped. Logits [G, B, C] are a committee of G auxiliary classifiers that
        must all read the source label (`models.validity_function`). None (the paper's search)
        counts every changed prediction.
      free_dims: perturb only the first `free_dims` coordinates of the codes; the rest stay
        the source's (a conditional VAE's class block: `models.style_dims`). None: all.

    Returns:
      `SearchResult` with every adversarial example kept (up to `max_keep_per_source` per source,
      smallest perturbation first) and the search's counts and wall time.

    Raises:
      ValueError: bad shapes, labels out of range, non-finite z0, zero sources or samples.

    Example:
      >>> res = latent_search(partial(models.decode, vp), partial(models.logits, cp), mu, y,
      ...                     key=jax.random.key(0), config=SearchConfig(num_samples=100))
      >>> res.z.shape, res.pred_label
    """
    return start_search(
        decode_fn, classify_fn, z0, y0, key=key, config=config, mesh=mesh,
        validity_fn=validity_fn, free_dims=free_dims,
    ).result()  # fmt: skip


def start_search(
    decode_fn: Callable[[jax.Array], jax.Array],
    classify_fn: Callable[[jax.Array], jax.Array],
    z0,
    y0,
    *,
    key: jax.Array | None,
    config: SearchConfig | None = None,
    mesh: Mesh | None = None,
    validity_fn: Callable[[jax.Array], jax.Array] | None = None,
    free_dims: int | None = None,
) -> PendingSearch:
    """`latent_search`, returning as soon as the search is on its way to the devices.

    The inputs are validated (bad input raises here), the program is dispatched, and the copies
    of its output to the host start as soon as it ends; `.result()` waits for them and builds
    the `SearchResult`. Start the next search before reading a result, and the host's work on
    one search (validation, packing, reading results: on a GPU about as long as a small model's
    search itself) overlaps the device's on the other:

      >>> pending = [start_search(dec, clf, z, y, key=k, config=c) for z, y, k, c in settings]
      >>> results = [p.result() for p in pending]

    Same arguments and result as `latent_search`, which is `start_search(...).result()`. Each
    dispatched search holds its output on the devices until its result is read. On several
    hosts every process starts the same searches and reads them in the same order (reading
    gathers across hosts).
    """
    start = time.perf_counter()
    config = SearchConfig() if config is None else config
    return dispatch_scales(
        decode_fn, classify_fn, z0, y0, key=key, config=config, scales=None, mesh=mesh,
        start=start, validity_fn=validity_fn, free_dims=free_dims,
    )  # fmt: skip


class PendingSearch:
    """A search dispatched to the devices, its result not read yet (`start_search`)."""

    def __init__(self, plan: _Plan, found: engine.Found, start: float):
        self._plan, self._found, self._start = plan, found, start
        engine.start_fetch(found)
        self._results: list[SearchResult] | None = None

    def results(self) -> list[SearchResult]:
        """One `SearchResult` per scale (a sweep's; one for `start_search`), read once: the
        device's output is released then. Each one's `wall_time_s` runs from the start to the
        first read."""
        if self._results is None:
            parts = engine.fetch_found(self._found)
            wall = time.perf_counter() - self._start
            self._results = [
                compact(part, self._plan.num_sources, config=c, wall_time_s=wall)
                for part, c in zip(parts, self._plan.configs, strict=True)
            ]
            self._found = None
        return self._results

    def result(self) -> SearchResult:
        """The `SearchResult` (waits for the device)."""
        results = self.results()
        if len(results) != 1:
            raise ValueError(f"this search ran {len(results)} scales: read them with .results().")
        return results[0]


class _Plan(NamedTuple):
    program: Any  # the jitted search program
    args: tuple  # its arguments (root key data, laid-out rows)
    configs: list[SearchConfig]  # one per scale, chunk size resolved
    num_sources: int


def _plan(
    decode_fn,
    classify_fn,
    z0,
    y0,
    *,
    key,
    config: SearchConfig,
    scales,
    mesh,
    validity_fn=None,
    free_dims: int | None = None,
) -> _Plan:
    """Validation, the chunk size, the layout and the program with its inputs."""
    z, y, _ = check_inputs(decode_fn, classify_fn, z0, y0, config=config, validity_fn=validity_fn)
    if free_dims is not None and not 1 <= free_dims <= z.shape[1]:
        raise ValueError(
            f"free_dims={free_dims}: the search perturbs the first free_dims of the codes' "
            f"{z.shape[1]} coordinates, so it must lie in [1, {z.shape[1]}] (None: all)."
        )
    scales = (config.scale,) if scales is None else scales
    root = key_data_words(key, config.seed)
    mesh = engine.default_mesh() if mesh is None else mesh
    n, latent = z.shape
    config = with_samples(config, n)
    check_counter_range(config.chains, config.rounds, latent)
    if config.chunk_size is None:
        sized = classify_fn if validity_fn is None else _both(classify_fn, validity_fn)
        chunk = auto_chunk_size(
            decode_fn, sized, latent, compute_dtype=config.compute_dtype,
            mode=config.mode, devices=mesh.devices,
        )  # fmt: skip
        config = dataclasses.replace(config, chunk_size=chunk)
    configs = [dataclasses.replace(config, scale=s) for s in scales]
    layout = engine.plan_layout(n, mesh.devices.size, config)  # of one replica
    program = engine.get_program(
        decode_fn, classify_fn, config, layout, mesh, validity_fn=validity_fn,
        free_dims=free_dims, copies=len(configs),
    )  # fmt: skip
    noise = np.asarray([noise_scale(c, latent) for c in configs], np.float32)
    args = (root, engine.lay_out_inputs(z, y, noise, layout, mesh))
    return _Plan(program, args, configs, n)


def _both(classify_fn, validity_fn):
    """What the chunk size is sized for: the classifier on a batch, and the validity model on
    the largest slice of it that it reads at once (B/8, `modes.VALIDITY_SLICES`): it reads only
    the flips. (Sized for the whole batch, an 8x8 digits committee of six got a quarter of the
    unconstrained search's chunk, and a slower search.)"""
    share = min(VALIDITY_SLICES)
    return lambda x: (classify_fn(x), validity_fn(x[: max(1, x.shape[0] // share)]))


def lower_search(
    decode_fn: Callable[[jax.Array], jax.Array],
    classify_fn: Callable[[jax.Array], jax.Array],
    z0,
    y0,
    *,
    key: jax.Array | None,
    config: SearchConfig | None = None,
    mesh: Mesh | None = None,
    validity_fn: Callable[[jax.Array], jax.Array] | None = None,
    free_dims: int | None = None,
) -> jax.stages.Lowered:
    """The search program `latent_search` would run, lowered but not compiled or run.

    For inspection: `.as_text()` shows the StableHLO (e.g. the dtypes of every convolution and
    dot), `.compile().cost_analysis()` XLA's FLOP and byte counts. Same arguments as
    `latent_search`.
    """
    config = SearchConfig() if config is None else config
    plan = _plan(
        decode_fn, classify_fn, z0, y0, key=key, config=config, scales=None, mesh=mesh,
        validity_fn=validity_fn, free_dims=free_dims,
    )  # fmt: skip
    return plan.program.lower(*plan.args)


def dispatch_scales(
    decode_fn,
    classify_fn,
    z0,
    y0,
    *,
    key,
    config: SearchConfig,
    scales,
    mesh,
    start: float,
    validity_fn=None,
    free_dims: int | None = None,
) -> PendingSearch:
    """The search at each of `scales` (already validated) as one program, dispatched; see
    `start_search`.

    `scales=None` means `(config.scale,)`. `start` is the caller's start time: every result's
    `wall_time_s` counts from it.
    """
    plan = _plan(
        decode_fn, classify_fn, z0, y0, key=key, config=config, scales=scales, mesh=mesh,
        validity_fn=validity_fn, free_dims=free_dims,
    )  # fmt: skip
    return PendingSearch(plan, plan.program(*plan.args), start)
