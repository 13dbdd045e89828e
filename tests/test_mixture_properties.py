"""Properties of the JAX mixtures: monotone bounds, sharding invariance, the functional core
under jit, n_init restarts, robustness (no NaN, clear errors), float64, and the API surface."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.base import clone

from defuse_jax.mixture import (
    BayesianGaussianMixture,
    GaussianMixture,
    _base,
    fit_bayesian_gaussian_mixture,
    fit_gaussian_mixture,
)

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def blobs(seed=0, n=1200, d=4, k=4, spread=6.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * spread + 3.0
    labels = rng.integers(0, k, n)
    factors = rng.normal(size=(k, d, d)) * 0.4 + np.eye(d)
    return centers[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), factors[labels])


@pytest.fixture(scope="module")
def data():
    return blobs()


def nondecreasing(bounds, rtol):
    b = np.asarray(bounds, np.float64)
    steps = np.diff(b)
    return steps.min(initial=0.0) >= -rtol * np.abs(b).max()


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("cls", [GaussianMixture, BayesianGaussianMixture])
def test_lower_bound_never_decreases(data, cls, covariance_type):
    """EM log-likelihood and VB lower bound are monotone (up to float32 rounding)."""
    model = cls(
        n_components=8,
        covariance_type=covariance_type,
        max_iter=60,
        tol=0.0,
        init_params="random",
        random_state=3,
    ).fit(data)
    assert model.n_iter_ == 60 and len(model.lower_bounds_) == 60
    assert nondecreasing(model.lower_bounds_, rtol=5e-6)
    assert model.lower_bounds_[-1] > model.lower_bounds_[0]


@pytest.mark.parametrize("cls", [GaussianMixture, BayesianGaussianMixture])
def test_lower_bound_never_decreases_float64(data, cls):
    model = cls(
        n_components=8, max_iter=40, tol=0.0, init_params="random", random_state=4, dtype="float64"
    ).fit(data)
    assert nondecreasing(model.lower_bounds_, rtol=1e-11)


@pytest.mark.parametrize("cls", [GaussianMixture, BayesianGaussianMixture])
def test_sharded_fit_equals_single_device(data, cls):
    """Rows split over 4 devices (statistics summed) give the 1-device fit."""
    assert len(jax.devices()) >= 4
    kw = dict(n_components=5, max_iter=30, tol=0.0, random_state=7)
    single = cls(**kw).fit(data[:1003])  # an odd size: padding differs between layouts
    sharded = cls(devices=4, **kw).fit(data[:1003])
    assert sharded.n_iter_ == single.n_iter_
    np.testing.assert_allclose(sharded.lower_bounds_, single.lower_bounds_, rtol=1e-4)
    np.testing.assert_allclose(sharded.weights_, single.weights_, atol=1e-4)
    np.testing.assert_allclose(sharded.means_, single.means_, atol=1e-3)
    np.testing.assert_allclose(sharded.covariances_, single.covariances_, atol=1e-3)
    assert np.mean(sharded.predict(data) == single.predict(data)) > 0.999


def test_functional_core_inside_jit_with_mesh_and_mask(data):
    x = jnp.asarray(data[:800], jnp.float32)
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("rows",))
    fit = jax.jit(
        functools.partial(
            fit_gaussian_mixture,
            n_components=4,
            max_iter=20,
            tol=0.0,
            init_params="random_from_data",
            mesh=mesh,
        )
    )
    out = fit(x, jax.random.key(0))
    assert int(out["code"]) == 0 and int(out["n_iter"]) == 20
    assert np.isfinite(np.asarray(out["means"])).all()
    # masked rows are ignored exactly like absent rows (no mesh here: same padding)
    extra = jnp.concatenate([x, 1e3 * jnp.ones((37, x.shape[1]), x.dtype)])
    mask = jnp.concatenate([jnp.ones(800), jnp.zeros(37)])
    fit1 = functools.partial(
        fit_bayesian_gaussian_mixture,
        n_components=4,
        max_iter=15,
        tol=0.0,
        init_params="random",
        block_size=256,
    )
    a = jax.jit(fit1)(x, jax.random.key(1))
    b = jax.jit(fit1)(extra, jax.random.key(1), mask=mask)
    np.testing.assert_allclose(np.asarray(a["means"]), np.asarray(b["means"]), atol=1e-3)
    np.testing.assert_allclose(float(a["lower_bound"]), float(b["lower_bound"]), rtol=1e-5)


def test_n_init_restarts_pick_the_best(data):
    """n_init restarts (vmapped) keep the restart with the largest bound."""
    x = jnp.asarray(data, jnp.float32)
    kw = dict(n_components=6, max_iter=200, tol=1e-4, init_params="random_from_data")
    fit = jax.jit(functools.partial(fit_gaussian_mixture, **kw), static_argnames="n_init")
    best = fit(x, jax.random.key(5), n_init=4)
    singles = [float(fit(x, k)["lower_bound"]) for k in jax.random.split(jax.random.key(5), 4)]
    assert max(singles) - min(singles) > 0.1  # the restarts find different optima
    assert float(best["lower_bound"]) == pytest.approx(max(singles), rel=1e-4)
    model = GaussianMixture(6, n_init=3, max_iter=30, init_params="random", random_state=5)
    model.fit(data)
    assert np.isfinite(model.lower_bound_)


@pytest.mark.parametrize("cls", [GaussianMixture, BayesianGaussianMixture])
def test_similar_row_counts_share_one_compiled_fit(data, cls, monkeypatch):
    """The estimator pads rows on the host to a bucketed count (97 to 120 rows: 120), so the
    jitted fit sees one shape; a count in another bucket compiles its own program."""
    static = ("model", "cfg", "layout", "mesh")  # as `_base._fit_program`, freshly jitted
    program = jax.jit(_base._fit_program.__wrapped__, static_argnames=static)
    monkeypatch.setattr(_base, "_fit_program", program)
    kw = dict(n_components=3, max_iter=2, random_state=0)
    cls(**kw).fit(data[:100])
    compiled = program._cache_size()
    cls(**kw).fit(data[:117])
    assert program._cache_size() == compiled
    cls(**kw).fit(data[:130])
    assert program._cache_size() > compiled


@pytest.mark.parametrize(
    "cls, covariance_type, init_params, extra",
    [
        (BayesianGaussianMixture, "full", "kmeans", {}),
        (BayesianGaussianMixture, "tied", "k-means++", {}),
        # the Dirichlet's total (in every log-density) counts the components in use only
        (BayesianGaussianMixture, "diag", "random",
         {"weight_concentration_prior_type": "dirichlet_distribution"}),
        # the extra components' covariances stay positive definite without reg_covar
        (GaussianMixture, "spherical", "random_from_data", {"reg_covar": 0.0}),
    ],
)  # fmt: skip
def test_a_fit_padded_to_a_larger_program_is_the_fit_of_its_size(
    data, cls, covariance_type, init_params, extra
):
    """program_components / program_rows compile for more components and rows than the fit
    uses; the extra ones take no part: the same iterations, parameters up to float rounding
    (the padded rows sum in other blocks), the same predictions, and attributes of the fit's
    own size."""
    kw = dict(n_components=5, covariance_type=covariance_type, init_params=init_params,
              max_iter=100, random_state=2, **extra)  # fmt: skip
    own = cls(**kw).fit(data[:300])
    padded = cls(program_components=16, program_rows=1000, **kw).fit(data[:300])
    assert padded.n_iter_ == own.n_iter_ and padded.converged_ == own.converged_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert getattr(padded, name).shape == getattr(own, name).shape, name
    np.testing.assert_allclose(padded.weights_, own.weights_, atol=1e-5)
    np.testing.assert_allclose(padded.means_, own.means_, atol=1e-4)
    np.testing.assert_allclose(padded.covariances_, own.covariances_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(padded.lower_bound_, own.lower_bound_, rtol=1e-4)
    assert padded.predict_proba(data).shape == (len(data), 5)
    np.testing.assert_array_equal(padded.predict(data), own.predict(data))
    np.testing.assert_allclose(padded.score_samples(data), own.score_samples(data), rtol=1e-4)


@pytest.mark.parametrize("cls", [GaussianMixture, BayesianGaussianMixture])
def test_fits_of_different_sizes_share_one_program_at_one_program_size(data, cls, monkeypatch):
    """Fits of 2 to 7 components on 40 to 700 rows (each its own program without a program
    size: `test_similar_row_counts_share_one_compiled_fit`) all run one program compiled for
    7 components and 700 rows, and so do their predictions on their own rows."""
    static = ("model", "cfg", "layout", "mesh")  # as `_base._fit_program`, freshly jitted
    program = jax.jit(_base._fit_program.__wrapped__, static_argnames=static)
    monkeypatch.setattr(_base, "_fit_program", program)
    unjitted = _base._posterior.__wrapped__
    posterior = jax.jit(  # a new function: a cache of its own
        lambda *a, **kw: unjitted(*a, **kw), static_argnames=("covariance_type",)
    )
    monkeypatch.setattr(_base, "_posterior", posterior)
    before = program._cache_size()  # (jit wrappers of one function share its cache)
    for k, n in [(2, 40), (7, 700), (4, 230)]:
        fitted = cls(n_components=k, max_iter=3, random_state=0, program_components=7,
                     program_rows=700).fit(data[:n])  # fmt: skip
        assert fitted.predict_proba(data[:n]).shape == (n, k)
    assert program._cache_size() == before + 1
    assert posterior._cache_size() == 1


def test_many_components_on_few_points_is_finite():
    """The pipeline's path: 100 components on a few thousand codes, no NaN anywhere."""
    x = blobs(seed=1, n=2500, d=8, k=5, spread=3.0)
    model = BayesianGaussianMixture(
        n_components=100, covariance_type="full", max_iter=300, random_state=0
    ).fit(x)
    for name in (
        "weights_",
        "means_",
        "covariances_",
        "precisions_cholesky_",
        "degrees_of_freedom_",
        "mean_precision_",
    ):
        assert np.isfinite(getattr(model, name)).all(), name
    assert np.isfinite(model.lower_bound_)
    assert 3 <= (model.weights_ > 0.01).sum() <= 10
    labels = model.predict(x)
    assert labels.shape == (2500,) and labels.max() < 100
    assert np.isfinite(model.predict_proba(x)).all()
    em = GaussianMixture(60, max_iter=50, random_state=0).fit(x[:600])
    assert np.isfinite(em.covariances_).all() and np.isfinite(em.score(x))


def test_collapsed_component_raises_clear_error():
    """reg_covar=0 and a degenerate covariance: a ValueError naming the cause, never NaN (of
    its own type, which the distill stage catches to refit a group with one component)."""
    from defuse_jax.mixture import IllDefinedCovarianceError

    with pytest.raises(IllDefinedCovarianceError, match="ill-defined empirical covariance"):
        GaussianMixture(1, reg_covar=0.0).fit(np.full((20, 3), 2.5))
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(60, 2)), rng.normal(size=(60, 2)) + 10, [[50.0, 50.0]]])
    means = np.array([[0.0, 0.0], [10.0, 10.0], [50.0, 50.0]])
    # a component collapsing on one isolated point without the floor: an error or a finite fit
    try:
        fitted = GaussianMixture(3, reg_covar=0.0, means_init=means, max_iter=20).fit(x)
    except ValueError as err:
        assert "ill-defined empirical covariance" in str(err)
    else:
        assert np.isfinite(fitted.covariances_).all() and np.isfinite(fitted.lower_bound_)
    # the reg_covar floor handles the same collapse, as in scikit-learn
    ok = GaussianMixture(3, reg_covar=1e-6, means_init=means, max_iter=20).fit(x)
    assert np.isfinite(ok.covariances_).all()
    assert ok.weights_[2] == pytest.approx(1 / 121, rel=1e-3)


def test_float64_requested_without_global_x64(data):
    assert not jax.config.read("jax_enable_x64")
    model = GaussianMixture(3, dtype="float64", max_iter=10, random_state=0).fit(data)
    assert model.means_.dtype == np.float64 and model.covariances_.dtype == np.float64
    assert model.score_samples(data).dtype == np.float64
    assert not jax.config.read("jax_enable_x64")  # left as it was


def test_api_surface(data):
    model = GaussianMixture(4, random_state=0).fit(data)
    n, d = data.shape
    proba = model.predict_proba(data)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(model.predict(data), proba.argmax(1))
    assert model.score(data) == pytest.approx(model.score_samples(data).mean(), rel=1e-6)
    assert model.precisions_.shape == (4, d, d)
    np.testing.assert_allclose(
        model.precisions_ @ model.covariances_, np.broadcast_to(np.eye(d), (4, d, d)), atol=1e-3
    )
    n_params = 4 * d * (d + 1) / 2 + 4 * d + 3
    assert model.bic(data) == pytest.approx(
        -2 * model.score(data) * n + n_params * math.log(n), rel=1e-6
    )
    assert model.aic(data) == pytest.approx(-2 * model.score(data) * n + 2 * n_params, rel=1e-6)
    xs, ys = model.sample(50)
    assert xs.shape == (50, d) and ys.shape == (50,)
    assert clone(model).get_params()["n_components"] == 4
    with pytest.raises(ValueError, match="features"):
        model.predict(data[:, :2])
    bgm = BayesianGaussianMixture(n_components=4, random_state=0).fit(data)
    assert len(bgm.weight_concentration_) == 2 and bgm.mean_prior_.shape == (d,)
    assert bgm.covariance_prior_.shape == (d, d)
    np.testing.assert_allclose(bgm.mean_prior_, data.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bgm.covariance_prior_, np.cov(data.T), rtol=1e-4)
    assert bgm.degrees_of_freedom_prior_ == d and bgm.mean_precision_prior_ == 1.0
    assert np.array_equal(bgm.fit_predict(data), bgm.predict(data))
