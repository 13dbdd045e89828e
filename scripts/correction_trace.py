"""Trace the correction epoch by epoch on a finished run, test accuracy included (analysis only).

For each region weight, fine-tunes the run's classifier (in a temporary directory: the run is
not modified) and after every epoch records what the correction's choice sees (validation
accuracy, accuracy on the watched regions, the worst drop of a labeled region) next to what it
must never see: test accuracy, and how many test images the epoch breaks (right before, wrong
after) and fixes. It answers "how much does the test set move whatever epoch is kept?". A
weight of 0 fine-tunes on the training data alone: the noise floor of continued training.

    python scripts/correction_trace.py runs/seeds-conv/seed0 --lams 0 0.003 --epochs 6
    python scripts/correction_trace.py RUN --learning-rate 1e-4 --json trace.json
    python scripts/correction_trace.py RUN --optimizer sgd --learning-rate 0.01 --lams 0 0.03
    python scripts/correction_trace.py RUN --lams 0.003 --epochs 8 --interpolate 0.5 0.75 1

`--interpolate` also scores, after every epoch, the weights moved only part of the way from the
original's: theta_0 + alpha * (theta - theta_0) (weight-space interpolation, as in WiSE-FT).
It asks whether the test images an epoch breaks lie on the fix's path (they break at every alpha
that fixes the regions) or are noise of continued training (a smaller alpha keeps them).

The JSON records name the test images each epoch breaks (`test_broken_ids`, indices into the
run's test split), so you can see whether the same images break whatever the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

import jax
import numpy as np

from defuse_jax import correction_selection as sel
from defuse_jax.correction import correction_losses, with_region_weight
from defuse_jax.regions import load_regions
from defuse_jax.run_config import load_run_config, resolved_lengths
from defuse_jax.stage_context import Context
from defuse_jax.stages.label import read_answers
from defuse_jax.training import fit


def _interpolate(original, tuned, alpha: float):
    """The weights `alpha` of the way from the original's to the fine-tuned ones."""
    if alpha == 1.0:  # exactly the trained weights (w0 + (w - w0) may round differently)
        return tuned
    # On the host: the trained weights may be replicated over devices, the original's are not.
    return jax.tree.map(lambda w0, w: w0 + alpha * (w - w0), *jax.device_get((original, tuned)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory whose label stage has finished")
    ap.add_argument("--lams", type=float, nargs="+", help="region weights (default: the run's)")
    ap.add_argument("--epochs", type=int, help="default: the run's correct.epochs")
    ap.add_argument("--learning-rate", type=float, help="default: the run's")
    ap.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), help="default: the run's")
    ap.add_argument(
        "--interpolate", type=float, nargs="+", default=[1.0], metavar="ALPHA",
        help="also score theta_0 + ALPHA * (theta - theta_0) each epoch (default: 1 only)",
    )  # fmt: skip
    ap.add_argument("--json", help="also write the records here")
    args = ap.parse_args()

    config = load_run_config(args.run)
    if config is None:
        raise SystemExit(f"{args.run} has no config.json: run the pipeline there first.")
    ctx = Context(os.path.abspath(args.run), config, print)
    ds = ctx.dataset
    # Its round length and region weights, as it ran.
    cc = resolved_lengths(config, len(ds.x_train)).correct
    train = dataclasses.replace(
        cc.train_config(),
        epochs=args.epochs or cc.epochs,
        learning_rate=args.learning_rate or cc.learning_rate,
        optimizer=args.optimizer or cc.optimizer,
    )
    labels = {k: v for k, v in read_answers(ctx).items() if v is not None}
    if not labels:
        raise SystemExit(f"{args.run} has no labeled region: nothing to correct.")
    regions = load_regions(ctx.path("distill"))
    clf, vae = ctx.model("classifier"), ctx.model("vae")
    held_out = sel.selection_data(
        clf, vae, regions, labels, x_val=ds.x_val, y_val=ds.y_val, x_train=ds.x_train,
        y_train=ds.y_train, samples=cc.select_samples,
        tau=cc.tau, seed=cc.seed, min_error_rate=config.distill.min_error_rate,
    )  # fmt: skip
    test_before = sel._right(clf, ds.x_test, ds.y_test)
    original = sel.score(clf, held_out, lam=0.0, epoch=0)
    # As `fine_tune` trains them: one program, the weight given with the data.
    weighted = correction_losses(clf, vae, regions, labels, config=cc)(None)
    data = {"x": ds.x_train, "y": np.asarray(ds.y_train, np.int32)}
    print(
        f"original: val {original.val_accuracy:.4f}, watched regions "
        f"{original.region_accuracy:.4f}, test {test_before.mean():.4f}; lr "
        f"{train.learning_rate:g}, {train.epochs} epochs"
    )
    print("lambda epoch alpha | val    regions worst-drop | test   broke fixed")
    records = []
    for lam in args.lams or cc.lams:

        def on_epoch(tuned, record, lam=lam):
            for alpha in args.interpolate:
                params = _interpolate(clf, tuned, alpha)
                s = sel.score(params, held_out, lam=lam, epoch=int(record["epoch"]))
                right = sel._right(params, ds.x_test, ds.y_test)
                broken = test_before & ~right
                row = {**sel.score_as_dict(s), "alpha": alpha, "test_accuracy": float(right.mean()),
                       "test_broken": int(broken.sum()),
                       "test_fixed": int((~test_before & right).sum()),
                       "test_broken_ids": np.flatnonzero(broken).tolist()}  # fmt: skip
                records.append(row)
                print(
                    f"{lam:6g} {s.epoch:5d} {alpha:5.3g} | {s.val_accuracy:.4f} "
                    f"{s.region_accuracy:.4f}  {s.worst_region_drop:.3f}      | "
                    f"{row['test_accuracy']:.4f} {row['test_broken']:5d} {row['test_fixed']:5d}",
                    flush=True,
                )

        with tempfile.TemporaryDirectory() as tmp:
            fit(
                clf, weighted, with_region_weight(data, lam), config=train,
                checkpoint_dir=os.path.join(tmp, "ckpt"), fingerprint={"trace": lam},
                on_epoch=on_epoch, progress=False, epoch_steps=cc.epoch_steps,
            )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"original": sel.score_as_dict(original),
                       "test_accuracy": float(test_before.mean()),
                       "records": records}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
