"""Row layout (shards x blocks x block rows) and the cross-shard reductions used on it.

Rows are padded to `n_shards * n_blocks * block` (small data: one block of a bucketed size, see
`bucket_rows`) and laid out so that shard s holds the global
rows `[s * n_local, (s + 1) * n_local)`, processed as `n_blocks` blocks of `block` rows (a
`lax.scan`, so memory stays bounded and one pass is one dispatch). Padded rows carry mask 0 and
zero features, so they contribute nothing to any statistic. Every reduction goes through the
helpers below, which are the identity when `axis_name` is None (one device) and a collective over
the named mesh axis otherwise: the statistics are summed across shards, and nothing else
crosses devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of the padded data: hashable, so it is part of the compiled program's key."""

    n_features: int
    n_shards: int
    block: int
    n_blocks: int  # per shard

    @property
    def n_local(self) -> int:
        return self.block * self.n_blocks

    @property
    def n_padded(self) -> int:
        return self.n_local * self.n_shards


def bucket_rows(n: int) -> int:
    """The smallest size >= n in 8, 16, 24, 32, 40, 48, 64, 80, ... (ratio about 2**0.25).

    Row counts are rounded up to these sizes (padding carries mask 0), so fits on data of
    similar sizes share one compiled program at the cost of at most ~19% padded rows.
    """
    b = 8
    while b < n:
        b = 8 * math.ceil(b * 1.19 / 8)
    return b


def make_layout(n_samples: int, n_features: int, n_shards: int, block_size: int) -> Layout:
    """Blocks of `block_size` rows per shard; a single smaller block (bucketed) for small data."""
    per_shard = max(1, math.ceil(n_samples / n_shards))
    if per_shard <= block_size:
        return Layout(n_features, n_shards, bucket_rows(per_shard), 1)
    return Layout(n_features, n_shards, int(block_size), math.ceil(per_shard / block_size))


class Blocks(NamedTuple):
    """One shard's rows, centred, as columns: xt [nb, d, B], mask [nb, B], gidx [nb, B]."""

    xt: jax.Array
    mask: jax.Array
    gidx: jax.Array


def psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def shard_index(axis_name) -> jax.Array:
    return jnp.int32(0) if axis_name is None else lax.axis_index(axis_name).astype(jnp.int32)


def global_argmax_pick(values: jax.Array, payload, axis_name):
    """For each leading entry t, the payload of the shard whose `values[t]` is largest.

    values: [T] this shard's best score per t; payload: pytree of [T, ...] arrays. Ties go to
    the lowest shard, which is also the lowest global row, as a plain argmax over all rows.
    """
    if axis_name is None:
        return payload
    allv = lax.all_gather(values, axis_name)  # [S, T]
    best = jnp.argmax(allv, axis=0)  # [T]
    me = shard_index(axis_name)
    mine = best == me

    def pick(p):
        sel = mine.reshape(mine.shape + (1,) * (p.ndim - 1))
        return lax.psum(jnp.where(sel, p, jnp.zeros_like(p)), axis_name)

    return jax.tree.map(pick, payload)


def global_top_k(values: jax.Array, ids: jax.Array, k: int, axis_name):
    """Global top-k of (values, ids) given each shard's local top candidates (1-D arrays)."""
    if axis_name is not None:
        values = lax.all_gather(values, axis_name).reshape(-1)
        ids = lax.all_gather(ids, axis_name).reshape(-1)
    top, pos = lax.top_k(values, k)
    return top, ids[pos]
