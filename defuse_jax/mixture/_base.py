"""What both estimators share: validation order, dtype/x64 handling, devices, the compiled fit
call, error reporting, and the prediction methods (predict, predict_proba, score_samples, score,
sample)."""

from __future__ import annotations

import abc
import contextlib
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from defuse_jax._plumbing.row_layout import RowLayout, bucket_rows, pad_rows
from defuse_jax.mixture import _engine, argument_checks
from defuse_jax.mixture.gaussian import precisions_from_cholesky, weighted_log_prob
from defuse_jax.precision import exact

ILL_DEFINED_MESSAGE = (
    "Fitting the mixture model failed because some components have ill-defined empirical "
    "covariance (for instance caused by singleton or collapsed samples). Try to decrease the "
    "number of components, increase reg_covar, or scale the input data."
)


class IllDefinedCovarianceError(ValueError):
    """A fit with a component whose covariance is not positive definite (too few or collapsed
    rows for it). A ValueError, as scikit-learn raises; its own type lets a caller that fits
    many groups retry one with fewer components instead of parsing the message."""


NON_FINITE_MESSAGE = (
    "Fitting the mixture model failed because the lower bound or the parameters became "
    "non-finite (overflow: the data's scale is too large or too small for the precision in "
    "use). Scale the input data, increase reg_covar, or use dtype='float64'."
)

_PREDICT_BLOCK = 4096

_fit_program = jax.jit(_engine.fit, static_argnames=("model", "cfg", "layout", "mesh"))


def x64_context(dtype):
    """Runs float64 work with x64 enabled locally (a no-op for float32 or when already on)."""
    if dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def resolve_mesh(devices) -> Mesh | None:
    """None (one device), "all", an int (the first n local devices) or a list of devices."""
    if devices is None:
        return None
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(
                f"devices must be None, 'all', an int or a list of devices, got {devices!r}."
            )
        devs = jax.devices()
    elif isinstance(devices, int) and not isinstance(devices, bool):
        avail = jax.devices()
        if devices < 1 or devices > len(avail):
            raise ValueError(f"devices={devices} but {len(avail)} device(s) are available.")
        devs = avail[:devices]
    else:
        devs = list(devices)
        if not devs:
            raise ValueError("devices is an empty list.")
    if len(devs) == 1:
        return None
    return Mesh(np.asarray(devs), ("rows",))


def seed_of(random_state) -> int:
    """An int seed from scikit-learn style random_state (None: a fresh random seed)."""
    if random_state is None:
        return int(np.random.default_rng().integers(0, 2**31 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    return int(random_state) % (2**32)


@functools.partial(jax.jit, static_argnames=("covariance_type",))
@exact
def _posterior(xb, means, prec_chol, log_const, *, covariance_type: str):
    """(log p(x) [nb, B], log responsibilities [nb, B, K]) of row blocks [nb, B, d], with the
    exact centred Mahalanobis form (as scikit-learn)."""

    def one(x):
        wlp = weighted_log_prob(x, means, prec_chol, log_const, covariance_type)
        lse = jax.nn.logsumexp(wlp, axis=1)
        return lse, wlp - lse[:, None]

    return jax.lax.map(one, xb)


# Fitted arrays with one entry per component (the tied covariance's are shared by all).
_PER_COMPONENT = ("weights", "means", "log_const", "conc_a", "conc_b", "mean_precision")
_PER_COMPONENT_UNLESS_TIED = ("covariances", "prec_chol", "dof")


def _in_use(out: dict, k: int, program_k: int, covariance_type: str) -> dict:
    """The fit's arrays for its first `k` components, of a program of `program_k`."""
    if program_k == k:
        return out
    names = _PER_COMPONENT + (() if covariance_type == "tied" else _PER_COMPONENT_UNLESS_TIED)
    return {name: v[:k] if name in names else v for name, v in out.items()}


class MixtureBase(DensityMixin, BaseEstimator, metaclass=abc.ABCMeta):
    """Common machinery; subclasses define the model, its extra checks and its attributes."""

    # names of the `_check_specific` arrays in data coordinates (shifted with the data)
    _offset_arrays: tuple[str, ...] = ()

    # -- subclass hooks ----------------------------------------------------------------------
    @abc.abstractmethod
    def _check_specific(self, x: np.ndarray) -> dict:
        """Checks the model's own parameters against X [n_samples, n_features] (float64).

        Returns:
          The model's user arrays for the engine (name -> float64 array or None), those named
          in `_offset_arrays` in data coordinates.
        """

    @abc.abstractmethod
    def _make_model(self, n_features: int, n_components: int):
        """The engine's model for a program of `n_components` components (hashable: part of the
        compiled program's key)."""

    @abc.abstractmethod
    def _set_fitted(self, out: dict) -> None:
        """Sets the model's own fitted attributes from the fit's host arrays `out`; `fit` has
        set those every mixture has (weights_, means_, covariances_, precisions_, ...)."""

    # -- fitting ---------------------------------------------------------------------------
    def _dtype(self):
        return argument_checks.resolve_dtype(self.dtype)

    def _convergence_window(self) -> int:
        return 0

    def fit(self, X, y=None, *, init_resp=None):
        """Fits the mixture to X [n_samples, n_features]; returns self.

        init_resp: optional [n_samples, n_components] initial responsibilities, used instead of
        `init_params` (a defuse-jax extension, e.g. to start exactly where another
        implementation starts).
        """
        argument_checks.check_common(self)
        dtype = self._dtype()
        x = argument_checks.check_data(self, X, n_components=self.n_components)
        n, d = x.shape
        offset = x.mean(axis=0)
        user = self._check_specific(x)  # host arrays in data coordinates (float64) or None
        if init_resp is not None:
            init_resp = argument_checks.check_init_resp(init_resp, n, self.n_components)
        user = {
            k: None if v is None else (v - offset if k in self._offset_arrays else v).astype(dtype)
            for k, v in user.items()
        }
        mesh = resolve_mesh(self.devices)
        k = int(self.n_components)
        program_k = _engine.program_size(k, self.program_components)
        model = self._make_model(d, program_k)
        seed = seed_of(self.random_state)
        with x64_context(dtype):
            # host (numpy) rows: the engine pads them before the jitted program sees their shape
            out = _engine.fit_functional(
                (x - offset).astype(dtype), jax.random.key(seed), user, model=model,
                n_components=int(self.n_components), covariance_type=self.covariance_type,
                tol=self.tol, reg_covar=self.reg_covar, max_iter=int(self.max_iter),
                n_init=int(self.n_init), init_params=self.init_params, mesh=mesh, mask=None,
                init_resp=init_resp, block_size=int(self.block_size), precompute_features=None,
                window=self._convergence_window(), program=_fit_program,
                program_components=self.program_components, program_rows=self.program_rows,
            )  # fmt: skip
            out = jax.device_get(out)
        out = {name: np.asarray(v) for name, v in out.items()}
        code = int(out["code"])
        if code == _engine.ILL_DEFINED_COVARIANCE:
            extra = (
                " The numerical accuracy can also be improved by using dtype='float64'."
                if dtype == np.float32
                else ""
            )
            raise IllDefinedCovarianceError(ILL_DEFINED_MESSAGE + extra)
        if code != _engine.OK:
            raise ValueError(NON_FINITE_MESSAGE)
        self._offset = offset
        # the posterior's program keeps the compiled size (its extra components masked out)
        self._means_c, self._log_const = out["means"], out["log_const"]
        self._prec_chol_c = out["prec_chol"]
        out = _in_use(out, k, program_k, self.covariance_type)
        n_iter = int(out["n_iter"])
        self.n_iter_ = n_iter
        self.converged_ = bool(out["converged"])
        self.lower_bound_ = float(out["lower_bound"])
        self.lower_bounds_ = [float(v) for v in out["history"][:n_iter]]
        self.means_ = (out["means"].astype(np.float64) + offset).astype(dtype)
        self.weights_ = out["weights"]
        self.covariances_ = out["covariances"]
        self.precisions_cholesky_ = out["prec_chol"]
        self.precisions_ = precisions_from_cholesky(out["prec_chol"], self.covariance_type)
        self._set_fitted(out)
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def fit_predict(self, X, y=None):
        return self.fit(X).predict(X)

    # -- prediction ------------------------------------------------------------------------
    def _posterior(self, X):
        check_is_fitted(self, "_means_c")
        dtype = self._dtype()
        x = argument_checks.check_data(self, X, fitting=False)
        with x64_context(dtype):
            n, d = x.shape
            # blocks of at most _PREDICT_BLOCK rows, bucketed: similar sizes share the program,
            # and up to `program_rows` every size shares the program size's
            n_rows = max(n, self.program_rows or 0)
            block = min(_PREDICT_BLOCK, bucket_rows(n_rows))
            rows = RowLayout(1, math.ceil(n_rows / block), block)
            xc = pad_rows((x - self._offset).astype(dtype), rows.padded_rows)
            lse, log_resp = _posterior(
                jnp.asarray(xc.reshape(rows.blocks, block, d)),
                jnp.asarray(self._means_c),
                jnp.asarray(self._prec_chol_c),
                jnp.asarray(self._log_const),
                covariance_type=self.covariance_type,
            )
            lse = np.asarray(lse).reshape(-1)[:n]
            log_resp = np.asarray(log_resp).reshape(rows.padded_rows, -1)[:n]
            return lse, log_resp[:, : int(self.n_components)]

    def score_samples(self, X):
        """Log-likelihood of each sample under the model, [n_samples]."""
        return self._posterior(X)[0]

    def score(self, X, y=None):
        """Mean log-likelihood of X (float)."""
        return float(np.mean(self.score_samples(X).astype(np.float64)))

    def predict(self, X):
        """Most probable component of each sample, [n_samples] int."""
        return np.argmax(self._posterior(X)[1], axis=1)

    def predict_proba(self, X):
        """Responsibilities (posterior component probabilities), [n_samples, n_components]."""
        return np.exp(self._posterior(X)[1])

    def sample(self, n_samples=1):
        """(X [n_samples, n_features], component labels [n_samples]), as scikit-learn."""
        check_is_fitted(self, "_means_c")
        if not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling "
                "requires at least one sample."
            )
        rng = check_random_state(self.random_state)
        weights = self.weights_.astype(np.float64)
        counts = rng.multinomial(n_samples, weights / weights.sum())
        means = self.means_.astype(np.float64)
        cov = self.covariances_.astype(np.float64)
        if self.covariance_type in ("full", "tied"):
            cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))  # exactly symmetric for numpy
        d = means.shape[1]
        parts = []
        for k, c in enumerate(counts):
            if self.covariance_type == "full":
                parts.append(rng.multivariate_normal(means[k], cov[k], int(c)))
            elif self.covariance_type == "tied":
                parts.append(rng.multivariate_normal(means[k], cov, int(c)))
            else:
                parts.append(means[k] + rng.standard_normal(size=(int(c), d)) * np.sqrt(cov[k]))
        x = np.vstack(parts).astype(self._dtype())
        y = np.concatenate([np.full(int(c), k, dtype=np.int64) for k, c in enumerate(counts)])
        return x, y
