"""Choosing the correction's region weight and epoch on validation data, never on the test split.

Every candidate lambda is fine-tuned for the configured epochs. After each epoch the model is
scored on two held-out sets that no training step sees:

* the validation split carved from the training data (`Dataset.x_val`), which stands in for the
  test set: the correction must not cost more than `max_val_drop` of its accuracy;
* fresh samples of the labeled regions (`CorrectConfig.select_samples` per region, drawn with
  the correction's seed, not with the evaluation's), which measure the fix. Only the regions
  that are errors under their label on these samples are scored (all labeled regions when
  there is none), as region accuracy is in the report.

The chosen model is the candidate (any lambda, any epoch, or the original classifier) with the
best region accuracy among those within `max_val_drop` of the original's validation accuracy;
ties go to the higher validation accuracy, then the smaller lambda, then the earlier epoch. The
original classifier is always within the bound, so a correction that would cost more validation
accuracy than allowed everywhere leaves the classifier as it was, and the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax import models
from defuse_jax.batching import map_batches
from defuse_jax.files import read_json, write_json, write_npz
from defuse_jax.models import Params
from defuse_jax.regions import Regions, sample_regions
from defuse_jax.training import evaluate

# Stream of the selection's region samples under the correction seed (the training samples use
# the step keys, the overlap summary stream 2).
_SELECT_STREAM = 3


class Score(NamedTuple):
    """One candidate model, scored on the held-out selection data."""

    lam: float  # region weight (0.0: the original classifier)
    epoch: int  # epochs fine-tuned (0: the original classifier)
    val_accuracy: float  # on the validation split
    region_accuracy: float  # on the selection samples of the watched regions


class SelectionData(NamedTuple):
    """What the candidates are scored on."""

    x: np.ndarray  # [n_val + M, H, W, C] validation images, then decoded region samples
    y: np.ndarray  # [n_val + M] int32 true class / region label
    is_region: np.ndarray  # [n_val + M] float32 1.0 for region samples
    watched: list[int]  # region ids whose samples are scored


def selection_data(
    classifier: Params,
    vae: Params,
    regions: Regions,
    labels: Mapping[int, int],
    *,
    x_val: np.ndarray,
    y_val: np.ndarray,
    samples: int,
    tau: float,
    seed: int,
    min_error_rate: float,
) -> SelectionData:
    """The validation split plus `samples` fresh decoded samples of each watched region.

    Args:
        classifier: the original classifier (decides which regions are errors).
        vae: the trained VAE (decodes the region samples).
        regions: the distilled regions.
        labels: {region id: class} of the labeled regions.
        x_val: [n_val, H, W, C] validation images; y_val: [n_val] labels.
        samples: samples per labeled region.
        tau: region samples come from N(mean, tau * covariance).
        seed: the correction seed.
        min_error_rate: a region is watched when the original classifier gets at least this
            share of its samples wrong under its label.
    """
    if len(y_val) == 0:
        raise ValueError(
            "Choosing the correction on validation data needs a validation split: set "
            "data.val_fraction > 0 (--val-fraction), or turn the choice off "
            "(--no-correct-select) to keep the last epoch of lambda = correct.lam."
        )
    ids = np.asarray(sorted(labels), np.int64)
    key = jax.random.fold_in(jax.random.key(seed), _SELECT_STREAM)
    z = sample_regions(regions, key, samples, tau=tau)[ids]  # [R, samples, L]
    r, n, latent = z.shape
    x_region = np.asarray(jax.jit(models.decode)(vae, jnp.asarray(z.reshape(-1, latent))))
    y_region = np.repeat(np.asarray([labels[int(i)] for i in ids], np.int32), n)
    right = _correct(classifier, x_region, y_region).reshape(r, n).mean(axis=1)
    watch = right <= 1.0 - min_error_rate + 1e-12
    if not watch.any():  # every labeled region already agrees with its label: watch them all
        watch[:] = True
    keep = np.repeat(watch, n)
    x_region, y_region = x_region[keep], y_region[keep]
    return SelectionData(
        x=np.concatenate([np.asarray(x_val, np.float32), x_region]),
        y=np.concatenate([np.asarray(y_val, np.int32), y_region]),
        is_region=np.concatenate([np.zeros(len(y_val)), np.ones(len(y_region))]).astype(np.float32),
        watched=[int(i) for i in ids[watch]],
    )


def _correct(classifier: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n] float32: 1.0 where the classifier gets x right."""
    pred = map_batches(lambda b: _predict(classifier, b["x"]), {"x": x}, batch_size=512)
    return (np.asarray(pred) == y).astype(np.float32)


@jax.jit
def _predict(params: Params, x: jax.Array) -> jax.Array:
    return params.module()(x).argmax(-1)


def scorer(data: SelectionData):
    """(eval_fn, eval_data) for `training.fit`: per-epoch `val_accuracy` and `region_accuracy`
    (the means of the weighted per-example metrics are the two accuracies)."""
    n = len(data.y)
    n_region = float(data.is_region.sum())
    n_val = n - n_region

    def eval_fn(params: Params, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        right = (params.module()(batch["x"]).argmax(-1) == batch["y"]).astype(jnp.float32)
        k = batch["k"]
        return {
            "val_accuracy": right * (1.0 - k) * (n / n_val),
            "region_accuracy": right * k * (n / max(n_region, 1.0)),
        }

    return eval_fn, {"x": data.x, "y": data.y, "k": data.is_region}


def score_original(classifier: Params, data: SelectionData) -> Score:
    """The original classifier as the epoch-0 candidate."""
    eval_fn, eval_data = scorer(data)
    ev = evaluate(eval_fn, classifier, eval_data)
    return Score(0.0, 0, ev["val_accuracy"], ev["region_accuracy"])


def rank(score: Score, *, baseline_val: float, max_val_drop: float) -> tuple[Any, ...]:
    """Sort key of a candidate: larger is better (see the module docstring)."""
    within = score.val_accuracy >= baseline_val - max_val_drop - 1e-9
    if within:
        return (1, score.region_accuracy, score.val_accuracy, -score.lam, -score.epoch)
    return (0, score.val_accuracy, score.region_accuracy, -score.lam, -score.epoch)


class BestEpoch:
    """`fit`'s `on_epoch` callback that keeps one lambda's best epoch on disk.

    `best.json` (the score and a fingerprint) and `best.npz` (the weights) are written
    atomically whenever an epoch beats the stored one, so a resumed run keeps the best epoch of
    the steps it does not run again. A `best.json` of other settings is ignored.
    """

    def __init__(
        self,
        directory: str,
        *,
        lam: float,
        baseline_val: float,
        max_val_drop: float,
        fingerprint: dict[str, Any],
    ):
        self.directory, self.lam = directory, float(lam)
        self.baseline_val, self.max_val_drop = baseline_val, max_val_drop
        self.fingerprint = fingerprint
        self.best: Score | None = None
        path = os.path.join(directory, "best.json")
        if os.path.exists(path) and os.path.exists(os.path.join(directory, "best.npz")):
            saved = read_json(path)
            if saved.get("fingerprint") == fingerprint:
                self.best = Score(**saved["score"])

    def _rank(self, score: Score) -> tuple[Any, ...]:
        return rank(score, baseline_val=self.baseline_val, max_val_drop=self.max_val_drop)

    def __call__(self, params: Params, record: Mapping[str, float]) -> None:
        score = Score(
            self.lam,
            int(record["epoch"]),
            float(record["select_val_accuracy"]),
            float(record["select_region_accuracy"]),
        )
        if self.best is not None and self._rank(score) <= self._rank(self.best):
            return
        leaves = jax.tree.leaves(jax.device_get(params.state))
        write_npz(os.path.join(self.directory, "best.npz"),
                  **{f"leaf_{i:04d}": np.asarray(a) for i, a in enumerate(leaves)})  # fmt: skip
        write_json(
            os.path.join(self.directory, "best.json"),
            {"score": score._asdict(), "fingerprint": self.fingerprint},
        )
        self.best = score

    def load(self, template: Params) -> Params:
        """The stored best weights, shaped like `template`."""
        with np.load(os.path.join(self.directory, "best.npz"), allow_pickle=False) as f:
            leaves = [f[k] for k in sorted(f.files)]
        treedef = jax.tree.structure(template.state)
        state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves])
        return Params(template.graphdef, state)
