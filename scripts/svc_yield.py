"""The SVC judge's bug yield on finished runs' kept error codes, for comparison with the judge
their reports used (on images above 16x16 pixels a conv classifier, `bug_yield.judge_for`).

    python scripts/svc_yield.py runs/fashion10k-mlp/seed0 runs/v10k/seed0

The SVC (`bug_yield.fit_judge`, on a seeded 5,000-image subset of the training split) is of
another family than the conv models, but weaker on 28x28 images (84.5% on Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import os

from defuse_jax import bug_yield, identification
from defuse_jax import train_models as tm
from defuse_jax.data import load_dataset
from defuse_jax.run_config import load_run_config


def svc_yield(run_dir: str) -> dict:
    """`bug_yield.judge_codes` by the SVC judge on `run_dir`'s kept codes."""
    config = load_run_config(run_dir)
    if config is None:
        raise SystemExit(f"{run_dir} holds no run (no config.json).")
    ds = load_dataset(config.data)
    vae = tm.load_trained(os.path.join(run_dir, "train", "vae"))[0]
    errors = identification.load_errors(os.path.join(run_dir, "search"))
    seed = config.data.seed
    judge = bug_yield.fit_judge(ds.x_train, ds.y_train, ds.x_test, ds.y_test, seed=seed)
    return bug_yield.judge_codes(
        judge, vae, errors["z"], errors["source_label"], errors["pred_label"], seed=seed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories")
    for run_dir in parser.parse_args().runs:
        out = svc_yield(run_dir)
        print(
            f"{run_dir}: {out['judge']} (test accuracy {out['judge_test_accuracy']:.1%}): bug "
            f"{out['bug']:.1%}, class change {out['class_change']:.1%} of {out['codes_judged']:,}"
        )


if __name__ == "__main__":
    main()
