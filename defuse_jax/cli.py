"""`defuse-jax` command line: thin wrappers over the library's stage functions."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence

from defuse_jax import flags
from defuse_jax.data import DataConfig
from defuse_jax.models import ClassifierConfig, VAEConfig
from defuse_jax.training import TrainConfig


def default_run_dir(dataset: str) -> str:
    return os.path.join("runs", dataset.replace("/", "_"))


_DATA_RENAME = {"name": "dataset", "seed": "data_seed"}


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, DataConfig, rename=_DATA_RENAME)
    parser.add_argument(
        "--out", default=None, help="run directory (default: runs/<dataset>); reused to resume"
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    return flags.from_flags(args, DataConfig, rename=_DATA_RENAME)


def run_dir(args: argparse.Namespace) -> str:
    return args.out or default_run_dir(args.dataset)


# ---------------------------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    import flax
    import jax
    import optax
    import orbax.checkpoint as ocp

    import defuse_jax

    info = {
        "defuse_jax": defuse_jax.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
        "local_device_count": jax.local_device_count(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v}")
    return 0


# ---------------------------------------------------------------------------------------------
# training


def _add_train_flags(p: argparse.ArgumentParser, model_cls: type, default_train: TrainConfig):
    add_data_flags(p)
    flags.add_flags(p, model_cls, prefix="model-", defaults=None)
    p.add_argument(
        "--default-model",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pick the model kind/size from the image shape; --no-default-model uses --model-*",
    )
    flags.add_flags(p, TrainConfig, defaults=default_train)


def cmd_train(args: argparse.Namespace, *, kind: str) -> int:
    from defuse_jax import train_models as tm
    from defuse_jax.data import load_dataset

    ds = load_dataset(data_config(args))
    train = flags.from_flags(args, TrainConfig)
    out = os.path.join(run_dir(args), kind)
    if kind == "vae":
        cfg = None if args.default_model else flags.from_flags(args, VAEConfig, prefix="model-")
        result = tm.train_vae(ds, out_dir=out, config=cfg, train=train)
    else:
        cfg = (
            None
            if args.default_model
            else flags.from_flags(args, ClassifierConfig, prefix="model-")
        )
        result = tm.train_classifier(ds, out_dir=out, config=cfg, train=train)
    print(
        f"{kind} trained in {out}: test "
        + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    )
    return 0


# ---------------------------------------------------------------------------------------------
# benchmarks


def _add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    from defuse_jax.bench import BENCHMARKS

    bench = sub.add_parser("bench", help="speed benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, module_path in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_path)
        except ImportError as e:  # a benchmark module that is not installed yet
            p = bsub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda a, e=e: _fail(f"benchmark unavailable: {e}"))
            continue
        p = bsub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=lambda a, m=module: (m.run(a), 0)[1])


def _fail(msg: str) -> int:
    print(f"defuse-jax: error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from defuse_jax import train_models as tm

    parser = argparse.ArgumentParser(
        prog="defuse-jax",
        description="Defuse in JAX: find, distill, label and correct a classifier's errors.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print JAX backend, devices and versions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train-vae", help="train (or resume) the VAE")
    _add_train_flags(p, VAEConfig, tm.VAE_TRAIN_DEFAULT)
    p.set_defaults(func=lambda a: cmd_train(a, kind="vae"))

    p = sub.add_parser("train-classifier", help="train (or resume) the classifier")
    _add_train_flags(p, ClassifierConfig, tm.CLASSIFIER_TRAIN_DEFAULT)
    p.set_defaults(func=lambda a: cmd_train(a, kind="classifier"))

    for register in EXTRA_COMMANDS:
        register(sub)
    _add_bench_parsers(sub)
    return parser


# Later stages register their subcommands here (pipeline, labeling, sweeps).
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from defuse_jax.checkpoint import CheckpointError
    from defuse_jax.data import DatasetNotFoundError

    try:
        return int(args.func(args) or 0)
    except (CheckpointError, DatasetNotFoundError, FileNotFoundError, ValueError, TypeError) as e:
        if os.environ.get("DEFUSE_JAX_TRACEBACK"):
            raise
        return _fail(f"{e}\n(set DEFUSE_JAX_TRACEBACK=1 for the full traceback)")
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume from the last checkpoint.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
