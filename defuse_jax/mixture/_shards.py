"""A shard's rows as blocks, and the reductions across shards used on them.

Rows are padded to a `_plumbing.row_layout.RowLayout` (shards x blocks x block rows): shard s
holds the global rows `[s * device_rows, (s + 1) * device_rows)`, processed as blocks (a
`lax.scan`, so memory stays bounded and one pass is one dispatch). Padded rows carry mask 0 and
zero features, so they contribute nothing to any statistic. Every reduction goes through the
helpers below, which are the identity when `axis_name` is None (one device) and a collective over
the named mesh axis otherwise: the statistics are summed across shards, and nothing else
crosses devices.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


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
