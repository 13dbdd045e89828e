"""Bug yield: how many of the search's error codes still show their source class.

An unrestricted adversarial example keeps its true class, yet the classifier gets it wrong. A
decoded error code whose image now shows the class the classifier predicts is a class change,
not a bug. Which one it is gets decided by a *judge*, a model that takes no part in the search,
the labels or the correction (like a test set, it is used for nothing else): a scikit-learn
RBF support-vector classifier fitted on (a seeded subset of) the training split's pixels. On
digits it reaches 99.1% test accuracy, above the run's classifiers; on larger images it is a
weaker model, so the report gives its test accuracy next to the yield.

Example:
  >>> judge = fit_judge(ds.x_train, ds.y_train, ds.x_test, ds.y_test)
  >>> bug_yield(judge, images, source_label, pred_label, region=assignment)["bug"]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from sklearn.svm import SVC

from defuse_jax import evaluation
from defuse_jax.models import Params

# The SVC's fit grows quadratically with its training set: a seeded subset keeps the judge at
# seconds on Fashion-MNIST's 51,000 images (all 1,145 of digits are used).
JUDGE_MAX_TRAIN = 5000
JUDGE_MAX_TEST = 2000
# Error codes the judge reads at most per run or setting (a seeded subset beyond).
MAX_JUDGED_CODES = 10_000
JUDGE_NAME = "SVC (RBF kernel, C=10) on {n:,} training images' pixels"


class Judge(NamedTuple):
    """An evaluation-only classifier of images."""

    model: Any  # fitted sklearn classifier: flattened pixels [M, H*W*C] -> labels [M]
    name: str  # what it is, for the report
    test_accuracy: float  # on up to JUDGE_MAX_TEST test images


def _subset(n: int, most: int, seed: int) -> np.ndarray:
    if n <= most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, most, replace=False))


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).reshape(len(x), -1)


def fit_judge(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    max_train: int = JUDGE_MAX_TRAIN,
    seed: int = 0,
) -> Judge:
    """Fits the judge on the training split (x: [N, H, W, C] in [0, 1]; y: [N])."""
    idx = _subset(len(x_train), max_train, seed)
    model = SVC(C=10.0, gamma="scale").fit(_flat(x_train[idx]), np.asarray(y_train)[idx])
    t = _subset(len(x_test), JUDGE_MAX_TEST, seed)
    accuracy = float(np.mean(model.predict(_flat(x_test[t])) == np.asarray(y_test)[t]))
    return Judge(model, JUDGE_NAME.format(n=len(idx)), accuracy)


def bug_yield(
    judge: Judge,
    images: np.ndarray,
    source: np.ndarray,
    pred: np.ndarray,
    *,
    region: np.ndarray | None = None,
) -> dict[str, Any]:
    """The judge's reading of decoded error codes.

    Args:
      judge: from `fit_judge`.
      images: [M, H, W, C] the decoded error codes.
      source: [M] their source labels; pred: [M] the classifier's predictions.
      region: [M] the region each code falls in (-1: none), or None.

    Returns:
      {"judge", "judge_test_accuracy", "codes_judged", "bug": share the judge reads as the source
      class, "class_change": share it reads as the predicted class, "per_region": {region id:
      bug share of its codes}} (shares are None when nothing was judged).
    """
    m = len(images)
    verdict = judge.model.predict(_flat(images)) if m else np.zeros((0,), np.int64)
    source, pred = np.asarray(source), np.asarray(pred)
    per_region: dict[int, float] = {}
    if region is not None and m:
        region = np.asarray(region)
        for r in np.unique(region[region >= 0]):
            inside = region == r
            per_region[int(r)] = float(np.mean(verdict[inside] == source[inside]))
    return {
        "judge": judge.name,
        "judge_test_accuracy": judge.test_accuracy,
        "codes_judged": int(m),
        "bug": float(np.mean(verdict == source)) if m else None,
        "class_change": float(np.mean(verdict == pred)) if m else None,
        "per_region": per_region,
    }


def judged_codes(n: int, *, most: int, seed: int) -> np.ndarray:
    """The indices of the error codes to judge: all of them up to `most`, else a seeded subset
    (sorted), so that the judge's cost stays bounded on large runs."""
    return _subset(n, most, seed)


def judge_codes(
    judge: Judge,
    vae: Params,
    z: np.ndarray,
    source: np.ndarray,
    pred: np.ndarray,
    *,
    region: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """`bug_yield` of error codes z [M, L], decoded by the run's VAE: all of them up to
    `MAX_JUDGED_CODES`, else a seeded subset (`judged_codes`); source, pred, region: [M]."""
    idx = judged_codes(len(z), most=MAX_JUDGED_CODES, seed=seed)

    def pick(a):
        return None if a is None else np.asarray(a)[idx]

    return bug_yield(
        judge, evaluation.decode(vae, np.asarray(z)[idx]), pick(source), pick(pred),
        region=pick(region),
    )  # fmt: skip
