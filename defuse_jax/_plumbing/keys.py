"""The raw [2] uint32 threefry key that counter-based words (`threefry`) are hashed with.

There are two derivations, and each engine keeps its own because its documented results depend
on it: the search hashes with the key's own data (`key_data_words`), the mixture fits with words
drawn from the key (`drawn_key_words`). Unifying them would change one engine's random stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _is_typed(key) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def drawn_key_words(key: jax.Array) -> jax.Array:
    """[2] uint32 words drawn from `key` (`jax.random.bits`); what the mixture fits hash with.

    Args:
      key: a typed JAX PRNG key of any implementation, or raw key data of the default one.
        Traceable: the fits call it inside jit and vmap.
    """
    if not _is_typed(key):
        key = jax.random.wrap_key_data(key)
    return jax.random.bits(key, (2,), jnp.uint32)


def key_data_words(key, seed: int) -> np.ndarray:
    """[2] uint32 key data of `key` itself (no derivation); what the search hashes with.

    Args:
      key: a single typed PRNG key (`jax.random.key`), a raw uint32[2] `PRNGKey`, or None for
        `jax.random.key(seed)`. A typed key of another implementation than threefry has other
        key data, so its words are drawn from it (`drawn_key_words`).
      seed: used only when `key` is None.

    Returns:
      numpy [2] uint32.

    Raises:
      ValueError: `key` is a key array, or raw data of another shape or dtype.
    """
    if key is None:
        key = jax.random.key(seed)
    arr = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if _is_typed(arr):
        if arr.shape != ():
            raise ValueError(f"key must be a single PRNG key, got key array shape {arr.shape}.")
        data = jax.random.key_data(arr)
        if data.shape != (2,) or data.dtype != jnp.uint32:  # another PRNG implementation
            data = drawn_key_words(arr)
        return np.asarray(data)
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise ValueError(
            f"key must be a jax.random.key or a raw uint32[2] PRNGKey; got {arr.dtype}{arr.shape}."
        )
    return np.asarray(arr)
