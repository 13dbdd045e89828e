"""`defuse-jax` command line: thin wrappers over the library's stage functions.

Every command works on a run directory (`--out`, default `runs/<dataset>`). The directory
remembers its configuration (`config.json`): flags given on the command line override it, flags
left out keep their saved values, so rerunning a command resumes it and `defuse-jax label` or
`defuse-jax evaluate` need nothing but `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
from collections.abc import Sequence

from defuse_jax import flags
from defuse_jax.correction import CorrectConfig
from defuse_jax.data import DataConfig
from defuse_jax.evaluation import EvalConfig
from defuse_jax.models import ClassifierConfig, VAEConfig
from defuse_jax.own_model import OwnModel
from defuse_jax.regions import DistillConfig
from defuse_jax.run_config import DEFAULT_SEARCH, STAGES, RunConfig, load_run_config
from defuse_jax.run_dir import check_not_a_file
from defuse_jax.search import SearchConfig
from defuse_jax.training import TrainConfig

_DATA_RENAME = {"name": "dataset", "seed": "data_seed"}
_NESTED = ("data", "vae", "vae_train", "classifier", "classifier_train", "own_classifier",
           "own_vae", "search", "distill", "correct", "eval")  # fmt: skip
EXIT_LABELS_PENDING = 3


def default_run_dir(dataset: str) -> str:
    return os.path.join("runs", dataset.replace("/", "_"))


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags for every part of `RunConfig` (absent from the namespace unless typed)."""
    from defuse_jax import train_models as tm

    p.add_argument("--out", default=None, help="run directory (default: runs/<dataset>)")
    flags.add_flags(p, DataConfig, rename=_DATA_RENAME, suppress=True)
    flags.add_flags(p, RunConfig, skip=_NESTED, suppress=True)
    auto = "chosen from the image shape"
    flags.add_flags(p, VAEConfig, prefix="vae-", unset_default=auto, suppress=True)
    flags.add_flags(p, TrainConfig, prefix="vae-", defaults=tm.VAE_TRAIN_DEFAULT, suppress=True)
    flags.add_flags(p, ClassifierConfig, prefix="clf-", unset_default=auto, suppress=True)
    flags.add_flags(p, TrainConfig, prefix="clf-", defaults=tm.CLASSIFIER_TRAIN_DEFAULT,
                    suppress=True)  # fmt: skip
    flags.add_flags(p, SearchConfig, prefix="search-", defaults=DEFAULT_SEARCH, suppress=True)
    flags.add_flags(p, DistillConfig, prefix="distill-", suppress=True)
    flags.add_flags(p, CorrectConfig, prefix="correct-", suppress=True)
    flags.add_flags(p, EvalConfig, prefix="eval-", suppress=True)
    p.add_argument(
        "--reduction-shards", type=int, default=argparse.SUPPRESS, metavar="S",
        help="set --vae-, --clf- and --correct-reduction-shards at once: every training sums its "
        "gradients over S shards of each batch in a fixed order, the same bits on every "
        "topology whose device count divides S (0: the backend's order, the default)",
    )  # fmt: skip
    _add_own_model_flags(p)


_OWN_FIELDS = {
    "classifier": ("fn", "ckpt", "frozen", "preprocess"),
    "vae": ("fn", "ckpt"),
}
_OWN_HELP = {
    "fn": "package.module:function returning your {role} (docs/own_classifier.md); 'none': "
    "back to the project's own",
    "ckpt": "Orbax checkpoint of its weights, restored into what --{role}-fn returns",
    "frozen": "regular expression of the weight paths the correction keeps fixed",
    "preprocess": "package.module:function mapping images [B, H, W, C] in [0, 1] to its input",
}


def _add_own_model_flags(p: argparse.ArgumentParser) -> None:
    """--classifier-fn/-ckpt/-frozen/-preprocess and --vae-fn/-ckpt (`own_model.OwnModel`)."""
    g = p.add_argument_group("your own models (own_model.OwnModel; saved with the run)")
    for role, fields in _OWN_FIELDS.items():
        for field in fields:
            g.add_argument(f"--{role}-{field}", default=argparse.SUPPRESS,
                           help=_OWN_HELP[field].format(role=role))  # fmt: skip


def _own_model(args: argparse.Namespace, role: str, base: OwnModel | None) -> OwnModel | None:
    """The run's `OwnModel` for `role`: the saved one with the typed flags on top."""
    given = {
        f: getattr(args, f"{role}_{f}") for f in _OWN_FIELDS[role] if hasattr(args, f"{role}_{f}")
    }
    if not given:
        return base
    if given.get("fn", "").lower() == "none":
        return None
    if "fn" not in given and base is None:
        raise ValueError(
            f"--{role}-{next(iter(given))} goes with --{role}-fn package.module:function, the "
            f"entry point that builds your {role}."
        )
    return OwnModel(**{**(dataclasses.asdict(base) if base else {}), **given})


def resolve(args: argparse.Namespace) -> tuple[str, RunConfig]:
    """(run directory, config): the directory's saved config with the typed flags on top."""
    dataset = getattr(args, "dataset", None)
    out = args.out or default_run_dir(dataset or "digits")
    check_not_a_file(out)
    base = load_run_config(out) or RunConfig()
    data = flags.from_flags(args, DataConfig, rename=_DATA_RENAME, base=base.data)
    top = flags.from_flags(args, RunConfig, base=base)  # top-level fields only
    vae, clf = base.vae, base.classifier
    if data != base.data:
        vae = clf = None  # the automatic architecture follows the new data
    if flags.given(args, VAEConfig, prefix="vae-") or flags.given(
        args, ClassifierConfig, prefix="clf-"
    ):
        from defuse_jax import train_models as tm
        from defuse_jax.data import load_dataset

        shape = load_dataset(data).image_shape
        if flags.given(args, VAEConfig, prefix="vae-"):
            vae = flags.from_flags(args, VAEConfig, prefix="vae-",
                                   base=vae or tm.default_vae_config(shape))  # fmt: skip
        if flags.given(args, ClassifierConfig, prefix="clf-"):
            clf = flags.from_flags(args, ClassifierConfig, prefix="clf-",
                                   base=clf or tm.default_classifier_config(shape))  # fmt: skip
    config = dataclasses.replace(
        top,
        data=data,
        vae=vae,
        classifier=clf,
        vae_train=flags.from_flags(args, TrainConfig, prefix="vae-", base=base.vae_train),
        classifier_train=flags.from_flags(
            args, TrainConfig, prefix="clf-", base=base.classifier_train
        ),
        search=flags.from_flags(args, SearchConfig, prefix="search-", base=base.search),
        distill=flags.from_flags(args, DistillConfig, prefix="distill-", base=base.distill),
        correct=flags.from_flags(args, CorrectConfig, prefix="correct-", base=base.correct),
        eval=flags.from_flags(args, EvalConfig, prefix="eval-", base=base.eval),
        own_classifier=_own_model(args, "classifier", base.own_classifier),
        own_vae=_own_model(args, "vae", base.own_vae),
    )
    shards = getattr(args, "reduction_shards", None)
    if shards is not None:  # the per-model flags, when typed too, win
        config = dataclasses.replace(
            config,
            vae_train=_unless_typed(args, "vae_reduction_shards", config.vae_train, shards),
            classifier_train=_unless_typed(
                args, "clf_reduction_shards", config.classifier_train, shards
            ),
            correct=_unless_typed(args, "correct_reduction_shards", config.correct, shards),
        )
    if getattr(args, "correct_lams", None) is not None and not config.correct.select:
        raise ValueError(
            "--correct-lams lists the region weights the correction chooses among, but the "
            "choice is off (--no-correct-select), which trains --correct-lam alone: pass "
            "--correct-lam instead, or drop --no-correct-select."
        )
    return out, config


def _unless_typed(args: argparse.Namespace, dest: str, config, shards: int):
    if hasattr(args, dest):
        return config
    return dataclasses.replace(config, reduction_shards=shards)


# ---------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    import flax
    import jax
    import optax
    import orbax.checkpoint as ocp

    import defuse_jax
    from defuse_jax import xla_cache

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
        "compilation_cache": xla_cache.cache_dir(),  # of the pipeline commands
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v}")
    return 0


def cmd_train(args: argparse.Namespace, *, kind: str) -> int:
    """Train one model into <run>/train/<kind> (the same place `run` uses)."""
    from defuse_jax import pipeline
    from defuse_jax import train_models as tm

    out, config = resolve(args)
    pipeline.check_available(config.data)  # before the config is saved
    config = pipeline.resolve_lengths(out, config)  # saves it, with the lengths it resolved to
    ctx = pipeline.Context(os.path.abspath(out), config, print)
    if kind == "vae":
        result = tm.train_vae(ctx.dataset, out_dir=ctx.path("train", "vae"), config=config.vae,
                              train=config.vae_train, progress=config.progress)  # fmt: skip
    else:
        result = tm.train_classifier(ctx.dataset, out_dir=ctx.path("train", "classifier"),
                                     config=config.classifier, train=config.classifier_train,
                                     progress=config.progress)  # fmt: skip
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    print(f"{kind} trained in {result.out_dir}: test {metrics}")
    return 0


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """--distributed and the explicit launch's --coordinator, --num-processes, --process-id."""
    from defuse_jax import distributed

    g = p.add_argument_group("many hosts (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="one of several processes (every host runs the same command); the "
                        "cluster is detected on Cloud TPU, SLURM and Open MPI")  # fmt: skip
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address (explicit launch)")  # fmt: skip
    g.add_argument("--num-processes", type=int, default=None, help="processes (explicit launch)")
    g.add_argument("--process-id", type=int, default=None, help="this process (explicit launch)")
    g.add_argument("--distributed-timeout", type=int, default=distributed.DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="wait this long for the coordinator and the other "
                   "processes to join (default: %(default)s)")  # fmt: skip
    g.add_argument("--heartbeat-timeout", type=int,
                   default=distributed.DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="SECONDS",
                   help="a process silent this long counts as dead and the others stop "
                        "(default: %(default)s)")  # fmt: skip


def join_cluster(args: argparse.Namespace) -> None:
    """`distributed.initialize` from the flags of `add_distributed_flags` (if --distributed)."""
    from defuse_jax import distributed

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed:
        if any(v is not None for v in explicit):
            raise distributed.DistributedError(
                "--coordinator, --num-processes and --process-id describe a distributed run: "
                "add --distributed."
            )
        return
    where = args.coordinator or "the detected coordinator"
    wait = f"waiting up to {args.distributed_timeout} s for every process"
    print(f"defuse-jax: joining the distributed run at {where} ({wait})", file=sys.stderr)
    distributed.initialize(
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        timeout_s=args.distributed_timeout,
        heartbeat_timeout_s=args.heartbeat_timeout,
    )


def cmd_stage(args: argparse.Namespace, *, until: str) -> int:
    """Run (or resume) every stage up to `until` (on every process of a distributed run)."""
    from defuse_jax import pipeline

    join_cluster(args)  # before anything else uses JAX
    out, config = resolve(args)
    try:
        pipeline.run(out, config, until=until)
    except pipeline.LabelsPending as e:
        print(f"defuse-jax: {e}", file=sys.stderr)
        return EXIT_LABELS_PENDING
    if until == "evaluate":
        print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    """Label the regions in the terminal (after running the stages up to distill)."""
    from defuse_jax import pipeline

    out, config = resolve(args)
    answers = pipeline.label_interactively(out, config)
    print(f"{len(answers)} regions answered. Rerun `defuse-jax run --out {out}` to continue.")
    return 0


# ---------------------------------------------------------------------------------------------


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


STAGE_HELP = {
    "run": "run (or resume) every stage: train, search, distill, label, correct, evaluate",
    "search": "stages up to the latent search (errors.npz)",
    "distill": "stages up to the misclassification regions (regions.json)",
    "correct": "stages up to fine-tuning the classifier on the labeled regions",
    "evaluate": "stages up to the before/after evaluation and the report (same as run)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defuse-jax",
        description="Defuse in JAX: find, distill, label and correct a classifier's errors.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print JAX backend, devices and versions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    for name, kind in (("train-vae", "vae"), ("train-classifier", "classifier")):
        p = sub.add_parser(name, help=f"train (or resume) the {kind} into <run>/train/{kind}")
        add_run_flags(p)
        p.set_defaults(func=lambda a, k=kind: cmd_train(a, kind=k), xla_cache=True)

    for name, help_ in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_)
        add_run_flags(p)
        add_distributed_flags(p)
        until = "evaluate" if name == "run" else name
        p.set_defaults(func=lambda a, u=until: cmd_stage(a, until=u), xla_cache=True)

    p = sub.add_parser("label", help="label the regions in the terminal (resumable)")
    add_run_flags(p)
    p.set_defaults(func=cmd_label, xla_cache=True)

    from defuse_jax import sweep as sweep_lib

    p = sub.add_parser("sweep", help="grid over search settings on a trained run (table + plot)")
    sweep_lib.add_arguments(p)
    p.set_defaults(func=sweep_lib.run)  # reports compile times: no compilation cache

    from defuse_jax import budget_sweep

    p = sub.add_parser(
        "sweep-budget",
        help="rerun search -> evaluate on a finished run's models for several search budgets",
    )
    budget_sweep.add_arguments(p)
    p.set_defaults(func=budget_sweep.run, xla_cache=True)

    from defuse_jax import yield_audit

    p = sub.add_parser(
        "audit",
        help="a person's blind check of a finished run's bug yield (sheets, then the score)",
    )
    yield_audit.add_arguments(p)
    p.set_defaults(func=yield_audit.run)

    _add_bench_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [e for e in extra if not e.startswith("-")]
        hint = (
            f" (a run directory is given with --out: --out {stray[0]})"
            if stray and hasattr(args, "out")
            else ""
        )
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    from defuse_jax.checkpoint import CheckpointError
    from defuse_jax.data import DatasetNotFoundError
    from defuse_jax.distributed import DistributedError

    if getattr(args, "xla_cache", False):  # pipeline commands; not bench/sweep (they time compiles)
        from defuse_jax.xla_cache import enable_compilation_cache

        enable_compilation_cache()
    try:
        return int(args.func(args) or 0)
    except (
        CheckpointError, DatasetNotFoundError, DistributedError, FileNotFoundError, ValueError,
        TypeError,
    ) as e:  # fmt: skip
        if os.environ.get("DEFUSE_JAX_TRACEBACK"):
            raise
        return _fail(f"{e}\n(set DEFUSE_JAX_TRACEBACK=1 for the full traceback)")
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


assert set(STAGE_HELP) - {"run"} <= set(STAGES)

if __name__ == "__main__":
    sys.exit(main())
