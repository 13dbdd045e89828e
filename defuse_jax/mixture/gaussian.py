"""Gaussian building blocks shared by the EM and variational mixtures.

Everything here is pure `jax.numpy` on small per-component arrays (K x d x d at most), except the
feature map and the exact log-density, which touch the data.

Layout of the fast path. For every covariance type the Mahalanobis term of a component is a
linear function of a per-sample *feature vector*

    f(x) = [second moments of x (T entries), x (d entries), 1]          (Fd = T + d + 1)

    full/tied:  T = d(d+1)/2, the upper triangle x_i x_j (i <= j) in `np.triu_indices` order
    diag:       T = d,        x_i^2
    spherical:  T = 1,        |x|^2

so that, for component k with precision P_k and mean mu_k,

    (x - mu_k)^T P_k (x - mu_k) = W[k] . f(x),
    W[k] = [P_k upper triangle (off-diagonal doubled), -2 P_k mu_k, mu_k^T P_k mu_k].

One matmul `W @ F` (K x Fd times Fd x B) then gives every component's Mahalanobis term of a block
of B samples, and one matmul `F @ R^T` gives every component's sufficient statistics (sum of
responsibilities, first and second moments) in the same layout. Samples are stored as columns
(`[Fd, B]`), so the elementwise work (exp, logsumexp over components) runs along contiguous rows.
The expanded quadratic loses precision when |x| is large next to the component's spread; the
engine centres the data on its mean first, and `repair_covariances` projects the (rare)
covariances that come out indefinite back onto the PSD cone before `reg_covar` is added, which
is what the exact, centred formula would give in exact arithmetic.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def n_second_moments(n_features: int, covariance_type: str) -> int:
    """T: the number of second-moment features for a covariance type."""
    if covariance_type in ("full", "tied"):
        return n_features * (n_features + 1) // 2
    if covariance_type == "diag":
        return n_features
    return 1


def n_stat_features(n_features: int, covariance_type: str) -> int:
    """Fd = T + d + 1: the length of the per-sample feature vector."""
    return n_second_moments(n_features, covariance_type) + n_features + 1


def features_t(xt: jax.Array, mask: jax.Array, covariance_type: str) -> jax.Array:
    """[Fd, B] features of a block of samples stored as columns.

    Args:
      xt: [d, B] samples as columns; padded columns must be zero.
      mask: [B] 1 for real samples, 0 for padding (becomes the constant feature, so padded
        columns are all-zero and contribute nothing to any statistic).
    """
    d = xt.shape[0]
    if covariance_type in ("full", "tied"):
        iu, ju = _triu(d)
        second = xt[iu] * xt[ju]
    elif covariance_type == "diag":
        second = xt * xt
    else:
        second = jnp.sum(xt * xt, axis=0, keepdims=True)
    return jnp.concatenate([second, xt, mask[None, :].astype(xt.dtype)], axis=0)


def _triu(n_features: int):
    iu, ju = np.triu_indices(n_features)
    return iu, ju


def pack_upper(mats: jax.Array) -> jax.Array:
    """[..., d, d] symmetric -> [..., T] upper triangle with off-diagonals doubled."""
    d = mats.shape[-1]
    iu, ju = _triu(d)
    coef = np.where(iu == ju, 1.0, 2.0)
    return mats[..., iu, ju] * jnp.asarray(coef, dtype=mats.dtype)


def unpack_sym(packed: jax.Array, n_features: int) -> jax.Array:
    """[..., T] upper triangle (as accumulated, not doubled) -> [..., d, d] symmetric."""
    iu, ju = _triu(n_features)
    pos = np.zeros((n_features, n_features), np.int32)
    pos[iu, ju] = np.arange(iu.size)
    pos[ju, iu] = np.arange(iu.size)
    return packed[..., pos]


def eye_like(d: int, dtype) -> jax.Array:
    return jnp.eye(d, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Moments from accumulated statistics (the M-step's input, as in sklearn's
# `_estimate_gaussian_parameters`: nk, xk and sk, reg_covar already on the diagonal).
# --------------------------------------------------------------------------------------------


def moments_from_stats(
    stats: jax.Array,
    n_features: int,
    covariance_type: str,
    reg_covar: float,
    *,
    repair: str = "cond",
):
    """(nk, xk, sk) from summed statistics `stats` [Fd, K] (the layout of `features_t`).

    nk = sum_n r_nk + 10 eps (as scikit-learn), xk = sum_n r_nk x_n / nk and sk the weighted
    covariance plus `reg_covar` on the diagonal; its shape follows `covariance_type`
    ([K,d,d], [d,d], [K,d], [K]). `repair` chooses how an indefinite raw covariance (float
    rounding of the expanded form) is fixed: "cond" (eigen-clip under `lax.cond`, only paid when
    needed) or "always" (computed and selected, for vmapped code).
    """
    d = n_features
    t = n_second_moments(d, covariance_type)
    dtype = stats.dtype
    eps = jnp.finfo(dtype).eps
    s2 = stats[:t].T  # [K, T]
    sx = stats[t : t + d].T  # [K, d]
    s1 = stats[t + d]  # [K]
    nk = s1 + 10 * eps
    xk = sx / nk[:, None]
    # sum_n r (x - m)(x - m)^T = M2 - (2 nk - s1) m m^T  (sx = nk m)
    w = 2 * nk - s1
    if covariance_type in ("full", "tied"):
        m2 = unpack_sym(s2, d)
        raw = m2 - w[:, None, None] * xk[:, :, None] * xk[:, None, :]
        if covariance_type == "full":
            raw = raw / nk[:, None, None]
        else:
            raw = jnp.sum(raw, axis=0) / jnp.sum(nk)
        raw = 0.5 * (raw + jnp.swapaxes(raw, -1, -2))
        raw = repair_covariances(raw, reg_covar, mode=repair)
        sk = raw + reg_covar * eye_like(d, dtype)
    elif covariance_type == "diag":
        raw = s2 / nk[:, None] - xk * xk
        sk = jnp.maximum(raw, 0) + reg_covar
    else:
        raw = s2[:, 0] / (d * nk) - jnp.sum(xk * xk, axis=1) / d
        sk = jnp.maximum(raw, 0) + reg_covar
    return nk, xk, sk


def _psd_clip(mats: jax.Array) -> jax.Array:
    evals, evecs = jnp.linalg.eigh(mats)
    # eigenvalues within rounding of zero are zero (as the exact, centred scatter would be)
    floor = 16 * jnp.finfo(mats.dtype).eps * jnp.max(jnp.abs(evals), axis=-1, keepdims=True)
    evals = jnp.where(evals > floor, evals, 0)
    return jnp.einsum("...ij,...j,...kj->...ik", evecs, evals, evecs)


def repair_covariances(raw: jax.Array, reg_covar: float, *, mode: str = "cond") -> jax.Array:
    """Projects the raw covariances whose `raw + reg I` is not positive definite onto the PSD cone.

    In exact arithmetic a weighted scatter matrix is PSD, so this only changes matrices that
    rounding made indefinite (a collapsed or near-empty component); the result is what the exact
    computation would give, up to rounding, and `reg_covar` keeps it positive definite.
    """
    d = raw.shape[-1]
    chol = jnp.linalg.cholesky(raw + reg_covar * eye_like(d, raw.dtype))
    ok = jnp.all(jnp.isfinite(chol), axis=(-2, -1))
    if mode == "never":
        return raw
    if mode == "always":
        fixed = _psd_clip(raw)
    else:
        fixed = lax.cond(jnp.all(ok), lambda r: r, _psd_clip, raw)
    return jnp.where(ok[..., None, None], raw, fixed)


def centered_moments(nk, xk, scatter, covariance_type: str, reg_covar: float):
    """sk from an exactly centred scatter: full [K,d,d], diag [K,d] (sum r (x-m)^2)."""
    d = xk.shape[-1]
    dtype = xk.dtype
    if covariance_type == "full":
        return scatter / nk[:, None, None] + reg_covar * eye_like(d, dtype)
    if covariance_type == "tied":
        return jnp.sum(scatter, axis=0) / jnp.sum(nk) + reg_covar * eye_like(d, dtype)
    if covariance_type == "diag":
        return scatter / nk[:, None] + reg_covar
    return jnp.sum(scatter, axis=1) / (d * nk) + reg_covar


# --------------------------------------------------------------------------------------------
# Precisions.
# --------------------------------------------------------------------------------------------


def lower_triangular_inverse(low: jax.Array) -> jax.Array:
    """L^{-1} of lower-triangular [..., d, d] matrices by forward substitution.

    A `fori_loop` over rows, batched over the leading axes: the same arithmetic as a triangular
    solve against the identity, at a fraction of the compile time of the batched solver.
    """
    d = low.shape[-1]
    eye = eye_like(d, low.dtype)

    def row(i, inv):
        li = lax.dynamic_index_in_dim(low, i, axis=-2, keepdims=False)  # [..., d]
        lii = lax.dynamic_index_in_dim(li, i, axis=-1, keepdims=False)  # [...]
        ei = lax.dynamic_index_in_dim(eye, i, axis=0, keepdims=False)  # [d]
        new = (ei - jnp.einsum("...j,...jk->...k", li, inv)) / lii[..., None]
        return lax.dynamic_update_index_in_dim(inv, new, i, axis=-2)

    return lax.fori_loop(0, d, row, jnp.zeros_like(low))


def precision_cholesky(covariances: jax.Array, covariance_type: str):
    """(precisions_cholesky, ok) as scikit-learn's `_compute_precision_cholesky`.

    full/tied: the upper-triangular U with U U^T = inverse(cov) (U = L^{-T}, L = chol(cov));
    diag/spherical: 1/sqrt(cov). `ok` is False when some covariance is not positive definite
    (the caller turns it into scikit-learn's error message instead of propagating NaN).
    """
    if covariance_type in ("full", "tied"):
        chol = jnp.linalg.cholesky(covariances)
        prec_chol = jnp.swapaxes(lower_triangular_inverse(chol), -1, -2)
        ok = jnp.all(jnp.isfinite(prec_chol))
        return prec_chol, ok
    ok = jnp.all(covariances > 0) & jnp.all(jnp.isfinite(covariances))
    return 1 / jnp.sqrt(jnp.maximum(covariances, jnp.finfo(covariances.dtype).tiny)), ok


def precisions_from_cholesky(prec_chol, covariance_type: str):
    """Precisions U U^T from their factors U (full [K, d, d], tied [d, d]), or the squares of
    the diagonal / spherical factors ([K, d], [K]).

    NumPy in, NumPy out: the estimators' `precisions_` are computed on the host, in the fitted
    dtype, exactly as scikit-learn computes them. JAX arrays (tracers) stay JAX.
    """
    if covariance_type in ("full", "tied"):
        xp = np if isinstance(prec_chol, np.ndarray) else jnp
        return prec_chol @ xp.swapaxes(prec_chol, -1, -2)
    return prec_chol**2


def covariances_from_cholesky(prec_chol, covariance_type: str):
    """Inverse of `precision_cholesky`: cov = (U U^T)^{-1}."""
    if covariance_type in ("full", "tied"):
        inv_t = lower_triangular_inverse(jnp.swapaxes(prec_chol, -1, -2))  # U^{-T}
        return inv_t @ jnp.swapaxes(inv_t, -1, -2)
    return 1 / prec_chol**2


def cholesky_from_precisions(precisions: np.ndarray, covariance_type: str) -> np.ndarray:
    """Upper U with U U^T = precision, as scikit-learn (flip, Cholesky, flip). NumPy, host side."""
    if covariance_type == "full":
        return np.stack(
            [np.flipud(np.fliplr(np.linalg.cholesky(np.flipud(np.fliplr(p))))) for p in precisions]
        )
    if covariance_type == "tied":
        p = precisions
        return np.flipud(np.fliplr(np.linalg.cholesky(np.flipud(np.fliplr(p)))))
    return np.sqrt(precisions)


def log_det_cholesky(prec_chol, covariance_type: str, n_features: int):
    """log det(prec_chol) per component (a scalar for tied), as scikit-learn."""
    if covariance_type == "full":
        return jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=-2, axis2=-1)), axis=-1)
    if covariance_type == "tied":
        return jnp.sum(jnp.log(jnp.diagonal(prec_chol)))
    if covariance_type == "diag":
        return jnp.sum(jnp.log(prec_chol), axis=-1)
    return n_features * jnp.log(prec_chol)


# --------------------------------------------------------------------------------------------
# Log densities.
# --------------------------------------------------------------------------------------------


def mahalanobis_matrix(means, prec_chol, covariance_type: str) -> jax.Array:
    """W [K, Fd] with W @ features_t(x) = (x - mu_k)^T P_k (x - mu_k) for every k."""
    k, d = means.shape
    if covariance_type in ("full", "tied"):
        prec = precisions_from_cholesky(prec_chol, covariance_type)
        if covariance_type == "tied":
            prec = jnp.broadcast_to(prec, (k, d, d))
            prec_chol = jnp.broadcast_to(prec_chol, (k, d, d))
        quad = pack_upper(prec)
        lin = -2 * jnp.einsum("kij,kj->ki", prec, means)
        y = jnp.einsum("kd,kde->ke", means, prec_chol)
        const = jnp.sum(y * y, axis=1)
    elif covariance_type == "diag":
        prec = prec_chol**2
        quad = prec
        lin = -2 * prec * means
        const = jnp.sum(prec * means * means, axis=1)
    else:
        prec = prec_chol**2
        quad = prec[:, None]
        lin = -2 * prec[:, None] * means
        const = prec * jnp.sum(means * means, axis=1)
    return jnp.concatenate([quad, lin, const[:, None]], axis=1)


def gaussian_log_norm(prec_chol, covariance_type: str, n_features: int, n_components: int):
    """[K] log normalisers: -d/2 log(2 pi) + log det(prec_chol)."""
    ld = log_det_cholesky(prec_chol, covariance_type, n_features)
    ld = jnp.broadcast_to(ld, (n_components,))
    return ld - 0.5 * n_features * math.log(2 * math.pi)


def exact_mahalanobis(x: jax.Array, means, prec_chol, covariance_type: str) -> jax.Array:
    """[B, K] squared Mahalanobis distances by the centred (exact) formula, as scikit-learn."""
    if covariance_type in ("full", "tied"):
        if covariance_type == "tied":
            prec_chol = jnp.broadcast_to(prec_chol, (means.shape[0],) + prec_chol.shape)
        diff = x[:, None, :] - means[None, :, :]  # [B, K, d]
        y = jnp.einsum("bkd,kde->bke", diff, prec_chol)
        return jnp.sum(y * y, axis=-1)
    if covariance_type == "diag":
        diff = x[:, None, :] - means[None, :, :]
        return jnp.sum((diff * prec_chol[None]) ** 2, axis=-1)
    diff = x[:, None, :] - means[None, :, :]
    return jnp.sum(diff * diff, axis=-1) * prec_chol[None, :] ** 2


def weighted_log_prob(x, means, prec_chol, log_const, covariance_type: str) -> jax.Array:
    """[B, K] log p(x | k) + log weight_k, `log_const` [K] holding every per-component term."""
    return log_const[None, :] - 0.5 * exact_mahalanobis(x, means, prec_chol, covariance_type)
