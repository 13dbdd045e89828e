"""Bad input to the mixture estimators: a clear ValueError, raised before anything compiles."""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from defuse_jax.mixture import BayesianGaussianMixture, GaussianMixture, _base

X_OK = np.random.default_rng(0).normal(size=(40, 3))


@pytest.fixture(autouse=True)
def no_compilation(monkeypatch):
    """Any call into the compiled fit fails the test: validation must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the compiled fit was reached; validation should have raised")

    monkeypatch.setattr(_base, "_fit_program", forbidden)


BOTH = [GaussianMixture, BayesianGaussianMixture]


def make(cls, **kw):
    return cls(**kw)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.zeros(10), "Expected 2D array"),
        (np.zeros((4, 3, 2)), "Found array with dim 3"),
        (np.zeros((5, 0)), "0 feature"),
        (np.zeros((1, 3)), "1 sample.* minimum of 2"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), "non-finite"),
        (np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0]]), "non-finite"),
        (np.array([["a", "b"], ["c", "d"]]), "could not convert string to float"),
        (np.array([[1 + 1j, 2.0], [3.0, 4.0]]), "Complex data not supported"),
    ],
)
def test_bad_data(cls, X, match):
    with pytest.raises(ValueError, match=match):
        make(cls, n_components=1).fit(X)


@pytest.mark.parametrize("cls", BOTH)
def test_fewer_samples_than_components(cls):
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        make(cls, n_components=5).fit(X_OK[:4])


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_components": 0}, "n_components"),
        ({"n_components": -2}, "n_components"),
        ({"n_components": 2.5}, "n_components"),
        ({"n_components": True}, "n_components"),
        ({"covariance_type": "banded"}, "covariance_type"),
        ({"tol": -1.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"tol": float("inf")}, "tol"),
        ({"reg_covar": -1e-3}, "reg_covar"),
        ({"max_iter": -1}, "max_iter"),
        ({"n_init": 0}, "n_init"),
        ({"init_params": "magic"}, "init_params"),
        ({"dtype": "float16"}, "dtype"),
        ({"dtype": "banana"}, "dtype"),
        ({"random_state": "seed"}, "random_state"),
        ({"block_size": 2}, "block_size"),
        ({"devices": "some"}, "devices"),
        ({"devices": 99}, "devices"),
        ({"program_components": 1}, "program_components=1 is below n_components=2"),
        ({"program_rows": 0}, "program_rows"),
    ],
)
def test_bad_parameters(cls, kw, match):
    kw = {"n_components": 2, **kw}
    with pytest.raises(ValueError, match=match):
        make(cls, **kw).fit(X_OK)


@pytest.mark.parametrize("cls", BOTH)
def test_wrong_parameter_type_is_also_a_type_error(cls):
    """As scikit-learn's own estimators: a ValueError (the contract here) and a TypeError."""
    with pytest.raises(TypeError, match="reg_covar"):
        make(cls, n_components=2, reg_covar="small").fit(X_OK)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"weight_concentration_prior_type": "pitman_yor"}, "weight_concentration_prior_type"),
        ({"weight_concentration_prior": 0.0}, "weight_concentration_prior"),
        ({"mean_precision_prior": -1.0}, "mean_precision_prior"),
        ({"degrees_of_freedom_prior": 1.5}, "degrees_of_freedom_prior"),
        ({"mean_prior": np.zeros(4)}, "mean_prior"),
        ({"covariance_prior": np.zeros((3, 3))}, "positive-definite"),
        ({"covariance_prior": np.eye(2)}, "covariance_prior"),
        ({"covariance_type": "diag", "covariance_prior": -np.ones(3)}, "positive"),
        ({"covariance_type": "spherical", "covariance_prior": -1.0}, "positive"),
    ],
)
def test_bad_bayesian_priors(kw, match):
    with pytest.raises(ValueError, match=match):
        BayesianGaussianMixture(n_components=2, **kw).fit(X_OK)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"weights_init": [0.2, 0.2]}, "normalized"),
        ({"weights_init": [1.5, -0.5]}, "range"),
        ({"weights_init": [0.5, 0.25, 0.25]}, "shape"),
        ({"means_init": np.zeros((2, 4))}, "shape"),
        ({"precisions_init": np.stack([np.eye(3), -np.eye(3)])}, "positive-definite"),
        ({"covariance_type": "diag", "precisions_init": np.zeros((2, 3))}, "positive"),
        ({"means_init": np.zeros((2, 3)), "program_components": 4}, "means_init cannot"),
    ],
)
def test_bad_gaussian_inits(kw, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(n_components=2, **kw).fit(X_OK)


@pytest.mark.parametrize("cls", BOTH)
def test_bad_init_resp(cls):
    with pytest.raises(ValueError, match="shape"):
        make(cls, n_components=2).fit(X_OK, init_resp=np.ones((40, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        make(cls, n_components=2).fit(X_OK, init_resp=-np.ones((40, 2)))


@pytest.mark.parametrize("cls", BOTH)
def test_not_fitted(cls):
    model = make(cls, n_components=2)
    for method in (model.predict, model.predict_proba, model.score_samples, model.score):
        with pytest.raises(NotFittedError):
            method(X_OK)
    with pytest.raises(NotFittedError):
        model.sample(3)
