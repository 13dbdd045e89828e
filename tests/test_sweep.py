"""Scale sweeps in one program (`latent_search_sweep`) and the `defuse-jax sweep` table."""

import argparse
import csv
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defuse_jax import cli
from defuse_jax import sweep as sweep_lib
from defuse_jax.search import SearchConfig, engine, latent_search, latent_search_sweep
from defuse_jax.search.scale_sweep import check_sweep

LATENT, HIDDEN, CLASSES = 4, 16, 3
_W = np.asarray(jax.random.normal(jax.random.key(1), (LATENT, HIDDEN)), np.float32)
_V = np.asarray(jax.random.normal(jax.random.key(2), (HIDDEN, CLASSES)), np.float32)


def decode(z):  # [B, L] -> [B, 4, 4, 1]
    return jnp.tanh(z @ jnp.asarray(_W, z.dtype)).reshape(z.shape[0], 4, 4, 1)


def classify(x):  # [B, 4, 4, 1] -> [B, C]
    return x.reshape(x.shape[0], -1) @ jnp.asarray(_V, x.dtype)


def constant_classify(x):  # a validity model that reads every image as class 0
    return jnp.zeros((x.shape[0], CLASSES), x.dtype) + jnp.asarray([1.0, 0.0, 0.0], x.dtype)


def _sources(n=24, seed=0):
    z0 = np.random.default_rng(seed).normal(size=(n, LATENT)).astype(np.float32)
    y0 = np.asarray(jnp.argmax(classify(decode(jnp.asarray(z0))), -1), np.int32)
    return z0, y0


def _counting_decode():
    """A fresh decode function (own program cache entries) that counts its traces."""
    count = [0]

    def dec(z):
        count[0] += 1  # Python side effect: runs once per trace, never per execution
        return decode(z)

    return dec, count


FIELDS = ("z", "source_index", "source_label", "pred_label", "prob", "perturbation_norm",
          "flips_per_source", "used")  # fmt: skip
SWEEPABLE = {
    "gaussian": SearchConfig(num_samples=24, chunk_size=64),
    "laplace": SearchConfig(distribution="laplace", num_samples=24, chunk_size=64, seed=3),
    "gaussian_keep_all": SearchConfig(num_samples=8, max_keep_per_source=None, chunk_size=5),
    "gradient": SearchConfig(mode="gradient", chains_per_source=4, num_rounds=5, chunk_size=16),
}


@pytest.mark.parametrize("name", list(SWEEPABLE))
def test_sweep_equals_separate_searches(name):
    z0, y0 = _sources()
    config, scales = SWEEPABLE[name], [0.3, 1.0, 0.7, 2.5]
    results = latent_search_sweep(
        decode, classify, z0, y0, key=jax.random.key(0), config=config, scales=scales
    )
    assert len(results) == len(scales)
    found = []
    for scale, res in zip(scales, results, strict=True):
        ref = latent_search(
            decode, classify, z0, y0, key=jax.random.key(0),
            config=dataclasses.replace(config, scale=scale),
        )  # fmt: skip
        for f in FIELDS:  # bit-identical, not just close
            np.testing.assert_array_equal(getattr(res, f), getattr(ref, f), err_msg=f)
        assert res.config == ref.config and res.config.scale == scale
        assert (res.num_samples_evaluated, res.num_sources_used, res.num_sources_skipped) == (
            ref.num_samples_evaluated, ref.num_sources_used, ref.num_sources_skipped,
        )  # fmt: skip
        found.append(res.num_flips)
    assert found[0] < found[-1]  # a wider perturbation flips more often (toy model)


def _always_class_0(x):  # every sample of a source labeled 1 is an error: all are kept
    return jnp.zeros((x.shape[0], CLASSES), x.dtype).at[:, 0].set(1.0)


def test_common_random_numbers_across_scales():
    """Sample j of source i is z0_i + scale * u_ij with the same unit noise u_ij at every scale."""
    z0, _ = _sources()
    y0 = np.ones(len(z0), np.int32)
    cfg = SearchConfig(num_samples=16, max_keep_per_source=None, skip_misclassified=False)
    lo, hi = latent_search_sweep(
        decode, _always_class_0, z0, y0, key=jax.random.key(0), config=cfg, scales=[0.5, 1.5]
    )
    assert lo.num_found == hi.num_found == len(z0) * 16
    # Ordered by source, then norm (= scale * |u|): the same order at both scales.
    np.testing.assert_array_equal(lo.source_index, hi.source_index)
    u_lo = (lo.z - z0[lo.source_index]) / 0.5
    u_hi = (hi.z - z0[hi.source_index]) / 1.5
    np.testing.assert_allclose(u_lo, u_hi, rtol=1e-4, atol=1e-5)
    # ... and the unit noise is drawn per chain, not one offset repeated.
    assert len(np.unique(u_lo.round(3), axis=0)) == len(u_lo)


def test_one_program_for_all_scales():
    z0, y0 = _sources(12)
    cfg = SearchConfig(num_samples=16)
    dec, count = _counting_decode()
    latent_search_sweep(dec, classify, z0, y0, key=jax.random.key(0), config=cfg,
                        scales=[0.25, 0.5, 1.0, 2.0])  # fmt: skip
    traces = count[0]
    ours = [k for k in engine._PROGRAMS if k[0] is dec]
    assert len(ours) == 1, "one program (one jit) for the four scales"
    # other values, same count: no new trace and no new program
    latent_search_sweep(dec, classify, z0, y0, key=jax.random.key(1), config=cfg,
                        scales=[0.1, 0.2, 0.3, 0.4])  # fmt: skip
    assert count[0] == traces
    assert len([k for k in engine._PROGRAMS if k[0] is dec]) == 1
    # a fresh function traced by one single search takes as many traces as the whole sweep did
    dec2, count2 = _counting_decode()
    latent_search(dec2, classify, z0, y0, key=jax.random.key(0), config=cfg)
    assert count2[0] == traces
    # and the scale is no part of a single search's program either
    latent_search(dec2, classify, z0, y0, key=jax.random.key(0),
                  config=dataclasses.replace(cfg, scale=3.0))  # fmt: skip
    assert count2[0] == traces


@pytest.mark.parametrize(
    "config, scales, match",
    [
        (SearchConfig(mode="iterative"), [0.5], "iterative.*does not use `scale`"),
        (SearchConfig(distribution="uniform_ball"), [0.5], "uniform_ball.*does not use"),
        (SearchConfig(distribution="beta_offset"), [0.5], "beta_offset.*does not use"),
        (SearchConfig(), [], "scales is empty"),
        (SearchConfig(), [0.5, 0.0], "finite and > 0"),
        (SearchConfig(), [-1.0], "finite and > 0"),
        (SearchConfig(), [float("nan")], "finite and > 0"),
        (SearchConfig(), [True], "must be numbers"),
        (SearchConfig(), "0.5", "sequence of numbers"),
        ("notaconfig", [0.5], "SearchConfig"),
    ],
)
def test_bad_sweep_is_a_clear_error_before_tracing(config, scales, match):
    z0, y0 = _sources(4)
    dec, count = _counting_decode()
    with pytest.raises(ValueError, match=match):
        latent_search_sweep(dec, classify, z0, y0, key=jax.random.key(0), config=config,
                            scales=scales)  # fmt: skip
    assert count[0] == 0  # nothing traced, nothing compiled


def test_gradient_mode_is_sweepable():
    assert check_sweep(SearchConfig(mode="gradient", distribution="beta_offset"), [1]) == (1.0,)


# ---------------------------------------------------------------------------------------------
# The sweep table


TOY_GRID = sweep_lib.SweepGrid(
    distributions=("gaussian", "beta_offset"),
    scales=(0.5, 1.5),
    samples=(8,),
    modes=("sample", "iterative", "gradient"),
)


def test_plan_groups_only_scales_into_one_program():
    base = SearchConfig(num_rounds=4)
    groups = sweep_lib.plan(TOY_GRID, base)
    shapes = [(c.mode, c.distribution if c.mode == "sample" else None, s) for c, s in groups]
    assert shapes == [
        ("sample", "gaussian", (0.5, 1.5)),
        ("sample", "beta_offset", ()),
        ("iterative", None, ()),
        ("gradient", None, (0.5, 1.5)),
    ]
    assert all(c.samples_per_source == 8 for c, _ in groups)


def test_table_rows_match_the_searches(tmp_path):
    z0, y0 = _sources(16)
    base = SearchConfig(num_rounds=4, chunk_size=64)
    rows = sweep_lib.run_sweep(
        decode, classify, z0, y0, grid=TOY_GRID, base=base, key=jax.random.key(0),
        distill_config=None, log=lambda s: None,
    )  # fmt: skip
    assert len(rows) == 6 and all(set(r) == set(sweep_lib.COLUMNS) for r in rows)
    for r in rows:
        cfg = dataclasses.replace(base, mode=r["mode"], num_samples=8, chains_per_source=2)
        if r["distribution"]:
            cfg = dataclasses.replace(cfg, distribution=r["distribution"])
        if r["scale"] is not None:
            cfg = dataclasses.replace(cfg, scale=r["scale"])
        ref = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=cfg)
        assert (r["flips"], r["errors_kept"], r["samples_evaluated"]) == (
            ref.num_flips, ref.num_found, ref.num_samples_evaluated,
        )  # fmt: skip
        assert r["errors_per_million"] == pytest.approx(
            1e6 * ref.num_flips / r["samples_evaluated"]
        )
        assert r["throughput_samples_per_s"] > 0 and r["run_s"] > 0
        assert r["settings_in_program"] == (2 if r["scale"] is not None else 1)
        assert r["regions"] is None
    paths = sweep_lib.write_outputs(rows, str(tmp_path), meta={"run": "toy"})
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 6
    with open(paths["json"]) as f:
        assert json.load(f)["rows"][0]["flips"] == rows[0]["flips"]
    assert os.path.getsize(paths["png"]) > 1000
    assert "errors_per_million" in sweep_lib.format_table(rows).splitlines()[0]


def test_validity_axis_and_bug_yield_column():
    """Each validity runs the grid again; "oracle" searches with the validity model, and the
    judge's figure lands in the bug_yield column."""
    z0, y0 = _sources(16)
    grid = sweep_lib.SweepGrid(distributions=("gaussian",), scales=(1.5,), samples=(16,),
                               modes=("sample",), validities=("none", "oracle"))  # fmt: skip
    base = SearchConfig(chunk_size=64)
    assert [c.validity for c, _ in sweep_lib.plan(grid, base)] == ["none", "oracle"]
    with pytest.raises(ValueError, match="validity 'oracle' needs the oracle"):
        sweep_lib.run_sweep(
            decode, classify, z0, y0, grid=grid, base=base, key=jax.random.key(0),
            distill_config=None, log=lambda s: None,
        )  # fmt: skip
    rows = sweep_lib.run_sweep(
        decode, classify, z0, y0, grid=grid, base=base, key=jax.random.key(0),
        distill_config=None, log=lambda s: None, validity_fn=constant_classify,
        judge=lambda res: res.num_found / 1000,
    )  # fmt: skip
    plain, valid = rows
    assert (plain["validity"], valid["validity"]) == ("none", "oracle")
    cfg = SearchConfig(chunk_size=64, num_samples=16, scale=1.5, validity="oracle")
    ref = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=cfg,
                        validity_fn=constant_classify)  # fmt: skip
    assert valid["errors_kept"] == ref.num_found < plain["errors_kept"]
    assert [r["bug_yield"] for r in rows] == [r["errors_kept"] / 1000 for r in rows]


def test_regions_are_counted_with_the_mixture():
    z0, y0 = _sources(16)
    grid = sweep_lib.SweepGrid(distributions=("gaussian",), scales=(1.5,), samples=(32,),
                               modes=("sample",))  # fmt: skip
    from defuse_jax.regions import DistillConfig

    rows = sweep_lib.run_sweep(
        decode, classify, z0, y0, grid=grid, base=SearchConfig(max_keep_per_source=None),
        key=jax.random.key(0), distill_config=DistillConfig(n_components=4, max_iter=30),
        log=lambda s: None,
    )  # fmt: skip
    assert rows[0]["errors_kept"] >= 10 and rows[0]["regions"] >= 1


def _args(**kw):
    base = dict(quick=False, distributions=None, scales=None, samples=None, modes=None,
                validities=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"distributions": ["gaussian", "cauchy"]}, r"unknown distributions \['cauchy'\]"),
        ({"modes": ["sample", "bogus"]}, r"unknown modes \['bogus'\]"),
        ({"scales": [0.5, -1.0]}, "finite and > 0"),
        ({"scales": [0.0]}, "finite and > 0"),
        ({"samples": [0]}, "positive ints"),
    ],
)
def test_bad_grid_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        sweep_lib.grid_from_args(_args(**kw))


def test_grid_flags_override_the_quick_grid():
    grid = sweep_lib.grid_from_args(_args(quick=True, scales=[0.1, 0.2]))
    assert grid.scales == (0.1, 0.2) and grid.samples == sweep_lib.QUICK_GRID.samples


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--modes", "bogus"], "unknown modes"),  # the grid fails before the missing run
        ([], "holds no run"),
        (["--scales", "0.5,1"], "space-separated: write '0.5 1'"),
        (["--samples", "1.5"], "invalid int value"),
        (["--run", "x"], "--run was renamed: use --out"),
        (["--out-dir", "x"], "--out-dir was renamed: use --sweep-dir"),
    ],
)
def test_cli_rejects_bad_flags_before_loading_anything(tmp_path, capsys, argv, match):
    missing = str(tmp_path / "no_run")
    try:
        code = cli.main(["sweep", "--out", missing, *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert match in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A quickly trained run directory (small models, ~30-60 s on a CPU)."""
    from defuse_jax import pipeline
    from defuse_jax.run_config import RunConfig, quick

    run_dir = str(tmp_path_factory.mktemp("sweep_run") / "run")
    config = dataclasses.replace(quick(RunConfig()), progress=False)
    pipeline.run(run_dir, config, until="train", log=lambda s: None)
    return run_dir


def test_cli_sweep_on_a_trained_run(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    code = cli.main(["sweep", "--out", tiny_run, "--quick", "--distributions", "gaussian",
                     "--max-sources", "20", "--samples", "8", "--sweep-dir", out])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "errors_per_million" in printed and "sweep.png" in printed
    with open(os.path.join(out, "sweep.json")) as f:
        table = json.load(f)
    assert table["num_sources"] == 20 and len(table["rows"]) == 2
    assert [r["scale"] for r in table["rows"]] == [0.5, 1.0]
    for r in table["rows"]:
        assert r["samples_evaluated"] == 8 * r["sources_used"] and r["regions"] >= 0
    assert os.path.exists(os.path.join(out, "sweep.csv"))


def test_bf16_error_rate_matches_float32_on_trained_models(tiny_run):
    """bfloat16 weights and activations find errors at float32's rate (same perturbations)."""
    from defuse_jax import identification, models
    from defuse_jax import train_models as tm
    from defuse_jax.data import DataConfig, load_dataset

    vae, _ = tm.load_trained(os.path.join(tiny_run, "train", "vae"))
    clf, _ = tm.load_trained(os.path.join(tiny_run, "train", "classifier"))
    ds = load_dataset(DataConfig(max_train=600, max_test=200))
    y0 = ds.y_test[:150].astype(np.int32)
    z0 = identification.encode_sources(vae, ds.x_test[:150], y0)  # (the VAE is conditional)
    rates = {}
    for dtype in ("float32", "bfloat16"):
        fns = models.search_functions(vae, clf, compute_dtype=dtype)
        cfg = SearchConfig(num_samples=128, scale=2.0, compute_dtype=dtype)
        res = latent_search(*fns, z0, y0, key=jax.random.key(0), config=cfg,
                            free_dims=models.style_dims(vae))  # fmt: skip
        rates[dtype] = res.num_flips / res.num_samples_evaluated
    assert rates["float32"] > 0.05  # a meaningful error rate to compare
    # bf16 rounds logits to ~3 significant digits: only near-boundary samples flip differently
    assert abs(rates["bfloat16"] - rates["float32"]) < 0.01, rates
