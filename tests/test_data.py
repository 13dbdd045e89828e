"""Tests for defuse_jax.data: embedded digits, the TFDS path (mocked, no network), bad inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from defuse_jax.data import (
    SUPPORTED_DATASETS,
    DataConfig,
    DatasetNotFoundError,
    load_dataset,
)

# ----------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig())


def test_digits_shapes_dtypes_range_and_metadata(digits):
    assert digits.name == "digits"
    # 1347 training images (1797 - ceil(0.25 * 1797)), 15% of them (202) for validation.
    assert digits.x_train.shape == (1145, 8, 8, 1) and digits.x_val.shape == (202, 8, 8, 1)
    assert digits.x_test.shape == (450, 8, 8, 1)
    assert digits.y_train.shape == (1145,) and digits.y_test.shape == (450,)
    assert digits.y_val.shape == (202,)
    for x in (digits.x_train, digits.x_val, digits.x_test):
        assert x.dtype == np.float32
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (digits.y_train, digits.y_val, digits.y_test):
        assert y.dtype == np.int32
    assert digits.num_classes == 10
    assert digits.image_shape == (8, 8, 1)
    assert digits.class_names == tuple(str(i) for i in range(10))


def test_digits_split_is_a_partition_of_the_sklearn_data(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    original = np.concatenate([bunch.images.reshape(-1, 64) / 16.0, bunch.target[:, None]], 1)
    split = np.concatenate(
        [
            np.concatenate([x.reshape(-1, 64), y[:, None]], 1)
            for x, y in (
                (digits.x_train, digits.y_train),
                (digits.x_val, digits.y_val),
                (digits.x_test, digits.y_test),
            )
        ]
    )
    # Same multiset of (image, label) rows: nothing lost, duplicated or relabelled.
    np.testing.assert_allclose(np.unique(split, axis=0), np.unique(original, axis=0), atol=1e-7)
    assert len(split) == len(original)


@pytest.mark.parametrize("test_fraction", [0.25, 0.5])
def test_digits_split_is_stratified(test_fraction):
    ds = load_dataset(DataConfig(test_fraction=test_fraction, seed=3))
    total = np.bincount(np.concatenate([ds.y_train, ds.y_val, ds.y_test]), minlength=10)
    expected = total * len(ds.y_test) / total.sum()
    assert np.all(np.abs(np.bincount(ds.y_test, minlength=10) - expected) <= 1.0)


def test_digits_is_deterministic_per_seed(digits):
    same = load_dataset(DataConfig(seed=0))
    other = load_dataset(DataConfig(seed=1))
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(same, field), getattr(digits, field))
    assert not np.array_equal(other.y_train, digits.y_train)


@pytest.mark.parametrize(
    ("max_train", "max_test", "n_train", "n_test"),
    [(100, 30, 100, 30), (None, 7, 1347, 7), (5000, None, 1347, 450)],
)
def test_digits_caps_take_a_seeded_subset(max_train, max_test, n_train, n_test):
    config = DataConfig(max_train=max_train, max_test=max_test, val_fraction=0.0)
    ds = load_dataset(config)
    assert len(ds.x_train) == len(ds.y_train) == n_train
    assert len(ds.x_test) == len(ds.y_test) == n_test
    assert ds.x_val.shape == (0, 8, 8, 1) and ds.y_val.shape == (0,)
    # Every kept row is a row of the uncapped split (same seed -> same split), without repeats.
    uncapped = load_dataset(DataConfig(val_fraction=0.0))
    full = {row.tobytes() for row in uncapped.x_train.reshape(len(uncapped.x_train), -1)}
    kept = [row.tobytes() for row in ds.x_train.reshape(n_train, -1)]
    assert set(kept) <= full
    again = load_dataset(config)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)


@pytest.mark.parametrize(
    ("max_train", "val_fraction", "n_val"), [(None, 0.15, 202), (100, 0.1, 10), (20, 0.5, 10)]
)
def test_validation_is_a_seeded_part_of_the_capped_training_split(max_train, val_fraction, n_val):
    config = DataConfig(max_train=max_train, val_fraction=val_fraction)
    ds = load_dataset(config)
    whole = load_dataset(dataclasses.replace(config, val_fraction=0.0))
    assert len(ds.y_val) == n_val and len(ds.y_train) + n_val == len(whole.y_train)
    rows = lambda x, y: [a.tobytes() + bytes([b]) for a, b in zip(x, y, strict=True)]  # noqa: E731
    train, val = rows(ds.x_train, ds.y_train), rows(ds.x_val, ds.y_val)
    # No training image is a validation image, and together they are the capped split.
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(rows(whole.x_train, whole.y_train))
    assert ds.x_test.shape == whole.x_test.shape  # the test split is untouched
    other = load_dataset(dataclasses.replace(config, seed=config.seed + 1))
    assert not np.array_equal(other.y_val, ds.y_val) or not np.array_equal(other.x_val, ds.x_val)


def test_digits_caps_differ_across_seeds():
    a = load_dataset(DataConfig(max_train=50, seed=0))
    b = load_dataset(DataConfig(max_train=50, seed=1))
    assert not np.array_equal(a.x_train, b.x_train)


def test_digits_resize():
    ds = load_dataset(DataConfig(image_size=16, max_train=20, max_test=20))
    assert ds.x_train.shape == (17, 16, 16, 1) and ds.image_shape == (16, 16, 1)
    assert ds.x_val.shape == (3, 16, 16, 1)
    assert ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    small = load_dataset(DataConfig(max_train=20, max_test=20))
    # Upsampling keeps the image: mean intensity is preserved to within interpolation error.
    np.testing.assert_allclose(
        ds.x_train.mean(axis=(1, 2, 3)), small.x_train.mean(axis=(1, 2, 3)), atol=0.03
    )


# ------------------------------------------------------------------------------------- TFDS

_SPLIT_SIZES = {"train": 40, "validation": 13, "test": 17}
_SPLIT_OFFSET = {"train": 0, "validation": 100, "test": 200}


class _FakeSource:
    """Random-access source shaped like a builder's features.

    Record i of a split is a constant image with value `offset + i` (so an image identifies
    its record and split after any resize), or pixel noise; labels are `(offset + i) % K`.
    """

    def __init__(self, features, split: str, pattern: str):
        self.features, self.split, self.pattern = features, split, pattern
        self.offset, self.n = _SPLIT_OFFSET[split], _SPLIT_SIZES[split]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, keys):
        assert all(0 <= k < self.n for k in keys)
        return [self._example(int(k)) for k in keys]

    def _example(self, i):
        h, w, c = self.features["image"].shape
        h, w = h or 40 + i % 7, w or 50 + i % 5  # variable-size datasets (gtsrb)
        value = self.offset + i
        if self.pattern == "noise":
            image = np.random.default_rng(value).integers(0, 256, (h, w, c), dtype=np.uint8)
        else:
            image = np.full((h, w, c), value, np.uint8)
        example = {"image": image}
        if "label" in self.features:
            example["label"] = np.int64(value % self.features["label"].num_classes)
        if "attributes" in self.features:
            example["attributes"] = {"Smiling": np.bool_(value % 3 == 0), "Male": np.bool_(True)}
        return example


@pytest.fixture
def fake_tfds(monkeypatch):
    """Mocks TFDS (no files, no network); returns the list of splits read, in order.

    `tfds.testing.mock_data`'s default source breaks `__getitems__` in tfds 4.9.10 (the mock
    binds it without `self`), so we pass our own source through `as_data_source_fn`.
    """
    requested = []
    pattern = {"value": "constant"}

    def as_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
        requested.append(split)
        return _FakeSource(builder.info.features, split, pattern["value"])

    # Anything that would download fails the test.
    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")

    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source
    ):
        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
        yield requested, pattern


# name, image_size, expected image shape, test split, class names (first 2), num_classes
_TFDS_CASES = [
    ("mnist", None, (28, 28, 1), "test", ("0", "1"), 10),
    ("mnist", 14, (14, 14, 1), "test", ("0", "1"), 10),
    ("fashion_mnist", None, (28, 28, 1), "test", ("T-shirt/top", "Trouser"), 10),
    ("svhn_cropped", None, (32, 32, 3), "test", ("0", "1"), 10),
    ("svhn_cropped", 16, (16, 16, 3), "test", ("0", "1"), 10),
    ("visual_domain_decathlon/gtsrb", None, (32, 32, 3), "validation", ("0", "1"), 43),
    ("visual_domain_decathlon/gtsrb", 24, (24, 24, 3), "validation", ("0", "1"), 43),
    ("celeb_a", None, (64, 64, 3), "test", ("not_smiling", "smiling"), 2),
]


@pytest.mark.parametrize(("name", "size", "shape", "test_split", "names", "k"), _TFDS_CASES)
def test_tfds_datasets(fake_tfds, name, size, shape, test_split, names, k):
    requested, _ = fake_tfds
    ds = load_dataset(DataConfig(name=name, image_size=size, val_fraction=0.0))
    assert requested == ["train", test_split]
    assert ds.name == name and ds.image_shape == shape
    assert ds.num_classes == k == len(ds.class_names) and ds.class_names[:2] == names
    for split, x, y in (("train", ds.x_train, ds.y_train), (test_split, ds.x_test, ds.y_test)):
        n, offset = _SPLIT_SIZES[split], _SPLIT_OFFSET[split]
        assert x.shape == (n, *shape) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        # Uncapped splits keep the source order; constant images stay exact through resize.
        values = offset + np.arange(n)
        np.testing.assert_array_equal(
            x, np.broadcast_to((values / 255).astype(np.float32)[:, None, None, None], x.shape)
        )
        expected = (values % 3 == 0) if name == "celeb_a" else values % k
        np.testing.assert_array_equal(y, expected)


def test_tfds_caps_pair_images_with_labels(fake_tfds):
    config = DataConfig(
        name="svhn_cropped", image_size=8, max_train=9, max_test=5, val_fraction=0.0, seed=4
    )
    ds = load_dataset(config)
    assert ds.x_train.shape == (9, 8, 8, 3) and ds.x_test.shape == (5, 8, 8, 3)
    index = np.rint(ds.x_train[:, 0, 0, 0] * 255).astype(int)  # record id from the image
    assert len(set(index)) == 9 and index.max() < _SPLIT_SIZES["train"]
    assert not np.array_equal(index, np.sort(index))  # shuffled, not the first 9 records
    np.testing.assert_array_equal(ds.y_train, index % 10)
    again = load_dataset(config)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    other = load_dataset(dataclasses.replace(config, seed=5))
    other_index = np.rint(other.x_train[:, 0, 0, 0] * 255).astype(int)
    assert not np.array_equal(other_index, index)


def test_tfds_downscale_is_antialiased(fake_tfds):
    _, pattern = fake_tfds
    pattern["value"] = "noise"
    ds = load_dataset(DataConfig(name="mnist", image_size=7, max_train=5, max_test=1))
    native = load_dataset(DataConfig(name="mnist", max_train=5, max_test=1))
    assert ds.x_train.shape == (4, 7, 7, 1) and ds.x_val.shape == (1, 7, 7, 1)
    # Each output pixel averages many noisy input pixels (point sampling would keep the spread).
    assert ds.x_train.std() < 0.35 * native.x_train.std()
    np.testing.assert_allclose(ds.x_train.mean(), native.x_train.mean(), atol=0.05)


# ------------------------------------------------------------------------------- bad inputs


def test_supported_datasets_lists_the_required_ones():
    required = {"digits", "mnist", "fashion_mnist", "svhn_cropped", "celeb_a"}
    assert required | {"visual_domain_decathlon/gtsrb"} <= set(SUPPORTED_DATASETS)


@pytest.mark.parametrize("name", ["cifar10", "MNIST", ""])
def test_unknown_dataset_name_lists_supported_names(name):
    with pytest.raises(ValueError, match="Unknown dataset") as info:
        load_dataset(DataConfig(name=name))
    assert all(supported in str(info.value) for supported in SUPPORTED_DATASETS)


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_missing_data_dir_is_named(tmp_path, name):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="does not exist") as info:
        load_dataset(DataConfig(name=name, data_dir=missing))
    assert missing in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        DataConfig(image_size=0),
        DataConfig(image_size=2.5),
        DataConfig(test_fraction=0.0),
        DataConfig(test_fraction=1.0),
        DataConfig(test_fraction=0.001),  # 2 test images for 10 classes
        DataConfig(max_train=0),
        DataConfig(max_test=-3),
        DataConfig(val_fraction=-0.1),
        DataConfig(val_fraction=1.0),
        DataConfig(max_train=3, val_fraction=0.9),  # 3 of 3 for validation, none to train
    ],
)
def test_bad_options_are_rejected(config):
    with pytest.raises(ValueError):
        load_dataset(config)


@pytest.mark.parametrize("name", ["mnist", "celeb_a"])
def test_unprepared_tfds_dataset_gives_one_clear_error(tmp_path, monkeypatch, name):
    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DataConfig(name=name, data_dir=str(tmp_path)))
    message = str(info.value)
    for needle in (repr(name), str(tmp_path), "download_and_prepare", "array_record"):
        assert needle in message
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_tfds_dataset_prepared_as_tfrecord_gives_a_clear_error(tmp_path):
    # Metadata only, in TFDS's default (tfrecord) format: "prepared" but not random-access.
    builder = tfds.builder("mnist", data_dir=str(tmp_path))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with pytest.raises(DatasetNotFoundError, match="tfrecord format") as info:
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path)))
    assert str(builder.data_path) in str(info.value)
    assert "file_format='array_record'" in str(info.value)
