"""JAX mixtures vs scikit-learn: fit time and log-likelihood, side by side in one run.

Rows (both models, `GaussianMixture` EM and the Dirichlet-process `BayesianGaussianMixture`):

- headline: N x d = 100,000 x 16, K = 20 components, full covariance, a fixed 100 iterations
  (tol = 0) on both sides, k-means initialisation on both sides;
- scaling in N (10^4 .. 10^6) and in K at the headline's other settings;
- pipeline: the distillation call, `BayesianGaussianMixture(n_components=100)` until
  convergence (tol 1e-3) on 5,000 x 16 codes with 12 true clusters;
- parity: PCA-16 of scikit-learn's digits, both models started from the same responsibilities
  (scikit-learn's own k-means labels for the seed), run to convergence: the log-likelihoods,
  their relative difference and the number of components with weight > 0.01.

Our fit time excludes compilation (best of `--repeats` fits after a first, compiling fit);
compile time is the first fit minus that, reported separately. scikit-learn runs on float64
data (its usual input) and ours in float32 (our default). Where scikit-learn would take too long
(N x K above `--sklearn-full-max`) it is timed on short fits (1 and 1 + `--sklearn-short-iters`
iterations) and its full time extrapolated linearly; such rows say "extrapolated" and have no
scikit-learn log-likelihood. The load average is recorded: other processes on the machine slow
both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import jax
import numpy as np

from defuse_jax import flags
from defuse_jax.bench.devices import ensure_devices
from defuse_jax.files import atomic_write
from defuse_jax.mixture import BayesianGaussianMixture, GaussianMixture
from defuse_jax.mixture.gaussian import COVARIANCE_TYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the benchmark's flags."""
    parser.add_argument("--n", type=int, default=100_000, help="headline samples")
    parser.add_argument("--d", type=int, default=16, help="features")
    parser.add_argument("--k", type=int, default=20, help="headline components")
    parser.add_argument("--iters", type=int, default=100, help="fixed iterations (tol = 0)")
    parser.add_argument(
        "--covariance-type", default="full", choices=COVARIANCE_TYPES,
        help="the mixtures' covariance type (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--models", nargs="+", choices=["gmm", "dpgmm"], default=["gmm", "dpgmm"], help="models"
    )
    parser.add_argument(
        "--scaling-n", nargs="*", type=flags.list_of(_count), default=[10_000, 100_000, 1_000_000],
        help="N of the scaling rows (none given: no N scaling)",
    )  # fmt: skip
    parser.add_argument(
        "--scaling-k", nargs="*", type=flags.list_of(int), default=[5, 50],
        help="K of the scaling rows (none given: no K scaling)",
    )  # fmt: skip
    parser.add_argument(
        "--sklearn-full-max",
        type=float,
        default=2.5e6,
        help="N*K above which scikit-learn's time is extrapolated from short fits",
    )
    parser.add_argument("--sklearn-short-iters", type=int, default=3)
    parser.add_argument("--no-sklearn", action="store_true", help="time only the JAX models")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pipeline row")
    parser.add_argument("--no-parity", action="store_true", help="skip the digits parity rows")
    parser.add_argument("--devices", type=int, default=1, help="shard our fits over n devices")
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--json", default="bench_results/mixture.json", help="JSON output path")
    flags.renamed(parser, "--out", "--json (--out names a run directory in every command)")


def make_data(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """k anisotropic Gaussian clusters with unequal weights in d dimensions (float64)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 4.0
    weights = rng.dirichlet(np.full(k, 5.0))
    labels = rng.choice(k, size=n, p=weights)
    factors = rng.normal(size=(k, d, d)) * 0.3 + np.eye(d)
    out = np.empty((n, d))
    for j in range(k):
        idx = np.flatnonzero(labels == j)
        out[idx] = centers[j] + rng.normal(size=(idx.size, d)) @ factors[j]
    return out


def _ours(name: str, k: int, iters: int, tol: float, args, seed: int):
    cls = GaussianMixture if name == "gmm" else BayesianGaussianMixture
    devices = None if args.devices <= 1 else args.devices
    return cls(
        n_components=k,
        covariance_type=args.covariance_type,
        max_iter=iters,
        tol=tol,
        random_state=seed,
        devices=devices,
        block_size=args.block_size,
    )


def _sklearn(name: str, k: int, iters: int, tol: float, args, seed: int):
    from sklearn import mixture as skm

    cls = skm.GaussianMixture if name == "gmm" else skm.BayesianGaussianMixture
    return cls(
        n_components=k,
        covariance_type=args.covariance_type,
        max_iter=iters,
        tol=tol,
        random_state=seed,
    )


def _time_fit(model, x) -> float:
    t = time.perf_counter()
    model.fit(x)
    return time.perf_counter() - t


def time_ours(name, x, k, iters, tol, args, seed) -> dict:
    model = _ours(name, k, iters, tol, args, seed)
    first = _time_fit(model, x)
    runs = [_time_fit(model, x) for _ in range(max(1, args.repeats))]
    best = min(runs)
    return {
        "fit_s": best,
        "compile_s": max(0.0, first - best),
        "n_iter": int(model.n_iter_),
        "score": float(model.score(x)),
        "lower_bound": float(model.lower_bound_),
        "active": int((model.weights_ > 0.01).sum()),
    }


def time_sklearn(name, x, k, iters, tol, args, seed, *, extrapolate: bool) -> dict:
    if not extrapolate:
        model = _sklearn(name, k, iters, tol, args, seed)
        t = _time_fit(model, x)
        return {
            "fit_s": t,
            "n_iter": int(model.n_iter_),
            "score": float(model.score(x)),
            "lower_bound": float(np.ravel(model.lower_bound_)[0]),
            "active": int((model.weights_ > 0.01).sum()),
            "extrapolated": False,
        }
    m = max(1, args.sklearn_short_iters)
    t1 = _time_fit(_sklearn(name, k, 1, 0.0, args, seed), x)
    t2 = _time_fit(_sklearn(name, k, 1 + m, 0.0, args, seed), x)
    per_iter = max(0.0, (t2 - t1) / m)
    return {
        "fit_s": t1 + (iters - 1) * per_iter,
        "n_iter": iters,
        "score": None,
        "lower_bound": None,
        "active": None,
        "extrapolated": True,
        "measured": f"1 and {1 + m} iterations: {t1:.1f} s, {t2:.1f} s",
    }


def bench_row(kind, name, n, d, k, iters, tol, args, *, data_seed=None) -> dict:
    x = make_data(n, d, k, args.seed if data_seed is None else data_seed)
    row = {"kind": kind, "model": name, "n": n, "d": d, "k": k, "iters": iters, "tol": tol}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning with tol = 0, on both sides
        row["ours"] = time_ours(name, x, k, iters, tol, args, args.seed)
        if not args.no_sklearn:
            extrapolate = n * k > args.sklearn_full_max
            row["sklearn"] = time_sklearn(
                name, x, k, iters, tol, args, args.seed, extrapolate=extrapolate
            )
            row["speedup"] = row["sklearn"]["fit_s"] / row["ours"]["fit_s"]
    _print_row(row)
    return row


HEADER = (
    f"{'rows':<9} {'model':<6} {'N':>8} {'K':>4} {'iters':>9} {'ours s':>8} {'compile':>8} "
    f"{'sklearn s':>10} {'speed-up':>9} {'ours ll':>10} {'sklearn ll':>10} {'active':>7}  note"
)


def _fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def _print_row(row: dict) -> None:
    o, s = row["ours"], row.get("sklearn")
    iters = f"{o['n_iter']}/{s['n_iter']}" if s else f"{o['n_iter']}"
    active = f"{o['active']}/{_fmt(s['active'], 'd')}" if s else f"{o['active']}"
    note = ""
    if "score_rel_diff" in row:
        note = f"digits PCA-16, same start: |ll diff| / |ll| = {row['score_rel_diff']:.1e}"
    if s and s.get("extrapolated"):
        note = "sklearn extrapolated (" + s["measured"] + ")"
    print(
        f"{row['kind']:<9} {row['model']:<6} {row['n']:>8} {row['k']:>4} {iters:>9} "
        f"{o['fit_s']:>8.2f} {o['compile_s']:>8.2f} "
        f"{_fmt(s['fit_s'] if s else None, '10.2f'):>10} "
        f"{_fmt(row.get('speedup'), '8.1f') + 'x' if s else '-':>9} "
        f"{o['score']:>10.4f} {_fmt(s['score'] if s else None, '10.4f'):>10} {active:>7}  {note}",
        flush=True,
    )


def _count(text: str) -> int:
    """An int that may be written 1e6."""
    return int(float(text))


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark, prints the table and writes the JSON; returns the results."""
    if args.quick:
        args.n, args.d, args.k, args.iters = 5000, 8, 5, 20
        args.scaling_n, args.scaling_k = [2000, 5000], [3]
        args.repeats = 1
    models = list(dict.fromkeys(args.models))
    ensure_devices(args.devices)
    load_start = os.getloadavg()
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices_used": max(1, args.devices),
        "devices_available": len(jax.devices()),
        "load_average_start": load_start,
        "dtype": {"ours": "float32", "sklearn": "float64"},
    }
    print(
        f"mixture bench: {info['backend']} ({info['cpu_count']} CPUs, "
        f"{info['devices_used']}/{info['devices_available']} devices), jax {info['jax']}, "
        f"load average {load_start[0]:.1f}; ours float32, scikit-learn float64; "
        f"covariance {args.covariance_type}"
    )
    print(HEADER)
    rows = []
    d, iters = args.d, args.iters
    for name in models:
        rows.append(bench_row("headline", name, args.n, d, args.k, iters, 0.0, args))
    for n in args.scaling_n:
        for name in models:
            if n == args.n:
                continue  # the headline row
            rows.append(bench_row("scale-N", name, n, d, args.k, iters, 0.0, args))
    for k in args.scaling_k:
        for name in models:
            if k == args.k:
                continue
            rows.append(bench_row("scale-K", name, args.n, d, k, iters, 0.0, args))
    if not args.no_pipeline and not args.quick and "dpgmm" in models:
        rows.append(pipeline_row(args))
    if not args.no_parity and not args.no_sklearn:
        rows.extend(parity_rows(models, args))
    info["load_average_end"] = os.getloadavg()
    result = {"info": info, "args": vars(args) | {"func": None}, "rows": rows}
    result["args"].pop("func", None)
    out = args.json
    if out:
        with atomic_write(out) as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {out}")
    return result


def pipeline_row(args) -> dict:
    """The distillation call: DP mixture, 100 components, until convergence, 5,000 x 16."""
    n, d, true_k = 5000, 16, 12
    x = make_data(n, d, true_k, args.seed + 1)
    row = {"kind": "pipeline", "model": "dpgmm", "n": n, "d": d, "k": 100, "iters": 1000}
    row["tol"] = 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row["ours"] = time_ours("dpgmm", x, 100, 1000, 1e-3, args, args.seed)
        if not args.no_sklearn:
            row["sklearn"] = time_sklearn(
                "dpgmm", x, 100, 1000, 1e-3, args, args.seed, extrapolate=False
            )
            row["speedup"] = row["sklearn"]["fit_s"] / row["ours"]["fit_s"]
    _print_row(row)
    return row


def parity_rows(models, args) -> list[dict]:
    """Digits PCA-16, same start on both sides, to convergence: log-likelihoods side by side."""
    from sklearn import mixture as skm
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    x = PCA(16, random_state=0).fit_transform(load_digits().data)
    rows = []
    for name in models:
        k = 10 if name == "gmm" else 20
        labels = KMeans(n_clusters=k, n_init=1, random_state=np.random.RandomState(args.seed))
        resp = np.zeros((len(x), k))
        resp[np.arange(len(x)), labels.fit(x).labels_] = 1
        kw = dict(n_components=k, max_iter=500)
        if name == "gmm":
            ours, ref = GaussianMixture(**kw), skm.GaussianMixture(random_state=args.seed, **kw)
        else:
            ours = BayesianGaussianMixture(**kw)
            ref = skm.BayesianGaussianMixture(random_state=args.seed, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            ours.fit(x, init_resp=resp)  # compiles
            t_first = time.perf_counter() - t
            t = time.perf_counter()
            ours.fit(x, init_resp=resp)
            t_ours = time.perf_counter() - t
            t_ref = _time_fit(ref, x)
        so, sr = float(ours.score(x)), float(ref.score(x))
        row = {
            "kind": "parity",
            "model": name,
            "n": len(x),
            "d": 16,
            "k": k,
            "iters": 500,
            "tol": 1e-3,
            "ours": {
                "fit_s": t_ours,
                "compile_s": max(0.0, t_first - t_ours),
                "n_iter": int(ours.n_iter_),
                "score": so,
                "active": int((ours.weights_ > 0.01).sum()),
            },
            "sklearn": {
                "fit_s": t_ref,
                "n_iter": int(ref.n_iter_),
                "score": sr,
                "active": int((ref.weights_ > 0.01).sum()),
                "extrapolated": False,
            },
            "speedup": t_ref / t_ours,
            "score_rel_diff": abs(so - sr) / abs(sr),
        }
        _print_row(row)
        rows.append(row)
    return rows
