"""Bug yield: how many of the search's error codes still show their source class.

An unrestricted adversarial example keeps its true class, yet the classifier gets it wrong. A
decoded error code whose image now shows the class the classifier predicts is a class change,
not a bug. Which one it is gets decided by a *judge*, a model that takes no part in the search,
the labels or the correction (like a test set, it is used for nothing else):

The judge is chosen on the test split from candidates of other families than the run's
models, by how well each reads the images the classifier gets right *and* its errors
(`choose_judge`): a weak judge misreads the first, and a judge sharing the classifier's blind
spots misreads the second, so also the search's bugs. The candidates (`judge_candidates`):

- a scikit-learn RBF support-vector classifier fitted on (a seeded subset of) the training
  split's pixels, in seconds (`fit_judge`): 98-99% test accuracy on digits, above the run's
  classifiers, also upsampled to 28x28; 84.5% on Fashion-MNIST, under them;
- on images above 16x16 pixels also a conv classifier of the default architecture trained on
  the training split with a seed no other model uses (`train_judge`). It reaches about the
  run's own conv classifier, and, that classifier's sibling, shares its blind spots: on 28x28
  digits it reads 11-22% of the conv classifier's test errors as their class, the SVC 44-80%.

The report gives every candidate's scores and bug yield beside the chosen judge's
(docs/results.md compares them on every run).

Example:
  >>> choice = judge_for(ds, classifier_test_predictions, cache_dir="runs/x/cache/judge")
  >>> bug_yield(choice.judge, images, source_label, pred_label, region=assignment)["bug"]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from sklearn.svm import SVC

from defuse_jax import evaluation
from defuse_jax import train_models as tm
from defuse_jax import training_lengths as tl
from defuse_jax.config_checks import fingerprint_fields
from defuse_jax.data import Dataset, dataset_sha256
from defuse_jax.files import json_digest, read_json
from defuse_jax.models import ClassifierConfig, Params
from defuse_jax.training import TrainConfig

# The SVC's fit grows quadratically with its training set: a seeded subset keeps the judge at
# seconds on Fashion-MNIST's 51,000 images (all 1,145 of digits are used).
JUDGE_MAX_TRAIN = 5000
JUDGE_MAX_TEST = 2000
# Error codes the judge reads at most per run or setting (a seeded subset beyond).
MAX_JUDGED_CODES = 10_000
JUDGE_NAME = "SVC (RBF kernel, C=10) on {n:,} training images' pixels"
SVC_MAX_PIXELS = 16 * 16  # larger images also get a conv candidate (`judge_candidates`)
# The conv judge's seed is the data seed plus this: no other model of a run is trained with it
# (the classifier uses its own seed, the oracle's members the classifier's seed + 1, + 2, ...).
JUDGE_SEED_OFFSET = 1000


class Judge(NamedTuple):
    """An evaluation-only classifier of images."""

    predict: Callable[[np.ndarray], np.ndarray]  # images [M, H, W, C] in [0, 1] -> labels [M]
    name: str  # what it is, for the report
    test_accuracy: float  # on up to JUDGE_MAX_TEST test images (the SVC), or all (conv)


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
    return Judge(lambda x: model.predict(_flat(x)), JUDGE_NAME.format(n=len(idx)), accuracy)


def train_judge(
    ds: Dataset,
    *,
    cache_dir: str,
    seed: int = 0,
    train: TrainConfig = tm.CLASSIFIER_TRAIN_DEFAULT,
    kind: str = "conv",
    progress: bool = False,
) -> Judge:
    """A classifier of `kind` (`ClassifierConfig(kind=kind)`) trained on the training split
    with `train` (default: the classifier's, its length from the step budget) and seed
    `seed + JUDGE_SEED_OFFSET`, as a judge.

    It is trained once per data and settings: in `cache_dir`/<digest of what it depends on>/
    (Orbax checkpoints, resumed or reloaded like every model of a run).
    """
    config = ClassifierConfig(kind=kind)
    # Its length resolved before the cache key: epochs left to the step budget (as config.json
    # saves them) and the epochs they resolve to (as the evaluate stage passes them) are the
    # same judge, in the same directory.
    train = tl.train_epochs(train, tl.CLASSIFIER_BUDGET, len(ds.x_train))
    train = dataclasses.replace(train, seed=seed + JUDGE_SEED_OFFSET)
    # (shift came after the judge: judges trained before it keep their directory)
    meta = {"model": dataclasses.asdict(config), "data": dataset_sha256(ds),
            "train": fingerprint_fields(train, only=("shift",))}  # fmt: skip
    out_dir = os.path.join(cache_dir, json_digest(meta))
    trained = tm.train_classifier(ds, out_dir=out_dir, config=config, train=train,
                                  progress=progress)  # fmt: skip
    params = trained.params
    epochs = read_json(os.path.join(out_dir, "config.json"))["train"]["epochs"]
    shifted = f", shifted by up to {train.shift} pixels" if train.shift else ""
    name = (f"{kind} classifier trained on {len(ds.x_train):,} training images{shifted} "
            f"({epochs} epochs, seed {train.seed})")  # fmt: skip
    return classifier_judge(params, name, float(trained.metrics["accuracy"]))


def classifier_judge(params: Params, name: str, test_accuracy: float) -> Judge:
    """A classifier (a project model or an ensemble, `evaluation.classify`) as a `Judge`."""
    return Judge(
        lambda x: np.asarray(evaluation.classify(params, np.asarray(x, np.float32))),
        name,
        test_accuracy,
    )


def judge_candidates(
    ds: Dataset,
    *,
    cache_dir: str,
    seed: int = 0,
    train: TrainConfig = tm.CLASSIFIER_TRAIN_DEFAULT,
    progress: bool = False,
) -> list[Judge]:
    """The judges `choose_judge` chooses from: the SVC, and on images above `SVC_MAX_PIXELS`
    pixels also the conv judge (`train_judge` with `train`, kept in `cache_dir`)."""
    svc = fit_judge(ds.x_train, ds.y_train, ds.x_test, ds.y_test, seed=seed)
    h, w, _ = ds.image_shape
    if h * w <= SVC_MAX_PIXELS:
        return [svc]
    return [svc, train_judge(ds, cache_dir=cache_dir, seed=seed, train=train, progress=progress)]


def judge_score(
    judge: Judge, images: np.ndarray, labels: np.ndarray, pred: np.ndarray, *, seed: int = 0
) -> dict[str, Any]:
    """How well `judge` reads test images as their labels, apart on those the classifier gets
    right and those it gets wrong (certain bugs; up to `JUDGE_MAX_TEST` of each, seeded).

    A judge must read both: the images the classifier gets right (a weak judge misreads
    them) and its errors (a judge sharing the classifier's blind spots misreads those). The
    *balanced* score is the mean of the two shares, or the first alone without errors.

    Args:
      judge: a candidate (`judge_candidates`).
      images: [N, H, W, C] test images; labels, pred: [N] their labels and the classifier's
        predictions.

    Returns:
      {"judge", "test_accuracy", "on_right", "on_wrong" (None without errors), "balanced"}.
    """
    labels, pred = np.asarray(labels), np.asarray(pred)
    shares = []
    for part in (np.flatnonzero(pred == labels), np.flatnonzero(pred != labels)):
        if len(part) == 0:
            shares.append(None)
            continue
        part = part[_subset(len(part), JUDGE_MAX_TEST, seed)]
        read = np.asarray(judge.predict(np.asarray(images)[part]))
        shares.append(float(np.mean(read == labels[part])))
    known = [s for s in shares if s is not None]
    return {
        "judge": judge.name,
        "test_accuracy": judge.test_accuracy,
        "on_right": shares[0],
        "on_wrong": shares[1],
        "balanced": float(np.mean(known)) if known else None,
    }


class JudgeChoice(NamedTuple):
    """The candidate judges, their scores on the test split and the one chosen."""

    candidates: list[Judge]
    scores: list[dict[str, Any]]  # `judge_score` of each candidate
    chosen: int  # index of the judge chosen

    @property
    def judge(self) -> Judge:
        return self.candidates[self.chosen]


def choose_judge(
    candidates: list[Judge],
    images: np.ndarray,
    labels: np.ndarray,
    pred: np.ndarray,
    *,
    seed: int = 0,
) -> JudgeChoice:
    """The candidate with the highest balanced score (`judge_score`) on the test images, the
    first of those that tie, with every candidate's score, so that a report can show them.

    The choice reads the test split and the classifier alone, never the search's codes.

    Args:
      candidates: the judges (`judge_candidates`), in order of preference on a tie.
      images: [N, H, W, C] test images; labels, pred: [N] their labels and the classifier's
        predictions.
    """
    if not candidates:
        raise ValueError("choose_judge needs at least one candidate judge.")
    scores = [judge_score(j, images, labels, pred, seed=seed) for j in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i]["balanced"] or 0.0, -i))
    return JudgeChoice(candidates, scores, best)


def judge_for(
    ds: Dataset,
    pred: np.ndarray,
    *,
    cache_dir: str,
    seed: int = 0,
    train: TrainConfig = tm.CLASSIFIER_TRAIN_DEFAULT,
    progress: bool = False,
) -> JudgeChoice:
    """The judge for `ds` and a classifier whose test predictions are `pred` [N]: the
    candidates (`judge_candidates`) and the one `choose_judge` picks (`.judge`)."""
    candidates = judge_candidates(ds, cache_dir=cache_dir, seed=seed, train=train,
                                  progress=progress)  # fmt: skip
    return choose_judge(candidates, ds.x_test, ds.y_test, pred, seed=seed)


def every_judge(
    choice: JudgeChoice, codes: JudgedCodes
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every candidate's reading of `codes`, each judge predicting them once: the chosen
    judge's `bug_yield` (per region too), and each candidate's score (`judge_score`) with its
    bug yield and whether it is the judge chosen (how far the yield depends on the judge)."""
    readings = [
        bug_yield(judge, codes.images, codes.source, codes.pred, region=codes.region)
        for judge in choice.candidates
    ]
    table = [
        {**score, "bug": reading["bug"], "chosen": i == choice.chosen}
        for i, (reading, score) in enumerate(zip(readings, choice.scores, strict=True))
    ]
    return readings[choice.chosen], table


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
    verdict = np.asarray(judge.predict(images)) if m else np.zeros((0,), np.int64)
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


def test_error_yield(
    judge: Judge, images: np.ndarray, labels: np.ndarray, pred: np.ndarray
) -> dict[str, Any]:
    """The judge's reading of the classifier's own test errors, the scale for its bug yield.

    A test image the classifier gets wrong is a bug by its label: it shows its true class. The
    share of those the judge reads as their true class is what this judge makes of certain bugs.
    A judge that shares the classifier's blind spots reads many of them as the classifier does
    (a conv judge behind a conv classifier on Fashion-MNIST reads 28-32% of them right), and so
    reads the search's bugs as class changes too: the search's yield is best read against it.

    Args:
      judge: from `judge_for`.
      images: [N, H, W, C] test images; labels: [N] their labels.
      pred: [N] the classifier's predictions on them.

    Returns:
      {"test_errors": how many the classifier gets wrong, "test_error_yield": the share of
      those the judge reads as their label (None without errors)}.
    """
    labels, pred = np.asarray(labels), np.asarray(pred)
    wrong = pred != labels
    n = int(wrong.sum())
    read = np.asarray(judge.predict(np.asarray(images)[wrong])) if n else np.zeros(0, np.int64)
    return {
        "test_errors": n,
        "test_error_yield": float(np.mean(read == labels[wrong])) if n else None,
    }


def label_agreement(judge: Judge, data: evaluation.EvalSet) -> dict[int, float]:
    """The judge's second opinion on the region labels: the share of each labeled region's
    held-out samples (those region accuracy is measured on) it reads as the region's label.

    A confirmed error region is one whose label the classifier gets wrong, so a wrong label
    (an oracle's mistake) can confirm a region as well as a real bug can. The judge took no
    part in the labels.

    Args:
      judge: from `judge_for`.
      data: the run's evaluation set (`evaluation.eval_set`): the labeled regions' ids, labels
        and decoded held-out samples.

    Returns:
      {region id: share of its samples the judge reads as its label}.
    """
    votes = evaluation.heldout_votes_of(judge.predict, data)
    return {
        rid: float(np.mean(v == label))
        for (rid, v), label in zip(votes.items(), data.region_labels, strict=True)
    }


def judged_codes(n: int, *, most: int, seed: int) -> np.ndarray:
    """The indices of the error codes to judge: all of them up to `most`, else a seeded subset
    (sorted), so that the judge's cost stays bounded on large runs."""
    return _subset(n, most, seed)


class JudgedCodes(NamedTuple):
    """The error codes a judge reads: all of a run's up to `MAX_JUDGED_CODES`, else a seeded
    subset (`judged_codes`), decoded once for every judge."""

    images: np.ndarray  # [M, H, W, C] decoded
    source: np.ndarray  # [M] source labels
    pred: np.ndarray  # [M] the classifier's predictions
    region: np.ndarray | None  # [M] the region each falls in (-1: none), or None


def decode_codes(
    vae: Params,
    z: np.ndarray,
    source: np.ndarray,
    pred: np.ndarray,
    *,
    region: np.ndarray | None = None,
    seed: int = 0,
) -> JudgedCodes:
    """Error codes z [M, L] to judge, decoded by the run's VAE; source, pred, region: [M]."""
    idx = judged_codes(len(z), most=MAX_JUDGED_CODES, seed=seed)

    def pick(a):
        return None if a is None else np.asarray(a)[idx]

    return JudgedCodes(evaluation.decode(vae, np.asarray(z)[idx]), pick(source), pick(pred),
                       pick(region))  # fmt: skip


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
    """`bug_yield` of error codes z [M, L] decoded by the run's VAE (`decode_codes`)."""
    codes = decode_codes(vae, z, source, pred, region=region, seed=seed)
    return bug_yield(judge, codes.images, codes.source, codes.pred, region=codes.region)
