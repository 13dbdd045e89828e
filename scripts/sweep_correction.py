"""Sweep the correction's fixed schedule (lambda / epochs / optimiser) on a finished run.

Reuses the run's trained models, regions and labels; each setting fine-tunes into a temporary
directory (the run itself is not modified), keeps its last epoch (`select` off: no choice on
held-out data) and is evaluated like the pipeline's evaluate stage. For the epoch-by-epoch
view of what the choice sees, see `scripts/correction_trace.py`.

    python scripts/sweep_correction.py --out runs/digits
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

from defuse_jax import evaluation, identification, pipeline
from defuse_jax.correction import CorrectConfig, fine_tune
from defuse_jax.regions import load_regions
from defuse_jax.run_config import load_run_config

GRID = [  # (lam, epochs, optimizer, learning rate)
    (0.01, 20, "sgd", 1e-3),  # the reference's setting
    (0.01, 40, "adam", 3e-4),  # the fixed schedule before the choice on held-out data
    (0.01, 80, "adam", 3e-4),
    (0.1, 40, "adam", 3e-4),
    (0.3, 20, "adam", 3e-4),
    (1.0, 10, "adam", 3e-4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/digits", help="a finished run directory")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    config = load_run_config(args.out)
    if config is None:
        raise SystemExit(f"{args.out} holds no run; run `defuse-jax run --out {args.out}` first.")
    ctx = pipeline.Context(args.out, config, print)
    ds, regions = ctx.dataset, load_regions(ctx.path("distill"))
    labels = {k: v for k, v in pipeline.read_answers(ctx).items() if v is not None}
    errors = identification.load_errors(ctx.path("search"))
    eval_set = evaluation.eval_set(ctx.model("vae"), x_test=ds.x_test, y_test=ds.y_test,
                                   regions=regions, labels=labels, errors=errors,
                                   config=config.eval)  # fmt: skip
    before = evaluation.evaluate_on(ctx.model("classifier"), eval_set)
    rows = []
    print(
        f"before: test {before['test_accuracy']:.4f}, "
        f"all labeled regions {before['region_accuracy']:.4f}"
    )
    print(f"{'lambda':>7} {'epochs':>6} {'optimizer':>10} {'test':>7} {'region':>7} {'seconds':>8}")
    for lam, epochs, opt, lr in GRID:
        cfg = dataclasses.replace(config.correct, select=False, lam=lam, epochs=epochs,
                                  optimizer=opt, learning_rate=lr)  # fmt: skip
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            params = fine_tune(ctx.model("classifier"), ctx.model("vae"), regions, labels,
                                  x_train=ds.x_train, y_train=ds.y_train, config=cfg,
                                  out_dir=tmp, progress=False).params  # fmt: skip
        seconds = time.perf_counter() - t0
        after = evaluation.evaluate_on(params, eval_set)
        rows.append({"lam": lam, "epochs": epochs, "optimizer": opt, "learning_rate": lr,
                     "test_accuracy": after["test_accuracy"],
                     "region_accuracy": after["region_accuracy"], "seconds": seconds})  # fmt: skip
        print(f"{lam:>7} {epochs:>6} {opt + ' ' + str(lr):>10} {after['test_accuracy']:>7.4f} "
              f"{after['region_accuracy']:>7.4f} {seconds:>8.1f}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"before": before, "rows": rows, "default": dataclasses.asdict(CorrectConfig())},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
