"""Counter-based random words: threefry2x32 of a key and a pair of 32-bit counters.

Both engines draw every random number as a pure function of a row's (or chain's) *global*
coordinates, never of a key split whose shape depends on how the work is chunked or sharded;
that is what makes their results independent of chunk size and device count. This module holds
the hash and the one mapping from words to uniforms; each engine decides what its counters are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32


def hash_counters(key: jax.Array, hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both output words of `threefry2x32(key, (hi, lo))` for every counter pair.

    Args:
      key: [2] uint32 raw threefry key (`keys`).
      hi, lo: integer counters; they broadcast together to some shape [...] and are taken
        modulo 2**32.

    Returns:
      (first, second): two [...] uint32 arrays, the two words each counter pair hashes to.
    """
    hi, lo = jnp.broadcast_arrays(hi.astype(jnp.uint32), lo.astype(jnp.uint32))
    shape, n = hi.shape, hi.size
    # one threefry call over all pairs (not one per pair): cheap to compile and to run
    out = threefry_2x32(key, jnp.concatenate([hi.reshape(-1), lo.reshape(-1)]))
    return out[:n].reshape(shape), out[n:].reshape(shape)


def uniform_open(words: jax.Array, dtype) -> jax.Array:
    """[...] uniform on the open interval (0, 1) from [...] uint32 words.

    The top 24 bits, offset by half a step, so that neither 0 nor 1 is ever drawn (inverse CDFs
    and logs stay finite) and float32 represents every value exactly.
    """
    top = jax.lax.shift_right_logical(words, jnp.uint32(8))
    return (top.astype(dtype) + 0.5) * 2.0**-24
