"""The initialisations' random streams, independent of sharding and blocking.

Every random word is `threefry2x32(key, (stream, global_row))` (`_plumbing.threefry`): a pure
function of the row's global index, never of a key split whose shape depends on how rows are
laid out. A fit sharded over 4 devices therefore draws exactly the numbers a 1-device fit draws.
The key is drawn from the fit's PRNG key (`_plumbing.keys.drawn_key_words`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from defuse_jax._plumbing.threefry import hash_counters, uniform_open


def stream_key(words: jax.Array, stream: int | jax.Array) -> jax.Array:
    """A derived [2] uint32 key for a numbered stream (one per k-means++ step, say)."""
    s = jnp.asarray(stream).astype(jnp.uint32)
    return jnp.stack(hash_counters(words, s, s ^ jnp.uint32(0x9E3779B9)))


def uniform(words: jax.Array, hi: jax.Array, lo: jax.Array, dtype) -> jax.Array:
    """Uniform on the open interval (0, 1) for counter pairs (hi, lo), which broadcast together;
    the first of each pair's two words."""
    return uniform_open(hash_counters(words, hi, lo)[0], dtype)


def gumbel(words: jax.Array, hi: jax.Array, lo: jax.Array, dtype) -> jax.Array:
    """Standard Gumbel noise (argmax of log-weight + Gumbel = a draw proportional to weight)."""
    return -jnp.log(-jnp.log(uniform(words, hi, lo, dtype)))
