"""Training speed: `training.fit` against its own jitted step, per model, with XLA's FLOP counts.

Rows: the VAE, the classifier and the oracle (the classifier twice as wide, as the label stage
trains it), each as an MLP and as a conv model, at 8x8 and 28x28, on random images of that size
(speed does not depend on the pixels). Per row:

- bare step: the jitted, donated train step called once per step from Python on batches gathered
  beforehand: the floor a loop around it can reach;
- fit, per loop form (`training.LOOP_FORMS`; the backend's default is marked): `training.fit`
  itself, with its batch order, metrics and final checkpoint, in a temporary directory;
- each timed twice: the whole `--epochs` run with compilation (what a user waits for), and the
  steady rate after the first epoch (fit: from its per-epoch clock; the bare step: timed after a
  warm-up call);
- GFLOP/s: XLA's cost analysis of the compiled step (multiply-adds x 2 of the forward and
  backward pass and the optimiser), divided by the steady step time, and as a fraction of a
  2048 x 2048 float32 matmul timed in the same run (the machine's practical rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defuse_jax import flags, losses, training
from defuse_jax.bench.roofline import matmul_gflops
from defuse_jax.files import atomic_write
from defuse_jax.models import VAE, Classifier, ClassifierConfig, VAEConfig, params_of

ROLES = ("vae", "classifier", "oracle")
NUM_CLASSES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the benchmark's flags."""
    parser.add_argument(
        "--sizes", nargs="+", type=flags.list_of(int), default=[8, 28],
        help="image sides (square, one channel; conv models need multiples of 4)",
    )  # fmt: skip
    parser.add_argument(
        "--kinds", nargs="+", choices=["mlp", "conv"], default=["mlp", "conv"], help="model kinds"
    )
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES), help="models")
    parser.add_argument(
        "--loops", nargs="+", choices=training.LOOP_FORMS, default=list(training.LOOP_FORMS),
        help="fit's loop forms to time (default: all)",
    )  # fmt: skip
    parser.add_argument("--train-size", type=int, default=4096, help="training images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed fit (>= 2)")
    parser.add_argument(
        "--reduction-shards", type=int, default=0, metavar="S",
        help="fixed-order gradient sums over S shards (TrainConfig.reduction_shards); run it "
        "with 0 and S to see what the option costs",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="best of this many matmul timings")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8x8 only, few steps")
    parser.add_argument("--json", default="bench_results/train.json", help="JSON output path")


def model_for(role: str, kind: str, size: int) -> tuple[Any, Any, Any]:
    """(params, loss_fn, model config) of the pipeline's model `role` at that kind and size."""
    shape = (size, size, 1)
    if role == "vae":
        config = VAEConfig(kind="conv", latent_dim=12, beta=4.0) if kind == "conv" else VAEConfig()
        model = VAE(config, image_shape=shape, rngs=nnx.Rngs(0))
        return params_of(model), losses.vae_loss, config
    config = ClassifierConfig(kind=kind, hidden=512 if role == "oracle" else 256)
    model = Classifier(config, image_shape=shape, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
    return params_of(model), losses.classifier_loss, config


def _data(role: str, n: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {"x": rng.random((n, size, size, 1), dtype=np.float32)}
    if role != "vae":
        data["y"] = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return data


def time_bare_step(params, loss_fn, data, config: training.TrainConfig, steps: int) -> dict:
    """The jitted, donated step called once per step on batches gathered beforehand."""
    optimizer = training.make_optimizer(config)
    step = training._step_fn(
        loss_fn, params.graphdef, optimizer, reduction_shards=config.reduction_shards
    )
    step = jax.jit(step, donate_argnums=0)
    init = jax.tree.map(jnp.copy, params.state)
    state = training.initial_state(optimizer, init)
    b = config.batch_size
    per_epoch = len(data["x"]) // b
    batches = [{k: jnp.asarray(v[i * b : (i + 1) * b]) for k, v in data.items()}
               for i in range(per_epoch)]  # fmt: skip
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0], key).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    state, _ = step(state, batches[0], key)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    for i in range(1, steps):
        state, metrics = step(state, batches[i % per_epoch], key)
    jax.block_until_ready((state, metrics))
    rest = time.perf_counter() - t
    return {
        "total_s": first + rest,
        "step_ms": 1e3 * rest / max(1, steps - 1),
        "flops_per_step": float(cost.get("flops", float("nan"))),
    }


def time_fit(params, loss_fn, data, config: training.TrainConfig, loop: str) -> dict:
    """`training.fit` end to end (compile included) and its steady rate after the first epoch."""
    per_epoch = len(data["x"]) // config.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        _, history = training.fit(
            params, loss_fn, data, config=config, checkpoint_dir=os.path.join(tmp, "ckpt"),
            fingerprint={"bench": "train"}, progress=False, loop=loop,
        )  # fmt: skip
        total = time.perf_counter() - t
    seconds = [h["seconds"] for h in history]
    steady = (seconds[-1] - seconds[0]) / ((len(seconds) - 1) * per_epoch)
    return {"total_s": total, "step_ms": 1e3 * steady}


def bench_row(role: str, kind: str, size: int, args, matmul: float) -> dict:
    params, loss_fn, model_config = model_for(role, kind, size)
    data = _data(role, args.train_size, size)
    config = training.TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, checkpoint_every=10**9,
        reduction_shards=args.reduction_shards,
    )  # fmt: skip
    steps = args.epochs * (args.train_size // args.batch_size)
    row: dict[str, Any] = {
        "role": role, "kind": kind, "size": size, "steps": steps,
        "model": dataclasses.asdict(model_config), "default_loop": training.default_loop(),
    }  # fmt: skip
    row["bare"] = time_bare_step(params, loss_fn, data, config, steps)
    for loop in args.loops:
        fit = time_fit(params, loss_fn, data, config, loop)
        fit["ratio_total"] = fit["total_s"] / row["bare"]["total_s"]
        fit["ratio_step"] = fit["step_ms"] / row["bare"]["step_ms"]
        row[f"fit_{loop}"] = fit
    gflops = row["bare"]["flops_per_step"] / row["bare"]["step_ms"] / 1e6
    row["step_gflops"] = gflops
    row["fraction_of_matmul"] = gflops / matmul
    _print_row(row, args.loops)
    return row


def _header(loops) -> str:
    cols = "".join(
        f" {'fit ' + lp + ' ms':>13} {'x step':>7} {'total s':>8} {'x':>6}" for lp in loops
    )
    return (
        f"{'model':<11} {'kind':<5} {'size':>4} {'steps':>6} {'step ms':>8} {'total s':>8}"
        f"{cols} {'GFLOP/s':>8} {'of mm':>6}"
    )


def _print_row(row: dict, loops) -> None:
    b = row["bare"]
    cols = ""
    for lp in loops:
        f = row[f"fit_{lp}"]
        mark = "*" if lp == row["default_loop"] else " "
        cols += (
            f" {f['step_ms']:>12.2f}{mark} {f['ratio_step']:>6.2f}x {f['total_s']:>8.1f} "
            f"{f['ratio_total']:>5.2f}x"
        )
    print(
        f"{row['role']:<11} {row['kind']:<5} {row['size']:>4} {row['steps']:>6} "
        f"{b['step_ms']:>8.2f} {b['total_s']:>8.1f}{cols} {row['step_gflops']:>8.1f} "
        f"{row['fraction_of_matmul']:>5.0%}",
        flush=True,
    )


def _check(args) -> None:
    if args.epochs < 2:
        raise ValueError("--epochs must be >= 2: the steady rate is timed after the first epoch.")
    if args.train_size < args.batch_size:
        raise ValueError(f"--train-size {args.train_size} is below --batch-size {args.batch_size}.")
    training.TrainConfig(batch_size=args.batch_size, reduction_shards=args.reduction_shards)
    for size in args.sizes:
        if size < 1 or ("conv" in args.kinds and size % 4):
            raise ValueError(f"--sizes {size}: conv models need a positive multiple of 4.")


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark, prints the table and writes the JSON; returns the results."""
    if args.quick:
        args.sizes, args.train_size, args.epochs, args.repeats = [8], 512, 2, 1
    _check(args)
    matmul = matmul_gflops(args.repeats)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "default_loop": training.default_loop(),
        "matmul_2048_float32_gflops": matmul,
        "load_average_start": os.getloadavg(),
    }
    print(
        f"train bench: {info['backend']} ({info['device_kind']}, {info['cpu_count']} CPUs), "
        f"jax {info['jax']}; batch {args.batch_size}, {args.train_size} images, "
        f"{args.epochs} epochs, reduction_shards {args.reduction_shards}, "
        f"{len(jax.devices())} devices; float32 2048^2 matmul {matmul:.0f} GFLOP/s; "
        f"* = this backend's loop form"
    )
    print(_header(args.loops))
    rows = [
        bench_row(role, kind, size, args, matmul)
        for size in args.sizes
        for kind in args.kinds
        for role in args.roles
    ]
    info["load_average_end"] = os.getloadavg()
    result = {"info": info, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    result["rows"] = rows
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return result
