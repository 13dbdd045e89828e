"""Counter-based randomness per chain, and the perturbation laws.

Every random word a chain uses comes from `threefry2x32(root, (source, (chain*R + round)*W + i))`:
a pure function of the chain's *global* coordinates, never of a split whose shape depends on how
the work is chunked or sharded. That is what makes results independent of chunk size and device
count. (One threefry call per block, instead of per-chain `fold_in` keys, is also what keeps
compile time and RNG cost small next to the networks.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from defuse_jax._plumbing.threefry import hash_counters, uniform_open
from defuse_jax.search.config import SearchConfig


def words_per_round(latent_dim: int) -> int:
    """W: random 32-bit words reserved per chain and round (enough for every law and mode)."""
    return latent_dim + 2


class ChainRng(NamedTuple):
    """Random words for a block of chains: S sources x c chains."""

    key: jax.Array  # [2] uint32 threefry key of the search
    source: jax.Array  # [S] int32 global source indices
    chain: jax.Array  # [c] int32 chain indices within a source
    rounds: int  # R, rounds per chain
    words: int  # W, words per chain and round

    def bits(self, round_index: jax.Array | int, n: int) -> jax.Array:
        """[S, c, n] uint32 words 0..n-1 of round `round_index` (n <= W)."""
        assert n <= self.words
        p = (n + 1) // 2
        base = (
            self.chain.astype(jnp.uint32) * jnp.uint32(self.rounds)
            + jnp.asarray(round_index).astype(jnp.uint32)
        ) * jnp.uint32(self.words)
        # counter pair (source, base + i) hashes to words 2i and 2i + 1
        lo = base[None, :, None] + jnp.arange(p, dtype=jnp.uint32)[None, None, :]
        hi = self.source.astype(jnp.uint32)[:, None, None]
        words = jnp.stack(hash_counters(self.key, hi, lo), axis=-1)  # [S, c, p, 2]
        return words.reshape(words.shape[:2] + (2 * p,))[..., :n]

    def uniform(self, round_index, n: int) -> jax.Array:
        """[S, c, n] float32 uniform on the open interval (0, 1)."""
        return uniform_open(self.bits(round_index, n), jnp.float32)

    def normal(self, round_index, n: int) -> jax.Array:
        """[S, c, n] float32 standard normal (inverse CDF of `uniform`)."""
        u = self.uniform(round_index, n)
        return jnp.float32(2.0**0.5) * jax.lax.erf_inv(jnp.float32(2.0) * u - jnp.float32(1.0))


def check_counter_range(chains: int, rounds: int, latent_dim: int) -> None:
    """Raises if the per-source counter would overflow 32 bits."""
    if chains * rounds * words_per_round(latent_dim) >= 2**32:
        raise ValueError(
            f"chains x rounds x (latent_dim + 2) = {chains} x {rounds} x "
            f"{words_per_round(latent_dim)} exceeds 2**32 per source; use fewer samples per "
            "source (or more source points)."
        )


def unit_direction(gauss: jax.Array) -> jax.Array:
    """Normalises [..., L] gaussian draws to directions uniform on the unit sphere."""
    norm = jnp.linalg.norm(gauss, axis=-1, keepdims=True)
    return gauss / jnp.maximum(norm, jnp.float32(1e-12))


def free_mask(latent_dim: int, free_dims: int | None) -> jax.Array:
    """[L] float32: 1 on the first `free_dims` coordinates of a code (all when None), which the
    search perturbs, 0 on the rest, which stay the source's (a conditional VAE's class
    block)."""
    free = latent_dim if free_dims is None else free_dims
    return (jnp.arange(latent_dim) < free).astype(jnp.float32)


SCALED_DISTRIBUTIONS = ("gaussian", "laplace")  # the "sample"-mode laws that read `scale`


def noise_scale(config: SearchConfig, latent_dim: int) -> float:
    """The factor that multiplies a chain's unit noise: `scale`, or `scale / sqrt(L)` for the
    initial jitter of `"gradient"` chains. Computed on the host and passed to the program per
    source row (so the scale is never a compile-time constant)."""
    if config.mode == "gradient":
        return config.scale / latent_dim**0.5
    return config.scale


def sample_offset(
    rng: ChainRng, latent_dim: int, *, config: SearchConfig, noise: jax.Array | None = None
) -> jax.Array:
    """One perturbation `z - z0` per chain (round 0) from the configured law.

    Args:
      rng: the block's chain randomness.
      latent_dim: L.
      config: `distribution`, `scale`, `radius_min`, `radius_max`, `beta_a` are read.
      noise: optional [S] float32 scale per source (what the search programs pass) in place of
        `config.scale`; only the gaussian and laplace laws have a scale.

    Returns:
      [S, c, L] float32 offsets.
    """
    dist = config.distribution
    scale = jnp.float32(config.scale) if noise is None else noise[:, None, None]
    if dist == "gaussian":
        return scale * rng.normal(0, latent_dim)
    if dist == "laplace":  # inverse CDF; u in (0, 1) so the log is finite
        v = rng.uniform(0, latent_dim) - jnp.float32(0.5)
        mag = -jnp.log1p(jnp.float32(-2.0) * jnp.abs(v))
        return scale * jnp.sign(v) * mag
    if dist == "uniform_ball":  # uniform direction, radius uniform in the window
        direction = unit_direction(rng.normal(0, latent_dim))
        t = rng.uniform(0, latent_dim + 1)[..., latent_dim:]
        radius = jnp.float32(config.radius_min) + t * jnp.float32(
            config.radius_max - config.radius_min
        )
        return radius * direction
    if dist == "beta_offset":  # the reference's Beta(a, a) per dimension (not centred)
        keys = jax.random.wrap_key_data(rng.bits(0, 2), impl="threefry2x32")
        a = jnp.float32(config.beta_a)
        flat = keys.reshape(-1)
        out = jax.vmap(lambda k: jax.random.beta(k, a, a, (latent_dim,), jnp.float32))(flat)
        return out.reshape(keys.shape + (latent_dim,))
    raise ValueError(f"unknown distribution {dist!r}")
