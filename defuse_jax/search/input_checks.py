"""The search's input checks: early, clear errors for bad decode/classify functions, sources,
labels or configuration (raised before anything is compiled)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax.search.config import SearchConfig


@functools.lru_cache(maxsize=64)
def _forward_shapes(
    decode_fn, classify_fn, latent_dim: int, compute_dtype: str
) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """(decoded, logits) shapes and dtypes for z [1, L] in the compute dtype: abstract evaluation
    only (no compile); cached so repeated searches skip tracing."""
    spec = jax.ShapeDtypeStruct((1, latent_dim), jnp.dtype(compute_dtype))
    try:
        return jax.eval_shape(lambda zz: (x := decode_fn(zz), classify_fn(x)), spec)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        hint = (
            ""
            if compute_dtype == "float32"
            else " (if the weights are float32, cast them: models.cast_params, or bind with "
            f"models.search_functions(..., compute_dtype={compute_dtype!r}))"
        )
        raise ValueError(
            f"classify_fn(decode_fn(z)) failed on z of shape (1, {latent_dim}) and dtype "
            f"{compute_dtype}{hint}: {e}"
        ) from e


def _check_compute_dtype(decoded, logits, compute_dtype: str) -> None:
    """Warns when a bfloat16 search would silently compute in float32 (float32 weights win the
    dtype promotion, so only z was cast): the caller owns the weights' dtype."""
    if compute_dtype == "float32":
        return
    wide = [
        f"{what} returned {out.dtype}"
        for what, out in (("decode_fn", decoded), ("classify_fn", logits))
        if jnp.issubdtype(out.dtype, jnp.floating) and jnp.finfo(out.dtype).bits > 16
    ]
    if wide:
        warnings.warn(
            f"compute_dtype={compute_dtype!r} but {' and '.join(wide)} for {compute_dtype} "
            "codes: their weights are wider, so the forward pass runs in float32. Cast the "
            "weights (models.cast_params, or bind with models.search_functions(..., "
            f"compute_dtype={compute_dtype!r})).",
            UserWarning,
            stacklevel=5,
        )


def check_inputs(
    decode_fn, classify_fn, z0, y0, *, config: SearchConfig, validity_fn=None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates and normalises `z0`, `y0`.

    Args:
      decode_fn: z [B, L] -> x [B, ...].
      classify_fn: x -> logits [B, C].
      z0: [N, L] latent means of the source points.
      y0: [N] integer labels.
      config: the search configuration (type-checked here).
      validity_fn: None, or x -> logits [B, C] over the classifier's C classes ([G, B, C]: a
        committee of G auxiliary classifiers that must all read the source).

    Returns:
      (z0 as float32 numpy [N, L], y0 as int32 numpy [N], number of classes C).

    Raises:
      ValueError: with what was wrong and how to fix it.
    """
    if not isinstance(config, SearchConfig):
        raise ValueError(f"config must be a SearchConfig, got {type(config).__name__}.")
    if not callable(decode_fn) or not callable(classify_fn):
        raise ValueError("decode_fn and classify_fn must be callables on batches.")
    if (config.validity == "none") != (validity_fn is None):
        raise ValueError(
            f"SearchConfig(validity={config.validity!r}) "
            + ("needs validity_fn, the auxiliary classifier's x -> logits."
               if validity_fn is None else
               "was given a validity_fn: set validity='oracle' to search with it, or drop "
               "validity_fn.")
        )  # fmt: skip
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
    z = np.asarray(z, np.float32)  # no copy when it is one already
    if not np.isfinite(z.sum()):  # one pass; NaN/inf anywhere (or an overflow) shows here
        bad = ~np.isfinite(z).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise ValueError(
                f"z0 has non-finite values (NaN/inf) in rows {rows}"
                f"{' ...' if bad.sum() > 5 else ''}; drop or fix those source points."
            )

    decoded, out = _forward_shapes(decode_fn, classify_fn, z.shape[1], config.compute_dtype)
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise ValueError(
            f"classify_fn(decode_fn(z)) must return logits [batch, classes]; "
            f"got shape {out.shape} for a batch of 1."
        )
    num_classes = int(out.shape[1])
    if num_classes < 2:
        raise ValueError(f"the classifier has {num_classes} class(es); need at least 2.")
    _check_compute_dtype(decoded, out, config.compute_dtype)
    if validity_fn is not None:
        if not callable(validity_fn):
            raise ValueError("validity_fn must be None or a callable on batches of images.")
        _, aux = _forward_shapes(decode_fn, validity_fn, z.shape[1], config.compute_dtype)
        # One auxiliary classifier [batch, C], or a committee that must all agree [G, batch, C]
        if len(aux.shape) not in (2, 3) or tuple(aux.shape[-2:]) != tuple(out.shape):
            raise ValueError(
                f"validity_fn(decode_fn(z)) must return logits over the classifier's "
                f"{num_classes} classes, [batch, {num_classes}] (or [models, batch, "
                f"{num_classes}] for several that must all read the source); got shape "
                f"{tuple(aux.shape)} for a batch of 1."
            )
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        out_of_range = (y < 0) | (y >= num_classes)
        raise ValueError(
            f"y0 has labels outside [0, {num_classes}) (the classifier's {num_classes} classes): "
            f"e.g. {y[out_of_range][:5].tolist()} at rows "
            f"{np.flatnonzero(out_of_range)[:5].tolist()}."
        )
    return z, y.astype(np.int32), num_classes
