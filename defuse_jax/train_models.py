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
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from defuse_jax import losses, plots
from defuse_jax.checkpoint import Checkpointer
from defuse_jax.data import Dataset
from defuse_jax.models import VAE, Classifier, ClassifierConfig, Params, VAEConfig, params_of
from defuse_jax.training import TrainConfig, TrainState, evaluate, fit, make_optimizer

VAE_TRAIN_DEFAULT = TrainConfig(epochs=120, batch_size=64, learning_rate=1e-3)
CLASSIFIER_TRAIN_DEFAULT = TrainConfig(epochs=40, batch_size=64, learning_rate=1e-3)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained model and what describes it."""

    params: Params
    model_config: Any  # VAEConfig | ClassifierConfig
    history: list[dict[str, float]]
    metrics: dict[str, float]  # final test metrics
    out_dir: str


def _dataset_meta(ds: Dataset) -> dict[str, Any]:
    return {
        "name": ds.name,
        "image_shape": list(ds.image_shape),
        "num_classes": ds.num_classes,
        "num_train": len(ds.x_train),
        "num_test": len(ds.x_test),
    }


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)  # atomic: a kill never leaves half a file


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
    return {"data": _dataset_meta(ds), "model": dataclasses.asdict(model_config)}


def train_vae(
    ds: Dataset,
    *,
    out_dir: str,
    config: VAEConfig | None = None,
    train: TrainConfig = VAE_TRAIN_DEFAULT,
) -> TrainedModel:
    """Train (or resume, or reload when finished) the VAE on `ds.x_train`."""
    config = config or default_vae_config(ds.image_shape)
    vae = VAE(config, image_shape=ds.image_shape, rngs=nnx.Rngs(train.seed))
    _write_json(
        os.path.join(out_dir, "config.json"),
        {
            "kind": "vae",
            "data": _dataset_meta(ds),
            "model": dataclasses.asdict(config),
            "train": dataclasses.asdict(train),
        },
    )
    params, history = fit(
        params_of(vae),
        losses.vae_loss,
        {"x": ds.x_train},
        config=train,
        checkpoint_dir=os.path.join(out_dir, "ckpt"),
        fingerprint=_fingerprint(ds, config),
        eval_fn=losses.vae_eval,
        eval_data={"x": ds.x_test},
        desc="vae",
    )
    metrics = evaluate(losses.vae_eval, params, {"x": ds.x_test})
    _write_json(os.path.join(out_dir, "history.json"), {"history": history, "test": metrics})
    save_reconstructions(params, ds.x_test[:16], os.path.join(out_dir, "reconstructions.png"))
    return TrainedModel(params, config, history, metrics, out_dir)


def train_classifier(
    ds: Dataset,
    *,
    out_dir: str,
    config: ClassifierConfig | None = None,
    train: TrainConfig = CLASSIFIER_TRAIN_DEFAULT,
) -> TrainedModel:
    """Train (or resume, or reload when finished) the classifier on (`x_train`, `y_train`)."""
    config = config or default_classifier_config(ds.image_shape)
    check_labels(ds.y_train, ds.num_classes, what="Training labels")
    check_labels(ds.y_test, ds.num_classes, what="Test labels")
    clf = Classifier(
        config, image_shape=ds.image_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(train.seed)
    )
    _write_json(
        os.path.join(out_dir, "config.json"),
        {
            "kind": "classifier",
            "data": _dataset_meta(ds),
            "model": dataclasses.asdict(config),
            "train": dataclasses.asdict(train),
        },
    )
    test = {"x": ds.x_test, "y": ds.y_test.astype(np.int32)}
    params, history = fit(
        params_of(clf),
        losses.classifier_loss,
        {"x": ds.x_train, "y": ds.y_train.astype(np.int32)},
        config=train,
        checkpoint_dir=os.path.join(out_dir, "ckpt"),
        fingerprint=_fingerprint(ds, config),
        eval_fn=losses.classifier_eval,
        eval_data=test,
        desc="classifier",
    )
    metrics = evaluate(losses.classifier_eval, params, test)
    _write_json(os.path.join(out_dir, "history.json"), {"history": history, "test": metrics})
    return TrainedModel(params, config, history, metrics, out_dir)


def default_vae_config(image_shape: tuple[int, int, int]) -> VAEConfig:
    """MLP for tiny grayscale images, conv for 28x28 and larger or colour images."""
    small = image_shape[0] * image_shape[1] <= 16 * 16
    return VAEConfig(kind="mlp") if small else VAEConfig(kind="conv", latent_dim=12, beta=4.0)


def default_classifier_config(image_shape: tuple[int, int, int]) -> ClassifierConfig:
    small = image_shape[0] * image_shape[1] <= 16 * 16
    return ClassifierConfig(kind="mlp") if small else ClassifierConfig(kind="conv")


def save_reconstructions(params: Params, x: np.ndarray, path: str) -> str:
    """Originals (top row) vs reconstructions from the mean code (bottom row)."""
    vae = params.module()
    mean, _ = vae.encode(jnp.asarray(x))
    recon = np.asarray(vae.decode(mean))
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
    with open(cfg_path) as f:
        saved = json.load(f)
    model_cfg, meta = saved["model"], saved["data"]
    shape = tuple(meta["image_shape"])
    if saved["kind"] == "vae":
        config: Any = VAEConfig(**{**model_cfg, "channels": tuple(model_cfg["channels"])})
        model: nnx.Module = VAE(config, image_shape=shape, rngs=nnx.Rngs(0))
    else:
        config = ClassifierConfig(**{**model_cfg, "channels": tuple(model_cfg["channels"])})
        model = Classifier(
            config, image_shape=shape, num_classes=meta["num_classes"], rngs=nnx.Rngs(0)
        )
    params = params_of(model)
    train = TrainConfig(**saved["train"])
    opt = make_optimizer(train)
    target = TrainState(jnp.zeros((), jnp.int32), params.state, opt.init(params.state))
    ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), fingerprint=None)
    restored = ckpt.restore_latest(target)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"No checkpoint in {out_dir}/ckpt; train the model first.")
    return Params(params.graphdef, restored[0].params), config
