"""Initial responsibilities (scikit-learn's `init_params`) and the exact moments they imply.

Each method yields a function that returns the [K, B] responsibilities of one block of rows:

- "kmeans": one-hot labels of k-means (k-means++ seeding, then Lloyd), as scikit-learn;
- "k-means++": one-hot on the K rows chosen by k-means++ seeding alone;
- "random_from_data": one-hot on K distinct rows drawn uniformly;
- "random": uniform random responsibilities, normalised per row;
- a user array `init_resp` [n, K] (a defuse-jax extension, for identical starts across
  implementations).

The initial (nk, xk, sk) are then computed with the exactly centred scatter, two passes over the
rows, as scikit-learn's `_estimate_gaussian_parameters` does, so a one-point component starts at
`reg_covar` exactly, as it does there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from defuse_jax.mixture import _kmeans, _random
from defuse_jax.mixture._shards import Blocks, global_top_k, psum
from defuse_jax.mixture.gaussian import centered_moments

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")


def responsibility_fn(
    method: str,
    blocks: Blocks,
    n_components: int,
    key_words: jax.Array,
    n_samples: jax.Array,
    axis_name,
    *,
    n_active: jax.Array | None = None,
    n_trials: jax.Array | None = None,
):
    """A function (xt, mask, gidx, aux) -> [K, B] for the chosen method.

    Only the first `n_active` (traced int32) of the K components get responsibilities, as a
    program compiled for exactly `n_active` components would give them (`n_trials`: its
    k-means++ candidates per center); the rest get zeros. None: all K.
    """
    k = n_components
    dtype = blocks.xt.dtype
    on = None if n_active is None else jnp.arange(k) < n_active  # [K]
    seeding = dict(n_active=n_active, n_trials=n_trials)

    if method == "kmeans":
        seeds, _ = _kmeans.kmeans_plusplus(blocks, k, key_words, axis_name, **seeding)
        centers = _kmeans.lloyd(blocks, seeds, n_samples, axis_name, active=on)
        return lambda xt, mask, gidx, aux: _kmeans.assign(xt, centers, on) * mask[None, :]

    if method in ("k-means++", "random_from_data"):
        if method == "k-means++":
            _, ids = _kmeans.kmeans_plusplus(blocks, k, key_words, axis_name, **seeding)
        else:
            u = _random.uniform(key_words, jnp.uint32(0), blocks.gidx, dtype)
            u = jnp.where(blocks.mask > 0, u, -1).reshape(-1)
            kk = min(k, u.shape[0])
            top, pos = lax.top_k(u, kk)
            _, ids = global_top_k(top, blocks.gidx.reshape(-1)[pos], k, axis_name)

        def onehot(xt, mask, gidx, aux):
            hit = gidx[None, :] == ids[:, None]
            if on is not None:
                hit = hit & on[:, None]
            return hit.astype(dtype) * mask[None, :]

        return onehot

    if method == "random":
        comp = jnp.arange(k, dtype=jnp.uint32)[:, None] + jnp.uint32(1)

        def rand(xt, mask, gidx, aux):
            u = _random.uniform(key_words, comp, gidx[None, :], dtype)
            if on is not None:
                u = jnp.where(on[:, None], u, 0)
            return u / jnp.sum(u, axis=0, keepdims=True) * mask[None, :]

        return rand

    if method == "given":
        return lambda xt, mask, gidx, aux: aux * mask[None, :]

    raise ValueError(f"unknown init method {method!r}")


def initial_moments(
    resp_fn,
    blocks: Blocks,
    aux,
    n_components: int,
    covariance_type: str,
    reg_covar: float,
    axis_name,
):
    """(nk, xk, sk) of the initial responsibilities, exactly centred (two passes)."""
    k = n_components
    nb, d, b = blocks.xt.shape
    dtype = blocks.xt.dtype
    eps = jnp.finfo(dtype).eps
    scan_in = (blocks.xt, blocks.mask, blocks.gidx, aux)

    def first(carry, inp):
        xt, mask, gidx, a = inp
        r = resp_fn(xt, mask, gidx, a)
        return (carry[0] + jnp.sum(r, axis=1), carry[1] + r @ xt.T), None

    (s1, sx), _ = lax.scan(first, (jnp.zeros((k,), dtype), jnp.zeros((k, d), dtype)), scan_in)
    s1, sx = psum(s1, axis_name), psum(sx, axis_name)
    nk = s1 + 10 * eps
    xk = sx / nk[:, None]

    full = covariance_type in ("full", "tied")
    shape = (k, d, d) if full else (k, d)

    def second(carry, inp):
        xt, mask, gidx, a = inp
        r = resp_fn(xt, mask, gidx, a)
        diff = (xt[None, :, :] - xk[:, :, None]) * mask[None, None, :]  # [K, d, B]
        if full:
            scat = lax.dot_general(r[:, None, :] * diff, diff, (((2,), (2,)), ((0,), (0,))))
        else:
            scat = jnp.einsum("kb,kib->ki", r, diff * diff)
        return carry + scat, None

    scatter, _ = lax.scan(second, jnp.zeros(shape, dtype), scan_in)
    scatter = psum(scatter, axis_name)
    sk = centered_moments(nk, xk, scatter, covariance_type, reg_covar)
    return nk, xk, sk
