"""`defuse-jax bench search`: throughput of the latent search engine against its honest ceilings.

For each model size (digits-sized MLP VAE decoder + MLP classifier; MNIST-sized conv VAE decoder
+ conv classifier, random weights, no data needed) it measures, in one run:

- the engine's latent samples evaluated per second for chain counts 256 .. 65,536 (sample mode,
  Q per source, the chunk size tuned first);
- the bare jitted forward pass (decode + classify + argmax, no search logic) at its best batch
  size: the ceiling for any search with these networks, and the engine's fraction of it;
- FLOPs per sample from XLA's cost analysis, achieved GFLOP/s, a large matmul's GFLOP/s;
- the reference's structure: a Python loop over source points with Q perturbations each, results
  pulled to the host per point, as a per-point jitted JAX function and (if `torch` is importable)
  as PyTorch modules of the same shapes; the engine's speed-up over each;
- (MLP) distinct errors per evaluated sample of the "sample", "iterative" and "gradient" modes.

Timings are wall-clock best-of-`--repeats` after a warm-up call (compilation excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from defuse_jax import flags, models
from defuse_jax.bench import roofline
from defuse_jax.bench.devices import ensure_devices
from defuse_jax.files import atomic_write
from defuse_jax.search import SearchConfig, latent_search, start_search
from defuse_jax.search.config import DTYPES

MODEL_SHAPES = {"mlp": (8, 8, 1), "conv": (28, 28, 1)}
LATENT_DIM = 8
STREAM_CALLS = 8  # searches per streamed timing (`paired_fraction`)
NUM_CLASSES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the benchmark's flags."""
    parser.add_argument(
        "--models", nargs="+", choices=list(MODEL_SHAPES), default=["mlp", "conv"],
        help="model sizes",
    )  # fmt: skip
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=list(DTYPES),
        default=["float32"],
        help="compute dtypes (weights cast with models.cast_params, as the pipeline does); the "
        "reference loops and the mode comparison run in the first one",
    )
    parser.add_argument(
        "--chains",
        nargs="+",
        type=flags.list_of(int),
        default=[256, 1024, 4096, 16384, 65536],
        help="total chain (= sample) counts per search call",
    )
    parser.add_argument(
        "--samples-per-source",
        type=int,
        default=32,
        help="Q of the throughput sweep (sources = chains / Q)",
    )
    parser.add_argument(
        "--chunk-sizes",
        nargs="+",
        type=flags.list_of(int),
        default=None,
        help="chunk sizes to try besides the automatic one (default on CPU: 256..8192 mlp, "
        "32..512 conv; larger on GPU/TPU)",
    )
    parser.add_argument(
        "--ref-points",
        type=int,
        default=64,
        help="source points timed in the per-point reference loops",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="best of this many timings (1 for calls longer than 5 s)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=0,
        help="on CPU, split the search over n XLA host devices (e.g. one per core; measure it: "
        "on a 2-core CPU it helped the MLP models, not the conv ones); 0: the devices JAX has",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-modes", action="store_true", help="skip the mode comparison")
    parser.add_argument(
        "--out",
        default="",
        help="a run directory whose search stage has run (any data set, your own models too): "
        "also time its own search without and with its validity model (the constraint's cost "
        "on trained models) and compare the modes there",
    )
    parser.add_argument(
        "--decoders", nargs="+", choices=["phase", "native"], default=None,
        help="conv decoder formulations to compare on the bare forward pass (models."
        "set_decoder_formulation; default: only the backend's own)",
    )  # fmt: skip
    parser.add_argument(
        "--scaling-devices", nargs="+", type=flags.list_of(int), default=None,
        help="engine samples/s on meshes of the first n devices, for each n (MLP models)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repeat")
    parser.add_argument("--json", default="bench_results/search.json", help="JSON output path")
    flags.renamed(parser, "--run-dir", "--out (the trained run directory)")


# ---------------------------------------------------------------------------------------------
# models


def build_models(kind: str, dtype: str = "float32"):
    """Random-weight VAE + classifier of one size, computing in `dtype`:
    (decode_fn, classify_fn, vae, clf)."""
    from flax import nnx

    from defuse_jax import models

    shape = MODEL_SHAPES[kind]
    vae = models.VAE(
        models.VAEConfig(kind=kind, latent_dim=LATENT_DIM), image_shape=shape, rngs=nnx.Rngs(0)
    )
    clf = models.Classifier(
        models.ClassifierConfig(kind=kind),
        image_shape=shape,
        num_classes=NUM_CLASSES,
        rngs=nnx.Rngs(1),
    )
    vp, cp = models.params_of(vae), models.params_of(clf)
    decode_fn, classify_fn = models.search_functions(vp, cp, compute_dtype=dtype)
    return decode_fn, classify_fn, vae, clf


def _sources(decode_fn, classify_fn, n: int, seed: int = 0, dtype: str = "float32"):
    """n random latent codes and the labels the classifier gives them in `dtype` (so no source
    is skipped)."""
    z0 = np.random.default_rng(seed).normal(size=(n, LATENT_DIM)).astype(np.float32)
    fwd = jax.jit(lambda z: jnp.argmax(classify_fn(decode_fn(z.astype(dtype))), -1))
    y0 = np.asarray(fwd(z0), np.int32)
    return z0, y0


# ---------------------------------------------------------------------------------------------
# measurements


def forward_ceiling(decode_fn, classify_fn, batches, repeats: int, dtype: str = "float32") -> dict:
    """Bare decode + classify + argmax at each batch size in `dtype`, the batch sharded over all
    devices like the engine's chains; FLOPs and bytes per sample from XLA's cost analysis at the
    best batch."""
    fwd = jax.jit(lambda z: jnp.argmax(classify_fn(decode_fn(z.astype(dtype))), axis=-1))
    devices = jax.devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), ("b",)), P("b"))
    rows = []
    for b in batches:
        b = -(-b // len(devices)) * len(devices)
        z = jax.random.normal(jax.random.key(0), (b, LATENT_DIM), jnp.float32)
        z = jax.device_put(z, sharding)
        t = roofline.best_time(lambda z=z: fwd(z).block_until_ready(), repeats)
        rows.append({"batch": b, "samples_per_s": b / t})
    best = max(rows, key=lambda r: r["samples_per_s"])
    cost = roofline.xla_forward_cost(fwd, best["batch"], LATENT_DIM)
    return {
        "by_batch": rows,
        "best_batch": best["batch"],
        "best_samples_per_s": best["samples_per_s"],
        "flops_per_sample": cost["flops"],
        "cost": cost,
    }


def _config(q: int, chunk: int | None, dtype: str, validity: str = "none") -> SearchConfig:
    return SearchConfig(
        mode="sample", num_samples=q, chunk_size=chunk, max_keep_per_source=5, compute_dtype=dtype,
        validity=validity,
    )  # fmt: skip


def engine_throughput(
    decode_fn,
    classify_fn,
    chains: int,
    q: int,
    chunk: int | None,
    repeats: int,
    dtype="float32",
    validity_fn=None,
) -> dict:
    """The engine on `chains` samples; `chunk=None` lets the search pick the chunk size;
    `validity_fn`: search with that validity model (`SearchConfig.validity`)."""
    n = max(1, chains // q)
    z0, y0 = _sources(decode_fn, classify_fn, n, dtype=dtype)
    cfg = _config(q, chunk, dtype, "none" if validity_fn is None else "oracle")
    key = jax.random.key(0)

    def search():
        return latent_search(
            decode_fn, classify_fn, z0, y0, key=key, config=cfg, validity_fn=validity_fn
        )

    res = search()
    t = roofline.best_time(search, repeats)
    return {
        "chains": n * q,
        "sources": n,
        "q": q,
        "chunk_size": res.config.chunk_size,
        "auto_chunk": chunk is None,
        "seconds": t,
        "samples_per_s": n * q / t,
        "found": res.num_found,
        "flips": res.num_flips,
        "sources_used": res.num_sources_used,
    }


def validity_cost(
    decode_fn,
    classify_fn,
    kind: str,
    dtype: str,
    chains: int,
    q: int,
    chunk: int,
    repeats: int,
    *,
    plain: dict,
) -> dict:
    """What `--search-validity oracle` costs: the engine with the run's default oracle for the
    model's image shape (random weights; the cost does not depend on them) against `plain`,
    the same engine's best row without one. The oracle is `DEFAULT_ORACLE_MEMBERS` models of
    the oracle's size per default shift (`train_models.oracle_shifts`): a committee of two
    such ensembles, each reading the flips."""
    from flax import nnx

    from defuse_jax import models, train_models
    from defuse_jax.stages.label import DEFAULT_ORACLE_MEMBERS

    shape = MODEL_SHAPES[kind]
    config = dataclasses.replace(train_models.oracle_classifier_config(shape), kind=kind)
    groups = len(train_models.oracle_shifts(shape))
    members = [
        models.params_of(models.Classifier(config, image_shape=shape, num_classes=NUM_CLASSES,
                                           rngs=nnx.Rngs(2 + i)))
        for i in range(groups * DEFAULT_ORACLE_MEMBERS)
    ]  # fmt: skip
    readers = train_models.shift_groups(members, groups)
    validity_fn = models.validity_function(readers, compute_dtype=dtype)
    row = engine_throughput(decode_fn, classify_fn, chains, q, chunk, repeats, dtype, validity_fn)
    return {**row, "time_ratio": plain["samples_per_s"] / row["samples_per_s"],
            "oracle_groups": groups, "oracle_members": len(members)}  # fmt: skip


def paired_fraction(
    decode_fn, classify_fn, chains: int, q: int, chunk: int, batch: int, repeats: int, dtype
) -> dict:
    """Engine vs bare forward on the same number of samples, timed alternately so that both see
    the same machine load (on a shared CPU an unpaired ceiling is biased by lucky moments); the
    engine both as one call at a time and streamed (`start_search`: a call's host work overlaps
    the device's work on the previous call, as in a sweep)."""
    n = max(1, chains // q)
    z0, y0 = _sources(decode_fn, classify_fn, n, dtype=dtype)
    cfg = _config(q, chunk, dtype)
    key = jax.random.key(0)
    fwd = jax.jit(lambda z: jnp.argmax(classify_fn(decode_fn(z.astype(dtype))), axis=-1))
    z = jax.random.normal(jax.random.key(1), (batch, LATENT_DIM), jnp.float32)
    calls = -(-n * q // batch)

    def forward_all():  # async dispatch of every batch, one wait at the end
        out = [fwd(z) for _ in range(calls)]
        jax.block_until_ready(out)

    def engine():
        latent_search(decode_fn, classify_fn, z0, y0, key=key, config=cfg)

    def engine_streamed():  # STREAM_CALLS searches, each started before the last one is read
        last = None
        for _ in range(STREAM_CALLS):
            started = start_search(decode_fn, classify_fn, z0, y0, key=key, config=cfg)
            if last is not None:
                last.result()
            last = started
        last.result()

    forward_all(), engine(), engine_streamed()
    t_fwd, t_eng, t_stream = float("inf"), float("inf"), float("inf")
    for _ in range(max(repeats, 3)):
        t = time.perf_counter()
        forward_all()
        t_fwd = min(t_fwd, time.perf_counter() - t)
        t = time.perf_counter()
        engine()
        t_eng = min(t_eng, time.perf_counter() - t)
        t = time.perf_counter()
        engine_streamed()
        t_stream = min(t_stream, (time.perf_counter() - t) / STREAM_CALLS)
    fwd = calls * batch / t_fwd
    return {
        "chains": n * q,
        "chunk_size": chunk,
        "forward_batch": batch,
        "forward_samples_per_s": fwd,
        "engine_samples_per_s": n * q / t_eng,
        "fraction": (n * q / t_eng) / fwd,
        "streamed_samples_per_s": n * q / t_stream,
        "streamed_fraction": (n * q / t_stream) / fwd,
    }


def reference_jax_loop(decode_fn, classify_fn, q: int, points: int, keep: int = 3) -> dict:
    """The reference's structure: a Python loop over sources, one jitted call per point, results
    pulled to the host per point, mismatches and the `keep` smallest perturbations chosen there.

    The point's key is derived inside the jitted call: deriving it eagerly on the host
    (`jax.random.fold_in` outside jit) costs more than the call itself on CPU and would make this
    baseline look slower than a careful user's loop."""

    @jax.jit
    def per_point(z0, root, i):  # z0: [L] -> (z [Q, L], pred [Q], norm [Q])
        key = jax.random.fold_in(root, i)
        delta = jnp.float32(0.5) * jax.random.normal(key, (q, LATENT_DIM), jnp.float32)
        z = z0[None, :] + delta
        pred = jnp.argmax(classify_fn(decode_fn(z)), axis=-1)
        return z, pred, jnp.linalg.norm(delta, axis=-1)

    z0, y0 = _sources(decode_fn, classify_fn, points, seed=1)
    root = jax.random.key(0)

    def loop():
        kept = []
        for i in range(points):
            z, pred, norm = jax.device_get(per_point(z0[i], root, i))
            bad = np.flatnonzero(pred != y0[i])
            kept.append(z[bad[np.argsort(norm[bad])[:keep]]])
        return kept

    t = roofline.best_time(loop, 3)
    return {"q": q, "points": points, "seconds": t, "samples_per_s": points * q / t}


def _torch_modules(vae, clf, kind: str):
    """PyTorch decoder + classifier with the same layer shapes as the flax models."""
    import torch
    from torch import nn

    h, w, c = MODEL_SHAPES[kind]
    vc, cc = vae.config, clf.config
    if kind == "mlp":
        dec = nn.Sequential(
            nn.Linear(LATENT_DIM, vc.hidden),
            nn.ReLU(),
            nn.Linear(vc.hidden, vc.hidden),
            nn.ReLU(),
            nn.Linear(vc.hidden, h * w * c),
            nn.Sigmoid(),
            nn.Unflatten(1, (c, h, w)),
        )
        net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(h * w * c, cc.hidden),
            nn.ReLU(),
            nn.Linear(cc.hidden, cc.hidden),
            nn.ReLU(),
            nn.Linear(cc.hidden, NUM_CLASSES),
        )
    else:
        c1, c2 = vc.channels
        dec = nn.Sequential(
            nn.Linear(LATENT_DIM, vc.hidden),
            nn.ReLU(),
            nn.Linear(vc.hidden, (h // 4) * (w // 4) * c2),
            nn.ReLU(),
            nn.Unflatten(1, (c2, h // 4, w // 4)),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c, 3, padding=1),
            nn.Sigmoid(),
        )
        k1, k2 = cc.channels
        net = nn.Sequential(
            nn.Conv2d(c, k1, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(k1, k2, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear((h // 4) * (w // 4) * k2, cc.hidden),
            nn.ReLU(),
            nn.Linear(cc.hidden, NUM_CLASSES),
        )
    with torch.no_grad():
        out = dec(torch.zeros(2, LATENT_DIM))
        assert tuple(out.shape) == (2, c, h, w), out.shape
        assert tuple(net(out).shape) == (2, NUM_CLASSES)
    return dec.eval(), net.eval()


def reference_torch_loop(vae, clf, kind: str, q: int, points: int, keep: int = 3) -> dict:
    """The reference loop in PyTorch; timed with torch's default threads and with 1 thread (on
    a shared machine oversubscription can hurt), the faster one reported."""
    import torch  # lazily: torch is never a runtime dependency of defuse-jax

    default_threads = torch.get_num_threads()
    best = None
    for threads in sorted({default_threads, 1}):
        torch.set_num_threads(threads)
        try:
            r = _torch_loop_once(vae, clf, kind, q, points, keep)
        finally:
            torch.set_num_threads(default_threads)
        r["threads"] = threads
        if best is None or r["samples_per_s"] > best["samples_per_s"]:
            best = r
    return best


def torch_device() -> str:
    """Where the PyTorch reference runs: on the GPU when JAX runs on one and torch sees it."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_loop_once(vae, clf, kind: str, q: int, points: int, keep: int) -> dict:
    import torch

    device = torch_device()
    dec, net = (m.to(device) for m in _torch_modules(vae, clf, kind))
    gen = torch.Generator(device=device).manual_seed(0)
    z0 = torch.randn(points, LATENT_DIM, generator=gen, device=device)
    y0 = np.random.default_rng(0).integers(0, NUM_CLASSES, points)

    def loop():
        kept = []
        with torch.no_grad():
            for i in range(points):
                delta = 0.5 * torch.randn(q, LATENT_DIM, generator=gen, device=device)
                z = z0[i][None, :] + delta
                pred = net(dec(z)).argmax(dim=1, keepdim=True).to(z.dtype)
                # One device-to-host copy per point, like the JAX loop's device_get.
                host = torch.cat([z, delta.norm(dim=1, keepdim=True), pred], 1).cpu().numpy()
                zs, norm, pred = host[:, :-2], host[:, -2], host[:, -1].astype(np.int64)
                bad = np.flatnonzero(pred != y0[i])
                kept.append(zs[bad[np.argsort(norm[bad])[:keep]]])
        return kept

    t = roofline.best_time(loop, 3)
    return {
        "q": q,
        "points": points,
        "seconds": t,
        "samples_per_s": points * q / t,
        "torch": torch.__version__,
        "device": device,
    }


def _distinct(res, cell: float) -> int:
    """Distinct errors: different (source, latent grid cell of side `cell`) pairs."""
    if res.num_found == 0:
        return 0
    cells = np.floor(res.z / cell).astype(np.int64)
    return int(np.unique(np.concatenate([res.source_index[:, None], cells], 1), axis=0).shape[0])


def compare_modes(
    decode_fn,
    classify_fn,
    z0,
    y0,
    budget: int,
    repeats: int,
    *,
    free_dims: int | None = None,
    scale: float | None = None,
) -> list:
    """Errors found per evaluated sample by each mode at the same sample budget per source
    (`free_dims`: the coordinates the search moves, `latent_search`'s; `scale`: the sample
    mode's perturbation scale and the gradient mode's jitter, None: `SearchConfig`'s)."""
    rounds = 8
    configs = {
        "sample": SearchConfig(mode="sample", num_samples=budget),
        "iterative": SearchConfig(
            mode="iterative", chains_per_source=budget // rounds, num_rounds=rounds
        ),
        "gradient": SearchConfig(
            mode="gradient", chains_per_source=budget // rounds, num_rounds=rounds
        ),
    }
    rows = []
    for mode, cfg in configs.items():
        cfg = dataclasses.replace(cfg, max_keep_per_source=None, chunk_size=1024)
        if scale is not None:
            cfg = dataclasses.replace(cfg, scale=scale)
        key = jax.random.key(0)
        search = partial(latent_search, decode_fn, classify_fn, z0, y0, key=key, config=cfg,
                         free_dims=free_dims)  # fmt: skip
        res = search()
        t = roofline.best_time(search, repeats)
        n = res.num_samples_evaluated
        first = [
            res.perturbation_norm[res.source_index == s].min() for s in np.unique(res.source_index)
        ]
        rows.append(
            {
                "mode": mode,
                "samples": n,
                "seconds": t,
                "flips": res.num_flips,
                "flips_per_sample": res.num_flips / n,
                "distinct_per_sample": _distinct(res, 0.1) / n,
                "distinct_per_s": _distinct(res, 0.1) / t,
                "distinct_pred_pairs": int(
                    np.unique(np.stack([res.source_index, res.pred_label], 1), axis=0).shape[0]
                ),
                "sources_with_error": int(np.unique(res.source_index).size),
                "median_smallest_norm": float(np.median(first)) if first else None,
            }
        )
    return rows


def trained_run(run_dir: str, repeats: int, *, modes: bool = True) -> dict:
    """A finished run's own search on its trained models: the search stage's sources, functions
    and settings as it resolved them (`identification.search_inputs`; search/summary.json: the
    pilot's scale, the samples per source; the chunk size chosen anew), without a validity model
    and with the run's (its oracle's shift groups, when it has one): the first call (tracing and
    compiling) and the best of `repeats` (at least 3) calls after it; then, with `modes`, the
    modes compared on the same sources at the run's scale.

    What the validity constraint costs depends on the models (it reads only the changed
    predictions), so this, not the random-weight models' row, is its cost on a run.
    """
    from defuse_jax import identification, stage_context
    from defuse_jax import train_models as tm

    ctx = stage_context.of_run(run_dir)  # the run's models as its stages load them
    with open(os.path.join(run_dir, "search", "summary.json")) as f:
        resolved = SearchConfig(**json.load(f)["config"])
    oracle_dir = os.path.join(run_dir, "label", "oracle")
    validities = {"none": None}
    if os.path.isdir(oracle_dir):
        validities["oracle"] = tm.load_shift_groups(oracle_dir)
    out = {"run_dir": run_dir, "config": dataclasses.asdict(resolved), "searches": {}}
    # Built once for both searches: the same sources and functions, with the validity model
    # left out of the plain one.
    inputs = identification.search_inputs(
        ctx.dataset, ctx.model("vae"), ctx.model("classifier"), search=resolved,
        max_sources=ctx.config.max_sources, seed=ctx.config.data.seed,
        validity=validities.get("oracle"),
    )  # fmt: skip
    for name, validity in validities.items():
        search = dataclasses.replace(resolved, validity=name, chunk_size=None)
        kwargs = inputs.kwargs if validity else {**inputs.kwargs, "validity_fn": None}
        call = partial(latent_search, inputs.decode_fn, inputs.classify_fn, inputs.z0,
                       inputs.y0, config=search, **kwargs)  # fmt: skip
        t = time.perf_counter()
        first = call()  # traces and compiles
        first_s, warm = time.perf_counter() - t, float("inf")
        for _ in range(max(3, repeats) if first_s < 30 else 1):
            t = time.perf_counter()
            call()
            warm = min(warm, time.perf_counter() - t)
        out["searches"][name] = {
            "validity": name,
            "groups": 0 if validity is None else len(validity),
            "first_call_s": first_s,
            "warm_call_s": warm,
            "found": first.num_found,
            "flips": first.num_flips,
            "chunk_size": first.config.chunk_size,
            "sources_used": first.num_sources_used,
            "samples": first.num_samples_evaluated,
        }
    rows = out["searches"]
    for r in rows.values():
        print(
            f"[{run_dir}] its search, validity {r['validity']} ({r['groups']} group(s)): "
            f"{r['found']:,} codes kept, best call {r['warm_call_s']:.3f}s (chunk "
            f"{r['chunk_size']}), first call {r['first_call_s']:.2f}s"
        )
    if "oracle" in rows:
        out["validity_time_ratio"] = rows["oracle"]["warm_call_s"] / rows["none"]["warm_call_s"]
        print(f"[{run_dir}] the validity constraint: {out['validity_time_ratio']:.2f}x the time")
    if modes:
        out["modes"] = compare_modes(inputs.decode_fn, inputs.classify_fn, inputs.z0, inputs.y0,
                                     64, repeats, free_dims=inputs.kwargs["free_dims"],
                                     scale=resolved.scale)  # fmt: skip
        _print_modes(out["modes"])
    return out


# ---------------------------------------------------------------------------------------------
# driver


# Forward batch sizes and chunk sizes tried per model: an accelerator needs far larger batches
# than a CPU to reach its ceiling (the CPU lists end where the working set leaves the caches).
_SIZES = {
    "cpu": {
        "mlp": {
            "batches": [64, 256, 1024, 4096, 16384],
            "chunks": [256, 1024, 2048, 4096, 8192],
            "tune_chains": 16384,
        },
        "conv": {
            "batches": [16, 64, 256, 1024],
            "chunks": [32, 64, 128, 256, 512],
            "tune_chains": 2048,
        },
    },
    "accelerator": {
        "mlp": {
            "batches": [1024, 16384, 65536, 262144, 1048576],
            "chunks": [16384, 65536, 262144, 1048576],
            "tune_chains": 1048576,
        },
        "conv": {  # up to 65,536: 16,384 was the largest tried before, and the best
            "batches": [1024, 4096, 16384, 65536],
            "chunks": [2048, 8192, 32768],
            "tune_chains": 131072,
        },
    },
}


def _size_class() -> str:
    return "cpu" if jax.default_backend() == "cpu" else "accelerator"


def _unless_out_of_memory(measure, *, chains: int, chunk: int) -> dict:
    """measure(), or a row saying the accelerator ran out of memory (the benchmark goes on)."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 (XlaRuntimeError's module moves between JAX versions)
        if "RESOURCE_EXHAUSTED" not in str(e) and not isinstance(e, MemoryError):
            raise
        print(f"  out of memory at chunk size {chunk}: skipped")
        return {"chains": chains, "chunk_size": chunk, "error": "out of memory"}


def _measured(rows: list) -> list:
    rows = [r for r in rows if "samples_per_s" in r]
    if not rows:
        raise RuntimeError("every size ran out of memory; pass smaller --chunk-sizes/--chains")
    return rows


def bench_model(kind: str, dtype: str, args, *, references: bool) -> dict:
    """One model size in one compute dtype; `references`: also the per-point reference loops
    and (MLP) the mode comparison."""
    quick, repeats = args.quick, (1 if args.quick else args.repeats)
    decode_fn, classify_fn, vae, clf = build_models(kind, dtype)
    sizes = _SIZES[_size_class()][kind]
    chains = list(args.chains)
    if quick:
        chains = [c for c in chains if c <= 4096] or chains[:1]
    q = args.samples_per_source
    if args.chunk_sizes:
        chunks = list(args.chunk_sizes)
    else:
        chunks = sizes["chunks"]
    if quick:
        chunks = chunks[1:3]
    out = {"model": kind, "dtype": dtype, "image_shape": MODEL_SHAPES[kind],
           "latent_dim": LATENT_DIM}  # fmt: skip

    batches = sizes["batches"]
    out["forward"] = fwd = forward_ceiling(
        decode_fn, classify_fn, batches[:3] if quick else batches, repeats, dtype
    )
    print(
        f"[{kind} {dtype}] forward ceiling {fwd['best_samples_per_s']:,.0f} samples/s "
        f"at batch {fwd['best_batch']}; {fwd['flops_per_sample']:,.0f} FLOPs/sample"
    )

    tune_chains = min(max(chains), sizes["tune_chains"])
    out["chunk_tuning"] = tuning = [
        _unless_out_of_memory(
            partial(engine_throughput, decode_fn, classify_fn, tune_chains, q, c, repeats, dtype),
            chains=tune_chains,
            chunk=c,
        )
        for c in [*chunks, None]  # None: the chunk size the search picks by itself
    ]
    best = max(_measured(tuning), key=lambda r: r["samples_per_s"])
    best_chunk = best["chunk_size"]
    out["best_chunk_size"] = best_chunk
    auto = tuning[-1]
    if "samples_per_s" in auto:
        out["auto_chunk_size"] = auto["chunk_size"]
        out["auto_fraction_of_best"] = auto["samples_per_s"] / best["samples_per_s"]
    print(
        f"[{kind} {dtype}] chunk tuning at {tune_chains} chains: "
        + ", ".join(
            f"{r['chunk_size']}{' (auto)' if r['auto_chunk'] else ''}: {r['samples_per_s']:,.0f}/s"
            for r in _measured(tuning)
        )
    )

    out["sweep"] = sweep = []
    for c in chains:
        row = _unless_out_of_memory(
            partial(engine_throughput, decode_fn, classify_fn, c, q, best_chunk, repeats, dtype),
            chains=c,
            chunk=best_chunk,
        )
        if "samples_per_s" in row:
            row["fraction_of_forward"] = row["samples_per_s"] / fwd["best_samples_per_s"]
            row["gflops_per_s"] = row["samples_per_s"] * fwd["flops_per_sample"] / 1e9
        sweep.append(row)
    engine_best = max(r["samples_per_s"] for r in _measured(sweep))
    out["engine_best_samples_per_s"] = engine_best
    out["engine_fraction_of_forward"] = engine_best / fwd["best_samples_per_s"]
    best_row = max(_measured(sweep), key=lambda r: r["samples_per_s"])
    out["flips_per_sample"] = best_row["flips"] / best_row["chains"]
    cost = fwd["cost"]
    out["roofline"] = {
        "engine": roofline.roofline(engine_best, cost, args.peaks, dtype),
        "forward": roofline.roofline(fwd["best_samples_per_s"], cost, args.peaks, dtype),
    }
    if kind == "conv" and args.decoders:
        out["decoders"] = {}
        for name in args.decoders:
            models.set_decoder_formulation(name)
            try:
                d_fn, c_fn, _, _ = build_models(kind, dtype)  # fresh functions: a new trace
                f = forward_ceiling(d_fn, c_fn, [fwd["best_batch"]], repeats, dtype)
                out["decoders"][name] = f["best_samples_per_s"]
            finally:
                models.set_decoder_formulation(None)
        print(f"[{kind} {dtype}] forward by decoder formulation: " + ", ".join(
            f"{k} {v:,.0f}/s" for k, v in out["decoders"].items()))  # fmt: skip
    if kind == "mlp" and args.scaling_devices and references:
        sources = _sources(decode_fn, classify_fn, max(1, tune_chains // q), dtype=dtype)
        out["device_scaling"] = roofline.device_scaling(
            decode_fn, classify_fn, sources, tune_chains, q, args.scaling_devices, repeats
        )
        print(f"[{kind} {dtype}] device scaling: " + ", ".join(
            f"{r['devices']}: {r['samples_per_s']:,.0f}/s ({r['efficiency']:.0%})"
            for r in out["device_scaling"]))  # fmt: skip
    out["validity"] = validity = validity_cost(
        decode_fn, classify_fn, kind, dtype, tune_chains, q, best_chunk, repeats,
        plain=max(_measured(tuning), key=lambda r: r["samples_per_s"]),
    )  # fmt: skip
    print(
        f"[{kind} {dtype}] with the default oracle as validity model ({validity['oracle_groups']}"
        f" group(s), {validity['oracle_members']} models): "
        f"{validity['samples_per_s']:,.0f} samples/s, {validity['time_ratio']:.2f}x the time of "
        "the plain search"
    )
    out["forward_gflops_per_s"] = fwd["best_samples_per_s"] * fwd["flops_per_sample"] / 1e9
    batch = min(fwd["best_batch"], tune_chains)  # both sides evaluate the same samples
    out["paired"] = pf = paired_fraction(
        decode_fn, classify_fn, tune_chains, q, best_chunk, batch, repeats, dtype
    )
    print(
        f"[{kind} {dtype}] paired at {pf['chains']} samples: engine "
        f"{pf['engine_samples_per_s']:,.0f}/s, forward {pf['forward_samples_per_s']:,.0f}/s -> "
        f"{pf['fraction']:.1%} of the forward pass; streamed {pf['streamed_samples_per_s']:,.0f}/s "
        f"-> {pf['streamed_fraction']:.1%}"
    )

    out["reference"] = refs = []
    if not references:
        return out
    points = max(8, args.ref_points // (4 if quick else 1))
    for qq in (10, 100):
        pts = points if qq == 10 else max(4, points // 4)
        r = {"impl": "jax per-point jit", **reference_jax_loop(decode_fn, classify_fn, qq, pts)}
        refs.append(r)
        if not args.no_torch:
            try:
                r = {"impl": "torch per-point", **reference_torch_loop(vae, clf, kind, qq, pts)}
                refs.append(r)
            except ImportError:
                refs.append({"impl": "torch per-point", "q": qq, "skipped": "torch not installed"})
    for r in refs:
        if "samples_per_s" in r:
            r["engine_speedup"] = engine_best / r["samples_per_s"]

    if kind == "mlp" and not args.no_modes:
        z0, y0 = _sources(decode_fn, classify_fn, 64 if quick else 256, seed=2)
        out["modes"] = compare_modes(decode_fn, classify_fn, z0, y0, 64, repeats)
    return out


def _print_model(r: dict) -> None:
    fwd = r["forward"]
    print(
        f"\n== {r['model']} models, {r['dtype']}, image {tuple(r['image_shape'])}, "
        f"latent {r['latent_dim']} =="
    )
    print(
        f"bare forward (decode+classify+argmax): best {fwd['best_samples_per_s']:>12,.0f} "
        f"samples/s at batch {fwd['best_batch']}, {fwd['flops_per_sample']:,.0f} FLOPs/sample, "
        f"{r['forward_gflops_per_s']:.1f} GFLOP/s"
    )
    for what in ("forward", "engine"):
        rf = r["roofline"][what]
        print(
            f"roofline, {what}: {rf['flops_per_sample']:,.0f} FLOPs and "
            f"{rf['bytes_per_sample']:,.0f} bytes per sample (XLA); {rf['tflops']:.2f} TFLOP/s = "
            f"{rf['fraction_of_peak_flops']:.1%} of peak, {rf['tb_per_s']:.3f} TB/s = "
            f"{rf['fraction_of_peak_bandwidth']:.1%} of peak bandwidth (memory roofline "
            f"{rf['memory_roofline_samples_per_s']:,.0f} samples/s)"
        )
    print(f"errors (flips) per evaluated sample: {r['flips_per_sample']:.4f}")
    pf = r["paired"]
    print(
        f"paired (alternating timings, {pf['chains']} samples): engine "
        f"{pf['engine_samples_per_s']:,.0f}/s vs forward {pf['forward_samples_per_s']:,.0f}/s "
        f"= {pf['fraction']:.1%} of the bare forward pass; streamed (each search started "
        f"before the last is read) {pf['streamed_samples_per_s']:,.0f}/s = "
        f"{pf['streamed_fraction']:.1%}"
    )
    print(
        f"{'chains':>8} {'sources':>8} {'chunk':>6} {'samples/s':>12} {'of fwd':>7} "
        f"{'GFLOP/s':>8} {'found':>6}"
    )
    for s in r["sweep"]:
        if "error" in s:
            print(f"{s['chains']:>8} {'':>8} {s['chunk_size']:>6}   ({s['error']})")
            continue
        print(
            f"{s['chains']:>8} {s['sources']:>8} {s['chunk_size']:>6} "
            f"{s['samples_per_s']:>12,.0f} {s['fraction_of_forward']:>6.1%} "
            f"{s['gflops_per_s']:>8.1f} {s['found']:>6}"
        )
    print(f"{'reference loop':<22} {'Q':>4} {'points':>6} {'samples/s':>12} {'engine x':>9}")
    for ref in r["reference"]:
        if "samples_per_s" not in ref:
            print(f"{ref['impl']:<22} {ref['q']:>4}   ({ref['skipped']})")
            continue
        print(
            f"{ref['impl']:<22} {ref['q']:>4} {ref['points']:>6} "
            f"{ref['samples_per_s']:>12,.0f} {ref['engine_speedup']:>8.1f}x"
        )
    if "modes" in r:
        _print_modes(r["modes"])


def _print_modes(rows: list) -> None:
    print(
        f"{'mode':<10} {'samples':>8} {'flips/smp':>9} {'distinct/smp':>12} "
        f"{'distinct/s':>11} {'(src,pred)':>10} {'srcs':>5} {'med min |dz|':>12}"
    )
    for m in rows:
        med = m["median_smallest_norm"]
        print(
            f"{m['mode']:<10} {m['samples']:>8} {m['flips_per_sample']:>9.3f} "
            f"{m['distinct_per_sample']:>12.3f} {m['distinct_per_s']:>11,.0f} "
            f"{m['distinct_pred_pairs']:>10} {m['sources_with_error']:>5} "
            f"{(med if med is not None else float('nan')):>12.3f}"
        )


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark, prints a table, writes JSON to `args.json`; returns the results."""
    kinds, dtypes = list(dict.fromkeys(args.models)), list(dict.fromkeys(args.dtype))
    if args.out and not os.path.isdir(os.path.join(args.out, "train")):  # before measuring
        raise ValueError(
            f"--out {args.out}: not a trained run directory (no train/ inside); --out names a "
            "run directory, the results file is --json"
        )
    if args.out and not os.path.exists(os.path.join(args.out, "search", "summary.json")):
        raise ValueError(
            f"--out {args.out}: its search stage has not run (no search/summary.json); the bench "
            f"times the run's own search settings: `defuse-jax run --out {args.out}` first"
        )
    ensure_devices(args.devices)
    repeats = 1 if args.quick else args.repeats
    result = {
        "benchmark": "search",
        "quick": bool(args.quick),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "matmul_2048_gflops_per_s": roofline.matmul_gflops(repeats, precision="highest"),
        "matmul_2048_default_precision_gflops_per_s": roofline.matmul_gflops(repeats),
        "matmul_2048_bf16_gflops_per_s": roofline.matmul_gflops(repeats, dtype=jnp.bfloat16),
        "models": [],
    }
    print(
        f"backend {result['backend']} x{len(result['devices'])}; 2048^2 matmul "
        f"{result['matmul_2048_gflops_per_s']:.1f} GFLOP/s (float32, full precision), "
        f"{result['matmul_2048_default_precision_gflops_per_s']:.1f} (float32, backend "
        f"default), {result['matmul_2048_bf16_gflops_per_s']:.1f} (bfloat16)"
    )
    args.peaks = result["peaks"] = roofline.device_peaks(repeats)
    print(
        f"peaks ({result['peaks']['source']}, {result['peaks']['device_kind']}): "
        f"{result['peaks']['bf16_tflops']:.3g} TFLOP/s bf16, "
        f"{result['peaks']['float32_tflops']:.3g} float32 (default precision), "
        f"{result['peaks']['tb_per_s']:.3g} TB/s"
    )
    tune = _SIZES[_size_class()]["mlp"]["tune_chains"] // (16 if args.quick else 1)
    result["engine_overhead"] = ov = roofline.engine_overhead(
        tune, args.samples_per_source, LATENT_DIM, repeats
    )
    print(
        f"engine overhead (near-zero model, {ov['chains']} chains, chunk {ov['chunk_size']}): "
        f"{ov['engine_ns_per_chain']:.2f} ns/chain = RNG + perturbation "
        f"{ov['rng_perturbation_ns_per_chain']:.2f} + the rest of the program (softmax/argmax, "
        f"norm, top-k merge, compaction) {ov['device_rest_ns_per_chain']:.2f} + host "
        f"(validation, input packing, transfers) {ov['host_ns_per_chain']:.2f}"
    )
    for kind in kinds:
        for i, dtype in enumerate(dtypes):
            r = bench_model(kind, dtype, args, references=i == 0)
            result["models"].append(r)
            _print_model(r)
            _write(result, args.json)  # after each model: a later failure keeps what was measured
    if args.out:
        result["trained_run"] = trained_run(args.out, repeats, modes=not args.no_modes)
    _write(result, args.json)
    if args.json:
        print(f"\nwrote {args.json}")
    return result


def _write(result: dict, path: str) -> None:
    if path:
        with atomic_write(path) as f:
            json.dump(result, f, indent=2, default=float)
