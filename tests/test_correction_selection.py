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

_ORIGINAL = sel.Score(0.0, 0, 0.90, 0.30, (0.30, 1.00))
_BOUNDS = {"original": _ORIGINAL, "max_val_drop": 0.01, "max_region_drop": 0.05}


def _s(lam, epoch, val, region, other=1.0):
    """A candidate whose watched region (the first) scores `region`, the other `other`."""
    return sel.Score(lam, epoch, val, region, (region, other))


@pytest.mark.parametrize(
    "better, worse",
    [
        # Within the bounds beats outside them, whatever the region accuracy.
        (_s(0.01, 3, 0.89, 0.50), _s(0.01, 4, 0.88, 1.00)),
        (_s(0.01, 3, 0.89, 0.50), _s(0.01, 4, 0.95, 1.00, other=0.90)),  # a region 10 pt worse
        # Within: the higher region accuracy wins, even at a lower val accuracy or a region
        # that lost less than the bound.
        (_s(0.01, 3, 0.895, 0.99, other=0.96), _s(0.001, 3, 0.95, 0.98)),
        # Equal region accuracy: higher val accuracy, then smaller lambda, then earlier epoch.
        (_s(0.01, 3, 0.92, 0.99), _s(0.001, 3, 0.91, 0.99)),
        (_s(0.001, 9, 0.92, 0.99), _s(0.01, 3, 0.92, 0.99)),
        (_s(0.01, 2, 0.92, 0.99), _s(0.01, 3, 0.92, 0.99)),
        # Both outside: the smaller worst region loss, then the higher val accuracy.
        (_s(0.01, 3, 0.85, 0.30, other=0.98), _s(0.01, 4, 0.95, 1.00, other=0.80)),
        (_s(0.01, 3, 0.85, 0.30), _s(0.01, 4, 0.80, 1.00)),
        # The original is within the bounds by definition and loses to any fix there.
        (_s(0.01, 5, 0.90, 0.60), _ORIGINAL),
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


def test_best_epoch_keeps_the_best_weights_across_a_resume(tmp_path):
    vae, clf, regions, x, y = _problem()
    data = sel.selection_data(clf, vae, regions, {0: 1, 1: 2}, x_val=x[64:], y_val=y[64:],
                              samples=8, tau=0.01, seed=0, min_error_rate=0.5)  # fmt: skip
    scaled = lambda c: models.Params(clf.graphdef, jax.tree.map(lambda a: a * c, clf.state))  # noqa: E731
    scores = {c: sel.score(scaled(c), data, lam=0.01, epoch=1) for c in (1.0, -1.0, 0.5)}
    original = sel.score(clf, data, lam=0.0, epoch=0)
    bounds = {"original": original, "max_val_drop": 1.0, "max_region_drop": 1.0}
    best_c = max(scores, key=lambda c: sel.rank(scores[c], **bounds))
    keeper = sel.BestEpoch(str(tmp_path), data, lam=0.01, fingerprint={"a": 1}, **bounds)
    records = [{"epoch": epoch} for epoch in (1, 2, 3)]
    for record, c in zip(records, scores, strict=True):
        keeper(scaled(c), record)  # scores the epoch into its history record
        assert record["select_val_accuracy"] == scores[c].val_accuracy
    assert keeper.best.epoch == 1 + list(scores).index(best_c)
    # A new keeper (a resumed run) starts from the stored best and keeps it against worse ones.
    resumed = sel.BestEpoch(str(tmp_path), data, lam=0.01, fingerprint={"a": 1}, **bounds)
    assert resumed.best == keeper.best
    for got, want in zip(
        jax.tree.leaves(resumed.load(clf).state), jax.tree.leaves(scaled(best_c).state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Stored by other settings: ignored.
    other = sel.BestEpoch(str(tmp_path), data, lam=0.01, fingerprint={"a": 2}, **bounds)
    assert other.best is None


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
                           max_val_drop=1.0, max_region_drop=1.0)  # fmt: skip
    out = fine_tune(clf, vae, regions, {0: 1, 1: 2}, x_train=x[:64], y_train=y[:64],
                    x_val=x[64:], y_val=y[64:], config=config, out_dir=str(tmp_path),
                    min_error_rate=0.5, progress=False)  # fmt: skip
    selection = read_json(tmp_path / "selection.json")
    assert out.selection == selection and sorted(selection["per_lam"]) == ["0.1", "1"]
    held_out = sel.selection_data(clf, vae, regions, {0: 1, 1: 2}, x_val=x[64:], y_val=y[64:],
                                  samples=16, tau=config.tau, seed=config.seed,
                                  min_error_rate=0.5)  # fmt: skip
    original = sel.score(clf, held_out, lam=0.0, epoch=0)
    assert selection["original"]["val_accuracy"] == original.val_accuracy
    # The chosen epoch is the best of every lambda's epochs (the history has their scores)...
    rows = [(float(lam), r) for lam, rows in selection["per_lam"].items() for r in rows]
    assert len(rows) == 2 * 3
    chosen = sel.Score.from_json(selection["chosen"])
    best = max(
        (r["region_accuracy"], r["val_accuracy"], -lam, -r["epoch"]) for lam, r in rows
    )  # every epoch is within the bounds of 1.0
    assert (chosen.region_accuracy, chosen.val_accuracy, -chosen.lam, -chosen.epoch) == best
    # ... and the returned model, and the one saved for the report, score exactly that again.
    assert sel.score(out.params, held_out, lam=chosen.lam, epoch=chosen.epoch) == chosen
    from defuse_jax.train_models import load_trained

    saved, _ = load_trained(str(tmp_path))
    assert sel.score(saved, held_out, lam=chosen.lam, epoch=chosen.epoch) == chosen


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
    "change",
    [
        {"lams": ()},
        {"lams": (0.01, 0.0)},
        {"max_val_drop": 2.0},
        {"max_region_drop": -0.1},
        {"select_samples": 0},
    ],  # fmt: skip
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
