"""k-means in JAX for the "kmeans" and "k-means++" initialisations, on sharded row blocks.

`kmeans_plusplus` is scikit-learn's greedy k-means++ (2 + log(K) candidate draws per center, the
candidate that most reduces the potential is kept); the draws proportional to the squared
distance use the Gumbel-max trick on counter-based noise, so each shard scores its own rows and
only the best score per candidate crosses devices. `lloyd` is Lloyd's algorithm with
scikit-learn's KMeans defaults (at most 300 iterations, stop when the squared center shift is at
most 1e-4 times the mean feature variance); an empty cluster keeps its previous center.

Both can work on the first centers of K alone (see `_engine.Hyper.n_active`): `kmeans_plusplus`
seeds the first `n_active` with the candidate draws of `n_active` centers, `lloyd` and `assign`
leave the centers outside the [K] bool `active` alone. So fits with different numbers of
components can share one compiled program and still give what a program compiled for exactly
`n_active` centers gives. The candidates are drawn from counter-based noise, so the first T of
T_max draws are the same whatever T_max.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from defuse_jax.mixture import _random
from defuse_jax.mixture._shards import Blocks, global_argmax_pick, psum


def _sqdist(blocks: Blocks, x2: jax.Array, centers: jax.Array) -> jax.Array:
    """[T, nb, B] squared distances from every row to each of T centers."""
    cross = jnp.einsum("td,ndb->tnb", centers, blocks.xt)
    c2 = jnp.sum(centers * centers, axis=1)
    return jnp.maximum(x2[None] + c2[:, None, None] - 2 * cross, 0)


def sample_rows(blocks: Blocks, weights: jax.Array, words: jax.Array, n_draws: int, axis_name):
    """`n_draws` rows drawn with replacement with probability proportional to `weights`.

    weights: [nb, B] non-negative (padded rows are never drawn). Returns (points [T, d],
    global row ids [T]).
    """
    dtype = blocks.xt.dtype
    trial = jnp.arange(n_draws, dtype=jnp.uint32)[:, None, None]
    g = _random.gumbel(words, trial, blocks.gidx[None], dtype)  # [T, nb, B]
    tiny = jnp.asarray(1e-30 if dtype == jnp.float32 else 1e-300, dtype)
    logw = jnp.log(jnp.maximum(weights, 0) + tiny)
    score = jnp.where(blocks.mask[None] > 0, logw[None] + g, -jnp.inf)
    flat = score.reshape(n_draws, -1)
    pos = jnp.argmax(flat, axis=1)
    best = jnp.take_along_axis(flat, pos[:, None], axis=1)[:, 0]
    nb, d, b = blocks.xt.shape
    blk, col = pos // b, pos % b
    points = blocks.xt[blk, :, col]  # [T, d]
    ids = blocks.gidx[blk, col]
    return global_argmax_pick(best, (points, ids), axis_name)


def local_trials(n_clusters: int) -> int:
    """scikit-learn's candidate draws per center of k-means++ seeding."""
    return 2 + int(math.log(n_clusters))


def kmeans_plusplus(
    blocks: Blocks,
    n_clusters: int,
    words: jax.Array,
    axis_name,
    n_local_trials: int | None = None,
    *,
    n_active: jax.Array | None = None,
    n_trials: jax.Array | None = None,
):
    """Greedy k-means++ seeding: (centers [K, d], global row ids of the chosen rows [K]).

    n_active, n_trials: traced int32 scalars: seed only the first `n_active` of the K centers,
    each from `n_trials` of the `n_local_trials` candidates (the rest stay zero).
    """
    if n_local_trials is None:
        n_local_trials = local_trials(n_clusters)
    dtype = blocks.xt.dtype
    d = blocks.xt.shape[1]
    x2 = jnp.sum(blocks.xt * blocks.xt, axis=1)
    first, first_id = sample_rows(blocks, blocks.mask, _random.stream_key(words, 0), 1, axis_name)
    closest = _sqdist(blocks, x2, first)[0]
    centers = jnp.zeros((n_clusters, d), dtype).at[0].set(first[0])
    ids = jnp.zeros((n_clusters,), jnp.uint32).at[0].set(first_id[0])

    def step(c, carry):
        closest, centers, ids = carry
        cand, cand_ids = sample_rows(
            blocks, closest * blocks.mask, _random.stream_key(words, c), n_local_trials, axis_name
        )
        dist = jnp.minimum(closest[None], _sqdist(blocks, x2, cand))
        pots = psum(jnp.sum(dist * blocks.mask[None], axis=(1, 2)), axis_name)
        if n_trials is not None:
            pots = jnp.where(jnp.arange(n_local_trials) < n_trials, pots, jnp.inf)
        best = jnp.argmin(pots)
        return dist[best], centers.at[c].set(cand[best]), ids.at[c].set(cand_ids[best])

    upper = n_clusters if n_active is None else n_active
    _, centers, ids = lax.fori_loop(1, upper, step, (closest, centers, ids))
    return centers, ids


def assign(xt: jax.Array, centers: jax.Array, active: jax.Array | None = None) -> jax.Array:
    """[K, B] one-hot nearest-center indicators of a block of columns (among the centers where
    the [K] bool `active` holds, when given)."""
    k = centers.shape[0]
    score = jnp.sum(centers * centers, axis=1)[:, None] - 2 * (centers @ xt)
    if active is not None:
        score = jnp.where(active[:, None], score, jnp.inf)
    lab = jnp.argmin(score, axis=0)
    return (lab[None, :] == jnp.arange(k)[:, None]).astype(xt.dtype)


def lloyd(
    blocks: Blocks,
    centers: jax.Array,
    n_samples: jax.Array,
    axis_name,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    active: jax.Array | None = None,
) -> jax.Array:
    """Lloyd iterations from `centers`; returns the final centers (those not `active`, a [K]
    bool, are never assigned a row and keep their place)."""
    k, d = centers.shape
    dtype = centers.dtype
    mean = psum(jnp.sum(blocks.xt * blocks.mask[:, None, :], axis=(0, 2)), axis_name) / n_samples
    sq = psum(jnp.sum(blocks.xt * blocks.xt, axis=(0, 2)), axis_name) / n_samples
    threshold = jnp.mean(jnp.maximum(sq - mean * mean, 0)) * tol

    def stats(c):
        def blk(carry, inp):
            xt, m = inp
            oh = assign(xt, c, active) * m[None, :]
            return (carry[0] + oh @ xt.T, carry[1] + jnp.sum(oh, axis=1)), None

        init = (jnp.zeros((k, d), dtype), jnp.zeros((k,), dtype))
        (sums, counts), _ = lax.scan(blk, init, (blocks.xt, blocks.mask))
        return psum(sums, axis_name), psum(counts, axis_name)

    def cond(s):
        it, _, shift = s
        return (it < max_iter) & (shift > threshold)

    def body(s):
        it, c, _ = s
        sums, counts = stats(c)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)
        return it + 1, new, jnp.sum((new - c) ** 2)

    init = (jnp.int32(0), centers, jnp.asarray(jnp.inf, dtype))
    _, centers, _ = lax.while_loop(cond, body, init)
    return centers
