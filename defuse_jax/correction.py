"""The correction stage: fine-tune the trained classifier on its data plus labeled region samples.

loss = CE(training batch) + lambda * CE(region batch), where the region batch is drawn fresh at
every step from N(mean_r, tau * cov_r) of the labeled regions, decoded by the (frozen) VAE and
labeled with its region's label. Where regions with different labels overlap, a sample's target
is the responsibility-weighted mix of their labels (`region_overlap`), so the two regions do not
pull the same inputs two ways; elsewhere it is the region's label. Training starts from the
classifier's checkpoint and writes its own checkpoints elsewhere, so the original model is never
overwritten.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from defuse_jax import correction_selection as sel
from defuse_jax import models, own_model, region_overlap, training_lengths
from defuse_jax.config_checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPTIONAL_POSITIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_fields,
    fingerprint_fields,
)
from defuse_jax.files import json_digest, write_json
from defuse_jax.models import Params
from defuse_jax.regions import Regions, region_cholesky
from defuse_jax.training import LossFn, TrainConfig, fit, save_finished

# The region weights the choice tries when none are set. The two strong ones are chosen only when
# they fix the watched regions better than the others (`correction_selection`): on digits
# (defaults, seeds 0-2) the choice is the same as among the first three; in the short-training
# runs of issue 24 on 4 devices (seeds 2 and 3) they lift region accuracy from 56% and 85% to 96%
# and 99.5% within the same bounds (docs/results.md). Narrow regions, each one bug the
# classifier holds firmly, need stronger ones: behind a search that keeps only samples that still
# show their source class (`SearchConfig.validity`) on Fashion-MNIST (10k/2k, MLP models, seeds 0
# and 1) LAMS fixed only 83% and 80% of their samples within the bounds, STRONG_LAMS 99.7% and
# 100% (lambda 0.1 chosen in both), test accuracy +1.4 and +0.7 pt; behind one mixture per
# predicted class (`DistillConfig.per_label`, 3 components each) LAMS 28% and 53%, STRONG_LAMS
# 98.8% and 99.9% (0.1 again), +2.4 and +1.3 pt (docs/results.md).
LAMS: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)
STRONG_LAMS: tuple[float, ...] = (0.01, 0.03, 0.1)


@dataclasses.dataclass(frozen=True)
class CorrectConfig:
    """Fine-tuning settings.

    Attributes:
        select: choose the region weight and the epoch on held-out data
            (`correction_selection`); False: the reference schedule, `lam` for `epochs`
            epochs, last epoch kept.
        lams: the region weights the choice fine-tunes with, one run each. None: 0.001 0.003
            0.01 0.03 0.1 (`LAMS`), or 0.01 0.03 0.1 (`STRONG_LAMS`) for narrow regions: when
            the search keeps only samples that still show their source class
            (--search-validity oracle) or the mixture is fitted per predicted class
            (--distill-per-label; `resolved`).
        max_val_drop: the most validation accuracy a kept epoch may lose (0.005 = 0.5 pt).
        max_region_drop: the most accuracy any labeled region may lose in a kept epoch.
        max_given_up: the share of the labeled regions the choice may give up when every epoch
            that fixes the watched regions breaks some labeled region (`choose`): those regions
            are named in the report, the rest kept within `max_region_drop`; 0 keeps the
            original classifier then.
        region_tolerance: epochs this close to the best accuracy on the watched regions count
            as fixing them as well; the one that breaks the fewest shifted training images
            (then the gentlest) is kept.
        select_samples: fresh samples per labeled region that the choice scores on.
        control: also fine-tune without the region term (lambda 0: the training data alone)
            for as many epochs as the kept model, with the same seed and batches, so the
            report can tell the test change the regions cause from the one continued training
            alone would (on the conv digits, the latter moves test accuracy by up to 0.9 pt).
        lam: weight lambda of the region loss without `select` (the reference's value; it uses
            plain SGD for ~20 epochs, which leaves region accuracy near 50% on digits: see the
            README sweep).
        region_batch_size: region samples per step.
        tau: region samples come from N(mean, tau * covariance).
        epochs: rounds of training per region weight; the choice scores a candidate after
            each (the reference's epochs).
        epoch_steps: steps per round; None: one epoch of at most
            `training_lengths.CORRECTION_ROUND_STEPS` steps (a full epoch on digits), so that
            a large training split does not make every round a long one.
        batch_size: training examples per step.
        learning_rate: optimiser step size.
        optimizer: "adam", "adamw" or "sgd" (the reference: SGD, lr 1e-3, momentum 0.9).
        momentum: SGD momentum.
        anchor: weight of an L2 pull towards the original weights (L2-SP), which keeps the
            fine-tuned model close to the one that earned the test accuracy; 0 disables it.
        resolve_overlap: train region samples on responsibility-weighted label mixes where
            regions with different labels overlap (False: every sample gets its own region's
            label, as in the reference).
        seed: seed of the batch order and of the region samples.
        checkpoint_every: save every this many steps.
        reduction_shards: gradients summed in a fixed order over this many shards of every
            batch, the same on every topology (`TrainConfig.reduction_shards`; 0: off).
    """

    select: bool = True
    lams: tuple[float, ...] | None = None
    max_val_drop: float = 0.005
    max_region_drop: float = 0.02
    max_given_up: float = 0.25
    region_tolerance: float = 0.01
    select_samples: int = 256
    control: bool = True
    lam: float = 0.01
    region_batch_size: int = 64
    tau: float = 0.01
    epochs: int = 20
    epoch_steps: int | None = None
    batch_size: int = 64
    learning_rate: float = 3e-4
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9
    anchor: float = 0.0
    resolve_overlap: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    reduction_shards: int = 0

    LATER_DEFAULTS: ClassVar[dict[str, Any]] = {"reduction_shards": 0}

    def __post_init__(self):
        if self.lams is not None and (not self.lams or any(not lam > 0 for lam in self.lams)):
            raise ValueError(f"lams must be one or more positive weights, got {self.lams!r}.")
        for name in ("max_val_drop", "max_region_drop", "max_given_up", "region_tolerance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"{name} is a fraction of accuracy in [0, 1] (0.005 = 0.5 pt), got "
                    f"{getattr(self, name)!r}."
                )
        check_fields(self, {
            "select_samples": POSITIVE_INT, "lam": POSITIVE, "region_batch_size": POSITIVE_INT,
            "tau": POSITIVE, "epochs": POSITIVE_INT, "epoch_steps": OPTIONAL_POSITIVE_INT,
            "batch_size": POSITIVE_INT,
            "learning_rate": POSITIVE, "momentum": NON_NEGATIVE, "anchor": NON_NEGATIVE,
            "checkpoint_every": POSITIVE_INT, "reduction_shards": NON_NEGATIVE_INT,
        })  # fmt: skip
        self.train_config()  # reduction_shards must divide batch_size

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            momentum=self.momentum,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
            reduction_shards=self.reduction_shards,
        )


def resolved(config: CorrectConfig, n_train: int, *, narrow_regions: bool = False) -> CorrectConfig:
    """`config` with the round length that runs (`training_lengths.correction_round_steps`)
    and, if none are set, the region weights: `STRONG_LAMS` for `narrow_regions` (a search that
    keeps only valid samples, or one mixture per predicted class), else `LAMS`."""
    steps = training_lengths.correction_round_steps(config.epoch_steps, n_train, config.batch_size)
    lams = config.lams or (STRONG_LAMS if narrow_regions else LAMS)
    return dataclasses.replace(config, epoch_steps=steps, lams=lams)


# Settings that only decide which epoch of which region weight is kept, whether a control is
# trained, or how far each weight's run goes: changing them keeps every region weight's finished
# run (`fine_tune`'s `runs_dir`; a run asked for more epochs resumes, one asked for fewer is read
# up to them, since an epoch's batches do not depend on the number of epochs).
CHOICE_ONLY: tuple[str, ...] = ("select", "lams", "max_val_drop", "max_region_drop",
                                "max_given_up", "region_tolerance", "control", "lam", "epochs",
                                "checkpoint_every")  # fmt: skip


# Part of every region weight's run key: bump it when the objective or the per-epoch scores
# change, so that runs trained by older code are not reused.
WEIGHT_RUN_VERSION = 3  # 2: the epochs' scores include select_shifted_broken; 3: per region


def weight_run_fingerprint(
    config: CorrectConfig, labels: Mapping[int, int], *, lam: float, min_error_rate: float
) -> dict[str, Any]:
    """What one region weight's run and its per-epoch scores depend on, besides the models,
    regions and data: everything of `config` except `CHOICE_ONLY`, the labels, the weight, the
    watched regions' threshold, and the code's `WEIGHT_RUN_VERSION`."""
    kept = {k: v for k, v in fingerprint_fields(config).items() if k not in CHOICE_ONLY}
    return {
        "version": WEIGHT_RUN_VERSION,
        "correct": kept,
        "lam": float(lam),
        "labels": {str(k): int(v) for k, v in sorted(labels.items())},
        "min_error_rate": float(min_error_rate),
    }


def weight_run_dir(runs_dir: str, fingerprint: Mapping[str, Any]) -> str:
    """`runs_dir`/lam_<weight>-<`json_digest` of the fingerprint>: a run per setting, so runs
    with other settings (other labels, say) never meet a checkpoint that is not theirs."""
    return os.path.join(runs_dir, f"lam_{fingerprint['lam']:g}-{json_digest(fingerprint)}")


# The training data's column that carries the region weight (`make_correction_loss(lam=None)`).
REGION_WEIGHT = "region_weight"


def with_region_weight(data: Mapping[str, np.ndarray], lam: float) -> dict[str, np.ndarray]:
    """`data` ({"x": [N, ...], "y": [N]}) with a `REGION_WEIGHT` column: [N] float32, all
    `lam`."""
    n = len(data["y"])
    return {**data, REGION_WEIGHT: np.full((n,), lam, np.float32)}


def make_correction_loss(
    vae: Params,
    means: np.ndarray,
    chol: np.ndarray,
    labels: np.ndarray,
    *,
    lam: float | None,
    region_batch_size: int,
    batch_size: int | None = None,
    anchor: Params | None = None,
    anchor_weight: float = 0.0,
    resolve_overlap: bool = False,
) -> LossFn:
    """The fine-tuning objective over labeled regions.

    Args:
        vae: the trained VAE (frozen; only its decoder is used).
        means: [R, L] means of the labeled regions.
        chol: [R, L, L] Cholesky factors of tau * covariance.
        labels: [R] int32 class of each region.
        lam: weight of the region term (0: the training data alone, no region sample drawn;
            the control of `CorrectConfig.control`). None: the weight is data, the batch's
            `REGION_WEIGHT` column (`with_region_weight`), so that every weight runs one
            compiled program (a weight written into the program compiles one per weight).
        region_batch_size: region samples per step.
        batch_size: the step's training batch size. When the loss sees a shard of it
            (`TrainConfig.reduction_shards`), the shard draws its share of
            `region_batch_size`, so that a step draws as many region samples either way.
        anchor: the original classifier, for the L2-SP term.
        anchor_weight: weight of sum ||w - w_original||^2 (0: off).
        resolve_overlap: targets are responsibility-weighted label mixes
            (`region_overlap.soft_targets`) instead of each sample's region label.
    """
    anchor_state = anchor.state if anchor is not None and anchor_weight > 0 else None
    means_j, chol_j = jnp.asarray(means, jnp.float32), jnp.asarray(chol, jnp.float32)
    labels_j = jnp.asarray(labels, jnp.int32)
    num_regions, latent = means_j.shape
    density = region_overlap.region_density(means, chol) if resolve_overlap else None

    def region_term(model, key, rows):
        """(cross-entropy, accuracy) on a fresh batch of `rows` decoded region samples."""
        k_region, k_eps = jax.random.split(key)
        r = jax.random.randint(k_region, (rows,), 0, num_regions)
        eps = jax.random.normal(k_eps, (rows, latent), jnp.float32)
        z = means_j[r] + jnp.einsum("bij,bj->bi", chol_j[r], eps, precision="highest")
        x_region = jax.lax.stop_gradient(models.decode(vae, z))
        region_logits = model(x_region)
        num_classes = region_logits.shape[-1]
        if density is None:
            targets = jax.nn.one_hot(labels_j[r], num_classes, dtype=jnp.float32)
        else:
            targets = region_overlap.soft_targets(density, z, labels_j, num_classes=num_classes)
        ce_region = optax.softmax_cross_entropy(region_logits, targets).mean()
        acc_region = (region_logits.argmax(-1) == labels_j[r]).astype(jnp.float32).mean()
        return ce_region, acc_region

    def loss_fn(params, batch, key, step):
        del step
        model = params.module()
        logits = model(batch["x"])
        ce_train = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        loss, metrics = ce_train, {"ce_train": ce_train}
        if lam != 0:  # lam 0 draws no region sample (the batches do not depend on the keys)
            weight = jnp.max(batch[REGION_WEIGHT]) if lam is None else jnp.float32(lam)
            shard = batch["y"].shape[0]  # static: the whole batch, or a shard of it
            rows = region_batch_size
            if batch_size is not None and shard != batch_size:
                rows = max(1, region_batch_size * shard // batch_size)
            ce_region, acc_region = region_term(model, key, rows)
            loss = loss + weight * ce_region
            metrics.update(ce_region=ce_region, region_accuracy=acc_region)
        if anchor_state is not None:
            sq = jax.tree.map(lambda w, w0: jnp.sum((w - w0) ** 2), params.state, anchor_state)
            drift = sum(jax.tree.leaves(sq))
            loss = loss + jnp.float32(anchor_weight) * drift
            metrics["drift"] = drift
        return loss, metrics

    return loss_fn


def correction_losses(
    classifier: Params,
    vae: Params,
    regions: Regions,
    labels: Mapping[int, int],
    *,
    config: CorrectConfig,
) -> Callable[[float | None], LossFn]:
    """`lam -> the fine-tuning objective of `config` over the labeled regions` (what
    `fine_tune` trains for each region weight, and its control for lambda 0; None: the weight
    comes with the data, `with_region_weight`).

    Args:
        classifier: the original classifier (the L2-SP anchor when `config.anchor` > 0).
        vae: the trained VAE.
        regions: the distilled regions.
        labels: {region id: class} of the labeled regions.
        config: fine-tuning settings.
    """
    ids = np.asarray(sorted(labels), np.int64)
    region_args = (
        vae,
        regions.means[ids],
        region_cholesky(regions, tau=config.tau)[ids],
        np.asarray([labels[int(i)] for i in ids], np.int32),
    )

    def loss(lam: float | None) -> LossFn:
        return make_correction_loss(
            *region_args,
            lam=lam,
            region_batch_size=config.region_batch_size,
            batch_size=config.batch_size,
            anchor=classifier,
            anchor_weight=config.anchor,
            resolve_overlap=config.resolve_overlap,
        )

    return loss


class Correction(NamedTuple):
    """What `fine_tune` returns."""

    params: Params  # the fine-tuned (or, when nothing was within bounds, original) classifier
    history: list[dict[str, float]]  # per-epoch records of the kept lambda's run
    selection: dict[str, Any] | None  # the choice on validation data (None: `select` off)
    control: Params | None  # fine-tuned without regions for the kept epochs (None: not asked
    # for, or the original was kept)


def fine_tune(
    classifier: Params,
    vae: Params,
    regions: Regions,
    labels: Mapping[int, int],
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    config: CorrectConfig,
    out_dir: str,
    min_error_rate: float = 0.5,
    runs_dir: str | None = None,
    progress: bool = True,
) -> Correction:
    """Fine-tune `classifier` on its training data plus samples of the labeled regions.

    Args:
        classifier: the trained classifier (its weights are the starting point; it is not
            modified, and nothing is written where it was loaded from).
        vae: the trained VAE.
        regions: the distilled regions.
        labels: {region id: class} of the labeled regions (skipped ones left out).
        x_train: [N, H, W, C] training images; y_train: [N] labels.
        x_val: [n_val, H, W, C] validation images no model trained on; y_val: [n_val] labels
            (needed when `config.select` is on).
        config: fine-tuning settings.
        out_dir: where the kept model's checkpoint and config.json go, and with `select` on,
            the choice in `selection.json`, and with `control` on, the control model under
            `control/` (all resumable).
        min_error_rate: the distill stage's threshold: which regions the choice watches.
        runs_dir: with `select` on, where each region weight's run is trained
            (`weight_run_dir`; default: `out_dir`). Settings in `CHOICE_ONLY` are not part
            of a run's key, so a later call with other bounds, lambdas or epochs reuses the
            finished runs and only chooses again. The key does not cover the models, regions
            or data: give a directory that belongs to these (the pipeline keys it by the label
            stage's completion).
        progress: show a progress bar.
    """
    if not labels:
        raise ValueError("fine_tune needs at least one labeled region.")
    config = resolved(config, len(x_train))
    loss = correction_losses(classifier, vae, regions, labels, config=config)
    train = config.train_config()
    data = {"x": x_train, "y": np.asarray(y_train, np.int32)}
    fingerprint = {
        "correct": fingerprint_fields(config),
        "labels": {str(k): int(v) for k, v in labels.items()},
    }

    def control(epochs: int) -> Params | None:
        """The control: `epochs` epochs on the training data alone, same seed and batches."""
        if not config.control or epochs == 0:
            return None
        control_dir = os.path.join(out_dir, "control")
        params, _ = fit(
            classifier, loss(0.0), data, config=dataclasses.replace(train, epochs=epochs),
            checkpoint_dir=os.path.join(control_dir, "ckpt"),
            fingerprint={**fingerprint, "control_epochs": epochs},
            desc="correct (control: no regions)", progress=progress,
            epoch_steps=config.epoch_steps,
        )  # fmt: skip
        _describe(control_dir, classifier, train)
        return params

    if not config.select:
        params, history = fit(
            classifier, loss(config.lam), data, config=train,
            checkpoint_dir=os.path.join(out_dir, "ckpt"), fingerprint=fingerprint,
            desc="correct", progress=progress, epoch_steps=config.epoch_steps,
        )  # fmt: skip
        _describe(out_dir, classifier, train)
        return Correction(params, history, None, control(config.epochs))

    held_out = sel.selection_data(
        classifier, vae, regions, labels, x_val=np.asarray(x_val), y_val=np.asarray(y_val),
        x_train=x_train, y_train=y_train, samples=config.select_samples, tau=config.tau,
        seed=config.seed, min_error_rate=min_error_rate,
    )  # fmt: skip
    original = sel.score(classifier, held_out, lam=0.0, epoch=0)
    keep = sel.KeptWeights(
        original, max_val_drop=config.max_val_drop, max_region_drop=config.max_region_drop
    )
    histories: dict[float, list[dict[str, float]]] = {}
    # The weight rides with the data: every weight's run (and the kept one's retraining) is one
    # program, compiled once in the process (`training._segment_program`; 22 of the 33 s of the
    # digits correction on a 2-core CPU once compiled one per weight).
    weighted = loss(None)
    for lam in config.lams:
        run_fp = weight_run_fingerprint(config, labels, lam=lam, min_error_rate=min_error_rate)
        _, history = fit(
            classifier, weighted, with_region_weight(data, lam), config=train,
            checkpoint_dir=os.path.join(weight_run_dir(runs_dir or out_dir, run_fp), "ckpt"),
            fingerprint=run_fp, on_epoch=sel.EpochScores(held_out, lam=lam, keep=keep),
            desc=f"correct (lambda={lam:g})", progress=progress, epoch_steps=config.epoch_steps,
        )  # fmt: skip
        histories[lam] = history[: config.epochs]  # a reused longer run: its first epochs
    chosen, given_up = sel.choose(
        original,
        [c for lam, hist in histories.items() for c in sel.scores_of(hist, lam=lam)],
        max_val_drop=config.max_val_drop,
        max_region_drop=config.max_region_drop,
        region_tolerance=config.region_tolerance,
        watched=held_out.watched,
        max_given_up=int(config.max_given_up * len(held_out.region_ids)),
    )
    kept_dir = os.path.join(out_dir, "ckpt")  # where `load_trained` reads the kept model
    if chosen.epoch == 0:
        params, history = classifier, []
        kept_fingerprint = {**fingerprint, "kept": "original"}
    else:
        params = keep.params_of(chosen)  # held while its run trained
        if params is None:  # runs reused from the cache: train the kept lambda again for the
            # kept epochs (deterministic: the same weights, and the run's own scores)
            params, _ = fit(
                classifier, weighted, with_region_weight(data, chosen.lam),
                config=dataclasses.replace(train, epochs=chosen.epoch),
                checkpoint_dir=os.path.join(out_dir, "retrain", "ckpt"),
                fingerprint={**fingerprint, "kept_lam": chosen.lam},
                desc=f"correct (kept: lambda={chosen.lam:g})", progress=progress,
                epoch_steps=config.epoch_steps,
            )  # fmt: skip
        history = histories[chosen.lam][: chosen.epoch]
        kept_fingerprint = {**fingerprint, "kept_lam": chosen.lam, "kept_epoch": chosen.epoch}
    save_finished(params, train, kept_dir, fingerprint=kept_fingerprint)
    _describe(out_dir, classifier, train)
    selection = {
        "chosen": sel.score_as_dict(chosen),
        "original": sel.score_as_dict(original),
        "kept_original": chosen.epoch == 0,
        "region_tolerance": config.region_tolerance,
        "region_ids": held_out.region_ids,
        "watched_regions": np.asarray(held_out.region_ids)[held_out.watched].tolist(),
        # labeled regions that broke in every epoch that fixed the rest (`choose`): region id,
        # its accuracy on the choice's samples before and after
        "given_up": [
            {
                "region": int(held_out.region_ids[i]),
                "before": original.per_region[i],
                "after": chosen.per_region[i],
            }
            for i in given_up
        ],  # fmt: skip
        "num_val": int(len(y_val)),
        "per_lam": {
            f"{lam:g}": [sel.score_as_dict(c) for c in sel.scores_of(hist, lam=lam)]
            for lam, hist in histories.items()
        },
    }
    write_json(os.path.join(out_dir, "selection.json"), selection)
    return Correction(params, history, selection, control(chosen.epoch))


def _describe(out_dir: str, classifier: Params, train: TrainConfig) -> None:
    """config.json next to the checkpoints, so `train_models.load_trained` can reload them."""
    meta: dict[str, Any] = {"kind": "classifier"}
    if own_model.is_external(classifier):  # restored into the user's model (`own_model`)
        meta["own"] = own_model.describe(classifier)
    else:
        module = classifier.module()
        meta["data"] = {"image_shape": list(module.image_shape), "num_classes": module.num_classes}
        meta["model"] = dataclasses.asdict(module.config)
    meta.update(train=dataclasses.asdict(train), fine_tuned=True)
    write_json(os.path.join(out_dir, "config.json"), meta)
