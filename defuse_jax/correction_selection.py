"""Choosing the correction's region weight and epoch on held-out data, never on the test split.

Every candidate lambda is fine-tuned for the configured epochs. After each epoch the model is
scored on two held-out sets that no training step sees:

* the validation split carved from the training data (`Dataset.x_val`), which stands in for the
  test set;
* fresh samples of every labeled region (`CorrectConfig.select_samples` per region, drawn with
  the correction's seed, not with the evaluation's).

A candidate is *within bounds* when it loses at most `max_val_drop` of the original's
validation accuracy and no labeled region loses more than `max_region_drop` of its accuracy.
Among those, the chosen model has the best accuracy on the *watched* regions: the labeled
regions that are errors under their label on these samples (every labeled region when there is
none), as region accuracy is in the report. Ties go to the higher validation accuracy, then the
smaller lambda, then the earlier epoch. The original classifier is always within bounds, so a
correction that breaks the bounds at every epoch leaves the classifier as it was, and the
report says so.
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

# Stream of the selection's region samples under the correction seed (the training samples use
# the step keys, the overlap summary stream 2).
_SELECT_STREAM = 3


class Score(NamedTuple):
    """One candidate model, scored on the held-out selection data."""

    lam: float  # region weight (0.0: the original classifier)
    epoch: int  # epochs fine-tuned (0: the original classifier)
    val_accuracy: float  # on the validation split
    region_accuracy: float  # mean over the watched regions' samples
    per_region: tuple[float, ...]  # [R] accuracy on each labeled region's samples

    def as_json(self) -> dict[str, Any]:
        return {**self._asdict(), "per_region": list(self.per_region)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Score:
        return cls(**{**obj, "per_region": tuple(obj["per_region"])})


class SelectionData(NamedTuple):
    """What the candidates are scored on."""

    x_val: np.ndarray  # [n_val, H, W, C]
    y_val: np.ndarray  # [n_val] int32
    x_region: np.ndarray  # [R * n, H, W, C] decoded samples, region by region
    y_region: np.ndarray  # [R * n] int32 the region's label
    region_ids: list[int]  # [R] the labeled regions, in the order of the samples
    watched: np.ndarray  # [R] bool: the regions whose accuracy is maximised


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
    """The validation split plus `samples` fresh decoded samples of each labeled region.

    Args:
        classifier: the original classifier (decides which regions are watched).
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
            "Choosing the correction on held-out data needs a validation split: set "
            "data.val_fraction > 0 (--val-fraction), or turn the choice off "
            "(--no-correct-select) to keep the last epoch of lambda = correct.lam."
        )
    ids = np.asarray(sorted(labels), np.int64)
    key = jax.random.fold_in(jax.random.key(seed), _SELECT_STREAM)
    z = sample_regions(regions, key, samples, tau=tau)[ids]  # [R, samples, L]
    latent = z.shape[-1]
    x_region = np.asarray(jax.jit(models.decode)(vae, jnp.asarray(z.reshape(-1, latent))))
    y_region = np.repeat(np.asarray([labels[int(i)] for i in ids], np.int32), samples)
    data = SelectionData(
        np.asarray(x_val, np.float32), np.asarray(y_val, np.int32), x_region, y_region,
        [int(i) for i in ids], np.ones(len(ids), bool),
    )  # fmt: skip
    before = np.asarray(_per_region(classifier, data))
    watch = before <= 1.0 - min_error_rate + 1e-12
    # Every labeled region already agrees with its label: the correction must keep them all.
    return data._replace(watched=watch if watch.any() else np.ones(len(ids), bool))


@jax.jit
def _predict(params: Params, x: jax.Array) -> jax.Array:
    return params.module()(x).argmax(-1)


def _right(params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n] bool: where the classifier gets x right."""
    pred = map_batches(lambda b: _predict(params, b["x"]), {"x": x}, batch_size=512)
    return np.asarray(pred) == y


def _per_region(params: Params, data: SelectionData) -> tuple[float, ...]:
    right = _right(params, data.x_region, data.y_region).reshape(len(data.region_ids), -1)
    return tuple(float(a) for a in right.mean(axis=1))


def score(params: Params, data: SelectionData, *, lam: float, epoch: int) -> Score:
    """A model's scores on the selection data."""
    per_region = _per_region(params, data)
    return Score(
        float(lam),
        int(epoch),
        float(_right(params, data.x_val, data.y_val).mean()),
        float(np.mean(np.asarray(per_region)[data.watched])),
        per_region,
    )


def rank(
    candidate: Score, *, original: Score, max_val_drop: float, max_region_drop: float
) -> tuple[Any, ...]:
    """Sort key of a candidate: larger is better (see the module docstring)."""
    worst = max((b - a for a, b in zip(candidate.per_region, original.per_region, strict=True)),
                default=0.0)  # fmt: skip
    within = (
        candidate.val_accuracy >= original.val_accuracy - max_val_drop - 1e-9
        and worst <= max_region_drop + 1e-9
    )
    tie = (-candidate.lam, -candidate.epoch)
    if within:
        return (1, candidate.region_accuracy, candidate.val_accuracy, *tie)
    return (0, -worst, candidate.val_accuracy, candidate.region_accuracy, *tie)


class BestEpoch:
    """`fit`'s `on_epoch` callback: scores every epoch and keeps one lambda's best on disk.

    It adds the scores to the epoch's history record (`select_val_accuracy`,
    `select_region_accuracy`, `select_worst_region_drop`). `best.json` (the score and a
    fingerprint) and `best.npz` (the weights) are written atomically whenever an epoch beats
    the stored one, so a resumed run keeps the best epoch of the steps it does not run again.
    A `best.json` of other settings is ignored.
    """

    def __init__(
        self,
        directory: str,
        data: SelectionData,
        *,
        lam: float,
        original: Score,
        max_val_drop: float,
        max_region_drop: float,
        fingerprint: dict[str, Any],
    ):
        self.directory, self.data, self.lam = directory, data, float(lam)
        self.bounds = {"original": original, "max_val_drop": max_val_drop,
                       "max_region_drop": max_region_drop}  # fmt: skip
        self.fingerprint = fingerprint
        self.best: Score | None = None
        path = os.path.join(directory, "best.json")
        if os.path.exists(path) and os.path.exists(os.path.join(directory, "best.npz")):
            saved = read_json(path)
            if saved.get("fingerprint") == fingerprint:
                self.best = Score.from_json(saved["score"])

    def rank(self, candidate: Score) -> tuple[Any, ...]:
        return rank(candidate, **self.bounds)

    def __call__(self, params: Params, record: dict[str, float]) -> None:
        s = score(params, self.data, lam=self.lam, epoch=int(record["epoch"]))
        original = self.bounds["original"]
        record.update(
            select_val_accuracy=s.val_accuracy,
            select_region_accuracy=s.region_accuracy,
            select_worst_region_drop=max(
                b - a for a, b in zip(s.per_region, original.per_region, strict=True)
            ),
        )
        if self.best is not None and self.rank(s) <= self.rank(self.best):
            return
        leaves = jax.tree.leaves(jax.device_get(params.state))
        write_npz(os.path.join(self.directory, "best.npz"),
                  **{f"leaf_{i:04d}": np.asarray(a) for i, a in enumerate(leaves)})  # fmt: skip
        write_json(
            os.path.join(self.directory, "best.json"),
            {"score": s.as_json(), "fingerprint": self.fingerprint},
        )
        self.best = s

    def load(self, template: Params) -> Params:
        """The stored best weights, shaped like `template`."""
        with np.load(os.path.join(self.directory, "best.npz"), allow_pickle=False) as f:
            leaves = [f[k] for k in sorted(f.files)]
        treedef = jax.tree.structure(template.state)
        state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves])
        return Params(template.graphdef, state)
