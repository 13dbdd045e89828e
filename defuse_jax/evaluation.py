"""The evaluation stage: test accuracy and region accuracy, before and after correction.

Region accuracy is measured on held-out samples: codes drawn from each labeled region with a key
stream that fine-tuning never uses, so they are fresh inputs from the same bug, not training data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

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


def heldout_predictions(
    classifier: Params,
    vae: Params,
    *,
    regions: Regions,
    region_ids: Sequence[int],
    config: EvalConfig,
) -> dict[int, np.ndarray]:
    """A classifier's predictions on the held-out samples of some regions (the samples region
    accuracy is measured on): {region id: [config.region_samples] classes}."""
    ids = np.asarray(sorted(int(i) for i in region_ids), np.int64)
    if len(ids) == 0:
        return {}
    z = heldout_region_codes(regions, ids, config=config)
    r, n, L = z.shape
    pred = predict(vae, classifier, z.reshape(-1, L)).reshape(r, n)
    return {int(i): p for i, p in zip(ids, pred, strict=True)}


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
    """Test accuracy, region accuracy (overall and per labeled region) and error-code accuracy.

    Args:
        classifier: the model to evaluate.
        vae: the VAE that decodes region samples.
        x_test: [N, H, W, C] test images; y_test: [N] labels.
        regions: the distilled regions.
        labels: {region id: class} for the labeled (not skipped) regions.
        errors: the search's errors (needs "z"); `regions.assignment` maps them to regions.
        config: evaluation settings.

    Returns:
        {"test_accuracy", "region_accuracy", "per_region": {id: accuracy},
         "error_code_accuracy", "num_error_codes_labeled"}; region numbers are None when no
        region is labeled.
    """
    test = evaluate(losses.classifier_eval, classifier, {"x": x_test, "y": y_test.astype(np.int32)})
    out: dict[str, Any] = {"test_accuracy": test["accuracy"]}
    ids = np.asarray(sorted(labels), np.int64)
    if len(ids) == 0:
        return {**out, "region_accuracy": None, "per_region": {}, "error_code_accuracy": None,
                "num_error_codes_labeled": 0}  # fmt: skip
    z = heldout_region_codes(regions, ids, config=config)
    r, n, L = z.shape
    pred = predict(vae, classifier, z.reshape(-1, L)).reshape(r, n)
    target = np.asarray([labels[int(i)] for i in ids])[:, None]
    per_region = (pred == target).mean(axis=1)
    out["region_accuracy"] = float(per_region.mean())
    out["per_region"] = {int(i): float(a) for i, a in zip(ids, per_region, strict=True)}
    # The adversarial codes themselves, judged by the label of the region they fall in.
    region_label = np.full(regions.num_regions, -1)
    region_label[ids] = target[:, 0]
    assigned = regions.assignment
    mask = (assigned >= 0) & (region_label[np.maximum(assigned, 0)] >= 0)
    if mask.any():
        p = predict(vae, classifier, np.asarray(errors["z"])[mask])
        out["error_code_accuracy"] = float((p == region_label[assigned[mask]]).mean())
    else:
        out["error_code_accuracy"] = None
    out["num_error_codes_labeled"] = int(mask.sum())
    return out


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
