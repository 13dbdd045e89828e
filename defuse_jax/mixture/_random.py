"""Counter-based random numbers for the initialisations, independent of sharding and blocking.

Every random word is `threefry2x32(key, (stream, global_row))`: a pure function of the row's
global index, never of a key split whose shape depends on how rows are laid out. A fit sharded
over 4 devices therefore draws exactly the numbers a 1-device fit draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32


def key_words(key: jax.Array) -> jax.Array:
    """[2] uint32 threefry key derived from any JAX PRNG key (typed or raw)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.bits(key, (2,), jnp.uint32)
    return jax.random.bits(jax.random.wrap_key_data(key), (2,), jnp.uint32)


def stream_key(words: jax.Array, stream: int | jax.Array) -> jax.Array:
    """A derived [2] uint32 key for a numbered stream (one per k-means++ step, say)."""
    s = jnp.asarray(stream).astype(jnp.uint32)
    out = threefry_2x32(words, jnp.stack([s, s ^ jnp.uint32(0x9E3779B9)]))
    return out


def bits(words: jax.Array, hi: jax.Array, lo: jax.Array) -> jax.Array:
    """uint32 words for counter pairs (hi, lo); `hi` and `lo` broadcast together."""
    hi, lo = jnp.broadcast_arrays(hi.astype(jnp.uint32), lo.astype(jnp.uint32))
    shape = hi.shape
    n = hi.size
    out = threefry_2x32(words, jnp.concatenate([hi.reshape(-1), lo.reshape(-1)]))
    return out[:n].reshape(shape)


def uniform(words: jax.Array, hi: jax.Array, lo: jax.Array, dtype) -> jax.Array:
    """Uniform on the open interval (0, 1), 24 random bits."""
    top = jax.lax.shift_right_logical(bits(words, hi, lo), jnp.uint32(8))
    return (top.astype(dtype) + 0.5) * (2.0**-24)


def gumbel(words: jax.Array, hi: jax.Array, lo: jax.Array, dtype) -> jax.Array:
    """Standard Gumbel noise (argmax of log-weight + Gumbel = a draw proportional to weight)."""
    return -jnp.log(-jnp.log(uniform(words, hi, lo, dtype)))
