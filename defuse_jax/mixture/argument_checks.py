"""The mixture estimators' argument checks: constructor parameters, X, and the initial arrays.

Host-side: every bad input is a clear ValueError before anything is traced or compiled.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils import check_scalar
from sklearn.utils.validation import validate_data

from defuse_jax.mixture.gaussian import COVARIANCE_TYPES

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")
DTYPES = {"float32": np.float32, "float64": np.float64}


class InvalidParameterError(ValueError, TypeError):
    """A bad estimator parameter. A ValueError, as every check here raises, and a TypeError,
    as `sklearn.utils.check_scalar` raises for a wrong type (scikit-learn's own estimators raise
    an error that is both, too)."""


# `check_scalar`'s names for the types it is asked for, for the bool message below
_TYPE_NAMES = {numbers.Integral: "int", numbers.Real: "float"}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _scalar(name: str, value, kind: type, **bounds):
    """`sklearn.utils.check_scalar`, raising `InvalidParameterError`, and refusing bools (which
    `numbers.Integral` includes, but a True count or tolerance is a mistake)."""
    if isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be an instance of {_TYPE_NAMES[kind]}, not bool.")
    try:
        return check_scalar(value, name, kind, **bounds)
    except (TypeError, ValueError) as err:
        raise InvalidParameterError(str(err)) from err


def check_int(name: str, value, minimum: int) -> int:
    """`value` as an int >= minimum."""
    return int(_scalar(name, value, numbers.Integral, min_val=minimum))


def check_real(name: str, value, minimum: float = 0.0, *, strict: bool = False) -> float:
    """`value` as a finite float >= minimum (> minimum if `strict`)."""
    bounds = "neither" if strict else "left"  # the lower bound included or not; no upper one
    v = float(_scalar(name, value, numbers.Real, min_val=minimum, include_boundaries=bounds))
    if not np.isfinite(v):  # check_scalar lets NaN and inf through
        raise InvalidParameterError(f"{name} must be finite, got {value!r}.")
    return v


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def resolve_dtype(dtype) -> type:
    """'float32' (default) or 'float64' (numpy types and names accepted)."""
    try:
        name = np.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}.") from err
    if name not in DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}.")
    return DTYPES[name]


def check_common(est) -> None:
    """Constructor arguments shared by both estimators."""
    check_int("n_components", est.n_components, 1)
    check_choice("covariance_type", est.covariance_type, COVARIANCE_TYPES)
    check_real("tol", est.tol, 0.0)
    check_real("reg_covar", est.reg_covar, 0.0)
    check_int("max_iter", est.max_iter, 0)
    check_int("n_init", est.n_init, 1)
    check_choice("init_params", est.init_params, INIT_METHODS)
    check_int("block_size", est.block_size, 8)
    if est.program_components is not None:
        v = check_int("program_components", est.program_components, 1)
        if v < est.n_components:
            raise InvalidParameterError(
                f"program_components={v} is below n_components={est.n_components}: the program "
                "must hold every component of the fit; give at least n_components, or None."
            )
    if est.program_rows is not None:
        check_int("program_rows", est.program_rows, 1)
    resolve_dtype(est.dtype)
    rs = est.random_state
    if rs is not None and not _is_int(rs) and not isinstance(rs, np.random.RandomState):
        raise ValueError(f"random_state must be None, an int or a numpy RandomState, got {rs!r}.")


def as_float_array(value, name: str, dtype=np.float64) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as err:  # ragged lists and the like
        raise ValueError(f"{name} could not be converted to a numeric array: {err}") from err
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got an array of dtype {arr.dtype}.")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real, got complex values.")
    return arr.astype(dtype, copy=False)


def check_data(
    estimator, X, *, n_components: int | None = None, fitting: bool = True
) -> np.ndarray:
    """X as a finite float64 [n_samples, n_features] array, or an error naming the problem.

    scikit-learn's own `validate_data` does the checks every estimator shares, in its words:
    2-D, numeric, real, dense, at least one feature, at least two samples to fit, and (when
    predicting) the number of features `fit` saw. `fit` sets `n_features_in_` here. Added: the
    count of non-finite values and what to do about them, and n_samples >= n_components.
    """
    arr = validate_data(
        estimator, X, reset=fitting, dtype=np.float64, ensure_all_finite=False,
        ensure_min_samples=2 if fitting else 1,
    )  # fmt: skip
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(
            f"X contains {bad} non-finite value(s) (NaN or infinity); remove or "
            "impute them before fitting."
        )
    if fitting and n_components is not None and arr.shape[0] < n_components:
        raise ValueError(
            f"Expected n_samples >= n_components but got n_components = "
            f"{n_components}, n_samples = {arr.shape[0]}."
        )
    return arr


def check_shape(arr: np.ndarray, shape: tuple, name: str) -> None:
    if arr.shape != shape:
        raise ValueError(
            f"The parameter '{name}' should have the shape of {shape}, but got {arr.shape}."
        )


def check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"The parameter '{name}' contains non-finite values.")


def check_spd(mat: np.ndarray, name: str) -> None:
    if not (np.allclose(mat, mat.T) and np.all(np.linalg.eigvalsh(mat) > 0)):
        raise ValueError(f"'{name}' should be symmetric, positive-definite.")


def check_weights_init(weights, n_components: int, dtype) -> np.ndarray:
    w = as_float_array(weights, "weights_init")
    check_shape(w, (n_components,), "weights_init")
    check_finite(w, "weights_init")
    if np.any(w < 0) or np.any(w > 1):
        raise ValueError(
            "The parameter 'weights_init' should be in the range [0, 1], but got "
            f"max value {w.max():.5f}, min value {w.min():.5f}."
        )
    atol = 1e-6 if dtype == np.float32 else 1e-8
    if abs(1.0 - w.sum()) > atol:
        raise ValueError(
            "The parameter 'weights_init' should be normalized, but got "
            f"sum(weights_init) = {w.sum():.5f}."
        )
    return w


def check_means_init(means, n_components: int, n_features: int) -> np.ndarray:
    m = as_float_array(means, "means_init")
    check_shape(m, (n_components, n_features), "means_init")
    check_finite(m, "means_init")
    return m


def check_precisions_init(
    prec, covariance_type: str, n_components: int, n_features: int
) -> np.ndarray:
    p = as_float_array(prec, "precisions_init")
    shape = {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]
    check_shape(p, shape, "precisions_init")
    check_finite(p, "precisions_init")
    if covariance_type == "full":
        for i in range(n_components):
            check_spd(p[i], "full precisions_init")
    elif covariance_type == "tied":
        check_spd(p, "tied precisions_init")
    elif np.any(p <= 0):
        raise ValueError(f"'{covariance_type} precisions_init' should be positive.")
    return p


def check_init_resp(resp, n_samples: int, n_components: int) -> np.ndarray:
    r = as_float_array(resp, "init_resp")
    check_shape(r, (n_samples, n_components), "init_resp")
    check_finite(r, "init_resp")
    if np.any(r < 0):
        raise ValueError("init_resp (initial responsibilities) must be non-negative.")
    return r
