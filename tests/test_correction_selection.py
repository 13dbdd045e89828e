"""Choosing the correction's lambda and epoch on validation data (`correction_selection`)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from defuse_jax import correction_selection as sel
from defuse_jax import models
from defuse_jax.correction import CorrectConfig, fine_tune
from defuse_jax.files import read_json
from defuse_jax.regions import Regions

_BOUNDS = {"baseline_val": 0.90, "max_val_drop": 0.01}


@pytest.mark.parametrize(
    "better, worse",
    [
        # Within the bound beats outside it, whatever the region accuracy.
        (sel.Score(0.01, 3, 0.89, 0.50), sel.Score(0.01, 4, 0.88, 1.00)),
        # Within the bound: the higher region accuracy wins, even at a lower val accuracy.
        (sel.Score(0.01, 3, 0.895, 0.99), sel.Score(0.001, 3, 0.95, 0.98)),
        # Equal region accuracy: higher val accuracy, then smaller lambda, then earlier epoch.
        (sel.Score(0.01, 3, 0.92, 0.99), sel.Score(0.001, 3, 0.91, 0.99)),
        (sel.Score(0.001, 9, 0.92, 0.99), sel.Score(0.01, 3, 0.92, 0.99)),
        (sel.Score(0.01, 2, 0.92, 0.99), sel.Score(0.01, 3, 0.92, 0.99)),
        # Both outside: the smaller loss of val accuracy wins.
        (sel.Score(0.01, 3, 0.85, 0.10), sel.Score(0.01, 4, 0.80, 1.00)),
        # The original (epoch 0) is within the bound by definition and loses to any fix there.
        (sel.Score(0.01, 5, 0.90, 0.60), sel.Score(0.0, 0, 0.90, 0.30)),
    ],
)
def test_rank_orders_candidates(better, worse):
    assert sel.rank(better, **_BOUNDS) > sel.rank(worse, **_BOUNDS)


def _tiny_models():
    vae = models.params_of(
        models.VAE(
            models.VAEConfig(latent_dim=2, hidden=16), image_shape=(8, 8, 1), rngs=nnx.Rngs(0)
        )  # fmt: skip
    )
    clf = models.params_of(
        models.Classifier(
            models.ClassifierConfig(hidden=16),
            image_shape=(8, 8, 1),
            num_classes=3,
            rngs=nnx.Rngs(1),
        )  # fmt: skip
    )
    return vae, clf


def _record(epoch, val, region):
    return {"epoch": epoch, "select_val_accuracy": val, "select_region_accuracy": region}


def test_best_epoch_keeps_the_best_weights_across_a_resume(tmp_path):
    _, clf = _tiny_models()
    scaled = lambda c: models.Params(clf.graphdef, jax.tree.map(lambda a: a * c, clf.state))  # noqa: E731
    keeper = sel.BestEpoch(str(tmp_path), lam=0.01, fingerprint={"a": 1}, **_BOUNDS)
    keeper(scaled(1.0), _record(1, 0.90, 0.50))
    keeper(scaled(2.0), _record(2, 0.90, 0.80))  # the best
    keeper(scaled(3.0), _record(3, 0.70, 0.99))  # outside the bound
    assert keeper.best == sel.Score(0.01, 2, 0.90, 0.80)
    # A new keeper (a resumed run) starts from the stored best and keeps it against worse ones.
    resumed = sel.BestEpoch(str(tmp_path), lam=0.01, fingerprint={"a": 1}, **_BOUNDS)
    assert resumed.best == keeper.best
    resumed(scaled(4.0), _record(4, 0.90, 0.70))
    for got, want in zip(
        jax.tree.leaves(resumed.load(clf).state), jax.tree.leaves(scaled(2.0).state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Stored by other settings: ignored.
    assert sel.BestEpoch(str(tmp_path), lam=0.01, fingerprint={"a": 2}, **_BOUNDS).best is None


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    vae, clf = _tiny_models()
    means = np.asarray([[2.0, 0.0], [-2.0, 1.0]], np.float32)
    cov = np.broadcast_to(np.eye(2, dtype=np.float32), (2, 2, 2)).copy()
    regions = Regions(means, cov, np.full(2, 0.5, np.float32), np.zeros(0, np.int32),
                      [{"id": 0}, {"id": 1}])  # fmt: skip
    x = rng.uniform(size=(96, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=96).astype(np.int32)
    return vae, clf, regions, x, y


def test_fine_tune_keeps_the_chosen_epoch(tmp_path):
    vae, clf, regions, x, y = _problem()
    config = CorrectConfig(lams=(0.1, 1.0), epochs=3, batch_size=32, select_samples=16,
                           max_val_drop=1.0)  # fmt: skip
    out = fine_tune(clf, vae, regions, {0: 1, 1: 2}, x_train=x[:64], y_train=y[:64],
                    x_val=x[64:], y_val=y[64:], config=config, out_dir=str(tmp_path),
                    min_error_rate=0.5, progress=False)  # fmt: skip
    selection = read_json(tmp_path / "selection.json")
    assert out.selection == selection and sorted(selection["per_lam"]) == ["0.1", "1"]
    # The chosen score is the best over every lambda's epochs (and the original)...
    scores = [sel.Score(**selection["original"])] + [
        sel.Score(float(lam), r["epoch"], r["val_accuracy"], r["region_accuracy"])
        for lam, rows in selection["per_lam"].items()
        for r in rows
    ]
    bounds = {"baseline_val": selection["original"]["val_accuracy"], "max_val_drop": 1.0}
    best = max(scores, key=lambda s: sel.rank(s, **bounds))
    assert sel.Score(**selection["chosen"]) == best and best.epoch > 0
    # ... and the returned model, and the one saved for the report, score exactly that again.
    held_out = sel.selection_data(clf, vae, regions, {0: 1, 1: 2}, x_val=x[64:], y_val=y[64:],
                                  samples=16, tau=config.tau, seed=config.seed,
                                  min_error_rate=0.5)  # fmt: skip
    rescored = sel.score_original(out.params, held_out)
    assert (rescored.val_accuracy, rescored.region_accuracy) == (
        best.val_accuracy,
        best.region_accuracy,
    )
    from defuse_jax.train_models import load_trained

    saved, _ = load_trained(str(tmp_path))
    assert sel.score_original(saved, held_out)[2:] == rescored[2:]


def test_fine_tune_keeps_the_original_when_every_epoch_costs_too_much(tmp_path):
    vae, clf, regions, x, y = _problem(1)
    # Validation labels the original gets all right; a wild learning rate changes them.
    y_val = np.asarray(models.logits(clf, x[64:]).argmax(-1), np.int32)
    config = CorrectConfig(lams=(1.0,), epochs=2, batch_size=32, select_samples=8,
                           max_val_drop=0.0, learning_rate=1.0)  # fmt: skip
    out = fine_tune(clf, vae, regions, {0: 1, 1: 2}, x_train=x[:64], y_train=y[:64],
                    x_val=x[64:], y_val=y_val, config=config, out_dir=str(tmp_path),
                    progress=False)  # fmt: skip
    assert out.selection["kept_original"] and out.history == []
    assert out.selection["original"]["val_accuracy"] == 1.0
    assert all(r["val_accuracy"] < 1.0 for r in out.selection["per_lam"]["1"])
    assert out.params is clf


def test_choosing_without_a_validation_split_is_a_clear_error(tmp_path):
    vae, clf, regions, x, y = _problem()
    with pytest.raises(ValueError, match="val_fraction"):
        fine_tune(clf, vae, regions, {0: 1}, x_train=x, y_train=y, x_val=x[:0], y_val=y[:0],
                  config=CorrectConfig(epochs=1, batch_size=32), out_dir=str(tmp_path),
                  progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "change", [{"lams": ()}, {"lams": (0.01, 0.0)}, {"max_val_drop": 2.0}, {"select_samples": 0}]
)
def test_bad_selection_settings_are_rejected(change):
    with pytest.raises(ValueError):
        dataclasses.replace(CorrectConfig(), **change)


def test_a_run_that_chooses_on_validation_needs_a_validation_split():
    from defuse_jax.data import DataConfig
    from defuse_jax.run_config import RunConfig

    with pytest.raises(ValueError, match="--no-correct-select"):
        RunConfig(data=DataConfig(val_fraction=0.0))
    RunConfig(data=DataConfig(val_fraction=0.0), correct=CorrectConfig(select=False))
