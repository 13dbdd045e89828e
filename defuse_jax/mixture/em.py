"""Gaussian mixture fitted by EM: the model algebra, a jittable functional fit, and the
scikit-learn style `GaussianMixture` estimator.

Semantics follow scikit-learn's `GaussianMixture`: the M-step's nk carries + 10 eps, the lower
bound of iteration t is the mean log-likelihood under the parameters *before* its M-step, the
initial weights are nk / n_samples, and `weights_init`, `means_init`, `precisions_init`
override what the initialisation computes.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from defuse_jax.mixture import _base, _engine, argument_checks
from defuse_jax.mixture.gaussian import (
    cholesky_from_precisions,
    covariances_from_cholesky,
    gaussian_log_norm,
    mahalanobis_matrix,
    precision_cholesky,
)


@dataclasses.dataclass(frozen=True)
class EMModel:
    """Per-component algebra of maximum-likelihood EM (see `_engine` for the protocol)."""

    n_components: int
    n_features: int
    covariance_type: str = "full"

    needs_ll = True
    needs_entropy = False

    # user arrays: weights_init [K], means_init [K, d], precisions_cholesky_init
    def center_user(self, user, center):
        user = dict(user)
        if user.get("means_init") is not None:
            user["means_init"] = user["means_init"] - center
        return user

    def skip_resp_init(self, user) -> bool:
        return all(
            user.get(k) is not None
            for k in ("weights_init", "means_init", "precisions_cholesky_init")
        )

    def priors(self, blocks, n, user, axis_name):
        return {"n": n}

    def _params(self, weights, means, covariances, prec_chol):
        return {
            "weights": weights,
            "means": means,
            "covariances": covariances,
            "prec_chol": prec_chol,
        }

    def init_params(self, nk, xk, sk, priors, user):
        ct = self.covariance_type
        if nk is not None:
            weights, means, covs = nk / priors["n"], xk, sk
        else:
            weights = means = covs = None
        if user.get("weights_init") is not None:
            weights = user["weights_init"]
        if user.get("means_init") is not None:
            means = user["means_init"]
        if user.get("precisions_cholesky_init") is not None:
            prec_chol = user["precisions_cholesky_init"]
            ok = jnp.all(jnp.isfinite(prec_chol))
            if covs is None:
                covs = covariances_from_cholesky(prec_chol, ct)
        else:
            prec_chol, ok = precision_cholesky(covs, ct)
        return self._params(weights, means, covs, prec_chol), ok

    def m_step(self, nk, xk, sk, priors):
        prec_chol, ok = precision_cholesky(sk, self.covariance_type)
        return self._params(nk / jnp.sum(nk), xk, sk, prec_chol), ok

    def log_const(self, params):
        return gaussian_log_norm(
            params["prec_chol"], self.covariance_type, self.n_features, self.n_components
        ) + jnp.log(params["weights"])

    def estep_terms(self, params, priors):
        w = mahalanobis_matrix(params["means"], params["prec_chol"], self.covariance_type)
        return w, self.log_const(params)

    def lower_bound(self, params, ll, ent, n, priors):
        return ll / n

    def finalize(self, params, center, priors):
        return {
            "weights": params["weights"],
            "means": params["means"] + center,
            "covariances": params["covariances"],
            "prec_chol": params["prec_chol"],
            "log_const": self.log_const(params),
        }


def fit_gaussian_mixture(
    x,
    key,
    *,
    n_components: int,
    covariance_type: str = "full",
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    n_init: int = 1,
    init_params: str = "kmeans",
    mesh=None,
    mask=None,
    init_resp=None,
    weights_init=None,
    means_init=None,
    precisions_cholesky_init=None,
    block_size: int = 4096,
    precompute_features: bool | None = None,
) -> dict:
    """Functional EM fit, callable inside `jax.jit`.

    Keyword arguments are static except `tol` and `reg_covar` (traced, may be arrays) and the
    arrays `mask`, `init_resp`, `weights_init`, `means_init`, `precisions_cholesky_init`;
    `max_iter` must be a Python int (it sizes the lower-bound history).

    x: [N, d] float array; key: a JAX PRNG key; mesh: optional 1-D `Mesh` over which the rows
    are sharded (statistics are summed across shards). Returns a dict with `weights`, `means`,
    `covariances`, `prec_chol` (precisions Cholesky factors), `log_const`, `lower_bound`,
    `n_iter`, `converged`, `code` (0 ok, 1 ill-defined covariance, 2 non-finite), `history`
    (per-iteration lower bounds, first `n_iter` valid).
    """
    user = {
        "weights_init": weights_init,
        "means_init": means_init,
        "precisions_cholesky_init": precisions_cholesky_init,
    }
    return _engine.fit_functional(
        x, key, user, model=EMModel(n_components, x.shape[1], covariance_type),
        n_components=n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
        max_iter=max_iter, n_init=n_init, init_params=init_params, mesh=mesh, mask=mask,
        init_resp=init_resp, block_size=block_size, precompute_features=precompute_features,
    )  # fmt: skip


class GaussianMixture(_base.MixtureBase):
    """Gaussian mixture fitted by EM, in JAX (scikit-learn's `GaussianMixture` API).

    Parameters are scikit-learn's (same names, defaults and meaning), plus:
      dtype: "float32" (default) or "float64" (x64 is enabled locally for the fit if needed).
      devices: None (one device), "all", an int n (first n devices) or a list of devices: rows
        are sharded over them and the sufficient statistics summed.
      block_size: rows per block of the data pass (memory/speed trade-off).
      program_components, program_rows: compile the fit for at least this many components
        (>= n_components) and rows, None for exactly the fit's. Every fit is one compiled
        program per shape: fits of different sizes given the same values share one, and only
        the first compiles (so do their predictions on up to program_rows rows). The extra
        components stay at weight zero and the extra rows are masked out, so the fit is the
        one of its own size, up to float rounding (the fitted attributes have n_components
        components). Not with weights_init, means_init or precisions_init.

    Not supported: warm_start, verbose. Fitted attributes: weights_, means_, covariances_,
    precisions_, precisions_cholesky_, converged_, n_iter_, lower_bound_, lower_bounds_,
    n_features_in_.
    """

    _offset_arrays = ("means_init",)

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        dtype="float32",
        devices=None,
        block_size=4096,
        program_components=None,
        program_rows=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.dtype = dtype
        self.devices = devices
        self.block_size = block_size
        self.program_components = program_components
        self.program_rows = program_rows

    def _check_specific(self, x):
        n, d = x.shape
        k = self.n_components
        user = {"weights_init": None, "means_init": None, "precisions_cholesky_init": None}
        given = [name for name in ("weights_init", "means_init", "precisions_init")
                 if getattr(self, name) is not None]  # fmt: skip
        if given and self.program_components not in (None, k):
            raise ValueError(
                f"program_components={self.program_components} pads the fit past n_components="
                f"{k}, which {', '.join(given)} cannot describe; leave program_components None "
                "with initial parameters."
            )
        if self.weights_init is not None:
            user["weights_init"] = argument_checks.check_weights_init(
                self.weights_init, k, self._dtype()
            )
        if self.means_init is not None:
            user["means_init"] = argument_checks.check_means_init(self.means_init, k, d)
        if self.precisions_init is not None:
            prec = argument_checks.check_precisions_init(
                self.precisions_init, self.covariance_type, k, d
            )
            user["precisions_cholesky_init"] = cholesky_from_precisions(prec, self.covariance_type)
        return user

    def _make_model(self, n_features, n_components):
        return EMModel(n_components, n_features, self.covariance_type)

    def _set_fitted(self, out):
        """EM has no fitted attributes beyond those every mixture has (`MixtureBase.fit`)."""

    def _n_parameters(self) -> int:
        d = self.means_.shape[1]
        k = self.n_components
        cov = {
            "full": k * d * (d + 1) / 2.0,
            "diag": k * d,
            "tied": d * (d + 1) / 2.0,
            "spherical": k,
        }[self.covariance_type]
        return int(cov + d * k + k - 1)

    def bic(self, X):
        """Bayesian information criterion of the model on X (lower is better)."""
        n = np.asarray(X).shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X):
        """Akaike information criterion of the model on X (lower is better)."""
        n = np.asarray(X).shape[0]
        return -2 * self.score(X) * n + 2 * self._n_parameters()
