"""The judges on the images they disagree about: the VAE's reconstructions of test images.

A reconstruction is decoded from a test image's code (with its label, for a class-conditional
VAE), as the search's error codes are, and its class is the test label. The script prints the
classifier's accuracy on them and each candidate judge's scores (`bug_yield.judge_score`: on the
reconstructions the classifier gets right and on those it gets wrong), then writes a blind audit
of them (`defuse_jax.yield_audit`) into `<run>/audit_recon/`: `--n` reconstructions the
classifier gets wrong (scored as "codes", their label as the source) shuffled with `--n` it gets
right (the labeler's calibration). Fill `audit_recon/labels.csv` and rerun to score it: how
often the labeler reads the label where the classifier does not, beside each judge.

    python scripts/audit_reconstructions.py runs/ffsh/seed0 --n 40
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from defuse_jax import bug_yield, evaluation, identification, stage_context
from defuse_jax import yield_audit as ya


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run directory")
    parser.add_argument("--n", type=int, default=40, help="reconstructions of each kind")
    parser.add_argument("--seed", type=int, default=7, help="the audit's draw and order")
    args = parser.parse_args()
    directory = os.path.join(args.run, "audit_recon")
    labels = os.path.join(directory, "labels.csv")
    if os.path.exists(labels):
        try:
            print(ya.format_score(ya.score_directory(directory)))
        except ya.AuditPending as e:
            raise SystemExit(str(e)) from None
        return
    ctx = stage_context.of_run(args.run)  # the run's models as its stages load them
    config, ds, vae, clf = ctx.config, ctx.dataset, ctx.model("vae"), ctx.model("classifier")
    rec = evaluation.decode(vae, identification.encode_sources(vae, ds.x_test, ds.y_test))
    pred_rec, y = np.asarray(evaluation.classify(clf, rec)), ds.y_test
    pred = np.asarray(evaluation.classify(clf, ds.x_test))
    choice = bug_yield.judge_for(ds, pred, cache_dir=os.path.join(args.run, "cache", "judge"),
                                 seed=config.data.seed, train=config.classifier_train)  # fmt: skip
    wrong = pred_rec != y
    print(f"{args.run}: the classifier reads {np.mean(~wrong):.1%} of the test reconstructions "
          f"right ({int(wrong.sum())} wrong)")  # fmt: skip
    for judge, on_test in zip(choice.candidates, choice.scores, strict=True):
        on_rec = bug_yield.judge_score(judge, rec, y, pred_rec, seed=config.data.seed)

        def f(x):
            return "n/a" if x is None else f"{x:.1%}"

        print(f"  {judge.name}: test images {f(on_test['on_right'])} / {f(on_test['on_wrong'])} "
              f"(right / the classifier's errors), reconstructions {f(on_rec['on_right'])} / "
              f"{f(on_rec['on_wrong'])}")  # fmt: skip
    if not wrong.any():
        return
    sample = ya.audit_sample(rec[wrong], y[wrong], pred_rec[wrong], rec[~wrong], y[~wrong],
                             pred_rec[~wrong], n_codes=args.n, n_known=args.n,
                             seed=args.seed)  # fmt: skip
    verdicts = {j.name: np.asarray(j.predict(sample.images)) for j in choice.candidates}
    sheets = ya.write_audit(directory, sample, verdicts, ds.class_names)
    print(f"Wrote {', '.join(sheets)}; fill {labels} and rerun.")


if __name__ == "__main__":
    main()
