"""Training lengths from the data size: digits keep their epochs, large data gets whole epochs
near the same step budget, explicit values stay, and the pipeline records what it used."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_idx_files import write_dataset
from test_training import _reference_fit

from defuse_jax import correction, data, losses, pipeline, training, training_lengths
from defuse_jax.correction import CorrectConfig
from defuse_jax.models import Classifier, ClassifierConfig, params_of
from defuse_jax.run_config import RunConfig, lengths_of, resolved_lengths
from defuse_jax.training import TrainConfig


@pytest.mark.parametrize(
    "validity, per_label, lams, want",
    [("none", False, None, correction.LAMS), ("oracle", False, None, correction.STRONG_LAMS),
     ("none", True, None, correction.STRONG_LAMS), ("oracle", False, (0.2,), (0.2,)),
     ("none", True, (0.05, 0.5), (0.05, 0.5))],
)  # fmt: skip
def test_region_weights_follow_the_regions_unless_set(validity, per_label, lams, want):
    """Unset region weights are stronger for narrow regions (behind a search that keeps only
    valid samples, or one mixture per predicted class); set ones are kept; config.json's lengths
    record the ones used."""
    config = RunConfig(
        search=dataclasses.replace(RunConfig().search, validity=validity),
        distill=dataclasses.replace(RunConfig().distill, per_label=per_label),
        correct=CorrectConfig(lams=lams),
    )  # fmt: skip
    resolved = resolved_lengths(config, 1145)
    assert resolved.correct.lams == want
    assert lengths_of(resolved, 1145)["correction_lams"] == list(want)
    assert correction.resolved(CorrectConfig(), 1145).lams == correction.LAMS  # the library's


@pytest.mark.parametrize(
    "n_train, vae, clf, oracle, round_steps",
    [
        (1145, 120, 40, 80, 17),  # digits: the epochs the README's tables were measured with
        (8500, 15, 5, 10, 25),  # Fashion-MNIST capped at 10,000, 15% held out
        (51000, 5, 5, 10, 25),  # full Fashion-MNIST: 3 epochs would do, 5 is the floor
        (100, 2040, 680, 1360, 1),  # tiny, one step per epoch: the budget in epochs
    ],
)
def test_lengths_follow_the_training_split(n_train, vae, clf, oracle, round_steps):
    resolved = resolved_lengths(RunConfig(), n_train)
    got = lengths_of(resolved, n_train)
    assert (got["vae_epochs"], got["classifier_epochs"], got["oracle_epochs"]) == (vae, clf, oracle)
    assert got["correction_round_steps"] == round_steps and got["correction_rounds"] == 20
    assert got["churn_images"] == min(n_train, training_lengths.CHURN_IMAGES)


def test_explicit_lengths_are_kept():
    config = RunConfig(
        vae_train=TrainConfig(epochs=7), classifier_train=TrainConfig(epochs=3, batch_size=32),
        correct=CorrectConfig(epoch_steps=100),
    )  # fmt: skip
    resolved = resolved_lengths(config, 51000)
    assert (resolved.vae_train.epochs, resolved.classifier_train.epochs) == (7, 3)
    assert resolved.correct.epoch_steps == 100
    # A round is never longer than an epoch.
    assert resolved_lengths(config, 1145).correct.epoch_steps == 1145 // 64


@pytest.mark.parametrize(
    "overrides",
    [{}, {"max_train": 300}, {"val_fraction": 0.3, "test_fraction": 0.4}, {"val_fraction": 0.0}],
)
def test_train_size_is_what_load_dataset_returns(overrides):
    config = data.DataConfig(**overrides)
    assert data.train_size(config) == len(data.load_dataset(config).x_train)


def test_train_size_of_idx_files(tmp_path):
    write_dataset(tmp_path)
    config = data.DataConfig("fashion_mnist", data_dir=str(tmp_path), max_train=30)
    assert data.train_size(config) == len(data.load_dataset(config).x_train) == 30 - 4


def test_config_json_records_the_lengths_and_keeps_them_when_the_data_is_gone(tmp_path):
    folder = tmp_path / "data"
    write_dataset(folder)
    run = str(tmp_path / "run")
    config = RunConfig(data=data.DataConfig("mnist", data_dir=str(folder)))
    resolved = pipeline.resolve_lengths(run, config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["vae_train"]["epochs"] is None  # as given: a new data size resolves anew
    assert saved["lengths"] == lengths_of(resolved, 34)  # 40 less 15% held out
    assert resolved.vae_train.epochs == 2040 and resolved.correct.epoch_steps == 1
    for f in folder.iterdir():
        f.unlink()
    again = pipeline.resolve_lengths(run, config)
    assert again == resolved
    with pytest.raises(ValueError, match="IDX|not prepared"):  # a new run has no record
        pipeline.resolve_lengths(str(tmp_path / "other"), config)


def test_rounds_train_the_first_batches_of_each_epochs_shuffle(tmp_path):
    """`fit(epoch_steps=k)`: epoch e trains on the first k batches of its own shuffle, so a
    round is the same whatever the number of rounds."""
    model = Classifier(ClassifierConfig(kind="mlp", hidden=8), image_shape=(4, 4, 1),
                       num_classes=3, rngs=nnx.Rngs(0))  # fmt: skip
    rng = np.random.default_rng(0)
    train_data = {"x": rng.random((90, 4, 4, 1), dtype=np.float32),
                  "y": rng.integers(0, 3, 90).astype(np.int32)}  # fmt: skip
    config = TrainConfig(epochs=3, batch_size=10, checkpoint_every=1000)
    want = _reference_fit(params_of(model), losses.classifier_loss, train_data, config,
                          epoch_steps=2)  # fmt: skip
    got, history = training.fit(
        params_of(model), losses.classifier_loss, train_data, config=config,
        checkpoint_dir=str(tmp_path), fingerprint={}, progress=False, epoch_steps=2, loop="steps",
    )  # fmt: skip
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for g, w in zip(jax.tree.leaves(got.state), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def test_resolving_changes_no_field_it_does_not_own():
    config = RunConfig()
    resolved = resolved_lengths(config, 51000)
    for f in dataclasses.fields(RunConfig):
        if f.name not in ("vae_train", "classifier_train", "correct"):
            assert getattr(resolved, f.name) == getattr(config, f.name), f.name
    assert dataclasses.replace(resolved.correct, epoch_steps=None, lams=None) == config.correct
