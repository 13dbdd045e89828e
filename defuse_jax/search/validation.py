"""Early, clear errors for bad search input (raised before anything is compiled)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax.search.config import SearchConfig


@functools.lru_cache(maxsize=64)
def _logits_shape(decode_fn, classify_fn, latent_dim: int) -> jax.ShapeDtypeStruct:
    """Abstract evaluation only (shapes, no compile); cached so repeated searches skip tracing."""
    spec = jax.ShapeDtypeStruct((1, latent_dim), jnp.float32)
    try:
        return jax.eval_shape(lambda zz: classify_fn(decode_fn(zz)), spec)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"classify_fn(decode_fn(z)) failed on z of shape (1, {latent_dim}): {e}"
        ) from e


def check_inputs(
    decode_fn, classify_fn, z0, y0, *, config: SearchConfig
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates and normalises `z0`, `y0`.

    Args:
      decode_fn: z [B, L] -> x [B, ...].
      classify_fn: x -> logits [B, C].
      z0: [N, L] latent means of the source points.
      y0: [N] integer labels.
      config: the search configuration (type-checked here).

    Returns:
      (z0 as float32 numpy [N, L], y0 as int32 numpy [N], number of classes C).

    Raises:
      ValueError: with what was wrong and how to fix it.
    """
    if not isinstance(config, SearchConfig):
        raise ValueError(f"config must be a SearchConfig, got {type(config).__name__}.")
    if not callable(decode_fn) or not callable(classify_fn):
        raise ValueError("decode_fn and classify_fn must be callables on batches.")
    z = np.asarray(z0)
    y = np.asarray(y0)
    if z.ndim != 2:
        raise ValueError(f"z0 must be [num_sources, latent_dim]; got shape {z.shape}.")
    if z.shape[0] == 0:
        raise ValueError("z0 has zero source points: there is nothing to search from.")
    if z.shape[1] == 0:
        raise ValueError("z0 has latent_dim 0.")
    if not np.issubdtype(z.dtype, np.floating):
        raise ValueError(f"z0 must be floating point, got dtype {z.dtype}.")
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(
            f"y0 must be [num_sources] matching z0 [{z.shape[0]}, {z.shape[1]}]; got shape "
            f"{y.shape}. Pass one integer label per source point."
        )
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"y0 must hold integer labels, got dtype {y.dtype}.")
    z = z.astype(np.float32)
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"z0 has non-finite values (NaN/inf) in rows {rows}"
            f"{' ...' if bad.sum() > 5 else ''}; drop or fix those source points."
        )

    out = _logits_shape(decode_fn, classify_fn, z.shape[1])
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise ValueError(
            f"classify_fn(decode_fn(z)) must return logits [batch, classes]; "
            f"got shape {out.shape} for a batch of 1."
        )
    num_classes = int(out.shape[1])
    if num_classes < 2:
        raise ValueError(f"the classifier has {num_classes} class(es); need at least 2.")
    y = y.astype(np.int64)
    out_of_range = (y < 0) | (y >= num_classes)
    if out_of_range.any():
        raise ValueError(
            f"y0 has labels outside [0, {num_classes}) (the classifier's {num_classes} classes): "
            f"e.g. {y[out_of_range][:5].tolist()} at rows "
            f"{np.flatnonzero(out_of_range)[:5].tolist()}."
        )
    return z, y.astype(np.int32), num_classes


def as_key(key, seed: int) -> jax.Array:
    """Raw threefry key data [2] uint32 from `key` (typed or raw PRNGKey), or from `seed`."""
    if key is None:
        key = jax.random.key(seed)
    arr = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.shape != ():
            raise ValueError(f"key must be a single PRNG key, got key array shape {arr.shape}.")
        data = jax.random.key_data(arr)
        if data.shape != (2,) or data.dtype != jnp.uint32:  # other PRNG impl: derive threefry
            data = jax.random.bits(arr, (2,), jnp.uint32)
        return np.asarray(data)
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise ValueError(
            f"key must be a jax.random.key or a raw uint32[2] PRNGKey; got {arr.dtype}{arr.shape}."
        )
    return np.asarray(arr)
