"""End-to-end Defuse on a mocked TFDS MNIST with the conv VAE and conv classifier.

`tfds.testing.mock_data` stands in for the dataset (no files, no network); the examples are
learnable (a bright bar whose row is the label), so the run trains real models, finds real
errors and fits regions: the path a Colab user takes on MNIST, on a tiny config.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from defuse_jax import pipeline
from defuse_jax import train_models as tm
from defuse_jax.correction import CorrectConfig
from defuse_jax.data import DataConfig
from defuse_jax.models import ClassifierConfig, VAEConfig
from defuse_jax.regions import DistillConfig
from defuse_jax.run_config import DEFAULT_SEARCH, RunConfig
from defuse_jax.training import TrainConfig

SPLIT_SIZES = {"train": 400, "test": 120}


class _BarSource:
    """MNIST-shaped examples: label c is a bright bar on rows 2c+3 .. 2c+5 over noise (a bar
    overlaps its neighbours' rows, so the VAE's latent space has boundaries to search)."""

    def __init__(self, split: str):
        self.n, self.seed = SPLIT_SIZES[split], 0 if split == "train" else 1

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self._example(int(i))

    def __getitems__(self, keys):
        return [self._example(int(k)) for k in keys]

    def _example(self, i):
        rng = np.random.default_rng((self.seed, i))
        label = i % 10
        image = rng.integers(0, 60, (28, 28, 1))
        image[2 * label + 3 : 2 * label + 6, 4:24] = 255
        return {"image": image.astype(np.uint8), "label": np.int64(label)}


@pytest.fixture
def mock_mnist(monkeypatch):
    def as_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
        return _BarSource(split)

    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")

    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source
    ):
        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
        yield


TINY_CONV = RunConfig(
    data=DataConfig(name="mnist", image_size=16),
    vae=VAEConfig(kind="conv", latent_dim=4, hidden=32, channels=(8, 16), kl_anneal_steps=100),
    vae_train=TrainConfig(epochs=12, batch_size=32, learning_rate=2e-3),
    classifier=ClassifierConfig(kind="conv", hidden=32, channels=(8, 16)),
    classifier_train=TrainConfig(epochs=6, batch_size=32, learning_rate=2e-3),
    max_sources=60,
    # The paper's search: the default validity search trains the oracle, left out here.
    search=dataclasses.replace(
        DEFAULT_SEARCH, num_samples=64, scale=1.0, chunk_size=256, validity="none"
    ),  # fmt: skip
    distill=DistillConfig(n_components=6, max_iter=100, min_codes=3, error_samples=32),
    grid_samples=4,
    # Two epochs are few: the larger region weights move these tiny regions within them.
    correct=CorrectConfig(epochs=2, batch_size=32, lams=(0.3, 1.0)),
    # No oracle (its training was a third of this test's time); the oracle has its own tests.
    labeler="source",
    oracle_check=False,
    progress=False,
)


@pytest.mark.slow
def test_conv_models_on_mocked_mnist_end_to_end(mock_mnist, tmp_path):
    run_dir = str(tmp_path / "run")
    pipeline.run(run_dir, TINY_CONV, log=lambda s: None)
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)

    assert report["dataset"] == "mnist"
    for name in ("vae", "classifier"):
        model = tm.load_trained(os.path.join(run_dir, "train", name))[0].module()
        assert model.config.kind == "conv" and model.image_shape == (16, 16, 1)
    # The data is learnable, so training through the conv layers worked...
    assert report["test_accuracy_before"] > 0.8
    # ... and the search, the mixture and the correction ran on real errors.
    assert report["num_samples_evaluated"] > 0 and report["num_errors_found"] > 0
    assert report["num_regions"] >= 1 and report["num_regions_labeled"] >= 1
    # Fine-tuning on the regions fixes many of them (measured: 0% -> 100%) and keeps the rest.
    assert report["region_accuracy_after"] > report["region_accuracy_before"] + 0.2
    assert report["test_accuracy_after"] > 0.8
