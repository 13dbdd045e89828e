"""Parity with scikit-learn: same data, same (or equivalent) start, same answer.

Tolerances are the issue's: the converged mean log-likelihood (`score`) within 1e-3 relative,
weights and means equal after matching components, and for the Dirichlet-process model the
same number of components with weight > 0.01. In float64 with an identical start the whole
lower-bound trajectory must agree to ~1e-9, which checks the algebra term by term.
"""

import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn import mixture as skm
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from defuse_jax.mixture import BayesianGaussianMixture, GaussianMixture

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def blobs(seed=0, n=1500, d=4, k=4):
    """Well-separated anisotropic clusters with unequal weights, away from the origin."""
    rng = np.random.default_rng(seed)
    centers = 12.0 * np.eye(k, d) + 5.0
    weights = np.array([0.4, 0.3, 0.2, 0.1])[:k]
    labels = rng.choice(k, size=n, p=weights / weights.sum())
    factors = rng.normal(size=(k, d, d)) * 0.5 + np.eye(d)
    return centers[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), factors[labels])


@pytest.fixture(scope="module")
def synthetic():
    return blobs()


@pytest.fixture(scope="module")
def digits16():
    return PCA(16, random_state=0).fit_transform(load_digits().data)


def kmeans_resp(X, k, seed):
    """scikit-learn's own "kmeans" initial responsibilities for random_state=seed."""
    labels = KMeans(n_clusters=k, n_init=1, random_state=np.random.RandomState(seed)).fit(X)
    resp = np.zeros((X.shape[0], k))
    resp[np.arange(X.shape[0]), labels.labels_] = 1
    return resp


def assert_matches(ours, ref, X, *, active=None, w_tol=2e-3, m_tol=2e-2):
    """score within 1e-3 relative; weights/means equal after matching (active components)."""
    s_ours, s_ref = ours.score(X), ref.score(X)
    assert abs(s_ours - s_ref) <= 1e-3 * abs(s_ref), (s_ours, s_ref)
    wa, wb = np.asarray(ours.weights_, np.float64), np.asarray(ref.weights_, np.float64)
    ma, mb = np.asarray(ours.means_, np.float64), np.asarray(ref.means_, np.float64)
    if active is not None:
        ia, ib = wa > active, wb > active
        assert ia.sum() == ib.sum(), (np.sort(wa)[::-1], np.sort(wb)[::-1])
        wa, wb, ma, mb = wa[ia], wb[ib], ma[ia], mb[ib]
    cost = ((ma[:, None, :] - mb[None, :, :]) ** 2).sum(-1)
    ra, rb = linear_sum_assignment(cost)
    scale = X.std()
    np.testing.assert_allclose(wa[ra], wb[rb], atol=w_tol)
    np.testing.assert_allclose(ma[ra], mb[rb], atol=m_tol * scale)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_own_init_synthetic(synthetic, covariance_type):
    ours = GaussianMixture(4, covariance_type=covariance_type, random_state=0).fit(synthetic)
    ref = skm.GaussianMixture(4, covariance_type=covariance_type, random_state=0).fit(synthetic)
    assert ours.converged_
    assert_matches(ours, ref, synthetic)


@pytest.mark.parametrize("covariance_type", ["tied", "spherical"])
def test_em_same_start_synthetic(synthetic, covariance_type):
    resp = kmeans_resp(synthetic, 4, 0)
    ours = GaussianMixture(4, covariance_type=covariance_type).fit(synthetic, init_resp=resp)
    ref = skm.GaussianMixture(4, covariance_type=covariance_type, random_state=0)
    assert_matches(ours, ref.fit(synthetic), synthetic)


def test_em_parameter_inits_match(synthetic):
    """weights_init / means_init / precisions_init, as scikit-learn."""
    ref0 = skm.GaussianMixture(4, random_state=1, max_iter=1).fit(synthetic)
    kw = dict(weights_init=ref0.weights_, means_init=ref0.means_, precisions_init=ref0.precisions_)
    ours = GaussianMixture(4, **kw).fit(synthetic)
    ref = skm.GaussianMixture(4, **kw).fit(synthetic)
    assert_matches(ours, ref, synthetic)
    assert ours.n_iter_ == ref.n_iter_


@pytest.mark.parametrize("seed", [0, 1])
def test_em_digits_pca16(digits16, seed):
    resp = kmeans_resp(digits16, 10, seed)
    ours = GaussianMixture(10, max_iter=300).fit(digits16, init_resp=resp)
    ref = skm.GaussianMixture(10, random_state=seed, max_iter=300).fit(digits16)
    assert_matches(ours, ref, digits16)


def test_dp_own_init_synthetic(synthetic):
    """Dirichlet process with 10 components on 4 clusters: same clusters, same active count."""
    kw = dict(n_components=10, max_iter=500, random_state=0)
    ours = BayesianGaussianMixture(**kw).fit(synthetic)
    ref = skm.BayesianGaussianMixture(**kw).fit(synthetic)
    assert_matches(ours, ref, synthetic, active=0.01)


@pytest.mark.parametrize("seed", [0, 3])
def test_dp_digits_pca16(digits16, seed):
    resp = kmeans_resp(digits16, 20, seed)
    kw = dict(n_components=20, max_iter=500)
    ours = BayesianGaussianMixture(**kw).fit(digits16, init_resp=resp)
    ref = skm.BayesianGaussianMixture(random_state=seed, **kw).fit(digits16)
    assert_matches(ours, ref, digits16, active=0.01)


def test_dirichlet_distribution_synthetic(synthetic):
    resp = kmeans_resp(synthetic, 6, 2)
    kw = dict(n_components=6, weight_concentration_prior_type="dirichlet_distribution")
    ours = BayesianGaussianMixture(**kw).fit(synthetic, init_resp=resp)
    ref = skm.BayesianGaussianMixture(random_state=2, **kw).fit(synthetic)
    assert_matches(ours, ref, synthetic, active=0.01)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_float64_trajectory_identical(synthetic, covariance_type):
    """float64, same start: the VB lower bound at every iteration and the fitted
    parameters agree with scikit-learn to ~1e-9 (every term of the algebra)."""
    X = synthetic[:600]
    resp = kmeans_resp(X, 6, 0)
    kw = dict(n_components=6, covariance_type=covariance_type, max_iter=25, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = BayesianGaussianMixture(dtype="float64", **kw).fit(X, init_resp=resp)
        ref = skm.BayesianGaussianMixture(random_state=0, **kw).fit(X)
    assert ours.means_.dtype == np.float64
    np.testing.assert_allclose(ours.lower_bounds_, np.ravel(ref.lower_bounds_), rtol=1e-9)
    for name in (
        "weights_",
        "means_",
        "covariances_",
        "precisions_cholesky_",
        "degrees_of_freedom_",
        "mean_precision_",
    ):
        np.testing.assert_allclose(
            getattr(ours, name), getattr(ref, name), rtol=1e-7, atol=1e-9, err_msg=name
        )
    np.testing.assert_allclose(ours.score_samples(X), ref.score_samples(X), rtol=1e-9)


def test_float64_em_trajectory_identical(synthetic):
    X = synthetic[:600]
    resp = kmeans_resp(X, 5, 0)
    kw = dict(n_components=5, max_iter=25, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = GaussianMixture(dtype="float64", **kw).fit(X, init_resp=resp)
        ref = skm.GaussianMixture(random_state=0, **kw).fit(X)
    np.testing.assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-8)
    assert ours.bic(X) == pytest.approx(ref.bic(X), rel=1e-9)
    assert ours.aic(X) == pytest.approx(ref.aic(X), rel=1e-9)


@pytest.mark.parametrize(
    ("covariance_type", "covariance_prior"), [("full", np.eye(4) * 2 + 0.5), ("spherical", 1.7)]
)
def test_user_priors_match(synthetic, covariance_type, covariance_prior):
    """Every prior argument, with data far from the origin (host-side centring undone)."""
    X = synthetic[:500] + np.array([100.0, -50.0, 3.0, 0.0])
    resp = kmeans_resp(X, 5, 0)
    kw = dict(
        n_components=5,
        covariance_type=covariance_type,
        max_iter=15,
        tol=0.0,
        weight_concentration_prior=0.3,
        mean_precision_prior=0.5,
        mean_prior=[99.0, -48.0, 2.0, 1.0],
        degrees_of_freedom_prior=4.5,
        covariance_prior=covariance_prior,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = BayesianGaussianMixture(dtype="float64", **kw).fit(X, init_resp=resp)
        ref = skm.BayesianGaussianMixture(random_state=0, **kw).fit(X)
    np.testing.assert_allclose(ours.lower_bounds_, np.ravel(ref.lower_bounds_), rtol=1e-9)
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=1e-9)
    np.testing.assert_allclose(ours.mean_prior_, ref.mean_prior_)
