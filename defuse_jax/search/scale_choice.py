"""`choose_scale`: the perturbation scale a search needs, read from a pilot search.

A class-conditional VAE's style codes carry less than an unconditional VAE's codes, and the
scale at which its samples start to fool the classifier depends on the data: on 8x8 digits the
reference's 0.5 kept 2 error codes from 450 sources where 2 kept 1,534; on Fashion-MNIST 0.5
kept the most bugs. In both the scale measured best was the smallest at which the search keeps
at least one error code per searched source, the rule this module applies to a pilot: the same
search (samples per source, validity model, free coordinates) on a seeded subset of the sources,
every candidate scale in one program (`latent_search_sweep`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from defuse_jax.search.config import SearchConfig
from defuse_jax.search.scale_sweep import check_sweep, latent_search_sweep
from defuse_jax.search.sizing import with_samples

PILOT_SOURCES = 256  # sources of the pilot search: a few percent of the budget on 10,000


class ScaleChoice(NamedTuple):
    """What the pilot found, scale by scale (each sequence in the order of `scales`)."""

    scale: float  # the chosen one
    scales: tuple[float, ...]  # the candidates, ascending
    kept: tuple[int, ...]  # error codes kept at each
    sources_used: int  # sources the pilot searched (skipped ones left out)
    pilot_sources: int  # sources drawn for the pilot

    def describe(self) -> str:
        kept = ", ".join(f"{k:,} at {s:g}" for s, k in zip(self.scales, self.kept, strict=True))
        return (
            f"scale {self.scale:g}: the smallest of {', '.join(f'{s:g}' for s in self.scales)} "
            f"that keeps at least one error code per searched source in a pilot on "
            f"{self.sources_used} sources (kept {kept})"
        )


def choose_scale(
    decode_fn: Callable[[jax.Array], jax.Array],
    classify_fn: Callable[[jax.Array], jax.Array],
    z0,
    y0,
    *,
    key: jax.Array | None,
    config: SearchConfig,
    scales: Sequence[float],
    pilot_sources: int = PILOT_SOURCES,
    seed: int = 0,
    mesh: Mesh | None = None,
    validity_fn: Callable[[jax.Array], jax.Array] | None = None,
    free_dims: int | None = None,
) -> ScaleChoice:
    """The smallest of `scales` at which a pilot search keeps at least one error code per
    searched source (the largest when none does).

    Args:
      decode_fn, classify_fn, z0, y0, key, config, mesh, validity_fn, free_dims: as for
        `latent_search`; `config.num_samples` left None is sized for all of `z0`'s sources,
        as the full search will be.
      scales: the candidate perturbation scales (`"sample"` mode with a scaled law, or
        `"gradient"` mode).
      pilot_sources: search from at most this many sources, a subset drawn with `seed`.

    Returns:
      `ScaleChoice`.

    Raises:
      ValueError: bad scales or a setting without a scale (`check_sweep`), or bad inputs as in
        `latent_search`, before anything is compiled.
    """
    grid = tuple(sorted(check_sweep(config, scales)))
    z0, y0 = np.asarray(z0), np.asarray(y0)
    n = len(z0)
    idx = np.arange(n)
    if pilot_sources < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, pilot_sources, replace=False))
    pilot = with_samples(config, n)  # the full search's samples per source
    results = latent_search_sweep(
        decode_fn, classify_fn, z0[idx], y0[idx], key=key, config=pilot, scales=grid,
        mesh=mesh, validity_fn=validity_fn, free_dims=free_dims,
    )  # fmt: skip
    kept = tuple(int(r.num_found) for r in results)
    used = int(results[0].num_sources_used)
    chosen = next((s for s, k in zip(grid, kept, strict=True) if used and k >= used), grid[-1])
    return ScaleChoice(chosen, grid, kept, used, len(idx))
