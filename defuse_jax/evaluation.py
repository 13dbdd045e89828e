"""The evaluation stage: test accuracy and region accuracy, before and after correction.

Region accuracy is measured on held-out samples: codes drawn from each labeled region with a key
stream that fine-tuning never uses, so they are fresh inputs from the same bug, not training data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax import losses, models
from defuse_jax.batching import map_batches
from defuse_jax.config_checks import POSITIVE, POSITIVE_INT, check_fields
from defuse_jax.models import Params
from defuse_jax.regions import Regions, sample_regions
from defuse_jax.training import evaluate

# Offset of the held-out sampling stream (fine-tuning draws from fold_in(seed-derived keys, step)).
_HELDOUT_STREAM = 1_000_003


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    Attributes:
        region_samples: held-out samples per labeled region.
        tau: region samples come from N(mean, tau * covariance).
        seed: seed of the held-out samples.
    """

    region_samples: int = 256
    tau: float = 0.01
    seed: int = 0

    def __post_init__(self):
        check_fields(self, {"region_samples": POSITIVE_INT, "tau": POSITIVE})


def predict(
    vae: Params, classifier: Params, z: np.ndarray, *, batch_size: int = 4096
) -> np.ndarray:
    """Classifier predictions on decoded codes: z [M, L] -> [M] int32."""
    fn = _predict_fn()
    out = map_batches(
        lambda b: fn(vae, classifier, b["z"]), {"z": np.asarray(z)}, batch_size=batch_size
    )
    return np.zeros((0,), np.int32) if out is None else out


@functools.cache
def _predict_fn():
    return jax.jit(
        lambda v, c, z: models.logits(c, models.decode(v, z)).argmax(-1).astype(jnp.int32)
    )


def heldout_region_codes(
    regions: Regions, region_ids: np.ndarray, *, config: EvalConfig
) -> np.ndarray:
    """[len(region_ids), n, L] held-out codes for the given regions."""
    key = jax.random.fold_in(jax.random.key(config.seed), _HELDOUT_STREAM)
    z = sample_regions(regions, key, config.region_samples, tau=config.tau)
    return z[np.asarray(region_ids, np.int64)]


def decode(vae: Params, z: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """Decoded codes on the host: z [M, L] -> images [M, H, W, C]."""
    out = map_batches(
        lambda b: _decode_fn()(vae, b["z"]), {"z": np.asarray(z)}, batch_size=batch_size
    )
    return np.zeros((0,), np.float32) if out is None else out


def classify(classifier: Params, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Predictions on images: x [M, H, W, C] -> [M] int32."""
    out = map_batches(lambda b: _classify_fn()(classifier, b["x"]), {"x": x}, batch_size=batch_size)
    return np.zeros((0,), np.int32) if out is None else out


@functools.cache
def _decode_fn():
    return jax.jit(models.decode)


@functools.cache
def _classify_fn():
    return jax.jit(lambda c, x: models.logits(c, x).argmax(-1).astype(jnp.int32))


class EvalSet(NamedTuple):
    """What every classifier of a run is evaluated on, decoded once (the VAE is frozen)."""

    x_test: np.ndarray  # [N, H, W, C]
    y_test: np.ndarray  # [N] int32
    region_ids: np.ndarray  # [R] the labeled regions, sorted
    region_labels: np.ndarray  # [R] their labels
    region_images: np.ndarray  # [R, n, H, W, C] their held-out samples, decoded
    error_labels: np.ndarray  # [m] the label of the region each error code in one falls in
    error_images: np.ndarray  # [m, H, W, C] those error codes, decoded


def eval_set(
    vae: Params,
    *,
    x_test: np.ndarray,
    y_test: np.ndarray,
    regions: Regions,
    labels: Mapping[int, int],
    errors: Mapping[str, np.ndarray],
    config: EvalConfig,
) -> EvalSet:
    """The test split, the labeled regions' held-out samples and the search's error codes in
    labeled regions (`regions.assignment` maps codes to regions), decoded."""
    ids = np.asarray(sorted(labels), np.int64)
    target = np.asarray([labels[int(i)] for i in ids], np.int64)
    if len(ids):
        z = heldout_region_codes(regions, ids, config=config)
        r, n, latent = z.shape
        images = decode(vae, z.reshape(-1, latent))
        images = images.reshape(r, n, *images.shape[1:])
    else:
        images = np.zeros((0, 0, *x_test.shape[1:]), np.float32)
    region_label = np.full(regions.num_regions, -1)
    region_label[ids] = target
    assigned = regions.assignment
    # (With no region at all every code is unassigned, and region_label is empty.)
    mask = (assigned >= 0) & (
        region_label[np.maximum(assigned, 0)] >= 0 if regions.num_regions else False
    )
    codes = np.asarray(errors["z"])[mask]
    return EvalSet(
        np.asarray(x_test), np.asarray(y_test, np.int32), ids, target, images,
        region_label[assigned[mask]], decode(vae, codes) if len(codes) else codes,
    )  # fmt: skip


def heldout_votes(classifier: Params, data: EvalSet) -> dict[int, np.ndarray]:
    """A classifier's predictions on the held-out samples of the labeled regions (those region
    accuracy is measured on): {region id: [EvalConfig.region_samples] classes}."""
    return heldout_votes_of(functools.partial(classify, classifier), data)


def heldout_votes_of(
    predict: Callable[[np.ndarray], np.ndarray], data: EvalSet
) -> dict[int, np.ndarray]:
    """`heldout_votes` of any image classifier: predict maps images [M, H, W, C] to [M]
    classes (e.g. the bug yield's judge, which is not a `Params`)."""
    if len(data.region_ids) == 0:
        return {}
    r, n = data.region_images.shape[:2]
    pred = np.asarray(predict(data.region_images.reshape(r * n, *data.region_images.shape[2:])))
    return {int(i): p for i, p in zip(data.region_ids, pred.reshape(r, n), strict=True)}


def evaluate_on(classifier: Params, data: EvalSet) -> dict[str, Any]:
    """Test accuracy, region accuracy (overall and per labeled region) and error-code accuracy.

    Returns:
        {"test_accuracy", "region_accuracy", "per_region": {id: accuracy},
         "error_code_accuracy", "num_error_codes_labeled"}; region numbers are None when no
        region is labeled.
    """
    test = evaluate(losses.classifier_eval, classifier, {"x": data.x_test, "y": data.y_test})
    out: dict[str, Any] = {"test_accuracy": test["accuracy"]}
    if len(data.region_ids) == 0:
        return {**out, "region_accuracy": None, "per_region": {}, "error_code_accuracy": None,
                "num_error_codes_labeled": 0}  # fmt: skip
    votes = heldout_votes(classifier, data)
    per_region = {
        i: float((votes[int(i)] == t).mean())
        for i, t in zip(data.region_ids.tolist(), data.region_labels, strict=True)
    }
    out["region_accuracy"] = float(np.mean(list(per_region.values())))
    out["per_region"] = per_region
    # The adversarial codes themselves, judged by the label of the region they fall in.
    if len(data.error_labels):
        pred = classify(classifier, data.error_images)
        out["error_code_accuracy"] = float((pred == data.error_labels).mean())
    else:
        out["error_code_accuracy"] = None
    out["num_error_codes_labeled"] = int(len(data.error_labels))
    return out


def evaluate_classifier(
    classifier: Params,
    vae: Params,
    *,
    x_test: np.ndarray,
    y_test: np.ndarray,
    regions: Regions,
    labels: Mapping[int, int],
    errors: Mapping[str, np.ndarray],
    config: EvalConfig,
) -> dict[str, Any]:
    """`evaluate_on` one classifier (several: build the `eval_set` once and reuse it).

    Args:
        classifier: the model to evaluate.
        vae: the VAE that decodes region samples.
        x_test: [N, H, W, C] test images; y_test: [N] labels.
        regions: the distilled regions.
        labels: {region id: class} for the labeled (not skipped) regions.
        errors: the search's errors (needs "z"); `regions.assignment` maps them to regions.
        config: evaluation settings.
    """
    data = eval_set(vae, x_test=x_test, y_test=y_test, regions=regions, labels=labels,
                    errors=errors, config=config)  # fmt: skip
    return evaluate_on(classifier, data)


def confirmed_error_regions(
    per_region_before: Mapping[int, float], *, min_error_rate: float
) -> list[int]:
    """Labeled regions that are errors under their own label, not just under the source label.

    A region is offered for labeling because the classifier disagrees with its codes' source
    label. Once labeled, the label is the truth: where the classifier already gets at least
    1 - `min_error_rate` of the region's held-out samples right under that label (the labeler
    sided with the classifier), the region is no bug, and counting it would flatter region
    accuracy both before and after.

    Args:
        per_region_before: {region id: accuracy of the original classifier under its label}.
        min_error_rate: the distill stage's threshold (`DistillConfig.min_error_rate`).
    """
    return sorted(
        int(i) for i, acc in per_region_before.items() if 1.0 - acc >= min_error_rate - 1e-12
    )


def region_accuracy(per_region: Mapping[int, float], ids: list[int]) -> float | None:
    """Mean accuracy over the regions `ids` (None when there are none)."""
    return float(np.mean([per_region[i] for i in ids])) if ids else None
