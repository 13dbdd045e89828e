"""Would a stricter filter on a finished run's kept error codes raise its bug yield? The run's
judge (`bug_yield.judge_for`) reads the codes that pass each filter:

- the oracle's confidence: its (ensemble) probability of the source class at least t;
- the classifier's confidence in its wrong prediction at least t;
- decode-encode consistency: the decoded image encoded again (the posterior mean) and decoded
  still gets the same wrong prediction (and the oracle still reads the source class).

    python scripts/yield_filters.py runs/v10k-conv/seed0

These are measurements for docs/results.md ("tried, did not help"), not search options.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax import bug_yield, evaluation, identification, models, stage_context
from defuse_jax.batching import map_batches


def _probs(params: models.Params, x: np.ndarray) -> np.ndarray:
    fn = jax.jit(lambda c, b: jax.nn.softmax(models.logits(c, b).astype(jnp.float32), -1))
    return np.asarray(map_batches(lambda b: fn(params, b["x"]), {"x": x}, batch_size=512))


def filters(run_dir: str) -> list[tuple[str, float, float]]:
    """[(filter, share of the judged codes it keeps, bug yield of those)]."""
    ctx = stage_context.of_run(run_dir)  # the run's models as its stages load them
    config, ds, vae, clf = ctx.config, ctx.dataset, ctx.model("vae"), ctx.model("classifier")
    oracle = ctx.model("oracle")
    errors = identification.load_errors(os.path.join(run_dir, "search"))
    seed = config.data.seed
    idx = bug_yield.judged_codes(len(errors["z"]), most=bug_yield.MAX_JUDGED_CODES, seed=seed)
    src, pred = errors["source_label"][idx], errors["pred_label"][idx]
    x = evaluation.decode(vae, errors["z"][idx])
    rows = np.arange(len(idx))
    p_src = _probs(oracle, x)[rows, src]
    p_pred = _probs(clf, x)[rows, pred]
    # re-encoded with the source class (a conditional VAE's codes hold it), decoded again
    x2 = evaluation.decode(vae, identification.encode_sources(vae, x, src))
    same = evaluation.classify(clf, x2) == pred
    still = evaluation.classify(oracle, x2) == src
    choice = bug_yield.judge_for(ds, evaluation.classify(clf, ds.x_test),
                                 cache_dir=os.path.join(run_dir, "cache", "judge"), seed=seed,
                                 train=config.classifier_train)  # fmt: skip
    judge = choice.judge
    bug = np.asarray(judge.predict(x)) == src
    out = [("every kept code", np.ones(len(idx), bool))]
    out += [(f"oracle p(source) >= {t}", p_src >= t) for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    out += [(f"classifier p(prediction) >= {t}", p_pred >= t) for t in (0.5, 0.7)]
    out += [("decode-encode: same prediction", same), ("... and oracle reads source", same & still)]
    return [(name, float(k.mean()), float(bug[k].mean()) if k.any() else float("nan"))
            for name, k in out]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories")
    for run_dir in parser.parse_args().runs:
        print(run_dir)
        for name, kept, found in filters(run_dir):
            print(f"  {name:34s} keeps {kept:6.1%}  bug yield {found:6.1%}")


if __name__ == "__main__":
    main()
