"""Train one model on a given CPU topology and print a hash of its weights.

Runs the same training as P processes x D forced CPU devices (P > 1: over gloo on this machine),
so that the hashes of several topologies can be compared: with `--reduction-shards S` they should
agree (docs/accelerators.md, "The same bits on every topology").

    python scripts/topology_bits.py --processes 1 --devices 1 --image-size 28 --model classifier
    python scripts/topology_bits.py --processes 2 --devices 2 --image-size 28 --model classifier
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile


def train_and_hash(args: argparse.Namespace, port: int | None, process_id: int) -> str:
    import jax
    import numpy as np

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}", num_processes=args.processes, process_id=process_id
        )
    from defuse_jax import train_models as tm
    from defuse_jax.data import DataConfig, load_dataset
    from defuse_jax.training import TrainConfig

    ds = load_dataset(DataConfig(image_size=args.image_size, max_train=args.max_train))
    train = TrainConfig(epochs=args.epochs, reduction_shards=args.reduction_shards)
    fn = tm.train_vae if args.model == "vae" else tm.train_classifier
    result = fn(ds, out_dir=args.out, train=train, progress=False)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(result.params.state):
        digest.update(np.asarray(leaf).tobytes())
    if args.processes > 1:
        jax.distributed.shutdown()
    return digest.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--devices", type=int, default=1, help="forced CPU devices per process")
    p.add_argument("--model", choices=("vae", "classifier"), default="classifier")
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--max-train", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--reduction-shards", type=int, default=4)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.process_id is not None:  # one worker, started below
        print(train_and_hash(args, args.port, args.process_id), flush=True)
        return
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        worker = [sys.executable, __file__, *sys.argv[1:], "--out", out, "--port", str(port)]
        procs = [
            subprocess.Popen(
                [*worker, "--process-id", str(i)], env=env, stdout=subprocess.PIPE, text=True
            )
            for i in range(args.processes)
        ]
        hashes = {proc.communicate()[0].strip().splitlines()[-1] for proc in procs}
    print(
        f"{args.processes} x {args.devices} devices, {args.model} {args.image_size}x"
        f"{args.image_size}, reduction_shards {args.reduction_shards}: {' '.join(sorted(hashes))}"
    )


if __name__ == "__main__":
    main()
