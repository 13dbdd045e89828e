"""The three search modes, each a fixed-shape function of one block of chains.

Each `run_<mode>` takes the block's source codes `z0: [S, L]`, labels `y0: [S]`, the chains'
randomness `rng` (S sources x c chains), `noise: [S]` (each source row's noise scale, a traced
input; see `perturb.noise_scale`) and `free: [L]` (1 where a coordinate may move, 0 where it
stays the source's: a conditional VAE's class block; `perturb.free_mask`), and returns
`Candidates` with leading shape [S, c, R] (R = rounds per chain): every evaluated latent code,
whether it flips the prediction, and its prediction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from defuse_jax.search.config import SearchConfig
from defuse_jax.search.perturb import ChainRng, sample_offset, unit_direction

DecodeFn = Callable[[jax.Array], jax.Array]
ClassifyFn = Callable[[jax.Array], jax.Array]
ValidityFn = Callable[[jax.Array], jax.Array] | None


class Candidates(NamedTuple):
    """Evaluated latent codes of a block of chains (leading dims `...` = [S, c, R] or [S, k])."""

    found: jax.Array  # [...] bool: prediction != source label (and, with a validity model, it
    # still reads the source label)
    z: jax.Array  # [..., L] float32
    pred: jax.Array  # [...] int32 predicted label
    prob: jax.Array  # [...] float32 probability of the predicted label
    norm: jax.Array  # [...] float32 ||z - z0||_2


def decode_and_classify(
    decode_fn: DecodeFn, classify_fn: ClassifyFn, z: jax.Array, *, config: SearchConfig
) -> tuple[jax.Array, jax.Array]:
    """Decode and classify in the compute dtype: z [B, L] -> (images [B, ...], float32 logits
    [B, C])."""
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    x = decode_fn(z.astype(dtype))
    return x, classify_fn(x).astype(jnp.float32)


# The validity model reads the rows that need a verdict (gathered to the front) in one slice of
# B / s rows for the first s here whose slice holds them all, so that up to B/8 of them it reads
# at most twice as many rows as need it (or B/64), in one step; beyond B/8 it loops over slices of
# B/8. At the 2% flip rate of a trained digits run a single slice size of B/8 read six times the
# flips: with the oracle committee the search took 2.4-2.6x the unconstrained one's time; with
# these, 1.5x (`defuse-jax sweep` on a trained run, docs/results.md).
VALIDITY_SLICES = (64, 32, 16, 8)


def validity_verdict(
    validity_fn: ValidityFn, x: jax.Array, y: jax.Array, need: jax.Array
) -> jax.Array:
    """Whether the validity model still reads the source label, on the rows that need to know.

    Only the needed rows are read (a changed prediction needs a verdict, an unchanged one does
    not), so the cost follows the flip rate, not the batch: they are gathered first, and read in
    slices of the smallest of B/64, B/32, B/16 and B/8 rows that holds them all
    (`VALIDITY_SLICES`, one compiled branch each), or in as many slices of B/8 as they fill.

    Args:
      validity_fn: x -> logits [B, C] of the auxiliary classifier, or [G, B, C] of G of them
        that must all read y (a committee); or None.
      x: [B, ...] the decoded images; y: [B] their source labels; need: [B] bool.

    Returns:
      [B] bool: the validity model (every member of a committee) reads y (False where not
      needed); all True without a validity model. It carries no gradient: it filters what the
      search records, it does not steer the gradient mode's steps.
    """
    if validity_fn is None:
        return jnp.ones(y.shape, bool)
    b = y.shape[0]
    count = jnp.sum(need, dtype=jnp.int32)
    # The needed rows' indices first, in row order, then b (no row): a running count, O(B),
    # where a sort would be O(B log B).
    rank = jnp.cumsum(need, dtype=jnp.int32) - 1
    order = (
        jnp.full((b,), b, jnp.int32)
        .at[jnp.where(need, rank, b)]
        .set(jnp.arange(b, dtype=jnp.int32), mode="drop")
    )
    x = jax.lax.stop_gradient(x)
    sizes = sorted({-(-b // s) for s in VALIDITY_SLICES})
    branches = [functools.partial(_read_slices, validity_fn, x, y, order, count, m) for m in sizes]
    which = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < count)  # the first slice that holds all
    return jax.lax.switch(which, branches)


def _read_slices(validity_fn, x, y, order, count, m: int) -> jax.Array:
    """`validity_verdict`'s reading in slices of m rows of `order` (padded with b, no row), as
    many as the `count` needed rows fill -> [B] bool."""
    b = y.shape[0]
    order = jnp.pad(order, (0, -(-b // m) * m - b), constant_values=b)

    def read_slice(state):
        i, still = state
        rows = jax.lax.dynamic_slice_in_dim(order, i * m, m)
        safe = jnp.minimum(rows, b - 1)  # the padding reads a real row; its verdict is dropped
        reads = jnp.argmax(validity_fn(x[safe]).astype(jnp.float32), axis=-1).astype(jnp.int32)
        every = jnp.all(reads.reshape(-1, m) == y[safe], axis=0)  # [m]: one reader, or all G
        return i + 1, still.at[rows].set(every, mode="drop")

    _, still = jax.lax.while_loop(
        lambda state: state[0] * m < count, read_slice, (jnp.int32(0), jnp.zeros((b,), bool))
    )
    return still


def read_logits(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, C] -> (argmax [B] int32, its softmax probability [B] float32)."""
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    prob = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
    return pred, prob


def _flat(x: jax.Array, lead: int) -> jax.Array:
    return x.reshape((-1,) + x.shape[lead:])


def run_sample(
    decode_fn,
    classify_fn,
    z0,
    y0,
    rng: ChainRng,
    *,
    config: SearchConfig,
    noise: jax.Array,
    free: jax.Array,
    validity_fn: ValidityFn = None,
) -> Candidates:
    """Paper mode: one i.i.d. perturbation per chain (R = 1)."""
    s, c = z0.shape[0], rng.chain.shape[0]
    latent = z0.shape[-1]
    delta = free * sample_offset(rng, latent, config=config, noise=noise)  # [S, c, L]
    z = z0[:, None, :] + delta  # [S, c, L]
    y = jnp.repeat(y0, c)
    x, logits = decode_and_classify(decode_fn, classify_fn, _flat(z, 2), config=config)
    pred, prob = read_logits(logits)
    flip = pred != y
    found = (flip & validity_verdict(validity_fn, x, y, flip)).reshape(s, c)
    pred, prob = pred.reshape(s, c), prob.reshape(s, c)
    norm = jnp.linalg.norm(delta, axis=-1)
    return Candidates(
        found[..., None], z[:, :, None], pred[..., None], prob[..., None], norm[..., None]
    )


def run_iterative(
    decode_fn,
    classify_fn,
    z0,
    y0,
    rng: ChainRng,
    *,
    config: SearchConfig,
    noise: jax.Array,
    free: jax.Array,
    validity_fn: ValidityFn = None,
) -> Candidates:
    """Zhao-style radius window per chain, one random direction per round.

    Until a chain's first flip the window [lo, hi] slides outward by `radius_step` each round
    (iterative stochastic search); after a flip at radius r the window becomes [lo / 2, r] and
    each further miss moves lo halfway toward hi (hybrid shrinking search), so later flips are
    closer to the source. (No scale: `noise` is not read.) The window follows the classifier's
    flips; a validity model only filters which of them are recorded.
    """
    s, c = z0.shape[0], rng.chain.shape[0]
    latent = z0.shape[-1]
    step = jnp.float32(config.radius_step)
    z0_b = jnp.repeat(z0, c, axis=0)  # [B, L], B = S * c
    y0_b = jnp.repeat(y0, c, axis=0)

    def one_round(state, r):
        lo, hi, hit_before = state  # [B] float32, [B] float32, [B] bool
        u = unit_direction(free * rng.normal(r, latent)).reshape(-1, latent)  # [B, L]
        t = rng.uniform(r, latent + 1)[..., latent].reshape(-1)  # [B]
        radius = lo + t * (hi - lo)
        z = z0_b + radius[:, None] * u
        x, logits = decode_and_classify(decode_fn, classify_fn, z, config=config)
        pred, prob = read_logits(logits)
        hit = pred != y0_b
        still = validity_verdict(validity_fn, x, y0_b, hit)
        hit_any = hit_before | hit
        new_lo = jnp.where(hit, 0.5 * lo, jnp.where(hit_before, 0.5 * (lo + hi), hi))
        new_hi = jnp.where(hit, radius, jnp.where(hit_before, hi, hi + step))
        return (new_lo, new_hi, hit_any), Candidates(hit & still, z, pred, prob, radius)

    b = s * c
    init = (jnp.zeros((b,), jnp.float32), jnp.full((b,), step), jnp.zeros((b,), bool))
    _, out = jax.lax.scan(one_round, init, jnp.arange(config.num_rounds, dtype=jnp.int32))
    # out leaves: [R, B, ...] -> [S, c, R, ...]
    return jax.tree.map(
        lambda a: jnp.moveaxis(a, 0, 1).reshape((s, c) + a.shape[:1] + a.shape[2:]), out
    )


def margin(logits: jax.Array, label: jax.Array) -> jax.Array:
    """logit[label] - max_{j != label} logit[j]: [B]; negative iff the prediction flipped."""
    onehot = jax.nn.one_hot(label, logits.shape[-1], dtype=jnp.bool_)
    own = jnp.sum(jnp.where(onehot, logits, jnp.float32(0.0)), axis=-1)
    other = jnp.max(jnp.where(onehot, jnp.float32(-jnp.inf), logits), axis=-1)
    return own - other


def run_gradient(
    decode_fn,
    classify_fn,
    z0,
    y0,
    rng: ChainRng,
    *,
    config: SearchConfig,
    noise: jax.Array,
    free: jax.Array,
    validity_fn: ValidityFn = None,
) -> Candidates:
    """Gradient-guided search: optax steps on margin(z) + penalty * ||z - z0||^2.

    Chains start at z0 plus N(0, scale^2 / L) jitter (so chains of one source differ) and every
    step's code is evaluated on the way (the forward pass of the gradient), so each step is one
    evaluated sample and every flipping step is recorded.
    """
    s, c = z0.shape[0], rng.chain.shape[0]
    latent = z0.shape[-1]
    z0_b = jnp.repeat(z0, c, axis=0)
    y0_b = jnp.repeat(y0, c, axis=0)
    jitter = jnp.repeat(noise, c)[:, None]  # [B, 1] scale / sqrt(L) per source
    z_init = z0_b + jitter * (free * rng.normal(0, latent)).reshape(-1, latent)
    if config.optimizer == "adam":
        opt = optax.adam(config.learning_rate)
    else:
        opt = optax.sgd(config.learning_rate)
    penalty = jnp.float32(config.distance_penalty)
    floor = jnp.float32(-config.margin_floor)

    def loss_fn(z):
        x, logits = decode_and_classify(decode_fn, classify_fn, z, config=config)
        dist2 = jnp.sum(jnp.square(z - z0_b), axis=-1)
        per_chain = jnp.maximum(margin(logits, y0_b), floor) + penalty * dist2
        # chains are independent: grad of the sum is per chain
        return jnp.sum(per_chain), (logits, x)

    def one_step(state, _):
        z, opt_state = state
        (_, (logits, x)), grad = jax.value_and_grad(loss_fn, has_aux=True)(z)
        grad = grad * free  # fixed coordinates stay the source's
        pred, prob = read_logits(logits)
        still = validity_verdict(validity_fn, x, y0_b, pred != y0_b)
        norm = jnp.linalg.norm(z - z0_b, axis=-1)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
            updates, opt_state = opt.update(grad, opt_state, z)
        return (optax.apply_updates(z, updates), opt_state), Candidates(
            (pred != y0_b) & still, z, pred, prob, norm
        )

    _, out = jax.lax.scan(one_step, (z_init, opt.init(z_init)), None, length=config.num_rounds)
    return jax.tree.map(
        lambda a: jnp.moveaxis(a, 0, 1).reshape((s, c) + a.shape[:1] + a.shape[2:]), out
    )


RUNNERS = {"sample": run_sample, "iterative": run_iterative, "gradient": run_gradient}
