"""Rows padded to devices x blocks x rows per block: the fixed-shape work of a compiled engine.

Device d holds the global rows `[d * device_rows, (d + 1) * device_rows)` as `blocks` blocks of
`block_rows` rows (a `lax.scan` over blocks, so memory stays bounded and a pass is one dispatch).
Padded rows come last; each engine marks them (a mask of 0, a label of -1) so that they
contribute nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class RowLayout(NamedTuple):
    """Static shape of the padded rows: hashable, so it can be part of a compiled program's key."""

    devices: int  # D
    blocks: int  # G, blocks per device
    block_rows: int  # B, rows per block

    @property
    def device_rows(self) -> int:
        """G * B rows per device."""
        return self.blocks * self.block_rows

    @property
    def padded_rows(self) -> int:
        """D * G * B rows in all."""
        return self.devices * self.device_rows


def bucket_rows(n: int) -> int:
    """The smallest size >= n in 8, 16, 24, 32, 40, 48, 64, 80, ... (ratio about 2**0.25).

    Row counts rounded up to these sizes (the padding carries mask 0) let work on data of
    similar sizes share one compiled program, at the cost of at most ~19% padded rows.
    """
    b = 8
    while b < n:
        b = 8 * math.ceil(b * 1.19 / 8)
    return b


def plan_rows(n_rows: int, devices: int, block_rows: int, *, bucket: bool = False) -> RowLayout:
    """Blocks of `block_rows` rows per device, or one smaller block when a device has fewer rows.

    Args:
      n_rows: N, the rows before padding.
      devices: D, the devices the rows are split over.
      block_rows: the most rows per block.
      bucket: round the rows of a single block up with `bucket_rows` (similar N then share a
        layout), instead of using exactly ceil(N / D).

    Returns:
      The layout; `padded_rows` >= N.
    """
    per_device = max(1, math.ceil(n_rows / devices))
    if per_device <= block_rows:
        return RowLayout(devices, 1, bucket_rows(per_device) if bucket else per_device)
    return RowLayout(devices, math.ceil(per_device / block_rows), int(block_rows))


def pad_rows(a, padded_rows: int, fill=0):
    """[N, ...] -> [padded_rows, ...]: `a` followed by rows of `fill`, in a's dtype.

    numpy stays numpy (padding on the host, before a jitted program sees the shape) and JAX
    arrays, tracers included, stay JAX.
    """
    xp = np if isinstance(a, np.ndarray) else jnp
    pad = xp.full((padded_rows - a.shape[0],) + a.shape[1:], fill, a.dtype)
    return xp.concatenate([a, pad])
