"""Correctness of the latent search engine (defuse_jax.search), with toy decoders/classifiers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from defuse_jax.search import (
    SearchConfig,
    SearchResult,
    engine,
    latent_search,
    sizing,
    start_search,
)
from defuse_jax.search.perturb import ChainRng, sample_offset

LATENT, HIDDEN, CLASSES = 4, 16, 3
_W = np.asarray(jax.random.normal(jax.random.key(1), (LATENT, HIDDEN)), np.float32)
_V = np.asarray(jax.random.normal(jax.random.key(2), (HIDDEN, CLASSES)), np.float32)


def decode(z):  # [B, L] -> [B, 4, 4, 1]: a toy decoder (weights cast to the compute dtype)
    return jnp.tanh(z @ jnp.asarray(_W, z.dtype)).reshape(z.shape[0], 4, 4, 1)


def classify(x):  # [B, 4, 4, 1] -> [B, C]
    return x.reshape(x.shape[0], -1) @ jnp.asarray(_V, x.dtype)


def constant_classify(x):  # always predicts class 0
    return jnp.zeros((x.shape[0], CLASSES), x.dtype) + jnp.asarray([1.0, 0.0, 0.0], x.dtype)


def _sources(n=24, seed=0):
    z0 = np.random.default_rng(seed).normal(size=(n, LATENT)).astype(np.float32)
    y0 = np.asarray(jnp.argmax(classify(decode(jnp.asarray(z0))), -1), np.int32)
    return z0, y0


def _mesh(n):  # same axis name as the default mesh, so _mesh(4) reuses its compiled program
    return Mesh(np.asarray(jax.devices()[:n]), ("chains",))


MODES = [
    SearchConfig(mode="sample", num_samples=24, chunk_size=64),
    SearchConfig(mode="sample", distribution="laplace", num_samples=24, chunk_size=64),
    SearchConfig(mode="sample", distribution="uniform_ball", num_samples=24, chunk_size=64),
    SearchConfig(mode="iterative", chains_per_source=4, num_rounds=6, chunk_size=16),
    SearchConfig(mode="gradient", chains_per_source=4, num_rounds=6, chunk_size=16),
]
IDS = ["gaussian", "laplace", "uniform_ball", "iterative", "gradient"]


@pytest.fixture(scope="module")
def results():
    """One run per mode on 4 devices (mesh=None: all devices), shared by several tests."""
    z0, y0 = _sources()
    return {
        i: latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=c)
        for i, c in zip(IDS, MODES, strict=True)
    }


@pytest.mark.parametrize("mode", IDS)
def test_every_example_is_really_misclassified(results, mode):
    z0, y0 = _sources()
    res = results[mode]
    assert isinstance(res, SearchResult) and res.num_found > 0
    logits = np.asarray(classify(decode(jnp.asarray(res.z))))
    pred = logits.argmax(-1)
    np.testing.assert_array_equal(pred, res.pred_label)
    assert (pred != res.source_label).all()
    np.testing.assert_array_equal(res.source_label, y0[res.source_index])
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1)).max(-1)
    np.testing.assert_allclose(res.prob, probs, rtol=1e-4, atol=1e-5)
    norms = np.linalg.norm(res.z - z0[res.source_index], axis=-1)
    np.testing.assert_allclose(res.perturbation_norm, norms, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", IDS)
def test_keep_smallest_per_source_sorted(results, mode):
    res = results[mode]
    k = res.config.max_keep_per_source
    counts = np.bincount(res.source_index, minlength=24)
    assert counts.max() <= k
    np.testing.assert_array_equal(counts, np.minimum(res.flips_per_source, k))
    for s in np.unique(res.source_index):  # ascending norm within each source, sources ascending
        assert np.all(np.diff(res.perturbation_norm[res.source_index == s]) >= 0)
    assert np.all(np.diff(res.source_index) >= 0)
    assert res.num_samples_evaluated == res.num_sources_used * res.config.samples_per_source


def _offsets(config, n_src=64, n_chain=256):
    rng = ChainRng(
        jax.random.key_data(jax.random.key(3)),
        jnp.arange(n_src, dtype=jnp.int32),
        jnp.arange(n_chain, dtype=jnp.int32),
        1,
        8 + 2,
    )
    return np.asarray(sample_offset(rng, 8, config=config)).reshape(-1, 8)


@pytest.mark.parametrize(
    "config, mean, std",
    [
        (SearchConfig(distribution="gaussian", scale=0.7), 0.0, 0.7),
        (SearchConfig(distribution="laplace", scale=0.5), 0.0, 0.5 * 2**0.5),
        (SearchConfig(distribution="beta_offset", beta_a=50.0), 0.5, (1 / (4 * 101)) ** 0.5),
    ],
)
def test_perturbation_statistics_per_dimension(config, mean, std):
    d = _offsets(config)  # 16384 x 8 draws
    np.testing.assert_allclose(d.mean(0), mean, atol=5 * std / np.sqrt(d.shape[0]))
    np.testing.assert_allclose(d.std(0), std, rtol=0.03)
    assert abs(np.corrcoef(d[:, 0], d[:, 1])[0, 1]) < 0.03  # independent dimensions


def test_perturbation_statistics_uniform_ball():
    d = _offsets(SearchConfig(distribution="uniform_ball", radius_min=0.5, radius_max=1.5))
    r = np.linalg.norm(d, axis=-1)
    assert r.min() >= 0.5 - 1e-5 and r.max() <= 1.5 + 1e-5
    np.testing.assert_allclose(np.quantile(r, [0.25, 0.5, 0.75]), [0.75, 1.0, 1.25], atol=0.02)
    u = d / r[:, None]  # uniform direction: mean ~ 0, second moment I / L
    np.testing.assert_allclose(u.mean(0), 0.0, atol=0.03)
    np.testing.assert_allclose(np.diag(u.T @ u / len(u)), 1 / 8, atol=0.01)


@pytest.mark.parametrize("mode", ["sample", "iterative", "gradient"])
def test_constant_classifier_finds_nothing(mode):
    z0 = np.random.default_rng(1).normal(size=(8, LATENT)).astype(np.float32)
    y0 = np.zeros(8, np.int32)
    res = latent_search(
        decode,
        constant_classify,
        z0,
        y0,
        key=jax.random.key(0),
        config=SearchConfig(mode=mode, num_samples=16, num_rounds=4),
    )
    assert res.num_found == 0 and len(res) == 0 and res.num_flips == 0
    assert res.z.shape == (0, LATENT) and res.source_index.shape == (0,)
    assert res.num_sources_used == 8 and res.num_sources_skipped == 0
    assert "no adversarial examples found" in res.summary()


def test_misclassified_sources_are_skipped():
    z0 = np.random.default_rng(1).normal(size=(8, LATENT)).astype(np.float32)
    y0 = np.asarray([0, 1, 2, 0, 1, 2, 0, 1], np.int32)  # constant classifier: only 0s correct
    cfg = SearchConfig(num_samples=16)
    res = latent_search(decode, constant_classify, z0, y0, key=jax.random.key(0), config=cfg)
    assert res.num_sources_skipped == 5 and res.num_sources_used == 3
    np.testing.assert_array_equal(res.used, y0 == 0)
    assert res.num_samples_evaluated == 3 * 16
    # without skipping, every wrong source "flips" at every sample
    res = latent_search(
        decode,
        constant_classify,
        z0,
        y0,
        key=jax.random.key(0),
        config=dataclasses.replace(cfg, skip_misclassified=False),
    )
    assert res.num_sources_skipped == 0 and res.num_flips == 5 * 16
    assert set(res.source_index.tolist()) == {1, 2, 4, 5, 7}


def _assert_same(a, b, exact=True):
    for f in ("source_index", "pred_label", "flips_per_source", "used"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    tol = {} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for f in ("z", "prob", "perturbation_norm"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), err_msg=f, **tol)


@pytest.mark.parametrize("index", [0, 3, 4], ids=["sample", "iterative", "gradient"])
def test_deterministic_and_key_dependent(results, index):
    z0, y0 = _sources()
    cfg = MODES[index]
    again = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=cfg)
    _assert_same(results[IDS[index]], again)
    other = latent_search(decode, classify, z0, y0, key=jax.random.key(1), config=cfg)
    assert not np.array_equal(other.z, again.z) or other.num_found != again.num_found
    raw = latent_search(decode, classify, z0, y0, key=jax.random.PRNGKey(0), config=cfg)
    _assert_same(raw, again)


@pytest.mark.parametrize("index", [0, 3, 4], ids=["sample", "iterative", "gradient"])
def test_one_device_equals_four_devices(results, index):
    assert len(jax.devices()) >= 4, "conftest forces 4 CPU devices"
    z0, y0 = _sources()
    one = latent_search(
        decode, classify, z0, y0, key=jax.random.key(0), config=MODES[index], mesh=_mesh(1)
    )
    four = latent_search(
        decode, classify, z0, y0, key=jax.random.key(0), config=MODES[index], mesh=_mesh(4)
    )
    _assert_same(one, four, exact=False)
    _assert_same(four, results[IDS[index]], exact=False)


@pytest.mark.parametrize("chunk_size", [7, 100, None])
def test_chunk_size_does_not_change_results(results, chunk_size):
    z0, y0 = _sources()
    # 7 < Q: several sub-chunks per source (padded); 100: 4 sources per block (MODES[0]: 2);
    # None: picked by backend and model size
    cfg = dataclasses.replace(MODES[0], chunk_size=chunk_size)
    res = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=cfg, mesh=_mesh(2))
    _assert_same(res, results["gaussian"], exact=False)


FIELDS = ("z", "source_index", "source_label", "pred_label", "prob", "perturbation_norm",
          "flips_per_source", "used")  # fmt: skip


def _assert_identical(a, b):
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert (a.num_samples_evaluated, a.num_sources_used) == (b.num_samples_evaluated,
                                                             b.num_sources_used)  # fmt: skip


def test_searches_started_together_equal_searches_run_one_by_one(results):
    """`start_search` dispatches and returns; several in flight read the same results."""
    z0, y0 = _sources()
    pending = [start_search(decode, classify, z0, y0, key=jax.random.key(0), config=MODES[i])
               for i in (0, 3, 4)]  # fmt: skip
    for p, name in zip(reversed(pending), ("gradient", "iterative", "gaussian"), strict=True):
        res = p.result()  # read in another order than started
        assert p.result() is res  # read once, kept
        _assert_identical(res, results[name])


@pytest.mark.parametrize("whole_copy_bytes", [0, 1 << 30])
def test_prefix_and_whole_copies_read_the_same_candidates(results, monkeypatch, whole_copy_bytes):
    """Candidates over `WHOLE_COPY_BYTES` are read as a prefix after the counts, the rest whole."""
    monkeypatch.setattr(engine, "WHOLE_COPY_BYTES", whole_copy_bytes)
    z0, y0 = _sources()
    pending = start_search(decode, classify, z0, y0, key=jax.random.key(0), config=MODES[0])
    assert engine.copied_whole(pending._found) == (whole_copy_bytes > 0)
    _assert_identical(pending.result(), results["gaussian"])


def test_keep_all_and_bf16():
    z0, y0 = _sources(8)
    cfg = SearchConfig(num_samples=32, max_keep_per_source=None)
    res = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=cfg)
    assert res.num_found == res.num_flips > 0
    half = latent_search(
        decode,
        classify,
        z0,
        y0,
        key=jax.random.key(0),
        config=dataclasses.replace(cfg, compute_dtype="bfloat16"),
    )
    assert half.num_found > 0
    # same perturbations; bf16 may flip a few borderline samples differently
    assert abs(half.num_found - res.num_found) <= 0.2 * res.num_found + 2


@pytest.mark.parametrize(
    "z0, y0, config, match",
    [
        (np.zeros((4, LATENT)), np.zeros(3, np.int32), None, "y0 must be"),
        (np.zeros((4, LATENT)), np.array([0, 1, 2, 3]), None, r"outside \[0, 3\)"),
        (np.zeros((4, LATENT)), np.array([0, -1, 2, 1]), None, r"outside \[0, 3\)"),
        (np.array([[0.0] * LATENT, [np.nan] * LATENT]), np.zeros(2, np.int32), None, "non-finite"),
        (np.array([[0.0] * LATENT, [np.inf] * LATENT]), np.zeros(2, np.int32), None, "non-finite"),
        (np.zeros((0, LATENT)), np.zeros(0, np.int32), None, "zero source points"),
        (np.zeros(LATENT), np.zeros(1, np.int32), None, r"z0 must be \[num_sources"),
        (np.zeros((2, LATENT)), np.zeros(2, np.float32), None, "integer labels"),
        (np.zeros((2, LATENT)), np.zeros(2, np.int32), "notaconfig", "SearchConfig"),
    ],
)
def test_bad_input_is_a_clear_error(z0, y0, config, match):
    with pytest.raises(ValueError, match=match):
        latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=config)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "num_samples=0"),
        ({"num_rounds": 0}, "num_rounds=0"),
        ({"chunk_size": 0}, "chunk_size=0.*or None"),
        ({"mode": "bogus"}, "mode="),
        ({"distribution": "cauchy"}, "distribution="),
        ({"max_keep_per_source": 0}, "max_keep_per_source"),
        ({"scale": 0.0}, "scale"),
        ({"radius_min": 2.0, "radius_max": 1.0}, "radius_min"),
        ({"validity": "svm"}, "validity="),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


MLP_COST, CONV_COST = sizing.ForwardCost(3.4e5, 2.2e4), sizing.ForwardCost(2.2e7, 2.9e6)


@pytest.mark.parametrize(
    "cost, backend, memory, gradient, expected",
    [
        (MLP_COST, "cpu", None, False, 2048),  # capped: larger chunks leave the caches
        (CONV_COST, "cpu", None, False, 128),  # the 2-core CPU's measured best: 64-128
        (CONV_COST, "cpu", None, True, 32),  # a backward pass per round too
        (MLP_COST, "gpu", 141e9, False, 262_144),  # the H200's measured best
        (CONV_COST, "gpu", 141e9, False, 32_768),  # the H200's measured best
        (CONV_COST, "gpu", 16e9, False, 4096),  # a 16 GB GPU: memory caps the chunk
        (CONV_COST, "tpu", None, False, 32_768),
        (sizing.ForwardCost(1e12, 1e9), "gpu", 16e9, False, 8),  # memory beats the minimum
    ],
)
def test_auto_chunk_size_by_backend_and_model(cost, backend, memory, gradient, expected):
    chunk = sizing.pick_chunk_size(cost, backend=backend, memory_bytes=memory, gradient=gradient)
    assert chunk == expected


def test_forward_cost_counts_flops_like_xla():
    cost = sizing.forward_cost(decode, classify, LATENT, "float32")
    spec = jax.ShapeDtypeStruct((64, LATENT), jnp.float32)
    xla = jax.jit(lambda z: classify(decode(z))).lower(spec).cost_analysis()["flops"] / 64
    assert cost.flops == pytest.approx(2 * (LATENT * HIDDEN + HIDDEN * CLASSES))
    assert cost.flops == pytest.approx(xla, rel=0.1)  # XLA adds the elementwise ops
    assert cost.bytes > 4 * (HIDDEN + CLASSES)
    half = sizing.forward_cost(decode, classify, LATENT, "bfloat16")
    assert half.bytes < cost.bytes and half.flops == cost.flops


def test_auto_chunk_size_is_reported_in_the_result():
    z0, y0 = _sources(8)
    res = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=SearchConfig())
    assert SearchConfig().chunk_size is None and isinstance(res.config.chunk_size, int)
    assert res.config.chunk_size == sizing.pick_chunk_size(
        sizing.forward_cost(decode, classify, LATENT, "float32"), backend="cpu", memory_bytes=None
    )


def test_a_validity_model_is_sized_at_the_largest_slice_it_reads():
    """The chunk size counts the validity model on an eighth of the batch, the largest slice
    it reads at once, not on every sample: it reads only the flips."""
    from defuse_jax.search import api

    validity = committee(classify, classify)  # twice the classifier's cost
    cost = sizing.forward_cost(decode, api._both(classify, validity), LATENT, "float32")
    alone = sizing.forward_cost(decode, classify, LATENT, "float32")
    decoding = sizing.forward_cost(decode, lambda x: x, LATENT, "float32")
    assert cost.flops == pytest.approx(alone.flops + 2 * (alone.flops - decoding.flops) / 8)


def reads_class_0(x):  # a validity model that reads every image as class 0
    return constant_classify(x)


@pytest.mark.parametrize("mode", IDS)
def test_validity_keeps_only_the_flips_the_validity_model_reads_as_the_source(results, mode):
    """Same key, same chains: with a validity model that always reads class 0, the search keeps
    exactly the paper search's flips of the sources labeled 0, and skips every other source."""
    z0, y0 = _sources()
    config = dataclasses.replace(MODES[IDS.index(mode)], validity="oracle")
    res = latent_search(
        decode, classify, z0, y0, key=jax.random.key(0), config=config, validity_fn=reads_class_0
    )
    plain = results[mode]
    of_class_0 = plain.source_label == 0
    assert 0 < of_class_0.sum() < len(plain.source_label)  # the test can tell the two apart
    np.testing.assert_array_equal(res.source_label, 0)
    np.testing.assert_array_equal(res.source_index, plain.source_index[of_class_0])
    np.testing.assert_allclose(res.z, plain.z[of_class_0])
    assert res.num_sources_used == int((y0 == 0).sum())


def committee(*readers):  # G validity models that must all read the source: [G, B, C]
    return lambda x: jnp.stack([r(x) for r in readers])


def test_a_validity_committee_keeps_what_every_member_reads_as_the_source(results):
    z0, y0 = _sources()
    config = dataclasses.replace(MODES[0], validity="oracle")

    def search(validity_fn):
        return latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=config,
                             validity_fn=validity_fn)  # fmt: skip

    alone, both = search(reads_class_0), search(committee(reads_class_0, reads_class_0))
    np.testing.assert_array_equal(both.z, alone.z)
    assert len(alone.z) > 0
    # Members that never agree: every source is misread by one of them, so none is searched.
    split = search(committee(reads_class_0, lambda x: jnp.roll(constant_classify(x), 1, -1)))
    assert split.num_sources_used == 0 and len(split.z) == 0


@pytest.mark.parametrize(
    "validity, validity_fn, match",
    [
        ("oracle", None, "needs validity_fn"),
        ("none", reads_class_0, "was given a validity_fn"),
        ("oracle", lambda x: classify(x)[:, :2], r"over the classifier's 3 classes"),
        ("oracle", lambda x: classify(x)[None, None], r"\[models, batch, 3\]"),
    ],
)
def test_validity_mismatch_is_a_clear_error(validity, validity_fn, match):
    z0, y0 = _sources(4)
    with pytest.raises(ValueError, match=match):
        latent_search(
            decode, classify, z0, y0, key=jax.random.key(0),
            config=SearchConfig(num_samples=4, validity=validity), validity_fn=validity_fn,
        )  # fmt: skip


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("share", [0.0, 0.05, 0.1, 0.5, 1.0])
def test_validity_verdict_reads_only_the_needed_rows_and_matches_reading_all(share, members):
    """The verdict on the rows that need one (gathered into slices) equals the dense reading
    of every row, whatever share of the batch needs it (37 rows: the slices do not divide it);
    a committee's (two members) is every member's. It reads them in the smallest slice that
    holds them all (1, 2, 3 or 5 rows: 37 / 64, 32, 16, 8 rounded up), or in slices of 5."""
    from defuse_jax.search.modes import validity_verdict

    rng = np.random.default_rng(0)
    x = jnp.asarray(decode(jnp.asarray(rng.normal(size=(37, LATENT)), jnp.float32)))
    y = jnp.asarray(rng.integers(0, CLASSES, 37), jnp.int32)
    need = jnp.asarray(rng.random(37) < share)
    reads = []

    def other(images):  # a second reader that disagrees with the first on some rows
        return classify(images[:, ::-1])

    read = []  # the slices read at run time (only the branch taken runs)

    def counting(images):  # the toy classifier, recording how many rows it reads
        rows = images.shape[0]
        reads.append(rows)
        jax.debug.callback(lambda: read.append(rows))
        return classify(images) if members == 1 else committee(classify, other)(images)

    got = jax.jit(lambda x, y, n: validity_verdict(counting, x, y, n))(x, y, need)
    jax.effects_barrier()
    first = (jnp.argmax(classify(x), -1) == y) & need
    dense = first & (jnp.argmax(other(x), -1) == y) if members == 2 else first
    if members == 2 and share == 1.0:
        assert 0 < dense.sum() < first.sum()  # the second member vetoes some of the first's
    np.testing.assert_array_equal(got, dense)
    assert sorted(reads) == [1, 2, 3, 5]  # one branch per slice size
    count = int(need.sum())
    m = next((m for m in (1, 2, 3) if m >= count), 5)
    assert read == [m] * -(-count // m)


@pytest.mark.parametrize(
    "validity, kept, used, says",
    [("none", 10, 400, None), ("oracle", 2000, 400, None), ("oracle", 291, 418, "291 error codes"),
     ("oracle", 0, 0, "--search-validity none"), ("none", 0, 0, "--vae-epochs")],
)  # fmt: skip
def test_a_thin_constrained_search_says_to_raise_the_samples(validity, kept, used, says):
    from defuse_jax.identification import thin_search_note

    summary = {"num_errors_found": kept, "num_sources_used": used, "num_sources": 450,
               "num_samples_evaluated": 100 * used}  # fmt: skip
    note = thin_search_note(summary, SearchConfig(validity=validity))
    assert note is None if says is None else says in note
    if used:  # too few codes: raise the samples
        assert note is None or ("at 100 samples per source" in note
                                and "--search-num-samples" in note)  # fmt: skip
    else:
        assert note.startswith("Every source was skipped")


@pytest.mark.parametrize(
    "sources, per_source", [(1, 1000), (450, 1000), (500, 1000), (2000, 250), (10_000, 100)]
)
def test_unset_samples_spread_the_budget_over_the_sources(sources, per_source):
    from defuse_jax.search.sizing import SAMPLE_BUDGET, samples_per_source, with_samples

    assert samples_per_source(sources) == per_source
    assert per_source * sources <= max(SAMPLE_BUDGET, 100 * sources)
    resolved = with_samples(SearchConfig(num_samples=None), sources)
    assert resolved.num_samples == per_source == resolved.samples_per_source
    assert with_samples(SearchConfig(num_samples=7), sources).num_samples == 7
    with pytest.raises(ValueError, match="sized from the number of sources"):
        _ = SearchConfig(num_samples=None).samples_per_source


@pytest.mark.parametrize("index", [0, 2, 3, 4], ids=["gaussian", "uniform_ball", "iterative",
                                                     "gradient"])  # fmt: skip
def test_free_dims_perturb_only_the_leading_coordinates(results, index):
    # A conditional VAE's class block stays the source's: every kept code matches its source
    # exactly beyond the first free_dims coordinates, and moves within them.
    config, z0 = MODES[index], _sources()[0]
    res = latent_search(decode, classify, z0, _sources()[1], key=jax.random.key(0),
                        config=config, free_dims=2)  # fmt: skip
    assert res.num_found > 0
    np.testing.assert_array_equal(res.z[:, 2:], z0[res.source_index, 2:])
    assert np.all(np.abs(res.z[:, :2] - z0[res.source_index, :2]).sum(axis=1) > 0)
    # The norm is the perturbation's: over the free coordinates, which are all that moved.
    np.testing.assert_allclose(
        res.perturbation_norm, np.linalg.norm(res.z - z0[res.source_index], axis=1), rtol=1e-4
    )
    # All coordinates free is the plain search, to the bit.
    every = latent_search(decode, classify, z0, _sources()[1], key=jax.random.key(0),
                          config=config, free_dims=LATENT)  # fmt: skip
    np.testing.assert_array_equal(every.z, results[IDS[index]].z)


@pytest.mark.parametrize("free_dims", [0, LATENT + 1])
def test_free_dims_out_of_range_is_a_clear_error(free_dims):
    z0, y0 = _sources()
    with pytest.raises(ValueError, match=rf"free_dims={free_dims}.*\[1, {LATENT}\]"):
        latent_search(decode, classify, z0, y0, key=jax.random.key(0),
                      config=MODES[0], free_dims=free_dims)  # fmt: skip


def test_choose_scale_takes_the_smallest_that_keeps_a_code_per_source():
    from defuse_jax.search.scale_choice import choose_scale

    z0, y0 = _sources(40)
    config = SearchConfig(num_samples=8, max_keep_per_source=4, chunk_size=64)
    scales = (2.0, 0.01, 0.3)  # any order: tried ascending
    choice = choose_scale(decode, classify, z0, y0, key=jax.random.key(0), config=config,
                          scales=scales, pilot_sources=24, seed=3)  # fmt: skip
    assert choice.scales == (0.01, 0.3, 2.0) and choice.pilot_sources == 24
    # Each count is what a plain search of the same pilot sources keeps at that scale.
    idx = np.sort(np.random.default_rng(3).choice(40, 24, replace=False))
    kept = [latent_search(decode, classify, z0[idx], y0[idx], key=jax.random.key(0),
                          config=dataclasses.replace(config, scale=s)).num_found
            for s in choice.scales]  # fmt: skip
    assert list(choice.kept) == kept and kept[0] < kept[-1]
    want = next(s for s, k in zip(choice.scales, kept, strict=True) if k >= choice.sources_used)
    assert choice.scale == want and "that keeps at least one error code" in choice.describe()
    # Nothing ever flips: the largest scale, the widest search.
    none = choose_scale(decode, constant_classify, z0, np.zeros(40, np.int32),
                        key=jax.random.key(0), config=config, scales=scales)  # fmt: skip
    assert none.scale == 2.0 and none.kept == (0, 0, 0)
    with pytest.raises(ValueError, match="iterative"):
        choose_scale(decode, classify, z0, y0, key=jax.random.key(0),
                     config=SearchConfig(mode="iterative"), scales=scales)  # fmt: skip


@pytest.mark.parametrize("devices, copies, sources", [(1, 1, 5), (4, 3, 24), (2, 2, 7)])
def test_inputs_pack_into_one_array_and_back(devices, copies, sources):
    """`lay_out_inputs` packs codes, labels, source indices and noise into one array per row
    (one transfer); `unpack_rows` reads back, per device block, every replica's rows."""
    from defuse_jax._plumbing.row_layout import plan_rows
    from defuse_jax.search import engine

    layout = engine.Layout(plan_rows(sources, devices, 4), chains=8, sub_chunks=1)
    d, g, s = layout.rows
    z0 = np.random.default_rng(0).normal(size=(sources, 3)).astype(np.float32)
    y0 = np.arange(sources, dtype=np.int32) % 5
    noise = np.linspace(0.5, 2.0, copies).astype(np.float32)
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("chains",))
    rows = engine.lay_out_inputs(z0, y0, noise, layout, mesh)
    z, y, src, scale = (np.asarray(a) for a in engine.unpack_rows(jnp.asarray(rows)))
    assert rows.shape == (d * copies * g, s, 6)
    padded = d * g * s
    want_src = np.arange(padded).reshape(d, 1, g, s)
    np.testing.assert_array_equal(
        src.reshape(d, copies, g, s), np.broadcast_to(want_src, (d, copies, g, s))
    )
    rows_of = src.reshape(-1)  # every row's source: codes and labels follow it
    real = rows_of < sources
    np.testing.assert_array_equal(z.reshape(-1, 3)[real], z0[rows_of[real]])
    np.testing.assert_array_equal(y.reshape(-1)[real], y0[rows_of[real]])
    assert (y.reshape(-1)[~real] == -1).all() and (z.reshape(-1, 3)[~real] == 0).all()
    np.testing.assert_array_equal(
        scale.reshape(d, copies, g * s), np.broadcast_to(noise[None, :, None], (d, copies, g * s))
    )
