"""The compiled search program: blocks of chains, per-source top-k on device, sharded over devices.

Layout. Sources are padded and laid out as `[D * G, S, ...]`: D devices (leading axis sharded over
every mesh axis), G blocks per device (a `lax.scan`, so one dispatch for the whole problem), S
sources per block. A block evaluates its sources' chains in sub-chunks of `c` chains per source
(another `lax.scan`) and merges the flips into a running per-source top-k by perturbation norm,
so memory is O(N * k) plus one block's decoded images, whatever N * Q is.

Sweeps. The perturbation scale is a per-row input. A sweep over K scales replicates the padded
sources K times along each device's block axis (`replicate`, `lay_out_inputs`), so one program
runs every (scale, source, chain) with blocks shaped exactly as in a single search.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from defuse_jax._plumbing.row_layout import RowLayout, pad_rows, plan_rows
from defuse_jax.search.config import SearchConfig
from defuse_jax.search.modes import (
    RUNNERS,
    Candidates,
    decode_and_classify,
    read_logits,
    validity_verdict,
)
from defuse_jax.search.perturb import ChainRng, free_mask, words_per_round


class Layout(NamedTuple):
    """How N sources x C chains are cut into fixed-shape work."""

    rows: RowLayout  # sources: D devices x G blocks per device x S sources per block
    chains: int  # c, chains per source per sub-chunk
    sub_chunks: int  # ceil(C / c)


def plan_layout(num_sources: int, devices: int, config: SearchConfig) -> Layout:
    """Chooses S, c, G so one sub-chunk evaluates about `chunk_size` chains per device."""
    total_chains = config.chains
    if total_chains >= config.chunk_size:
        per_block, chains = 1, config.chunk_size
    else:
        per_block, chains = config.chunk_size // total_chains, total_chains
    rows = plan_rows(num_sources, devices, per_block)
    return Layout(rows, chains, math.ceil(total_chains / chains))


class DeviceOutput(NamedTuple):
    """The program's output (after `unpack`): leading [D * G, S]."""

    best: Candidates  # [D*G, S, k, ...] the k smallest-norm flips per source
    num_flips: jax.Array  # [D*G, S] int32 flips per source before the top-k
    used: jax.Array  # [D*G, S] bool source searched (valid and, if skipping, correct at z0)


def _merge_top_k(best: Candidates, new: Candidates, k: int) -> Candidates:
    """Per-row top-k of two candidate sets [S, k] and [S, m] by smallest norm among found."""
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), best, new)
    score = jnp.where(both.found, -both.norm, jnp.float32(-jnp.inf))
    _, idx = jax.lax.top_k(score, k)  # ties keep the lower index, i.e. earlier chains

    def take(a):
        ix = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
        return jnp.take_along_axis(a, ix, axis=1)

    return jax.tree.map(take, both)


def _empty(sources: int, k: int, latent: int) -> Candidates:
    return Candidates(
        found=jnp.zeros((sources, k), bool),
        z=jnp.zeros((sources, k, latent), jnp.float32),
        pred=jnp.zeros((sources, k), jnp.int32),
        prob=jnp.zeros((sources, k), jnp.float32),
        norm=jnp.full((sources, k), jnp.inf, jnp.float32),
    )


def _search_block(
    decode_fn,
    classify_fn,
    validity_fn,
    config,
    layout,
    free_dims,
    root,
    z0,
    y0,
    src,
    valid,
    noise,
):
    """One block: z0 [S, L], y0/src/valid/noise [S] -> (best [S, k], flips [S], used [S])."""
    s, latent = z0.shape
    if config.skip_misclassified:  # one extra forward per source (1/Q of the search's work)
        x0, logits0 = decode_and_classify(decode_fn, classify_fn, z0, config=config)
        right = valid & (read_logits(logits0)[0] == y0)
        # A source the validity model misreads could give no valid flip: it is skipped too.
        used = right & validity_verdict(validity_fn, x0, y0, right)
    else:
        used = valid
    runner = functools.partial(
        RUNNERS[config.mode], decode_fn, classify_fn, config=config, validity_fn=validity_fn,
        free=free_mask(latent, free_dims),
    )  # fmt: skip

    def sub_chunk(carry, j):
        best, flips = carry
        chain_idx = j * layout.chains + jnp.arange(layout.chains, dtype=jnp.int32)
        rng = ChainRng(root, src, chain_idx, config.rounds, words_per_round(latent))
        cand = runner(z0, y0, rng, noise=noise)  # [S, c, R, ...]
        mask = used[:, None, None] & (chain_idx < config.chains)[None, :, None]
        cand = cand._replace(found=cand.found & mask)
        flips = flips + jnp.sum(cand.found, axis=(1, 2), dtype=jnp.int32)
        flat = jax.tree.map(lambda a: a.reshape((s, -1) + a.shape[3:]), cand)
        return (_merge_top_k(best, flat, config.keep), flips), None

    init = (_empty(s, config.keep, latent), jnp.zeros((s,), jnp.int32))
    (best, flips), _ = jax.lax.scan(sub_chunk, init, jnp.arange(layout.sub_chunks, dtype=jnp.int32))
    return best, flips, used


def build_program(
    decode_fn,
    classify_fn,
    config: SearchConfig,
    layout: Layout,
    mesh: Mesh,
    validity_fn=None,
    free_dims: int | None = None,
):
    """The jitted program.

    (key data [2] uint32, then rows with leading [D*G, S]: z0 [.., L] float32, y0 int32 with -1
    for padding, src int32 (the source index the chains' RNG is derived from), noise float32
    (the noise scale, `perturb.noise_scale`))
    -> (floats [D*G, S, k, L + 2], ints [D*G, S, 2k + 2]): the outputs packed into two arrays
    so that the host fetches them in two transfers (`unpack` reverses it).

    The scale is a traced input, never a compile-time constant, so one program serves every scale
    and a sweep's rows (replicated sources, `src` repeating) compute exactly what a single search
    computes (a constant would let XLA fold it into neighbouring constants and round differently).
    `config.scale` is not read.
    """
    block = functools.partial(
        _search_block, decode_fn, classify_fn, validity_fn, config, layout, free_dims
    )

    def per_device(root, z0, y0, src, noise):  # local leading dim: G blocks
        def body(_, xs):
            z, y, s, n = xs
            return None, block(root, z, jnp.maximum(y, 0), s, y >= 0, n)

        _, (best, flips, used) = jax.lax.scan(body, None, (z0, y0, src, noise))
        floats = jnp.concatenate([best.z, best.prob[..., None], best.norm[..., None]], axis=-1)
        ints = jnp.concatenate(
            [
                best.found.astype(jnp.int32),
                best.pred,
                flips[..., None],
                used.astype(jnp.int32)[..., None],
            ],
            axis=-1,
        )
        return floats, ints

    axes = P(tuple(mesh.axis_names))
    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), axes, axes, axes, axes),
        out_specs=(axes, axes),
        check_vma=False,
    )
    rows = NamedSharding(mesh, axes)
    return jax.jit(sharded, in_shardings=(NamedSharding(mesh, P()),) + (rows,) * 4)


def unpack(floats: np.ndarray, ints: np.ndarray, latent: int) -> DeviceOutput:
    """Host side of `build_program`'s packing: numpy arrays back to a `DeviceOutput`."""
    k = floats.shape[2]
    best = Candidates(
        found=ints[..., :k].astype(bool),
        z=floats[..., :latent],
        pred=ints[..., k : 2 * k],
        prob=floats[..., latent],
        norm=floats[..., latent + 1],
    )
    return DeviceOutput(best, ints[..., 2 * k], ints[..., 2 * k + 1].astype(bool))


_PROGRAMS: dict = {}
_CANONICAL_SCALE = 1.0  # programs read the scale per row: it is no part of their identity


def get_program(
    decode_fn,
    classify_fn,
    config: SearchConfig,
    layout: Layout,
    mesh: Mesh,
    validity_fn=None,
    free_dims: int | None = None,
):
    """Cached `build_program` (a new jit per distinct functions / config but its scale / layout /
    mesh)."""
    config = dataclasses.replace(config, scale=_CANONICAL_SCALE)
    cache_key = (decode_fn, classify_fn, validity_fn, config, layout, mesh, free_dims)
    if cache_key not in _PROGRAMS:
        if len(_PROGRAMS) > 32:  # closures may hold model weights: keep the cache small
            _PROGRAMS.clear()
        _PROGRAMS[cache_key] = build_program(
            decode_fn, classify_fn, config, layout, mesh, validity_fn, free_dims
        )
    return _PROGRAMS[cache_key]


def default_mesh() -> Mesh:
    """A 1-D mesh over every device (all hosts after `jax.distributed.initialize()`)."""
    return Mesh(np.asarray(jax.devices()), ("chains",))


def replicate(layout: Layout, copies: int) -> Layout:
    """The layout of `copies` replicas of the sources (one per swept setting): every device
    holds its G blocks once per replica, so blocks have the same shapes as in a single search."""
    return layout._replace(rows=layout.rows._replace(blocks=layout.rows.blocks * copies))


def lay_out_inputs(
    z0: np.ndarray, y0: np.ndarray, noise: np.ndarray, layout: Layout, mesh: Mesh
) -> tuple:
    """Pads the host inputs to `layout` and replicates them once per entry of `noise`.

    Args:
      z0: [N, L] float32 source codes; y0: [N] int32 labels (padding rows get label -1).
      noise: [K] float32 noise scale of each replica.
      layout: the layout of *one* replica (`plan_layout(N, ...)`).
      mesh: the devices.

    Returns:
      (z0, y0, src, noise) with leading [D * K * G, S] (`replicate(layout, K)`): device d holds
      replica k's blocks d*G .. d*G + G - 1 at its local blocks k*G .. k*G + G - 1. `src` is a
      row's index in the padded single-replica layout, the same in every replica. numpy arrays,
      which the jitted program places with its input shardings; with several processes they
      become global arrays (every process passes the same full inputs).
    """
    latent = z0.shape[1]
    k, (d, g, s) = len(noise), layout.rows
    padded = layout.rows.padded_rows
    z = pad_rows(np.asarray(z0, np.float32), padded).reshape(d, 1, g, s, latent)
    y = pad_rows(np.asarray(y0, np.int32), padded, fill=-1).reshape(d, 1, g, s)
    src = np.arange(padded, dtype=np.int32).reshape(d, 1, g, s)
    scale = np.broadcast_to(np.asarray(noise, np.float32)[None, :, None, None], (d, k, g, s))
    out = tuple(
        np.ascontiguousarray(np.broadcast_to(a, (d, k, g, s) + a.shape[4:])).reshape(
            (d * k * g, s) + a.shape[4:]
        )
        for a in (z, y, src, scale)
    )
    if jax.process_count() == 1:
        return out
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return tuple(jax.make_array_from_callback(a.shape, rows, lambda idx, a=a: a[idx]) for a in out)


def split_replicas(host: DeviceOutput, layout: Layout, copies: int) -> list[DeviceOutput]:
    """Inverse of `lay_out_inputs`'s replication: one `DeviceOutput` [D*G, S] per replica."""

    def part(a: np.ndarray, i: int) -> np.ndarray:
        a = np.asarray(a)
        rest = a.shape[1:]  # (S, ...)
        per = a.reshape((layout.rows.devices, copies, layout.rows.blocks) + rest)
        return per[:, i].reshape((-1,) + rest)

    return [jax.tree.map(lambda a, i=i: part(a, i), host) for i in range(copies)]


def fetch(tree):
    """Device -> host transfer of the output (gathered across hosts if needed)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(a, "is_fully_addressable", True) for a in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
