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

from defuse_jax._plumbing.row_layout import RowLayout, plan_rows
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


class Found(NamedTuple):
    """The program's output: each of K replicas' found candidates, compacted on the device.

    Row j < count[r] of replica r is its j-th candidate in (source, perturbation norm) order;
    later rows are filler. P = the padded sources of one replica, k = `SearchConfig.keep`.
    Few arrays, so that the host fetches them in few transfers (`start_fetch`, `fetch_found`).
    """

    z: jax.Array  # [K, P*k, L] float32 latent codes
    extras: jax.Array  # [K, P*k, 5] float32: probability of the prediction, perturbation norm,
    # then the int32 bits of the source index, the prediction and the source label
    meta: jax.Array  # [K, 1 + 2P] int32: count, then flips per source (before the top-k), then
    # 1 per searched source


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
    copies: int = 1,
):
    """The jitted program over `copies` replicas of the sources laid out as `layout` (one
    replica's layout; `lay_out_inputs`).

    (key data [2] uint32, then rows with leading [D*K*G, S]: z0 [.., L] float32, y0 int32 with -1
    for padding, src int32 (the source index the chains' RNG is derived from), noise float32
    (the noise scale, `perturb.noise_scale`)) -> `Found`.

    The found candidates are compacted on the device, so that the host reads only them
    (`fetch_found`) instead of every source's k slots: on a GPU the host's share of a small
    model's search (the transfer and the compaction) was larger than the device's.

    The scale is a traced input, never a compile-time constant, so one program serves every scale
    and a sweep's rows (replicated sources, `src` repeating) compute exactly what a single search
    computes (a constant would let XLA fold it into neighbouring constants and round differently).
    `config.scale` is not read.
    """
    block = functools.partial(
        _search_block, decode_fn, classify_fn, validity_fn, config, layout, free_dims
    )

    def per_device(root, rows):  # local leading dim: G blocks
        def body(_, r):
            z, y, src, noise = unpack_rows(r)
            return None, block(root, z, jnp.maximum(y, 0), src, y >= 0, noise)

        return jax.lax.scan(body, None, rows)[1]

    axes = P(tuple(mesh.axis_names))
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), axes), out_specs=(axes, axes, axes),
        check_vma=False,
    )  # fmt: skip

    def program(root, rows):
        best, flips, used = sharded(root, rows)
        return _compact(best, flips, used, unpack_rows(rows)[1], layout.rows.devices, copies)

    return jax.jit(program, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, axes)))


def _bits(a: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, dtype)


def unpack_rows(rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`lay_out_inputs`'s packed rows [..., L + 3] -> (z0 [..., L] float32, y0 [...] int32,
    src [...] int32, noise [...] float32)."""
    return rows[..., :-3], _bits(rows[..., -3], jnp.int32), _bits(rows[..., -2], jnp.int32), \
        rows[..., -1]  # fmt: skip


def _compact(best: Candidates, flips, used, y0, devices: int, copies: int) -> Found:
    """The blocks' top-k slots [D*K*G, S, k, ...] -> `Found`: per replica, the found slots in
    (source, slot) order, moved to the front by their rank among the found (a scatter)."""

    def by_replica(a):  # [D*K*G, S, ...] -> [K, P, ...], P = D*G*S in source order
        a = a.reshape((devices, copies, -1) + a.shape[2:])
        return jnp.swapaxes(a, 0, 1).reshape((copies, -1) + a.shape[3:])

    found = by_replica(best.found)  # [K, P, k]
    k = found.shape[-1]
    found = found.reshape(copies, -1)  # [K, P*k]
    rank = jnp.cumsum(found, axis=1, dtype=jnp.int32) - 1
    rows = found.shape[1]
    dest = jnp.where(found, rank, rows)  # out of range: dropped
    replica = jnp.arange(copies)[:, None]
    slot_row = jnp.arange(rows) // k  # the slot's row in [K, P]

    def per_slot(a):  # [D*K*G, S, (k)] -> [K, P*k]
        a = by_replica(a)
        return a.reshape(copies, rows) if a.ndim == 3 else a[:, slot_row]

    def scatter(a):  # [K, P*k, ...] -> its found rows first
        return jnp.zeros_like(a).at[replica, dest].set(a, mode="drop")

    source = jnp.broadcast_to(slot_row.astype(jnp.int32), (copies, rows))  # its row of [K, P]
    ints = [source, per_slot(best.pred), per_slot(y0)]
    extras = [per_slot(best.prob), per_slot(best.norm)] + [_bits(a, jnp.float32) for a in ints]
    meta = [jnp.sum(found, axis=1, dtype=jnp.int32)[:, None], by_replica(flips),
            by_replica(used).astype(jnp.int32)]  # fmt: skip
    return Found(
        z=scatter(by_replica(best.z).reshape(copies, rows, -1)),
        extras=scatter(jnp.stack(extras, axis=-1)),
        meta=jnp.concatenate(meta, axis=1),
    )


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
    copies: int = 1,
):
    """Cached `build_program` (a new jit per distinct functions / config but its scale / layout /
    mesh / copies)."""
    config = dataclasses.replace(config, scale=_CANONICAL_SCALE)
    cache_key = (decode_fn, classify_fn, validity_fn, config, layout, mesh, free_dims, copies)
    if cache_key not in _PROGRAMS:
        if len(_PROGRAMS) > 32:  # closures may hold model weights: keep the cache small
            _PROGRAMS.clear()
        _PROGRAMS[cache_key] = build_program(
            decode_fn, classify_fn, config, layout, mesh, validity_fn, free_dims, copies
        )
    return _PROGRAMS[cache_key]


def default_mesh() -> Mesh:
    """A 1-D mesh over every device (all hosts after `jax.distributed.initialize()`)."""
    return Mesh(np.asarray(jax.devices()), ("chains",))


def lay_out_inputs(
    z0: np.ndarray, y0: np.ndarray, noise: np.ndarray, layout: Layout, mesh: Mesh
) -> np.ndarray | jax.Array:
    """Pads the host inputs to `layout`, replicates them once per entry of `noise`, and packs
    them into one array (one transfer to the device; `unpack_rows` reverses it).

    Args:
      z0: [N, L] float32 source codes; y0: [N] int32 labels (padding rows get label -1).
      noise: [K] float32 noise scale of each replica.
      layout: the layout of *one* replica (`plan_layout(N, ...)`).
      mesh: the devices.

    Returns:
      [D * K * G, S, L + 3] float32 rows: z0, then the int32 bits of y0 and of src (a row's
      index in the padded single-replica layout, the same in every replica), then the noise
      scale. Device d holds replica k's blocks d*G .. d*G + G - 1 at its local blocks
      k*G .. k*G + G - 1. A numpy array, which the jitted program places with its input
      sharding; with several processes a global array (every process passes the same inputs).
    """
    latent = z0.shape[1]
    k, (d, g, s) = len(noise), layout.rows
    padded = layout.rows.padded_rows
    one = np.empty((padded, latent + 3), np.float32)  # one replica, in source order
    one[: len(z0), :latent] = z0
    one[len(z0) :, :latent] = 0.0
    ints = one[:, latent : latent + 2].view(np.int32)
    ints[: len(y0), 0] = y0
    ints[len(y0) :, 0] = -1  # padding
    ints[:, 1] = np.arange(padded, dtype=np.int32)
    if k == 1:
        one[:, latent + 2] = noise[0]
        rows = one
    else:
        rows = np.empty((d, k, g * s, latent + 3), np.float32)
        rows[:] = one.reshape(d, 1, g * s, latent + 3)
        rows[..., latent + 2] = np.asarray(noise, np.float32)[None, :, None]
    rows = rows.reshape(d * k * g, s, latent + 3)
    if jax.process_count() == 1:
        return rows
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return jax.make_array_from_callback(rows.shape, sharding, lambda idx: rows[idx])


class HostFound(NamedTuple):
    """One replica's `Found` on the host, cut to its count (numpy views)."""

    z: np.ndarray  # [M, L] float32
    prob: np.ndarray  # [M] float32
    norm: np.ndarray  # [M] float32
    source: np.ndarray  # [M] int32
    pred: np.ndarray  # [M] int32
    label: np.ndarray  # [M] int32
    flips: np.ndarray  # [P] int32 flips per padded source
    used: np.ndarray  # [P] bool


@functools.partial(jax.jit, static_argnums=1)
def _prefix(found: Found, rows: int) -> tuple[jax.Array, jax.Array]:
    return found.z[:, :rows], found.extras[:, :rows]


WHOLE_COPY_BYTES = 64 << 20  # candidates up to this size are copied whole, as soon as they exist


def copied_whole(found: Found) -> bool:
    """Whether the host reads `found`'s candidates whole: on one host, when they hold at most
    `WHOLE_COPY_BYTES` (filler included). Otherwise `fetch_found` reads a prefix."""
    return (
        all(a.is_fully_addressable for a in found)  # several hosts: gathered on fetch
        and found.z.nbytes + found.extras.nbytes <= WHOLE_COPY_BYTES
    )


def start_fetch(found: Found) -> None:
    """Starts the device -> host copies that need nothing from the host: the counts, and the
    candidates themselves when they are read whole (`copied_whole`). They run as soon as the
    program ends, beside whatever the device runs next (another search)."""
    if not all(a.is_fully_addressable for a in found):
        return
    found.meta.copy_to_host_async()
    if copied_whole(found):
        found.z.copy_to_host_async()
        found.extras.copy_to_host_async()


def fetch_found(found: Found) -> list[HostFound]:
    """Device -> host, one `HostFound` per replica (after `start_fetch`, the copies it started).

    Candidates read whole (`copied_whole`) cross in one transfer. Larger ones come after the
    counts as a prefix that holds every replica's (its length rounded up to a power of two, so
    that few slicing programs compile): one more round trip and a slicing program, which queues
    behind anything the device runs meanwhile, but no filler crosses (a search that keeps every
    flip has mostly filler).
    """
    meta = fetch(found.meta)
    count, p = meta[:, 0], (meta.shape[1] - 1) // 2
    if copied_whole(found):
        z, extras = fetch((found.z, found.extras))
    else:
        most = int(count.max(initial=0))
        rows = min(found.z.shape[1], 1 << max(most - 1, 0).bit_length()) if most else 0
        z, extras = fetch(_prefix(found, rows))
    ints = extras[..., 2:].view(np.int32)
    return [
        HostFound(
            z=z[r, :c],
            prob=extras[r, :c, 0],
            norm=extras[r, :c, 1],
            source=ints[r, :c, 0],
            pred=ints[r, :c, 1],
            label=ints[r, :c, 2],
            flips=meta[r, 1 : 1 + p],
            used=meta[r, 1 + p :].astype(bool),
        )
        for r, c in enumerate(count.tolist())
    ]


def fetch(tree):
    """Device -> host transfer of the output (gathered across hosts if needed)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(a, "is_fully_addressable", True) for a in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
