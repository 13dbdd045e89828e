"""Several judges' bug yield on finished runs' kept error codes, beside their reading of the
run's classifier's own test errors (certain bugs, the scale for the yield).

    python scripts/judge_yield.py runs/d28cv/seed1 runs/ffcv/seed0 --judges conv mlp svc

Judges (`defuse_jax.bug_yield`): `svc` is the SVC of 8x8 digits (`fit_judge`, a seeded
5,000-image subset of the training split); `conv` and `mlp` are classifiers of that family
trained like the run's classifier with the judge's own seed (`train_judge`, kept in the run's
`cache/judge/`); `conv-shift` the conv one trained on images shifted by up to 2 pixels
(`TrainConfig.shift`); `oracle` the run's oracle (label/oracle/), which is no judge (it steers
the search and labels the regions) but is scored the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from defuse_jax import bug_yield, evaluation, identification, stage_context


def judge_yields(run_dir: str, judges: list[str]) -> dict[str, dict]:
    """{judge kind: `bug_yield.bug_yield` of `run_dir`'s kept codes plus
    `bug_yield.test_error_yield` on its classifier's test errors}."""
    ctx = stage_context.of_run(run_dir)  # the run's models as its stages load them
    config, ds, vae, clf = ctx.config, ctx.dataset, ctx.model("vae"), ctx.model("classifier")
    pred = evaluation.classify(clf, ds.x_test)
    seed = config.data.seed
    errors = identification.load_errors(os.path.join(run_dir, "search"))
    codes = bug_yield.decode_codes(  # decoded once for every judge
        vae, errors["z"], errors["source_label"], errors["pred_label"], seed=seed
    )
    out = {}
    for kind in judges:
        if kind == "svc":
            judge = bug_yield.fit_judge(ds.x_train, ds.y_train, ds.x_test, ds.y_test, seed=seed)
        elif kind == "oracle":
            oracle = ctx.model("oracle")
            accuracy = np.mean(np.asarray(evaluation.classify(oracle, ds.x_test)) == ds.y_test)
            judge = bug_yield.classifier_judge(oracle, "the run's oracle", float(accuracy))
        else:
            shift = 2 if kind == "conv-shift" else 0
            judge = bug_yield.train_judge(
                ds, cache_dir=os.path.join(run_dir, "cache", "judge"), seed=seed,
                train=dataclasses.replace(config.classifier_train, shift=shift),
                kind=kind.removesuffix("-shift"),
            )  # fmt: skip
        out[kind] = {
            **bug_yield.bug_yield(judge, codes.images, codes.source, codes.pred),
            **bug_yield.test_error_yield(judge, ds.x_test, ds.y_test, pred),
            **bug_yield.judge_score(judge, ds.x_test, ds.y_test, pred, seed=seed),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories")
    parser.add_argument("--judges", nargs="+", default=["conv", "mlp", "svc"],
                        choices=["conv", "conv-shift", "mlp", "svc", "oracle"])  # fmt: skip
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args()
    everything = {}
    for run_dir in args.runs:
        everything[run_dir] = judge_yields(run_dir, args.judges)
        for kind, out in everything[run_dir].items():
            print(
                f"{run_dir} {kind}: {out['judge']} (test accuracy "
                f"{out['judge_test_accuracy']:.1%}): reads {out['test_error_yield']:.1%} of the "
                f"classifier's {out['test_errors']} test errors as their class; bug "
                f"{out['bug']:.1%}, class change {out['class_change']:.1%} of "
                f"{out['codes_judged']:,} kept codes; balanced score {out['balanced']:.1%}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1, default=str)


if __name__ == "__main__":
    main()
