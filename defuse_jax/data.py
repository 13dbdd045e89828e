"""Datasets as numpy arrays: the embedded sklearn `digits` and TFDS image datasets.

One entry point, `load_dataset(DataConfig(...))`, returns a `Dataset` with images as float32
in [0, 1], NHWC (grayscale kept as C=1), int32 labels, train/validation/test splits and
metadata. The validation split is carved from the training split (`DataConfig.val_fraction`);
no model trains on it.

* `digits` (default): scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  no network needed. Split into train/test with a seeded, stratified `train_test_split`.
* `mnist` and `fashion_mnist` from their original IDX files when `data_dir` holds them (gzipped
  or not; Debian's `apt-get install dataset-fashion-mnist` puts Fashion-MNIST's in
  `/usr/share/datasets/fashion-mnist/`; torchvision's and Kaggle's downloads work too): see
  `idx_files`. `max_train` / `max_test` pick seeded subsets of the files' splits.
* TFDS datasets (`mnist`, `fashion_mnist`, `svhn_cropped`, `visual_domain_decathlon/gtsrb`,
  `celeb_a`) are read through `tfds.data_source` (random access over ArrayRecord files; no
  TensorFlow needed). They are never downloaded from here: a dataset that is not prepared in
  `data_dir` raises `DatasetNotFoundError` with instructions on how to prepare it.

Dataset-specific choices:

* `visual_domain_decathlon/gtsrb`: the decathlon's `test` split is unlabeled (all labels are
  -1), so the labeled `validation` split is used as the test set. Images vary in size; they are
  centre-cropped to a square and resized (default 32x32).
* `celeb_a`: binary target = the `Smiling` attribute (about half of the faces smile, so the
  classes are balanced); class names `("not_smiling", "smiling")`. The 218x178 images are
  centre-cropped to 178x178 and resized (default 64x64). At 64x64 the full train split is
  about 8 GB as float32; use `max_train` for quick runs.

Example:
    >>> ds = load_dataset(DataConfig(name="digits", seed=0))
    >>> ds.x_train.shape, ds.x_val.shape, ds.num_classes
    ((1145, 8, 8, 1), (202, 8, 8, 1), 10)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from defuse_jax import idx_files
from defuse_jax.files import arrays_sha256

__all__ = [
    "SUPPORTED_DATASETS",
    "DataConfig",
    "Dataset",
    "DatasetNotFoundError",
    "load_dataset",
]

_READ_BATCH = 1024  # records per `__getitems__` call


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and how.

    Attributes:
        name: `"digits"` (embedded, sklearn), or a TFDS dataset prepared offline: `"mnist"`,
            `"fashion_mnist"`, `"svhn_cropped"`, `"visual_domain_decathlon/gtsrb"`, `"celeb_a"`.
        data_dir: TFDS data directory holding prepared datasets; must exist if given. `None`
            uses TFDS's default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
        image_size: resize images to `image_size x image_size` (non-square images are
            centre-cropped to a square first). `None`: native size for fixed-size datasets
            (`digits` stays 8x8), 32 for `visual_domain_decathlon/gtsrb`, 64 for `celeb_a`.
        test_fraction: `digits` only: fraction of the 1797 images in the stratified test split.
        max_train: keep only the first `max_train` training examples after a seeded shuffle.
        max_test: same for the test split.
        val_fraction: fraction of the training split (after `max_train`) held out as a
            validation split that no model trains on. The correction chooses its region weight
            and epoch on it, so that nothing is ever chosen on the test split. 0: no validation
            split, which needs the choice off (--no-correct-select: the correction then keeps
            the last epoch of the reference weight).
        seed: seeds the `digits` split and the shuffles behind `max_train` / `max_test` and the
            validation split.
    """

    name: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    test_fraction: float = 0.25
    max_train: int | None = None
    max_test: int | None = None
    val_fraction: float = 0.15
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset as numpy arrays with its metadata.

    Attributes:
        name: dataset name as in `DataConfig.name`.
        x_train: `[n_train, H, W, C]` float32 in [0, 1].
        y_train: `[n_train]` int32 in `[0, num_classes)`.
        x_test: `[n_test, H, W, C]` float32 in [0, 1].
        y_test: `[n_test]` int32 in `[0, num_classes)`.
        num_classes: number of classes.
        image_shape: `(H, W, C)`.
        class_names: `num_classes` human-readable names, indexed by label.
        x_val: `[n_val, H, W, C]` validation images carved from the training split (no model
            trains on them); `n_val` is 0 when `DataConfig.val_fraction` is 0.
        y_val: `[n_val]` int32.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    x_val: np.ndarray
    y_val: np.ndarray


def dataset_sha256(ds: Dataset) -> str:
    """Hex SHA-256 of the training and test splits' images and labels: what a model trained
    outside the train stage (the oracle, the bug-yield judge) depends on, whatever the
    `DataConfig` or arrays it came from. About half a second on Fashion-MNIST's 60,000 images."""
    return arrays_sha256((ds.x_train, ds.y_train, ds.x_test, ds.y_test))


class DatasetNotFoundError(ValueError):
    """A TFDS dataset is not prepared (readable without TensorFlow) in the given data_dir."""


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    """How to turn one TFDS dataset into (image, label) arrays."""

    test_split: str = "test"
    default_size: int | None = None  # None: native size (fixed-shape datasets only)
    label: Callable[[Mapping[str, Any]], Any] = lambda ex: ex["label"]
    class_names: tuple[str, ...] | None = None  # None: from info.features["label"].names


_TFDS_SPECS: dict[str, _TfdsSpec] = {
    "mnist": _TfdsSpec(),
    "fashion_mnist": _TfdsSpec(),
    "svhn_cropped": _TfdsSpec(),
    # The decathlon's test labels are withheld (-1): evaluate on the labeled validation split.
    "visual_domain_decathlon/gtsrb": _TfdsSpec(test_split="validation", default_size=32),
    "celeb_a": _TfdsSpec(
        default_size=64,
        label=lambda ex: ex["attributes"]["Smiling"],
        class_names=("not_smiling", "smiling"),
    ),
}

SUPPORTED_DATASETS: tuple[str, ...] = ("digits", *_TFDS_SPECS)

# The datasets that may come as IDX files, with their class names (label order).
_IDX_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}  # fmt: skip


def _idx_split_files(config: DataConfig) -> dict[str, idx_files.IdxSplit] | None:
    """The dataset's IDX files in `config.data_dir`, or None (then TFDS is asked)."""
    if config.name not in _IDX_CLASS_NAMES or config.data_dir is None:
        return None
    return idx_files.find_idx_files(config.data_dir, config.name)


def load_dataset(config: DataConfig = DataConfig()) -> Dataset:  # noqa: B008 (frozen)
    """Loads a dataset as numpy arrays (images float32 in [0, 1], NHWC; labels int32).

    Args:
        config: which dataset, where its files are, target image size, caps and seed.

    Returns:
        A `Dataset`; `x_*: [n, H, W, C]` float32, `y_*: [n]` int32.

    Raises:
        ValueError: unknown name, non-existent `data_dir`, or an out-of-range option.
        DatasetNotFoundError: a TFDS dataset is not prepared in `data_dir` (nothing is
            downloaded; the message says how to prepare it).

    Example:
        >>> ds = load_dataset(DataConfig(name="digits", image_size=16, max_train=100))
        >>> ds.x_train.shape, ds.x_val.shape
        ((85, 16, 16, 1), (15, 16, 16, 1))
    """
    _validate(config)
    if config.name == "digits":
        return _load_digits(config)
    files = _idx_split_files(config)
    if files is not None:
        return _load_idx(config, files)
    return _load_tfds(config, _TFDS_SPECS[config.name])


def check_available(config: DataConfig) -> None:
    """Raises what `load_dataset` would raise about the config, without reading the data.

    For the pipeline to call before it saves the config into a run directory or sets a stage's
    outputs aside, so a typo in a data flag costs nothing.

    Raises:
        ValueError: unknown name, non-existent `data_dir`, or an out-of-range option.
        DatasetNotFoundError: a TFDS dataset that is not prepared in `data_dir`.
        idx_files.IdxError: IDX files that are missing, truncated, of the wrong kind, or whose
            counts or labels do not fit (their images are not read).
    """
    _validate(config)
    if config.name == "digits":
        return
    files = _idx_split_files(config)
    if files is not None:
        for split in files.values():
            idx_files.check_split(split, num_classes=len(_IDX_CLASS_NAMES[config.name]))
        return
    _open_sources(config.name, ("train", _TFDS_SPECS[config.name].test_split), config.data_dir)


def train_size(config: DataConfig) -> int:
    """How many training examples `load_dataset(config)` returns, without reading images.

    Raises:
        What `check_available` raises.
    """
    check_available(config)
    if config.name == "digits":
        n = 1797  # scikit-learn's digits
        n_train = n - math.ceil(config.test_fraction * n)
    elif (files := _idx_split_files(config)) is not None:
        n_train = idx_files.check_split(files["train"], num_classes=10)[0]
    else:
        _, (source,) = _open_sources(config.name, ("train",), config.data_dir)
        n_train = len(source)
    if config.max_train is not None:
        n_train = min(n_train, config.max_train)
    return n_train - round(config.val_fraction * n_train)


def _validate(config: DataConfig) -> None:
    """Raises a clear ValueError for a bad config, before any file is touched."""
    if config.name not in SUPPORTED_DATASETS:
        raise ValueError(
            f"Unknown dataset {config.name!r}. Supported datasets: {', '.join(SUPPORTED_DATASETS)}."
        )
    if config.data_dir is not None and not os.path.isdir(os.path.expanduser(config.data_dir)):
        raise ValueError(
            f"data_dir {config.data_dir!r} does not exist or is not a directory. Pass the "
            "directory that holds the prepared TFDS datasets, or leave data_dir unset to use "
            "TFDS's default."
        )
    if config.image_size is not None and (
        isinstance(config.image_size, bool)
        or int(config.image_size) != config.image_size
        or config.image_size < 1
    ):
        raise ValueError(
            f"image_size must be a positive integer or None, got {config.image_size!r}."
        )
    if not 0.0 < config.test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {config.test_fraction!r}.")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be in [0, 1), got {config.val_fraction!r} (0: no validation split)."
        )
    for field in ("max_train", "max_test"):
        cap = getattr(config, field)
        if cap is not None and (isinstance(cap, bool) or int(cap) != cap or cap < 1):
            raise ValueError(f"{field} must be a positive integer or None, got {cap!r}.")


def _cap_indices(n: int, cap: int | None, seed: int, stream: int) -> np.ndarray:
    """`[min(n, cap)]` indices: all of `range(n)`, or the first `cap` of a seeded permutation."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.random.default_rng([seed, stream]).permutation(n)[:cap]


def _split_validation(
    x: np.ndarray, y: np.ndarray, config: DataConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): a seeded `val_fraction` of the training rows as
    validation, the rest (in their order) for training."""
    n_val = round(config.val_fraction * len(y))
    if config.val_fraction > 0 and not 0 < n_val < len(y):
        raise ValueError(
            f"val_fraction={config.val_fraction} of {len(y)} training examples leaves "
            f"{n_val} for validation and {len(y) - n_val} for training; both need at least "
            "one. Change val_fraction (0 turns the validation split off) or max_train."
        )
    val = np.zeros(len(y), bool)
    val[np.random.default_rng([config.seed, 2]).permutation(len(y))[:n_val]] = True
    return x[~val], y[~val], x[val], y[val]


def _load_digits(config: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]  # [1797, 8, 8, 1], raw values 0..16
    y = bunch.target.astype(np.int32)
    num_classes = len(bunch.target_names)
    n_test = math.ceil(config.test_fraction * len(y))  # sklearn's rounding for a float size
    if min(n_test, len(y) - n_test) < num_classes:
        raise ValueError(
            f"test_fraction={config.test_fraction} leaves {n_test} of {len(y)} digits for the "
            f"test split; a stratified split needs at least {num_classes} images in each split."
        )
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=config.test_fraction, random_state=config.seed, stratify=y
    )
    train = _cap_indices(len(y_train), config.max_train, config.seed, 0)
    test = _cap_indices(len(y_test), config.max_test, config.seed, 1)
    x_train, y_train, x_test, y_test = x_train[train], y_train[train], x_test[test], y_test[test]
    x_train, y_train, x_val, y_val = _split_validation(x_train, y_train, config)
    if config.image_size is not None and config.image_size != x.shape[1]:
        x_train, x_val, x_test = (
            resize_images(a, config.image_size) for a in (x_train, x_val, x_test)
        )
    return Dataset(
        name="digits",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        image_shape=tuple(x_train.shape[1:]),
        class_names=tuple(str(c) for c in bunch.target_names),
        x_val=x_val,
        y_val=y_val,
    )


def _load_idx(config: DataConfig, files: dict[str, idx_files.IdxSplit]) -> Dataset:
    class_names = _IDX_CLASS_NAMES[config.name]
    arrays = []
    for split, cap, stream in (("train", config.max_train, 0), ("test", config.max_test, 1)):
        count, height, width = idx_files.check_split(files[split], num_classes=len(class_names))
        rows = _cap_indices(count, cap, config.seed, stream)
        images, labels = idx_files.read_split(files[split], num_classes=len(class_names), rows=rows)
        images = images[..., None]  # [n, H, W, 1] uint8
        if config.image_size is not None and config.image_size != height:
            images = np.stack([_resize_uint8(im, config.image_size) for im in images])
        x = images.astype(np.float32)
        x /= np.float32(255.0)  # as the TFDS path: correctly rounded v / 255
        arrays += [x, labels]
    x_train, y_train, x_val, y_val = _split_validation(arrays[0], arrays[1], config)
    return Dataset(
        name=config.name,
        x_train=x_train,
        y_train=y_train,
        x_test=arrays[2],
        y_test=arrays[3],
        num_classes=len(class_names),
        image_shape=tuple(x_train.shape[1:]),
        class_names=class_names,
        x_val=x_val,
        y_val=y_val,
    )


def _not_prepared_message(
    name: str, data_dir: str | None, looked_in: str, *, target: str | None = None
) -> str:
    where = f"data_dir={data_dir!r}" if data_dir else "TFDS's default data_dir"
    target = target or data_dir or "/path/to/tfds_data"
    return (
        f"TFDS dataset {name!r} is not prepared in {where} (looked in {looked_in}), and "
        "defuse-jax does not download datasets (generating most TFDS image datasets needs "
        "network access and TensorFlow, which is not installed here).\n"
        "To fix, either:\n"
        f"  1. point data_dir at a directory that already holds {name!r} prepared in the "
        f"array_record format (a folder {name}/<version>/ with dataset_info.json and "
        "*.array_record-* files), or\n"
        "  2. prepare it once on a machine with network access, then copy the directory here:\n"
        "       pip install tensorflow tensorflow-datasets\n"
        f'       python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, '
        f"data_dir={target!r}, file_format='array_record').download_and_prepare()\"\n"
        "     (file_format='array_record' matters: the default tfrecord files cannot be read "
        'without TensorFlow; with defuse-jax installed there, `python -c "from '
        f"defuse_jax.data import prepare_dataset; prepare_dataset({name!r}, "
        f'data_dir={target!r})"` does the same.)'
    )


def prepare_dataset(name: str, *, data_dir: str | None = None) -> str:
    """Download and prepare a TFDS dataset in the array_record format `load_dataset` reads.

    Needs network access and, for most image datasets, TensorFlow (e.g. in Colab); run it once,
    then `load_dataset` works offline from the same `data_dir`.

    Returns:
        The directory the dataset was prepared in.
    """
    if name not in _TFDS_SPECS:
        raise ValueError(
            f"{name!r} is not a TFDS dataset defuse-jax reads; use one of {list(_TFDS_SPECS)}."
        )
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def _open_sources(name: str, splits: Sequence[str], data_dir: str | None) -> tuple[Any, list[Any]]:
    """Returns (builder info, one random-access source per split); never downloads."""
    import tensorflow_datasets as tfds

    try:
        sources = [
            tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            for split in splits
        ]
    except Exception as exc:  # noqa: BLE001 (diagnosed below; re-raised if not understood)
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            # `from None`: tfds's own error here talks about file formats and confuses.
            raise DatasetNotFoundError(
                _not_prepared_message(name, data_dir, str(builder.data_dir))
            ) from None
        if isinstance(exc, NotImplementedError):  # prepared, but not in a random-access format
            fmt = builder.info.file_format
            fix = _not_prepared_message(
                name, data_dir, str(builder.data_dir), target="/path/to/new_tfds_data"
            )
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} is prepared at {builder.data_dir} in the "
                f"{getattr(fmt, 'value', fmt)} format, which cannot be read without TensorFlow. "
                + fix.split("\n", 1)[1]
            ) from exc
        raise
    return tfds.builder(name, data_dir=data_dir).info, sources


def _load_tfds(config: DataConfig, spec: _TfdsSpec) -> Dataset:
    info, (train_src, test_src) = _open_sources(
        config.name, ("train", spec.test_split), config.data_dir
    )
    size = config.image_size or spec.default_size
    native = tuple(info.features["image"].shape)  # (H, W, C); H, W are None if they vary
    if size is None and None in native[:2]:
        raise ValueError(f"{config.name} has variable image sizes; set image_size.")
    image_shape = (size, size, native[2]) if size is not None else native
    class_names = spec.class_names or tuple(info.features["label"].names)

    arrays = []
    for split, source, cap, stream in (
        ("train", train_src, config.max_train, 0),
        (spec.test_split, test_src, config.max_test, 1),
    ):
        indices = _cap_indices(len(source), cap, config.seed, stream)
        x, y = _read(source, indices, spec, size, image_shape, f"{config.name}[{split}]")
        if y.size and (y.min() < 0 or y.max() >= len(class_names)):
            raise ValueError(
                f"{config.name} split {split!r} has labels outside [0, {len(class_names)}) "
                f"(min {y.min()}, max {y.max()}); is the split unlabeled?"
            )
        arrays += [x, y]
    x_train, y_train, x_val, y_val = _split_validation(arrays[0], arrays[1], config)
    return Dataset(
        name=config.name,
        x_train=x_train,
        y_train=y_train,
        x_test=arrays[2],
        y_test=arrays[3],
        num_classes=len(class_names),
        image_shape=image_shape,
        class_names=class_names,
        x_val=x_val,
        y_val=y_val,
    )


def _read(
    source: Any,
    indices: np.ndarray,
    spec: _TfdsSpec,
    size: int | None,
    image_shape: tuple[int, int, int],
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Reads `indices` from a data source in batches -> (`[n, *image_shape]` float32, `[n]`)."""
    from tqdm.auto import tqdm

    # Read in increasing index order (sequential file access), write back in `indices` order.
    order = np.argsort(indices, kind="stable")
    images = np.empty((len(indices), *image_shape), np.uint8)  # float32 only at the end
    labels = np.empty((len(indices),), np.int32)
    for start in tqdm(range(0, len(indices), _READ_BATCH), desc=desc, leave=False, disable=None):
        rows = order[start : start + _READ_BATCH]
        examples = source.__getitems__([int(i) for i in indices[rows]])
        for row, example in zip(rows, examples, strict=True):
            image = np.asarray(example["image"])
            images[row] = _resize_uint8(image, size) if size is not None else image
            labels[row] = spec.label(example)
    x = images.astype(np.float32)
    x /= np.float32(255.0)  # correctly rounded v / 255, like the digits' v / 16
    return x, labels


def _center_square(image: np.ndarray) -> np.ndarray:
    """Central `[s, s, C]` crop, `s = min(H, W)`, of an `[H, W, C]` image."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


def _resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """`[H, W, C]` uint8 -> `[size, size, C]` uint8: centre square crop, antialiased resize."""
    from PIL import Image

    image = _center_square(image)
    if image.shape[:2] == (size, size):
        return image
    channels = image.shape[2]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    # Pillow's bilinear filter widens its support when downscaling, i.e. it is antialiased.
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return out.reshape(size, size, channels)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """`[n, H, W, C]` float32 in [0, 1] -> `[n, size, size, C]`, same filter as uint8 images."""
    from PIL import Image

    out = np.empty((len(images), size, size, images.shape[-1]), np.float32)
    for i, image in enumerate(images):
        image = _center_square(image)
        for c in range(image.shape[-1]):  # mode "F" images are single-channel
            pil = Image.fromarray(np.ascontiguousarray(image[..., c]))  # float32 -> mode "F"
            out[i, ..., c] = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0)
