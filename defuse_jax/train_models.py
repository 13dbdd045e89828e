"""The training stage: fit the VAE and the classifier on a dataset, with resumable checkpoints.

Each model lives in its own directory:

    <out>/config.json        resolved configs (data, model, train)
    <out>/ckpt/<step>/       Orbax checkpoints (the latest is the trained model)
    <out>/history.json       per-epoch metrics
    <out>/reconstructions.png  (VAE) originals vs reconstructions

Example:
    >>> ds = data.load_dataset(data.DataConfig("digits"))
    >>> vae = train_vae(ds, out_dir="runs/demo/vae")
    >>> clf = train_classifier(ds, out_dir="runs/demo/classifier")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from defuse_jax import losses, plots, training_lengths
from defuse_jax.checkpoint import Checkpointer
from defuse_jax.config_checks import fingerprint_fields
from defuse_jax.data import Dataset
from defuse_jax.files import read_json, write_json
from defuse_jax.models import (
    VAE,
    Classifier,
    ClassifierConfig,
    Params,
    VAEConfig,
    ensemble_of,
    mean_code,
    params_of,
)
from defuse_jax.training import TrainConfig, evaluate, fit, initial_state, make_optimizer

# Epochs from the data size (`training_lengths`): 120 and 40 on the 1,145 digits.
VAE_TRAIN_DEFAULT = TrainConfig(epochs=None, batch_size=64, learning_rate=1e-3)
CLASSIFIER_TRAIN_DEFAULT = TrainConfig(epochs=None, batch_size=64, learning_rate=1e-3)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained model and what describes it."""

    params: Params
    model_config: Any  # VAEConfig | ClassifierConfig
    history: list[dict[str, float]]
    metrics: dict[str, float]  # final test metrics
    out_dir: str


def dataset_meta(ds: Dataset) -> dict[str, Any]:
    """What a trained model's config.json and checkpoint fingerprint record of its data."""
    return {
        "name": ds.name,
        "image_shape": list(ds.image_shape),
        "num_classes": ds.num_classes,
        "num_train": len(ds.x_train),
        "num_test": len(ds.x_test),
    }


def check_labels(y: np.ndarray, num_classes: int, *, what: str) -> None:
    """Raise a clear error if labels are not integers in [0, num_classes)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{what} must be integer class indices, got dtype {y.dtype}.")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)]
        raise ValueError(
            f"{what} must lie in [0, {num_classes}), found {bad[:5].tolist()} "
            f"({len(bad)} out of range)."
        )


def _fingerprint(ds: Dataset, model_config: Any) -> dict[str, Any]:
    return {"data": dataset_meta(ds), "model": fingerprint_fields(model_config)}


def _train(
    kind: str,
    model: nnx.Module,
    ds: Dataset,
    data: dict[str, np.ndarray],
    eval_data: dict[str, np.ndarray],
    *,
    out_dir: str,
    train: TrainConfig,
    progress: bool,
) -> TrainedModel:
    """Shared by both models: describe the run, fit (resuming), evaluate, record the history."""
    loss_fn, eval_fn = {
        "vae": (losses.vae_loss, losses.vae_eval),
        "classifier": (losses.classifier_loss, losses.classifier_eval),
    }[kind]
    config = model.config
    write_json(
        os.path.join(out_dir, "config.json"),
        {"kind": kind, "data": dataset_meta(ds), "model": dataclasses.asdict(config),
         "train": dataclasses.asdict(train)},
    )  # fmt: skip
    params, history = fit(
        params_of(model),
        loss_fn,
        data,
        config=train,
        checkpoint_dir=os.path.join(out_dir, "ckpt"),
        fingerprint=_fingerprint(ds, config),
        eval_fn=eval_fn,
        eval_data=eval_data,
        # About ten test evaluations per run: on the 28x28 conv models one after every epoch
        # cost a fifth of the VAE's training time, for a log line.
        eval_every=max(1, train.epochs // 10),
        desc=kind,
        progress=progress,
    )
    metrics = evaluate(eval_fn, params, eval_data)
    write_json(os.path.join(out_dir, "history.json"), {"history": history, "test": metrics})
    return TrainedModel(params, config, history, metrics, out_dir)


def train_vae(
    ds: Dataset,
    *,
    out_dir: str,
    config: VAEConfig | None = None,
    train: TrainConfig = VAE_TRAIN_DEFAULT,
    progress: bool = True,
) -> TrainedModel:
    """Train (or resume, or reload when finished) the VAE on `ds.x_train` (epochs None: from
    its size, `training_lengths.VAE_BUDGET`)."""
    config = config or default_vae_config(ds.image_shape)
    train = training_lengths.train_epochs(train, training_lengths.VAE_BUDGET, len(ds.x_train))
    vae = VAE(
        config, image_shape=ds.image_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(train.seed)
    )
    train_data, test = {"x": ds.x_train}, {"x": ds.x_test}
    if config.conditional:  # the decoder reads the class
        check_labels(ds.y_train, ds.num_classes, what="Training labels")
        train_data["y"], test["y"] = ds.y_train.astype(np.int32), ds.y_test.astype(np.int32)
    result = _train(
        "vae", vae, ds, train_data, test, out_dir=out_dir, train=train, progress=progress
    )
    save_reconstructions(
        result.params, ds.x_test[:16], os.path.join(out_dir, "reconstructions.png"),
        y=ds.y_test[:16],
    )  # fmt: skip
    return result


def train_classifier(
    ds: Dataset,
    *,
    out_dir: str,
    config: ClassifierConfig | None = None,
    train: TrainConfig = CLASSIFIER_TRAIN_DEFAULT,
    progress: bool = True,
) -> TrainedModel:
    """Train (or resume, or reload when finished) the classifier on (`x_train`, `y_train`)
    (epochs None: from its size, `training_lengths.CLASSIFIER_BUDGET`)."""
    config = config or default_classifier_config(ds.image_shape)
    train = training_lengths.train_epochs(
        train, training_lengths.CLASSIFIER_BUDGET, len(ds.x_train)
    )
    check_labels(ds.y_train, ds.num_classes, what="Training labels")
    check_labels(ds.y_test, ds.num_classes, what="Test labels")
    clf = Classifier(
        config, image_shape=ds.image_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(train.seed)
    )
    train_data = {"x": ds.x_train, "y": ds.y_train.astype(np.int32)}
    test = {"x": ds.x_test, "y": ds.y_test.astype(np.int32)}
    return _train(
        "classifier", clf, ds, train_data, test, out_dir=out_dir, train=train, progress=progress
    )


ENSEMBLE_FILE = "ensemble.json"  # an ensemble's member count and test accuracies


def member_dir(out_dir: str, k: int) -> str:
    """Where member `k` of an ensemble in `out_dir` lives: member 0 in `out_dir` itself (so a
    one-member ensemble is laid out as a plain trained classifier), member k in member<k>/."""
    return out_dir if k == 0 else os.path.join(out_dir, f"member{k}")


def train_ensemble(
    ds: Dataset,
    *,
    out_dir: str,
    members: int,
    config: ClassifierConfig,
    train: TrainConfig,
    shifts: Sequence[int] | None = None,
    progress: bool = True,
) -> TrainedModel:
    """`members` classifiers of `config`, member k trained (or resumed, or reloaded) with seed
    `train.seed + k`, and their `models.Ensemble`, whose test metrics go to ensemble.json
    (with each member's). Returns the ensemble (one member: that classifier itself).

    With `shifts` (G values), `members` classifiers per shift, G * members in all: member
    k * G + g trains with seed `train.seed + k` on images shifted by up to `shifts[g]`
    (`TrainConfig.shift`), so that more members add directories and fewer reuse a prefix of
    them. Without, every member trains with `train.shift`.
    """
    shifts = (train.shift,) if shifts is None else tuple(shifts)
    settings = [dataclasses.replace(train, seed=train.seed + k, shift=s)
                for k in range(members) for s in shifts]  # fmt: skip
    trained = [
        train_classifier(
            ds, out_dir=member_dir(out_dir, i), config=config, train=member_train, progress=progress
        )
        for i, member_train in enumerate(settings)
    ]
    params = ensemble_of([t.params for t in trained])
    test = {"x": ds.x_test, "y": ds.y_test.astype(np.int32)}
    total = len(trained)
    metrics = trained[0].metrics if total == 1 else evaluate(losses.classifier_eval, params, test)
    write_json(
        os.path.join(out_dir, ENSEMBLE_FILE),
        {"members": total, "test": metrics, "member_test": [t.metrics for t in trained],
         **({"shifts": list(shifts)} if len(shifts) > 1 else {})},
    )  # fmt: skip
    return TrainedModel(params, config, trained[0].history, metrics, out_dir)


def ensemble_record(out_dir: str) -> dict[str, Any]:
    """`train_ensemble`'s record in `out_dir` ({"members": K, "test": metrics, ...}); a
    directory without one holds a plain classifier: one member, its test metrics (None when
    it has none)."""
    path = os.path.join(out_dir, ENSEMBLE_FILE)
    if os.path.exists(path):
        return read_json(path)
    history = os.path.join(out_dir, "history.json")
    return {"members": 1, "test": read_json(history)["test"] if os.path.exists(history) else None}


def load_ensemble(out_dir: str) -> Params:
    """Reload `train_ensemble`'s ensemble (read-only, no training)."""
    members = ensemble_record(out_dir)["members"]
    return ensemble_of([load_trained(member_dir(out_dir, k))[0] for k in range(members)])


def shift_groups(members: Sequence[Params], groups: int) -> list[Params]:
    """`train_ensemble`'s members (member k * G + g trained at its g-th shift) as one ensemble
    per shift: the search's validity committee (`models.validity_function`)."""
    return [ensemble_of(list(members[g::groups])) for g in range(groups)]


def load_shift_groups(out_dir: str) -> list[Params]:
    """Reload `train_ensemble`'s ensemble as one ensemble per shift it was trained with
    (`shift_groups`): [the whole ensemble] when it was trained with one shift."""
    record = ensemble_record(out_dir)
    members = [load_trained(member_dir(out_dir, k))[0] for k in range(record["members"])]
    return shift_groups(members, len(record.get("shifts") or [0]))


def record_own_model(
    kind: str, model: Params, identity: dict[str, Any], ds: Dataset, *, out_dir: str
) -> dict[str, float]:
    """The train stage for a user's own model (`own_model`): nothing to train. Its identity
    (`own_model.describe`) and test metrics go to `out_dir` (config.json, history.json), and
    the metrics are returned.

    Args:
        kind: "classifier" (accuracy and loss) or "vae" (the project's VAE: `losses.vae_eval`;
            another: the reconstruction's mean squared error, "recon_mse").
        model: the model; identity: its `own_model.describe`.
    """
    from defuse_jax import own_model

    if kind == "classifier":
        eval_fn, test = losses.classifier_eval, {"x": ds.x_test, "y": ds.y_test.astype(np.int32)}
    else:
        external = own_model.is_external(model)
        eval_fn = losses.reconstruction_mse if external else losses.vae_eval
        test = {"x": ds.x_test}
        if not external and model.module().config.conditional:
            test["y"] = ds.y_test.astype(np.int32)
    metrics = evaluate(eval_fn, model, test)
    write_json(
        os.path.join(out_dir, "config.json"),
        {"kind": kind, "data": dataset_meta(ds), "own": identity},
    )
    write_json(os.path.join(out_dir, "history.json"), {"history": [], "test": metrics})
    return metrics


def default_vae_config(image_shape: tuple[int, int, int]) -> VAEConfig:
    """MLP for tiny grayscale images, conv for 28x28 and larger or colour images; both
    class-conditional (`VAEConfig.conditional`: the search moves the style and keeps the class,
    so it finds bugs rather than class changes; docs/results.md measures it against the
    reference's unconditional VAE, which `--no-vae-conditional` gives)."""
    small = image_shape[0] * image_shape[1] <= 16 * 16
    if small:
        return VAEConfig(kind="mlp", conditional=True)
    return VAEConfig(kind="conv", latent_dim=12, beta=4.0, conditional=True)


def default_classifier_config(image_shape: tuple[int, int, int]) -> ClassifierConfig:
    small = image_shape[0] * image_shape[1] <= 16 * 16
    return ClassifierConfig(kind="mlp") if small else ClassifierConfig(kind="conv")


def oracle_classifier_config(image_shape: tuple[int, int, int]) -> ClassifierConfig:
    """The "oracle" labeler's classifier: the default kind for the shape, twice as wide (512)
    in its dense layers; `stages.label.train_oracle` trains it twice as long with other seeds, as
    an ensemble (`train_ensemble`).
    """
    return dataclasses.replace(default_classifier_config(image_shape), hidden=512)


# The oracle's shifted members move their images by this share of the image's side: 2 pixels
# on 28x28 (at least 1: on 8x8 a fourteenth is no pixel).
ORACLE_SHIFT_FRACTION = 1 / 14


def oracle_shifts(image_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """How far the oracle's training images are shifted (`TrainConfig.shift`) by default: a
    committee of members trained unshifted and members shifted by a fourteenth of the side (2
    pixels on 28x28, at least 1: 1 on 8x8), whose every group must read the source class in the
    search (`RunConfig.oracle_shift`). Behind it every judge's mean bug yield rose over one
    group's, on 8x8 and 28x28 digits and on Fashion-MNIST (docs/results.md)."""
    shift = int(min(image_shape[0], image_shape[1]) * ORACLE_SHIFT_FRACTION)
    return (0, max(1, shift))


def save_reconstructions(
    params: Params, x: np.ndarray, path: str, *, y: np.ndarray | None = None
) -> str:
    """Originals (top row) vs reconstructions from the mean code (bottom row); `y`, their
    classes, is what a conditional VAE decodes with."""
    code = mean_code(params, jnp.asarray(x), None if y is None else jnp.asarray(y))
    recon = np.asarray(params.module().decode(code))
    grid = np.concatenate([np.asarray(x), recon])
    return plots.save_image_grid(
        grid,
        path,
        ncols=len(x),
        row_labels=["original", "reconstruction"],
        suptitle="VAE: originals (top) vs reconstructions (bottom)",
    )


def load_trained(out_dir: str) -> tuple[Params, Any]:
    """Reload a trained VAE or classifier from its directory (read-only, no training).

    Returns:
        (params, model config).

    Raises:
        FileNotFoundError: `out_dir` holds no trained model.
        CheckpointError: its checkpoint cannot be read.
    """
    cfg_path = os.path.join(out_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"No trained model in {out_dir} (missing config.json); train it first."
        )
    saved = read_json(cfg_path)
    if "own" in saved:
        raise FileNotFoundError(
            f"{out_dir} records your own {saved['kind']} {saved['own']['name']}, not a model "
            "the project trained: build it as the run did (`own_model.from_entry_point` or "
            "`own_model.as_classifier`)."
        )
    model_cfg, meta = saved["model"], saved["data"]
    shape = tuple(meta["image_shape"])
    if saved["kind"] == "vae":
        config: Any = VAEConfig(**{**model_cfg, "channels": tuple(model_cfg["channels"])})
        model: nnx.Module = VAE(
            config, image_shape=shape, num_classes=meta["num_classes"], rngs=nnx.Rngs(0)
        )
    else:
        config = ClassifierConfig(**{**model_cfg, "channels": tuple(model_cfg["channels"])})
        model = Classifier(
            config, image_shape=shape, num_classes=meta["num_classes"], rngs=nnx.Rngs(0)
        )
    return restore_weights(out_dir, params_of(model)), config


def restore_weights(out_dir: str, template: Params) -> Params:
    """The latest checkpoint in `out_dir`/ckpt restored into `template`'s structure (the
    optimiser state it holds is read with the training settings of `out_dir`/config.json).

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: it cannot be read, or does not fit `template`.
    """
    saved = read_json(os.path.join(out_dir, "config.json"))
    # Configs saved before `progress` left TrainConfig carry it: keep only the current fields.
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in saved["train"].items() if k in names})
    target = initial_state(make_optimizer(train), template.state)
    ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), fingerprint=None)
    restored = ckpt.restore_latest(target)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"No checkpoint in {out_dir}/ckpt; train the model first.")
    return Params(template.graphdef, restored[0].params)
