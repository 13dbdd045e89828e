"""Where the search's time goes on this machine: host parts, device program, and kernels.

For the roofline work on an accelerator (docs/accelerators.md). With the benchmark's
random-weight models (`defuse-jax bench search`'s sizes) it times, per model and dtype:

- the bare forward pass (decode + classify + argmax) at the best batch;
- `latent_search` end to end, and its parts: planning (validation, layout), the compiled program
  alone on inputs already on the device, the program on host inputs, the program with the
  transfer back of the found candidates, and building the result;
- a `jax.profiler` trace of one search call (and one conv forward pass), summarised by XLA op and
  by device line (kernel time per stream), so that a kernel that dominates is named.

    PYTHONPATH=. python scripts/profile_search.py --out DIR [--quick]

Writes DIR/profile.json and prints the tables. `--quick` runs toy sizes (a CPU smoke run).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp

from defuse_jax import conv_layers, models
from defuse_jax.bench import roofline
from defuse_jax.bench.search_bench import LATENT_DIM, _sources, build_models
from defuse_jax.search import SearchConfig, engine, latent_search
from defuse_jax.search import api as search_api
from defuse_jax.search.result import compact

REPEATS = 5  # best of, after a warm-up call (`roofline.best_time`)


def trace_summary(fn, top: int = 12) -> dict:
    """One call of `fn` under `jax.profiler.trace`: device time per line and the top XLA ops."""
    fn()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        with jax.profiler.trace(d):
            fn()
        wall = time.perf_counter() - t
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {"wall_s": wall, "error": "no trace written"}
        data = jax.profiler.ProfileData.from_file(files[0])
        planes, lines = [p.name for p in data.planes], {}
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                events = collections.Counter()
                for e in line.events:
                    events[e.name] += e.duration_ns
                lines[f"{plane.name} {line.name}"] = {
                    "total_ms": sum(events.values()) * 1e-6,
                    "top_ms": {k: v * 1e-6 for k, v in events.most_common(top)},
                }
    return {"wall_ms": wall * 1e3, "planes": planes, "device_lines": lines}


def search_parts(decode_fn, classify_fn, chains: int, q: int, chunk: int, dtype: str) -> dict:
    """`latent_search`'s time and its parts at `chains` samples, Q per source."""
    n = max(1, chains // q)
    z0, y0 = _sources(decode_fn, classify_fn, n, dtype=dtype)
    cfg = SearchConfig(num_samples=q, chunk_size=chunk, max_keep_per_source=5, compute_dtype=dtype)
    key = jax.random.key(0)

    def search():
        return latent_search(decode_fn, classify_fn, z0, y0, key=key, config=cfg)

    total = roofline.best_time(search, REPEATS)

    def plan():
        return search_api._plan(
            decode_fn, classify_fn, z0, y0, key=key, config=cfg, scales=None, mesh=None
        )

    t_plan = roofline.best_time(plan, REPEATS)
    p = plan()
    placed = jax.device_put(p.args)
    t_prog = roofline.best_time(lambda: jax.block_until_ready(p.program(*placed)), REPEATS)
    t_prog_host = roofline.best_time(lambda: jax.block_until_ready(p.program(*p.args)), REPEATS)

    def program_and_fetch():
        found = p.program(*placed)
        engine.start_fetch(found)
        return engine.fetch_found(found)

    t_fetch = roofline.best_time(program_and_fetch, REPEATS)
    parts = program_and_fetch()
    t_compact = roofline.best_time(
        lambda: compact(parts[0], n, config=p.configs[0], wall_time_s=0.0), REPEATS
    )
    ms = 1e3
    return {
        "chains": n * q,
        "q": q,
        "chunk": chunk,
        "samples_per_s": n * q / total,
        "total_ms": total * ms,
        "plan_ms": t_plan * ms,
        "program_device_inputs_ms": t_prog * ms,
        "program_host_inputs_ms": t_prog_host * ms,
        "program_and_fetch_ms": t_fetch * ms,
        "compact_ms": t_compact * ms,
        "found": int(parts[0].z.shape[0]),
        "trace": trace_summary(search),
    }


def forward(decode_fn, classify_fn, batch: int, dtype: str, trace: bool) -> dict:
    fwd = jax.jit(lambda z: jnp.argmax(classify_fn(decode_fn(z.astype(dtype))), axis=-1))
    z = jax.random.normal(jax.random.key(0), (batch, LATENT_DIM), jnp.float32)
    t = roofline.best_time(lambda: fwd(z).block_until_ready(), REPEATS)
    row = {"batch": batch, "samples_per_s": batch / t, "ms": t * 1e3}
    if trace:
        row["trace"] = trace_summary(lambda: fwd(z).block_until_ready(), top=20)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    quick = args.quick
    result = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "mlp": {},
        "conv": {},
    }
    path = os.path.join(args.out, "profile.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    mlp_chains = 4096 if quick else 1 << 20
    for dtype in ("float32",) if quick else ("float32", "bfloat16"):
        decode_fn, classify_fn, _, _ = build_models("mlp", dtype)
        rows = {"forward": [forward(decode_fn, classify_fn, b, dtype, False)
                            for b in ((1024,) if quick else (262144, 1 << 20))]}  # fmt: skip
        rows["search"] = [
            search_parts(decode_fn, classify_fn, mlp_chains, q, c, dtype)
            for q, c in (((32, 1024),) if quick else ((32, 262144), (100, 262144), (32, 65536)))
        ]
        result["mlp"][dtype] = rows
        save()
        print(json.dumps({"mlp": dtype, **rows}, indent=1)[:6000], flush=True)

    conv_batch = 64 if quick else 16384
    for dtype in ("bfloat16",) if quick else ("bfloat16", "float32"):
        rows = {}
        for form in ("phase", "native"):
            models.set_decoder_formulation(form)
            decode_fn, classify_fn, _, _ = build_models("conv", dtype)
            rows[form] = forward(decode_fn, classify_fn, conv_batch, dtype, trace=form == "phase")
        models.set_decoder_formulation(None)
        # the first classifier layer as the backend's own convolution, not one matmul
        few, conv_layers._FEW_INPUTS_BACKENDS = conv_layers._FEW_INPUTS_BACKENDS, frozenset()
        decode_fn, classify_fn, _, _ = build_models("conv", dtype)
        rows["phase_conv_first_layer"] = forward(decode_fn, classify_fn, conv_batch, dtype, False)
        conv_layers._FEW_INPUTS_BACKENDS = few
        decode_fn, classify_fn, _, _ = build_models("conv", dtype)
        chunk = 64 if quick else 8192
        rows["search"] = search_parts(
            decode_fn, classify_fn, 256 if quick else 65536, 32, chunk, dtype
        )
        result["conv"][dtype] = rows
        save()
        print(json.dumps({"conv": dtype, **rows}, indent=1)[:6000], flush=True)
    ov = roofline.engine_overhead(
        4096 if quick else 262144, 32, LATENT_DIM, repeats=3
    )  # near-zero model
    result["engine_overhead"] = ov
    save()
    print(json.dumps(ov, indent=1))


if __name__ == "__main__":
    main()
