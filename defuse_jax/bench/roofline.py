"""Where the search's time goes: device peaks, roofline fractions, the engine's own overhead, and
multi-device scaling (used by `defuse-jax bench search`).

- Peaks: a small table of vendor figures (dense bf16 and the float32 matmul path each backend
  uses by default, memory bandwidth); an unknown device gets measured figures instead (a bf16
  matmul and a copy).
- Roofline: XLA's FLOPs and bytes accessed per sample (`cost_analysis` of the compiled forward
  pass) times the achieved samples/s, as fractions of those peaks.
- Overhead: the engine with a near-zero-cost model (identity decoder, one linear classifier)
  measures everything the engine adds per chain, split three ways: counter-based RNG plus
  perturbation (timed alone), the rest of the compiled program (softmax and argmax, the norm,
  the per-source top-k merge, compacting the found candidates), and the host (validation,
  packing the inputs, the transfers, building the result).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from defuse_jax.search import SearchConfig, latent_search
from defuse_jax.search import api as search_api
from defuse_jax.search.perturb import ChainRng, sample_offset

# device_kind substring -> (bf16 dense TFLOP/s, float32 default-precision TFLOP/s, TB/s):
# vendor datasheet figures. GPU float32 matmuls default to TF32, TPU ones to bf16 passes.
DEVICE_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (989.0, 494.0, 4.8),
    "H100": (989.0, 494.0, 3.35),
    "A100": (312.0, 156.0, 2.0),
    "TPU v4": (275.0, 275.0, 1.2),
    "TPU v5 lite": (197.0, 197.0, 0.82),  # v5e
    "TPU v6 lite": (918.0, 918.0, 1.64),  # v6e
}


def best_time(fn, repeats: int) -> float:
    """Best wall time of `fn()` (which must block until its result is ready), after a warm-up
    call; a single timing when the warm-up took over 5 s."""
    t = time.perf_counter()
    fn()  # warm-up / compile
    if time.perf_counter() - t > 5.0:
        repeats = 1
    best = float("inf")
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(repeats: int, n: int = 2048, *, dtype=jnp.float32, precision=None) -> float:
    """An n x n matmul's rate; `precision=None` is the backend default (TF32 on a GPU)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision))
    return 2.0 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats) / 1e9


def measured_peaks(repeats: int) -> tuple[float, float, float]:
    """(bf16 TFLOP/s, float32 TFLOP/s, TB/s) measured: 4096^2 matmuls and a 256 MiB copy."""
    n = 4096 if jax.default_backend() != "cpu" else 1024
    bf16, f32 = (matmul_gflops(repeats, n, dtype=d) / 1e3 for d in (jnp.bfloat16, jnp.float32))
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    bw = 2.0 * x.nbytes / best_time(lambda: copy(x).block_until_ready(), repeats)
    return bf16, f32, bw / 1e12


def device_peaks(repeats: int) -> dict[str, Any]:
    """The peaks of the first device: from `DEVICE_PEAKS`, else measured."""
    kind = jax.devices()[0].device_kind
    for name, (bf16, f32, tbs) in DEVICE_PEAKS.items():
        if name in kind:
            return {"device_kind": kind, "source": "datasheet", "bf16_tflops": bf16,
                    "float32_tflops": f32, "tb_per_s": tbs}  # fmt: skip
    bf16, f32, tbs = measured_peaks(repeats)
    return {"device_kind": kind, "source": "measured", "bf16_tflops": bf16,
            "float32_tflops": f32, "tb_per_s": tbs}  # fmt: skip


def xla_forward_cost(fwd, batch: int, latent: int) -> dict[str, float]:
    """XLA's FLOPs and bytes accessed per sample of the jitted forward pass `fwd` (z [B, L]
    float32 -> ...) compiled unsharded at `batch` (a sharded compile reports one device's
    share)."""
    cost = fwd.lower(jax.ShapeDtypeStruct((batch, latent), jnp.float32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "flops": float(cost.get("flops", float("nan"))) / batch,
        "bytes": float(cost.get("bytes accessed", float("nan"))) / batch,
    }


def roofline(samples_per_s: float, cost: dict[str, float], peaks: dict, dtype: str) -> dict:
    """Achieved FLOP/s and bytes/s of `samples_per_s` as fractions of the device's peaks."""
    tflops = peaks["bf16_tflops"] if dtype == "bfloat16" else peaks["float32_tflops"]
    flops_s, bytes_s = samples_per_s * cost["flops"], samples_per_s * cost["bytes"]
    return {
        "flops_per_sample": cost["flops"],
        "bytes_per_sample": cost["bytes"],
        "tflops": flops_s / 1e12,
        "tb_per_s": bytes_s / 1e12,
        "fraction_of_peak_flops": flops_s / (tflops * 1e12),
        "fraction_of_peak_bandwidth": bytes_s / (peaks["tb_per_s"] * 1e12),
        "memory_roofline_samples_per_s": peaks["tb_per_s"] * 1e12 / cost["bytes"],
    }


def _zero_model(latent: int, classes: int = 10):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(latent, classes)), jnp.float32)

    def decode(z):  # [B, L] -> [B, 1, 1, L]: no work
        return z.reshape(z.shape[0], 1, 1, latent)

    def classify(x):  # one linear layer: 2 L C FLOPs per sample
        return x.reshape(x.shape[0], -1) @ w.astype(x.dtype)

    return decode, classify


def engine_overhead(chains: int, q: int, latent: int, repeats: int) -> dict[str, float]:
    """ns per chain the engine adds (near-zero model), and its RNG + perturbation share."""
    decode, classify = _zero_model(latent)
    n = max(1, chains // q)
    z0 = np.random.default_rng(0).normal(size=(n, latent)).astype(np.float32)
    y0 = np.asarray(jnp.argmax(classify(decode(jnp.asarray(z0))), -1), np.int32)
    cfg = SearchConfig(num_samples=q, max_keep_per_source=5)
    key = jax.random.key(0)
    res = latent_search(decode, classify, z0, y0, key=key, config=cfg)
    total = best_time(lambda: latent_search(decode, classify, z0, y0, key=key, config=cfg), repeats)

    @jax.jit
    def rng_perturb(z0):  # what the engine draws for these chains, in one block
        rng = ChainRng(
            jnp.zeros((2,), jnp.uint32), jnp.arange(n, dtype=jnp.int32),
            jnp.arange(q, dtype=jnp.int32), 1, latent + 2,
        )  # fmt: skip
        delta = sample_offset(rng, latent, config=cfg, noise=jnp.full((n,), 0.5, jnp.float32))
        z = z0[:, None, :] + delta
        return jnp.sum(z, axis=(1, 2)) + jnp.linalg.norm(delta, axis=-1).sum(axis=1)

    zj = jnp.asarray(z0)
    rng_t = best_time(lambda: rng_perturb(zj).block_until_ready(), repeats)
    # The compiled program alone, its inputs already laid out: the rest of `total` is the host
    # (validation, packing the inputs, the transfers, building the result).
    plan = search_api._plan(decode, classify, z0, y0, key=key, config=cfg, scales=None, mesh=None)
    device_t = best_time(lambda: jax.block_until_ready(plan.program(*plan.args)), repeats)
    samples = n * q
    ns = 1e9 / samples
    return {
        "chains": samples,
        "chunk_size": res.config.chunk_size,
        "engine_ns_per_chain": total * ns,
        "rng_perturbation_ns_per_chain": rng_t * ns,
        "device_rest_ns_per_chain": max(device_t - rng_t, 0.0) * ns,
        "host_ns_per_chain": max(total - device_t, 0.0) * ns,
    }


def device_scaling(decode_fn, classify_fn, sources, chains: int, q: int, counts, repeats: int):
    """Engine samples/s on meshes of the first n devices, for each n in `counts` available."""
    z0, y0 = sources
    cfg = SearchConfig(num_samples=q, max_keep_per_source=5)
    key = jax.random.key(0)
    rows, base = [], None
    for n in counts:
        if n > len(jax.devices()):
            continue
        mesh = Mesh(np.asarray(jax.devices()[:n]), ("chains",))

        def call(mesh=mesh):
            return latent_search(decode_fn, classify_fn, z0, y0, key=key, config=cfg, mesh=mesh)

        t = best_time(call, repeats)
        sps = len(z0) * q / t
        base = base or sps
        rows.append({"devices": n, "samples_per_s": sps, "efficiency": sps / (n * base)})
    return rows
