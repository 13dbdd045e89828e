"""Batched inference: one jitted function over fixed-size batches of host arrays.

Every batch has the same shape (the last one is padded by repeating row 0), so a function
compiles once whatever the number of rows; outputs are trimmed back to the real rows. Training
metrics (`training.evaluate`), predictions on decoded codes (`evaluation.predict`) and the search
stage's encoding (`identification.encode_sources`) all go through here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def map_batches(
    fn: Callable[[dict[str, jax.Array]], Any],
    data: Mapping[str, np.ndarray],
    *,
    batch_size: int,
) -> Any:
    """`fn` over `data` in batches of `batch_size` rows, outputs concatenated on the host.

    Args:
      fn: batch {name: [B, ...]} -> pytree of [B, ...] arrays (typically jitted).
      data: host arrays with a common leading dimension N.
      batch_size: rows per call (B).

    Returns:
      The pytree of `fn`'s outputs as NumPy arrays with leading dimension N; None when N = 0
      (there is no output shape to give).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(next(iter(data.values())))
    if n == 0:
        return None
    parts = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        rows = np.where(idx < n, idx, 0)  # pad with row 0: one shape, one compile
        real = min(batch_size, n - start)
        out = fn({k: jnp.asarray(v[rows]) for k, v in data.items()})
        parts.append(jax.tree.map(lambda a, real=real: np.asarray(a)[:real], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
