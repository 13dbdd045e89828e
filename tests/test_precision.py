"""Full float32 where it must be exact, the backend's fast default everywhere else.

A CPU computes float32 matmuls exactly, so it cannot show the TF32 (GPU) or bf16-pass (TPU)
rounding that broke the mixture fit on an accelerator; what it can show is the request: every
`dot_general` of the mixture's and the regions' lowered programs must carry HIGHEST precision,
and programs outside them (a user's own, the search's forward pass) must not.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import mixture as skm

from defuse_jax import regions
from defuse_jax.mixture import (
    BayesianGaussianMixture,
    GaussianMixture,
    _base,
    fit_bayesian_gaussian_mixture,
    fit_gaussian_mixture,
)

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

_DOT = re.compile(r"stablehlo\.(dot_general|dot|convolution)\b")


def matmul_precisions(hlo_text: str) -> list[str]:
    """The precision attribute of every dot/convolution of a lowered module ('' when none)."""
    out = []
    for line in hlo_text.splitlines():
        if _DOT.search(line):
            m = re.search(r"precision = \[([A-Z]+), ([A-Z]+)\]", line)
            out.append(f"{m.group(1)},{m.group(2)}" if m else "")
    return out


def assert_all_highest(texts: list[str]) -> int:
    precisions = [p for t in texts for p in matmul_precisions(t)]
    assert precisions, "no matmul found: the check would be vacuous"
    bad = [p or "<none>" for p in precisions if p != "HIGHEST,HIGHEST"]
    assert not bad, f"{len(bad)} of {len(precisions)} matmuls not at HIGHEST: {sorted(set(bad))}"
    return len(precisions)


class _Recording:
    """Wraps a jitted program: records the lowered text of every call, then runs it."""

    def __init__(self, program):
        self.program = program
        self.texts: list[str] = []

    def __call__(self, *args, **kwargs):
        self.texts.append(self.program.lower(*args, **kwargs).as_text())
        return self.program(*args, **kwargs)


def _blobs(n=400, d=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, d)) * 5
    return centers[rng.integers(0, 3, n)] + rng.normal(size=(n, d))


@pytest.mark.parametrize(
    "cls, covariance_type",
    [(GaussianMixture, "full"), (BayesianGaussianMixture, "full"), (GaussianMixture, "diag")],
)
def test_estimator_programs_request_full_precision(monkeypatch, cls, covariance_type):
    fit_rec = _Recording(_base._fit_program)
    post_rec = _Recording(_base._posterior)
    monkeypatch.setattr(_base, "_fit_program", fit_rec)
    monkeypatch.setattr(_base, "_posterior", post_rec)
    x = _blobs()
    model = cls(n_components=3, covariance_type=covariance_type, max_iter=3, random_state=0)
    model.fit(x)  # k-means initialisation, E/M steps, Cholesky factors
    model.predict(x), model.predict_proba(x), model.score_samples(x), model.score(x)
    assert len(fit_rec.texts) == 1 and len(post_rec.texts) == 4
    # (the diagonal posterior has no matmul at all; the fit always has)
    assert_all_highest(fit_rec.texts + post_rec.texts)
    # `sample` draws on the host in float64 (NumPy): no device matmul to check.
    assert model.sample(5)[0].shape == (5, x.shape[1])


@pytest.mark.parametrize("fit_fn", [fit_gaussian_mixture, fit_bayesian_gaussian_mixture])
def test_functional_fit_requests_full_precision(fit_fn):
    x = jnp.asarray(_blobs(), jnp.float32)
    program = jax.jit(lambda x, k: fit_fn(x, k, n_components=3, max_iter=3))
    assert_all_highest([program.lower(x, jax.random.key(0)).as_text()])


def test_region_sampling_requests_full_precision():
    means = jnp.zeros((2, 3), jnp.float32)
    chol = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (2, 3, 3))
    text = regions.draw_region_codes.lower(means, chol, jax.random.key(0), n=4).as_text()
    assert_all_highest([text])


def test_user_programs_keep_their_default_precision():
    """The scoped request does not leak: after a fit, a user's matmul is at the default."""
    GaussianMixture(n_components=2, max_iter=2, random_state=0).fit(_blobs())
    a = jnp.ones((4, 4), jnp.float32)
    text = jax.jit(lambda a: a @ a).lower(a).as_text()
    assert matmul_precisions(text) == [""] or matmul_precisions(text) == ["DEFAULT,DEFAULT"]


@pytest.mark.slow
@pytest.mark.parametrize("cls", [GaussianMixture, BayesianGaussianMixture])
def test_ill_conditioned_float32_fit_matches_float64_scikit_learn(cls):
    """200k x 16 rows 1e3 away from the origin with spreads of 1e-2: float32 holds its own."""
    rng = np.random.default_rng(0)
    n, d, k = 200_000, 16, 3
    centers = 1e3 + rng.normal(size=(k, d)) * 0.5
    scales = rng.uniform(0.005, 0.02, size=(k, d))
    labels = rng.integers(0, k, n)
    x = centers[labels] + rng.normal(size=(n, d)) * scales[labels]
    kw = dict(n_components=k, covariance_type="full", max_iter=50, random_state=0)
    ours = cls(**kw).fit(x)
    sk_cls = skm.GaussianMixture if cls is GaussianMixture else skm.BayesianGaussianMixture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sk_cls(**kw).fit(x)
    assert ours.converged_
    assert abs(ours.score(x) - ref.score(x)) < 1e-3, (ours.score(x), ref.score(x))


# --------------------------------------------------------------------------------------------
# bfloat16 search: the models really compute in bfloat16.

_TENSOR = re.compile(r"tensor<([0-9x]*)(bf16|f16|f32|f64)>")


def _conv_models(latent=4):
    from flax import nnx

    from defuse_jax import models

    shape = (8, 8, 1)
    vae = models.VAE(
        models.VAEConfig(kind="conv", latent_dim=latent, hidden=16, channels=(4, 8)),
        image_shape=shape,
        rngs=nnx.Rngs(0),
    )
    clf = models.Classifier(
        models.ClassifierConfig(kind="conv", hidden=16, channels=(4, 8)),
        image_shape=shape,
        num_classes=3,
        rngs=nnx.Rngs(1),
    )
    return models.params_of(vae), models.params_of(clf)


def _matmul_operand_dtypes(text: str) -> list[tuple[str, ...]]:
    """Operand element types of every dot/convolution in a lowered module."""
    out = []
    for line in text.splitlines():
        if _DOT.search(line):
            signature = line.rsplit(":", 1)[-1].split("->")[0]
            out.append(tuple(m.group(2) for m in _TENSOR.finditer(signature)))
    return out


@pytest.mark.parametrize("mode", ["sample", "gradient"])
def test_bf16_search_program_computes_in_bf16(mode):
    from defuse_jax import models
    from defuse_jax.search import SearchConfig, lower_search

    vp, cp = _conv_models()
    z0 = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    y0 = np.zeros(6, np.int32)
    config = SearchConfig(
        mode=mode, num_samples=8, chains_per_source=2, num_rounds=2, compute_dtype="bfloat16"
    )
    dec, clf = models.search_functions(vp, cp, compute_dtype="bfloat16")
    text = lower_search(dec, clf, z0, y0, key=jax.random.key(0), config=config).as_text()
    operands = _matmul_operand_dtypes(text)
    assert len(operands) >= 5, operands  # decoder and classifier convs and dense layers
    assert all(ops and set(ops) == {"bf16"} for ops in operands), sorted(set(operands))
    # The same search with float32 weights computes in float32 (what the pipeline used to do).
    # Under JAX's standard promotion that search warns; under strict promotion it fails early.
    dec32, clf32 = models.search_functions(vp, cp)
    with jax.numpy_dtype_promotion("standard"), pytest.warns(UserWarning, match="runs in float32"):
        text32 = lower_search(dec32, clf32, z0, y0, key=jax.random.key(0), config=config)
    assert any("f32" in ops for ops in _matmul_operand_dtypes(text32.as_text()))
    with pytest.raises(ValueError, match="cast them"):
        lower_search(*models.search_functions(vp, cp), z0, y0, key=None, config=config)


def test_cast_params_casts_only_floating_leaves():
    from defuse_jax import models

    vp, _ = _conv_models()
    half = models.cast_params(vp, "bfloat16")
    leaves = jax.tree.leaves(half.state)
    assert leaves and all(a.dtype == jnp.bfloat16 for a in leaves)
    back = models.cast_params(half, jnp.float32)
    for a, b in zip(jax.tree.leaves(vp.state), jax.tree.leaves(back.state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-2)
    z = jnp.zeros((2, 4), jnp.bfloat16)
    assert models.decode(half, z).dtype == jnp.bfloat16
