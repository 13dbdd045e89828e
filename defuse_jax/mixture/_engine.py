"""The shared fitting engine: one data pass per iteration, a `lax.while_loop` over iterations,
`vmap` over the `n_init` restarts and an optional `shard_map` over row shards.

A *model* (EM in `em.py`, variational in `variational.py`) supplies only small per-component
algebra:

    model.priors(blocks, n, user, axis_name) -> pytree      data-dependent constants (VB priors)
                                      (the engine adds "active": the [K] bool components in
                                      use, or None when all are; see `Hyper.n_active`)
    model.init_params(nk, xk, sk, priors, user) -> (params, ok)
    model.m_step(nk, xk, sk, priors) -> (params, ok)
    model.estep_terms(params, priors) -> (W [K, Fd], const [K])
        weighted log-prob of x under component k = const_k - 0.5 * W[k] . features(x)
    model.lower_bound(params, ll_sum, entropy_sum, n, priors) -> lower bound
    model.finalize(params, center, priors) -> pytree of outputs (means back in data coordinates)

and the engine does everything that touches the N rows. One iteration is one pass over the
blocks: E-step with the current parameters (log-domain, logsumexp over components), and the
sufficient statistics of the M-step accumulated in the same pass (`features @ resp^T`), summed
across shards with `psum`. The lower bound is computed exactly where scikit-learn computes it
(EM: mean log-likelihood of the E-step; VB: after the M-step, with the E-step's entropy), and the
convergence test is scikit-learn's `abs(change) < tol`, plus the two rules for float32 rounding
noise described in `EngineConfig` (a stall rule, and optionally a windowed change).

Precision: the fit is traced under `defuse_jax.precision.exact`, so its matmuls run at full
float32 on every backend (TF32 or bf16-pass statistics make covariances indefinite).

Numerical guards: the Mahalanobis term is clamped at 0, indefinite covariances are repaired
(see `gaussian.repair_covariances`), and a step whose precisions or lower bound are not finite is
not taken: the loop stops with an error code (1: a covariance is not positive definite, 2: the
lower bound or the parameters overflowed) that the estimator turns into a ValueError.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from defuse_jax._plumbing.keys import drawn_key_words
from defuse_jax._plumbing.row_layout import RowLayout, pad_rows, plan_rows
from defuse_jax.mixture import _init, _kmeans
from defuse_jax.mixture._shards import Blocks, psum, shard_index
from defuse_jax.mixture.gaussian import features_t, moments_from_stats, n_stat_features
from defuse_jax.precision import exact

# Stall rule (see `EngineConfig.stall_iters`): iterations without the bound rising more than
# tol above its running maximum, after which a fit with tol > 0 counts as converged.
STALL_ITERS = 10

OK, ILL_DEFINED_COVARIANCE, NON_FINITE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static settings of a fit (hashable: part of the compiled program's cache key).

    `tol`, `reg_covar` and `max_iter` are not here: they are traced scalars (`Hyper`), so
    changing them does not recompile. `history_size` (>= max_iter) sizes the per-iteration
    lower-bound record; `history_size_for` rounds it up to a power of two.

    `precompute_features`: keep the [Fd, N] feature matrix for the whole fit (fastest on CPU;
    Fd x N values) instead of recomputing it every pass (`precompute_for` picks it when the
    matrix takes at most 1 GiB per device).

    `stall_iters`: besides scikit-learn's `abs(change) < tol`, a fit with tol > 0 also counts as
    converged once its lower bound has not risen more than tol above its running maximum for
    this many iterations. With exact arithmetic the bound rises monotonically, so this never
    fires before scikit-learn's test would; it matters in float32, where the variational bound
    (a sum over samples, e.g. 1e5 in magnitude) cannot resolve a change of tol = 1e-3 and its
    rounding noise of a few ulps would otherwise keep a converged fit running to max_iter.

    `window`: 0 for scikit-learn's test on one step's change. W > 0 tests the change over the
    last W iterations instead, `abs(lb_t - lb_(t-W)) < W * tol`: with a monotone bound whose
    steps shrink this implies scikit-learn's test (so it fires at most W iterations later), and
    it averages out rounding noise that would otherwise fire scikit-learn's test early (used
    for the variational bound in float32, whose noise is a few times tol).

    `masked`: the program fits the first `Hyper.n_active` of its `n_components` components (a
    program shared by fits of different sizes). Without it every component is in use and the
    program holds no masking at all, so its results do not move in the last bits.
    """

    n_components: int
    covariance_type: str = "full"
    history_size: int = 128
    n_init: int = 1
    init_params: str = "kmeans"
    precompute_features: bool = True
    stall_iters: int = STALL_ITERS
    window: int = 0
    masked: bool = False


# Keep the feature matrix for the whole fit when it takes at most this many bytes per device.
PRECOMPUTE_BYTES = 1 << 30


def precompute_for(layout: RowLayout, n_features: int, covariance_type: str, dtype) -> bool:
    """Whether the [Fd, N] features fit in PRECOMPUTE_BYTES (else they are rebuilt per pass)."""
    fd = n_stat_features(n_features, covariance_type)
    return fd * layout.device_rows * jnp.dtype(dtype).itemsize <= PRECOMPUTE_BYTES


def history_size_for(max_iter: int) -> int:
    return max(16, 1 << max(0, int(max_iter) - 1).bit_length())


class Hyper(NamedTuple):
    """Traced hyperparameters: tol and reg_covar (data dtype scalars), max_iter (int32), and the
    components in use.

    `n_active` <= `EngineConfig.n_components`: a program compiled for K components fits the
    first `n_active` of them, the others held at weight zero with masked log-probabilities, so
    that fits with different numbers of components can share one compiled program.
    `n_trials` is scikit-learn's k-means++ candidates per center for `n_active` centers.
    """

    tol: jax.Array
    reg_covar: jax.Array
    max_iter: jax.Array
    n_active: jax.Array
    n_trials: jax.Array


def program_size(n_components: int, program_components: int | None) -> int:
    """The components K a fit's program is compiled for: its own, or `program_components`."""
    return max(n_components, program_components or 0)


def make_hyper(tol, reg_covar, max_iter, dtype, n_active: int) -> Hyper:
    return Hyper(
        jnp.asarray(tol, dtype),
        jnp.asarray(reg_covar, dtype),
        jnp.asarray(max_iter, jnp.int32),
        jnp.asarray(n_active, jnp.int32),
        jnp.asarray(_kmeans.local_trials(n_active), jnp.int32),
    )


# The log-probability constant of a component not in use: finite (a weight of 0 would give
# -inf, and the entropy's r * log r would then be 0 * -inf), and low enough that exp() of it
# relative to any component in use is exactly 0.
MASKED_LOG = -1e30


def only_active(active: jax.Array | None, nk: jax.Array, sk: jax.Array, covariance_type: str):
    """(nk, sk) with the components not in use at nk = 0 exactly (no 10 eps mass: the models'
    weights and the stick-breaking tails see only the components in use) and an identity
    covariance (with reg_covar = 0 theirs would be 0, not positive definite; the variational
    model weighs it by nk = 0). `active` None: all are in use, nothing changes."""
    if active is None:
        return nk, sk
    if covariance_type == "full":
        sk = jnp.where(active[:, None, None], sk, jnp.eye(sk.shape[-1], dtype=sk.dtype))
    elif covariance_type == "diag":
        sk = jnp.where(active[:, None], sk, 1)
    elif covariance_type == "spherical":
        sk = jnp.where(active, sk, 1)
    return jnp.where(active, nk, 0), sk


class LoopState(NamedTuple):
    it: jax.Array
    params: Any
    lower_bound: jax.Array
    best: jax.Array
    stall: jax.Array
    converged: jax.Array
    code: jax.Array
    history: jax.Array


def data_pass(
    w_mat,
    const,
    blocks: Blocks,
    feats,
    covariance_type: str,
    *,
    want_ll: bool,
    want_entropy: bool,
    axis_name,
):
    """One E-step over all blocks, accumulating sufficient statistics.

    Returns (stats [Fd, K], sum of log p(x), sum of r log r), summed over shards.
    """
    k, fd = w_mat.shape
    dtype = w_mat.dtype

    def blk(carry, inp):
        stats, ll, ent = carry
        f = inp if feats is not None else features_t(inp[0], inp[1], covariance_type)
        maha = jnp.maximum(w_mat @ f, 0)  # [K, B]
        logits = const[:, None] - 0.5 * maha
        mx = jnp.max(logits, axis=0, keepdims=True)
        e = jnp.exp(logits - mx)
        s = jnp.sum(e, axis=0, keepdims=True)
        r = e / s
        lse = (mx + jnp.log(s))[0]
        mask = f[-1]
        stats = stats + lax.dot_general(f, r, (((1,), (1,)), ((), ())))  # [Fd, K]
        if want_ll:
            ll = ll + jnp.sum(lse * mask)
        if want_entropy:
            ent = ent + jnp.sum(jnp.sum(r * (logits - lse[None, :]), axis=0) * mask)
        return (stats, ll, ent), None

    init = (jnp.zeros((fd, k), dtype), jnp.zeros((), dtype), jnp.zeros((), dtype))
    xs = feats if feats is not None else (blocks.xt, blocks.mask)
    (stats, ll, ent), _ = lax.scan(blk, init, xs)
    return psum(stats, axis_name), psum(ll, axis_name), psum(ent, axis_name)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def run_em_loop(
    model,
    cfg: EngineConfig,
    hyper: Hyper,
    params0,
    ok0,
    blocks: Blocks,
    feats,
    priors,
    n,
    axis_name,
    *,
    vmapped: bool,
) -> LoopState:
    """The `lax.while_loop` over iterations (one restart)."""
    dtype = blocks.xt.dtype
    d = blocks.xt.shape[1]
    repair = "always" if vmapped else "cond"
    history0 = jnp.zeros((cfg.history_size,), dtype)
    minus_inf = jnp.asarray(-jnp.inf, dtype)
    state0 = LoopState(
        jnp.int32(0),
        params0,
        minus_inf,
        minus_inf,
        jnp.int32(0),
        jnp.bool_(False),
        jnp.where(ok0, OK, ILL_DEFINED_COVARIANCE).astype(jnp.int32),
        history0,
    )

    def cond(s: LoopState):
        return (s.it < hyper.max_iter) & ~s.converged & (s.code == OK)

    active = priors["active"]

    def body(s: LoopState):
        w_mat, const = model.estep_terms(s.params, priors)
        if active is not None:
            const = jnp.where(active, const, MASKED_LOG)
        stats, ll, ent = data_pass(
            w_mat,
            const,
            blocks,
            feats,
            cfg.covariance_type,
            want_ll=model.needs_ll,
            want_entropy=model.needs_entropy,
            axis_name=axis_name,
        )
        nk, xk, sk = moments_from_stats(
            stats, d, cfg.covariance_type, hyper.reg_covar, repair=repair
        )
        nk, sk = only_active(active, nk, sk, cfg.covariance_type)
        new, ok = model.m_step(nk, xk, sk, priors)
        lb = model.lower_bound(new, ll, ent, n, priors)
        finite = jnp.isfinite(lb) & _all_finite(new)
        good = ok & finite
        code = jnp.where(ok, jnp.where(finite, OK, NON_FINITE), ILL_DEFINED_COVARIANCE)
        change = lb - s.lower_bound
        rose = lb > s.best + hyper.tol
        best = jnp.where(rose, lb, s.best)
        stall = jnp.where(rose, 0, s.stall + 1).astype(jnp.int32)
        if cfg.window > 0:
            back = s.history[jnp.maximum(s.it - cfg.window, 0)]
            back = jnp.where(s.it >= cfg.window, back, -jnp.inf)
            small = jnp.abs(lb - back) < cfg.window * hyper.tol
        else:
            small = jnp.abs(change) < hyper.tol
        converged = good & (hyper.tol > 0) & (small | (stall >= cfg.stall_iters))
        params = jax.tree.map(lambda a, b: jnp.where(good, a, b), new, s.params)
        lb_keep = jnp.where(good, lb, s.lower_bound)
        history = s.history.at[jnp.minimum(s.it, cfg.history_size - 1)].set(lb_keep)
        return LoopState(
            s.it + 1, params, lb_keep, best, stall, converged, code.astype(jnp.int32), history
        )

    return lax.while_loop(cond, body, state0)


def fit_local(
    x, mask, key, user, hyper, init_resp, *, model, cfg: EngineConfig, layout: RowLayout, axis_name
):
    """Everything one shard runs: centring, priors, initialisation, the loop, the best restart.

    x: [device_rows, d] this shard's rows (padded rows arbitrary), mask: [device_rows] 1/0.
    """
    dtype = x.dtype
    nb, b, d = layout.blocks, layout.block_rows, x.shape[1]
    x = jnp.where(mask[:, None] > 0, x, 0)
    n = psum(jnp.sum(mask), axis_name)
    center = psum(jnp.sum(x, axis=0), axis_name) / n
    center = center + psum(jnp.sum((x - center) * mask[:, None], axis=0), axis_name) / n
    xc = (x - center) * mask[:, None]
    offset = shard_index(axis_name).astype(jnp.uint32) * jnp.uint32(layout.device_rows)
    gidx = offset + jnp.arange(layout.device_rows, dtype=jnp.uint32)
    blocks = Blocks(
        xc.reshape(nb, b, d).transpose(0, 2, 1), mask.reshape(nb, b), gidx.reshape(nb, b)
    )
    user = model.center_user(user, center)
    # `active` [K] bool: the components in use (`Hyper.n_active`), or None (all of them); the
    # models mask their sums over components with it
    active = jnp.arange(cfg.n_components) < hyper.n_active if cfg.masked else None
    priors = {**model.priors(blocks, n, user, axis_name), "active": active}
    feats = None
    if cfg.precompute_features:
        feats = jax.vmap(lambda xt, m: features_t(xt, m, cfg.covariance_type))(
            blocks.xt, blocks.mask
        )
    if init_resp is not None:
        aux = init_resp.astype(dtype).reshape(nb, b, -1).transpose(0, 2, 1)
        method = "given"
    else:
        aux = None
        method = cfg.init_params
    vmapped = cfg.n_init > 1

    def one(k):
        words = drawn_key_words(k)
        if model.skip_resp_init(user):
            params0, ok0 = model.init_params(None, None, None, priors, user)
        else:
            resp_fn = _init.responsibility_fn(
                method, blocks, cfg.n_components, words, n, axis_name,
                **(dict(n_active=hyper.n_active, n_trials=hyper.n_trials) if cfg.masked else {}),
            )  # fmt: skip
            nk, xk, sk = _init.initial_moments(
                resp_fn,
                blocks,
                aux,
                cfg.n_components,
                cfg.covariance_type,
                hyper.reg_covar,
                axis_name,
            )
            nk, sk = only_active(active, nk, sk, cfg.covariance_type)
            params0, ok0 = model.init_params(nk, xk, sk, priors, user)
        return run_em_loop(
            model, cfg, hyper, params0, ok0, blocks, feats, priors, n, axis_name, vmapped=vmapped
        )

    if vmapped:
        runs = jax.vmap(one)(jax.random.split(key, cfg.n_init))
    else:
        runs = jax.tree.map(lambda a: a[None], one(key))
    good = runs.code == OK
    score = jnp.where(good, runs.lower_bound, -jnp.inf)
    # scikit-learn keeps the first restart with the largest bound (and the first if all -inf).
    best = jnp.argmax(jnp.where(jnp.isnan(score), -jnp.inf, score))
    best = jnp.where(jnp.any(good), best, 0)
    run = jax.tree.map(lambda a: a[best], runs)
    out = model.finalize(run.params, center, priors)
    if active is not None:
        out["log_const"] = jnp.where(active, out["log_const"], MASKED_LOG)
    out.update(
        lower_bound=run.lower_bound,
        n_iter=run.it,
        converged=run.converged,
        code=run.code,
        history=run.history,
        center=center,
        n_good=jnp.sum(good),
    )
    return out


class Rows(NamedTuple):
    """A fit's rows padded to its layout's `padded_rows` P (padded rows: zeros, mask 0)."""

    x: Any  # [P, d]
    mask: Any  # [P] 1/0
    init_resp: Any  # [P, K] initial responsibilities, or None


def lay_out_rows(x, mask, init_resp, layout: RowLayout) -> Rows:
    """Pads [N, d] rows, their optional [N] mask (None: all ones) and [N, K] `init_resp`.

    numpy stays numpy: the estimators pass host arrays, so the jitted fit sees the padded
    (bucketed) row count and fits on similar sizes share one compiled program. JAX arrays
    (tracers inside a caller's jit) stay JAX.
    """
    n = x.shape[0]
    if mask is None:
        mask = (np if isinstance(x, np.ndarray) else jnp).ones((n,), x.dtype)
    if init_resp is not None:
        init_resp = pad_rows(init_resp.astype(x.dtype), layout.padded_rows)
    return Rows(
        pad_rows(x, layout.padded_rows),
        pad_rows(mask.astype(x.dtype), layout.padded_rows),
        init_resp,
    )


@exact
def fit(
    rows: Rows,
    key,
    user,
    hyper: Hyper,
    *,
    model,
    cfg: EngineConfig,
    layout: RowLayout,
    mesh: Mesh | None,
):
    """Jittable fit on rows laid out by `lay_out_rows`, sharded over the 1-D `mesh` (or None).

    Every matmul runs at full float32 whatever the backend's default (`defuse_jax.precision`).
    """
    x, mask, init_resp = rows
    if x.shape[0] != layout.padded_rows:
        raise ValueError(f"fit takes rows padded to {layout.padded_rows}, got {x.shape[0]}.")
    kw = dict(model=model, cfg=cfg, layout=layout)
    if mesh is None:
        return fit_local(x, mask, key, user, hyper, init_resp, axis_name=None, **kw)
    name = mesh.axis_names[0]
    rows_spec = P(name)

    if init_resp is None:

        def local(xs, ms, k, u, h):
            return fit_local(xs, ms, k, u, h, None, axis_name=name, **kw)

        args, specs = (x, mask, key, user, hyper), (rows_spec, rows_spec, P(), P(), P())
    else:

        def local(xs, ms, k, u, h, r):
            return fit_local(xs, ms, k, u, h, r, axis_name=name, **kw)

        args = (x, mask, key, user, hyper, init_resp)
        specs = (rows_spec, rows_spec, P(), P(), P(), rows_spec)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)
    return sharded(*args)


def fit_functional(
    x,
    key,
    user,
    *,
    model,
    n_components: int,
    covariance_type: str,
    tol,
    reg_covar,
    max_iter: int,
    n_init: int,
    init_params: str,
    mesh: Mesh | None,
    mask,
    init_resp,
    block_size: int,
    precompute_features: bool | None,
    window: int = 0,
    program=fit,
    program_components: int | None = None,
    program_rows: int | None = None,
):
    """The one construction of a fit: the row layout, the static `EngineConfig`, the traced
    `Hyper`, the padded rows, and the call of `program` on them.

    The functional fits (`fit_gaussian_mixture`, `fit_bayesian_gaussian_mixture`) call it with
    JAX arrays and `program=fit` (traced inside the caller's jit); the estimators with host
    numpy arrays and `program` their jitted `fit`, so that the rows are padded on the host
    (see `lay_out_rows`). They differ only in `model`, `user` (model-specific arrays) and
    `window`.

    Args:
      x: [N, d] float rows; key: a JAX PRNG key; user: dict of model-specific arrays or None.
      mask: optional [N] 1/0 (rows with 0 are left out); init_resp: optional [N, K].
      program: `fit`, or a jitted `fit` (static `model`, `cfg`, `layout`, `mesh`).
      program_components, program_rows: compile for at least this many components (`model`'s
        `n_components` must be the larger of the two) and rows; fits of other sizes under the
        same values share the program (see `Hyper`).

    Returns:
      `program`'s output: a dict of the fitted arrays (see the functional fits), with
      `max(n_components, program_components)` components, those past n_components at weight 0.
    """
    n, d = x.shape
    n_shards = 1 if mesh is None else mesh.devices.size
    k = program_size(n_components, program_components)
    n_rows = max(n, program_rows or 0)
    if k > n_components:
        n_rows = max(n_rows, k * n_shards)  # the random_from_data draw takes K rows per shard
    layout = plan_rows(n_rows, n_shards, block_size, bucket=True)
    if precompute_features is None:
        precompute_features = precompute_for(layout, d, covariance_type, x.dtype)
    cfg = EngineConfig(
        n_components=k,
        covariance_type=covariance_type,
        history_size=history_size_for(max_iter),
        n_init=n_init,
        init_params=init_params,
        precompute_features=precompute_features,
        window=window,
        masked=program_components is not None,
    )
    hyper = make_hyper(tol, reg_covar, max_iter, x.dtype, n_components)
    if init_resp is not None and k > n_components:
        xp = np if isinstance(init_resp, np.ndarray) else jnp
        init_resp = xp.concatenate(
            [init_resp, xp.zeros((n, k - n_components), init_resp.dtype)], axis=1
        )
    rows = lay_out_rows(x, mask, init_resp, layout)
    return program(rows, key, user, hyper, model=model, cfg=cfg, layout=layout, mesh=mesh)
