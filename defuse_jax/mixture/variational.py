"""Variational Bayesian Gaussian mixture (Dirichlet-process or Dirichlet prior on the weights,
Gaussian-Wishart on the components): the model algebra, a jittable functional fit, and the
scikit-learn style `BayesianGaussianMixture` estimator.

The updates, the expected log-weights/log-densities and the (constant-free) lower bound are
scikit-learn's `BayesianGaussianMixture` term for term (Bishop 10.2 with the normalised Wishart
scale; Blei & Jordan 2006 stick-breaking for the Dirichlet process), so the fitted attributes
mean the same thing. Priors left as None take scikit-learn's data-dependent defaults, computed
in the compiled program (summed across shards).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from defuse_jax.mixture import _base, _engine, argument_checks
from defuse_jax.mixture._shards import psum
from defuse_jax.mixture._special import betaln, digamma, gammaln
from defuse_jax.mixture.gaussian import (
    gaussian_log_norm,
    log_det_cholesky,
    mahalanobis_matrix,
    precision_cholesky,
)

PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")


def _sum_in_use(per_component, active):
    """The sum over the components in use (`active` [K] bool, or None: all of them)."""
    return jnp.sum(per_component if active is None else jnp.where(active, per_component, 0))


# In float32 the convergence test looks at the change over this many iterations (see
# `BayesianGaussianMixture`); float64 uses scikit-learn's one-step test.
FLOAT32_WINDOW = 10


def default_convergence_window(dtype) -> int:
    """`FLOAT32_WINDOW` for float32 data, 0 (scikit-learn's one-step test) otherwise."""
    return FLOAT32_WINDOW if jnp.dtype(dtype) == jnp.float32 else 0


@dataclasses.dataclass(frozen=True)
class VBModel:
    """Per-component algebra of the variational mixture (see `_engine` for the protocol)."""

    n_components: int
    n_features: int
    covariance_type: str = "full"
    weight_concentration_prior_type: str = "dirichlet_process"
    weight_concentration_prior: float | None = None
    mean_precision_prior: float | None = None
    degrees_of_freedom_prior: float | None = None

    needs_ll = False
    needs_entropy = True

    def wcp(self, n_active) -> float:
        """The weight concentration prior: as given, or 1 / the components in use."""
        w = self.weight_concentration_prior
        return 1.0 / n_active if w is None else float(w)

    @property
    def beta0(self) -> float:
        return 1.0 if self.mean_precision_prior is None else float(self.mean_precision_prior)

    @property
    def nu0(self) -> float:
        v = self.degrees_of_freedom_prior
        return float(self.n_features) if v is None else float(v)

    @property
    def is_dp(self) -> bool:
        return self.weight_concentration_prior_type == "dirichlet_process"

    # user arrays: mean_prior [d], covariance_prior (shape by covariance type)
    def center_user(self, user, center):
        user = dict(user)
        if user.get("mean_prior") is not None:
            user["mean_prior"] = user["mean_prior"] - center
        return user

    def skip_resp_init(self, user) -> bool:
        return False

    def priors(self, blocks, n, user, axis_name):
        d = self.n_features
        dtype = blocks.xt.dtype
        mean_prior = user.get("mean_prior")
        if mean_prior is None:
            mean_prior = jnp.zeros((d,), dtype)  # the data are centred on their mean
        cov_prior = user.get("covariance_prior")
        if cov_prior is None:  # np.cov / np.var with ddof=1, as scikit-learn
            if self.covariance_type in ("full", "tied"):
                scatter = jnp.einsum("nib,njb->ij", blocks.xt, blocks.xt)
                cov_prior = psum(scatter, axis_name) / (n - 1)
            else:
                var = psum(jnp.sum(blocks.xt * blocks.xt, axis=(0, 2)), axis_name) / (n - 1)
                cov_prior = var if self.covariance_type == "diag" else jnp.mean(var)
        return {"n": n, "mean_prior": mean_prior, "covariance_prior": cov_prior}

    def _components_in_use(self, priors, dtype):
        """(the [K] bool components in use and their count as a `dtype` scalar; or None and
        n_components when all are in use)."""
        active = priors["active"]
        if active is None:
            return None, self.n_components
        return active, jnp.sum(active).astype(dtype)

    def init_params(self, nk, xk, sk, priors, user):
        return self.m_step(nk, xk, sk, priors)

    def m_step(self, nk, xk, sk, priors):
        ct = self.covariance_type
        # nk is 0 past the components in use (`_engine.only_active`)
        _, k = self._components_in_use(priors, nk.dtype)
        wcp = self.wcp(k)
        m0, w0 = priors["mean_prior"], priors["covariance_prior"]
        beta0, nu0 = self.beta0, self.nu0
        if self.is_dp:
            tail = jnp.cumsum(nk[::-1])[::-1]
            tail = jnp.concatenate([tail[1:], jnp.zeros((1,), nk.dtype)])
            conc = (1.0 + nk, wcp + tail)
        else:
            conc = wcp + nk
        beta = beta0 + nk
        means = (beta0 * m0[None, :] + nk[:, None] * xk) / beta[:, None]
        diff = xk - m0[None, :]
        if ct == "full":
            nu = nu0 + nk
            outer = diff[:, :, None] * diff[:, None, :]
            cov = (
                w0[None] + nk[:, None, None] * sk + (nk * beta0 / beta)[:, None, None] * outer
            ) / nu[:, None, None]
        elif ct == "tied":
            nbar = jnp.sum(nk) / k
            nu = nu0 + nbar
            outer = jnp.einsum("k,ki,kj->ij", nk / beta, diff, diff)
            cov = (w0 + sk * nbar + beta0 / k * outer) / nu
        elif ct == "diag":
            nu = nu0 + nk
            cov = (w0[None] + nk[:, None] * (sk + (beta0 / beta)[:, None] * diff * diff)) / nu[
                :, None
            ]
        else:
            nu = nu0 + nk
            cov = (w0 + nk * (sk + beta0 / beta * jnp.mean(diff * diff, axis=1))) / nu
        prec_chol, ok = precision_cholesky(cov, ct)
        params = {
            "conc": conc,
            "mean_precision": beta,
            "means": means,
            "dof": nu,
            "covariances": cov,
            "prec_chol": prec_chol,
        }
        return params, ok

    def log_weights(self, params, priors):
        conc = params["conc"]
        if self.is_dp:
            a, b = conc
            dsum = digamma(a + b)
            cum = jnp.cumsum(digamma(b) - dsum)
            return digamma(a) - dsum + jnp.concatenate([jnp.zeros((1,), a.dtype), cum[:-1]])
        # the Dirichlet's total: the components in use
        return digamma(conc) - digamma(_sum_in_use(conc, priors["active"]))

    def _log_lambda(self, nu):
        d = self.n_features
        i = jnp.arange(d, dtype=jnp.asarray(nu).dtype)
        nu = jnp.asarray(nu)
        terms = digamma(0.5 * (nu[..., None] - i))
        return d * math.log(2.0) + jnp.sum(terms, axis=-1)

    def log_const(self, params, priors):
        d, k = self.n_features, self.n_components
        nu = params["dof"]
        base = gaussian_log_norm(params["prec_chol"], self.covariance_type, d, k)
        extra = -0.5 * d * jnp.log(nu) + 0.5 * (self._log_lambda(nu) - d / params["mean_precision"])
        return base + jnp.broadcast_to(extra, (k,)) + self.log_weights(params, priors)

    def estep_terms(self, params, priors):
        w = mahalanobis_matrix(params["means"], params["prec_chol"], self.covariance_type)
        return w, self.log_const(params, priors)

    def lower_bound(self, params, ll, ent, n, priors):
        d = self.n_features
        nu = params["dof"]
        active, k = self._components_in_use(priors, jnp.asarray(nu).dtype)
        ldpc = log_det_cholesky(params["prec_chol"], self.covariance_type, d) - 0.5 * d * jnp.log(
            nu
        )
        i = jnp.arange(d, dtype=jnp.asarray(nu).dtype)
        lwn = -(
            nu * ldpc
            + nu * d * 0.5 * math.log(2.0)
            + jnp.sum(gammaln(0.5 * (jnp.asarray(nu)[..., None] - i)), axis=-1)
        )

        def total(per_component):
            return _sum_in_use(per_component, active)

        log_wishart = k * lwn if self.covariance_type == "tied" else total(lwn)
        conc = params["conc"]
        if self.is_dp:
            log_norm_weight = -total(betaln(conc[0], conc[1]))
        else:
            log_norm_weight = gammaln(total(conc)) - total(gammaln(conc))
        mean_term = 0.5 * d * total(jnp.log(params["mean_precision"]))
        return -ent - log_wishart - log_norm_weight - mean_term

    def weights(self, params, priors):
        conc = params["conc"]
        active = priors["active"]
        if self.is_dp:
            a, b = conc
            s = a + b
            tmp = b / s
            w = a / s * jnp.concatenate([jnp.ones((1,), a.dtype), jnp.cumprod(tmp[:-1])])
        else:
            w = conc
        if active is not None:
            w = jnp.where(active, w, 0)
        return w / jnp.sum(w)

    def finalize(self, params, center, priors):
        conc = params["conc"]
        conc_a, conc_b = conc if self.is_dp else (conc, conc)
        return {
            "weights": self.weights(params, priors),
            "means": params["means"] + center,
            "covariances": params["covariances"],
            "prec_chol": params["prec_chol"],
            "log_const": self.log_const(params, priors),
            "conc_a": conc_a,
            "conc_b": conc_b,
            "mean_precision": params["mean_precision"],
            "dof": params["dof"],
            "mean_prior": priors["mean_prior"] + center,
            "covariance_prior": priors["covariance_prior"],
        }


def fit_bayesian_gaussian_mixture(
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
    weight_concentration_prior_type: str = "dirichlet_process",
    weight_concentration_prior: float | None = None,
    mean_precision_prior: float | None = None,
    mean_prior=None,
    degrees_of_freedom_prior: float | None = None,
    covariance_prior=None,
    mesh=None,
    mask=None,
    init_resp=None,
    block_size: int = 4096,
    precompute_features: bool | None = None,
    convergence_window: int | None = None,
) -> dict:
    """Functional variational fit, callable inside `jax.jit`.

    Keyword arguments are static except `tol` and `reg_covar` (traced) and the arrays `mask`,
    `init_resp`, `mean_prior`, `covariance_prior`; `max_iter` must be a Python int.

    Same conventions as `em.fit_gaussian_mixture`; also returns `conc_a`/`conc_b` (the
    Beta parameters of the stick-breaking weights; both equal the Dirichlet parameters for
    "dirichlet_distribution"),
    `mean_precision`, `dof`, `mean_prior`, `covariance_prior`. `convergence_window` defaults to
    10 in float32 and 0 (scikit-learn's one-step test) otherwise; see `BayesianGaussianMixture`.
    """
    if convergence_window is None:
        convergence_window = default_convergence_window(x.dtype)
    model = VBModel(
        n_components,
        x.shape[1],
        covariance_type,
        weight_concentration_prior_type,
        weight_concentration_prior,
        mean_precision_prior,
        degrees_of_freedom_prior,
    )
    user = {"mean_prior": mean_prior, "covariance_prior": covariance_prior}
    return _engine.fit_functional(
        x, key, user, model=model, n_components=n_components, covariance_type=covariance_type,
        tol=tol, reg_covar=reg_covar, max_iter=max_iter, n_init=n_init, init_params=init_params,
        mesh=mesh, mask=mask, init_resp=init_resp, block_size=block_size,
        precompute_features=precompute_features, window=convergence_window,
    )  # fmt: skip


class BayesianGaussianMixture(_base.MixtureBase):
    """Variational Bayesian Gaussian mixture in JAX (scikit-learn's `BayesianGaussianMixture`).

    Parameters are scikit-learn's (same names, defaults and meaning), plus `dtype`, `devices`,
    `block_size`, `program_components` and `program_rows` as in `GaussianMixture`. Not
    supported: warm_start, verbose.

    Fitted attributes: weights_, means_, covariances_, precisions_, precisions_cholesky_,
    converged_, n_iter_, lower_bound_, lower_bounds_, weight_concentration_prior_,
    weight_concentration_, mean_precision_prior_, mean_precision_, mean_prior_,
    degrees_of_freedom_prior_, degrees_of_freedom_, covariance_prior_, n_features_in_.

    Convergence in float32: the lower bound is a sum over samples whose rounding noise is a few
    times `tol`, so scikit-learn's one-step test `abs(change) < tol` would fire on noise. In
    float32 the test is made on the last 10 steps instead (`abs(lb_t - lb_(t-10)) < 10 tol`,
    which implies scikit-learn's test for a monotone bound with shrinking steps), and a bound
    that has not risen more than tol above its running maximum for 10 iterations also counts
    as converged (see `_engine.EngineConfig`). float64 uses scikit-learn's test.
    """

    def _convergence_window(self) -> int:
        return default_convergence_window(self._dtype())

    _offset_arrays = ("mean_prior",)

    def __init__(
        self,
        *,
        n_components=1,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=None,
        mean_precision_prior=None,
        mean_prior=None,
        degrees_of_freedom_prior=None,
        covariance_prior=None,
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
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.dtype = dtype
        self.devices = devices
        self.block_size = block_size
        self.program_components = program_components
        self.program_rows = program_rows

    def _check_specific(self, x):
        n, d = x.shape
        argument_checks.check_choice(
            "weight_concentration_prior_type", self.weight_concentration_prior_type, PRIOR_TYPES
        )
        for name in ("weight_concentration_prior", "mean_precision_prior"):
            if getattr(self, name) is not None:
                argument_checks.check_real(name, getattr(self, name), 0.0, strict=True)
        if self.degrees_of_freedom_prior is not None:
            v = argument_checks.check_real(
                "degrees_of_freedom_prior", self.degrees_of_freedom_prior, -np.inf
            )
            if v <= d - 1.0:
                raise ValueError(
                    f"The parameter 'degrees_of_freedom_prior' should be greater "
                    f"than {d - 1}, but got {v:.3f}."
                )
        user = {"mean_prior": None, "covariance_prior": None}
        if self.mean_prior is not None:
            m = argument_checks.as_float_array(self.mean_prior, "mean_prior")
            argument_checks.check_shape(m, (d,), "mean_prior")
            argument_checks.check_finite(m, "mean_prior")
            user["mean_prior"] = m
        if self.covariance_prior is not None:
            ct = self.covariance_type
            c = argument_checks.as_float_array(self.covariance_prior, "covariance_prior")
            argument_checks.check_finite(c, "covariance_prior")
            if ct in ("full", "tied"):
                argument_checks.check_shape(c, (d, d), f"{ct} covariance_prior")
                argument_checks.check_spd(c, f"{ct} covariance_prior")
            elif ct == "diag":
                argument_checks.check_shape(c, (d,), "diag covariance_prior")
                if np.any(c <= 0):
                    raise ValueError("'diag covariance_prior' should be positive.")
            else:
                if c.ndim != 0 or float(c) <= 0:
                    raise ValueError("'spherical covariance_prior' should be a positive float.")
            user["covariance_prior"] = c
        elif n < 2:
            raise ValueError("At least 2 samples are needed for the default covariance_prior.")
        return user

    def _make_model(self, n_features, n_components):
        def f(v):
            return None if v is None else float(v)

        return VBModel(
            n_components,
            n_features,
            self.covariance_type,
            self.weight_concentration_prior_type,
            f(self.weight_concentration_prior),
            f(self.mean_precision_prior),
            f(self.degrees_of_freedom_prior),
        )

    def _set_fitted(self, out):
        model = self._make_model(self.n_features_in_, int(self.n_components))
        dtype = self._dtype()
        self.weight_concentration_prior_ = model.wcp(int(self.n_components))
        if model.is_dp:
            self.weight_concentration_ = (out["conc_a"], out["conc_b"])
        else:
            self.weight_concentration_ = out["conc_a"]
        self.mean_precision_prior_ = model.beta0
        self.mean_precision_ = out["mean_precision"]
        self.mean_prior_ = (out["mean_prior"].astype(np.float64) + self._offset).astype(dtype)
        self.degrees_of_freedom_prior_ = model.nu0
        self.degrees_of_freedom_ = out["dof"]
        cp = out["covariance_prior"]
        self.covariance_prior_ = float(cp) if cp.ndim == 0 else cp
