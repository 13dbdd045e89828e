"""MNIST-format IDX files: find them in a folder, check them, read them as numpy arrays.

MNIST, Fashion-MNIST, KMNIST and EMNIST ship as four IDX files (images and labels of the train
and test splits), gzipped or not. This module finds them under the names the original sites,
Debian's `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`), torchvision
(`<dir>/<Name>/raw/`) and Kaggle (`train-images.idx3-ubyte`) use, and reads them without
TensorFlow or the network.

The IDX format: a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 size per dimension, then the values in row-major order. Images are
`[n, rows, cols]` unsigned bytes, labels `[n]` unsigned bytes.

Example:
    >>> files = find_idx_files("/usr/share/datasets/fashion-mnist")
    >>> x, y = read_split(files["train"])  # [60000, 28, 28] uint8, [60000] uint8
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

__all__ = ["IdxError", "IdxSplit", "check_split", "find_idx_files", "read_split"]

_UBYTE = 0x08
# Split -> the file-name stems of its images and labels ("t10k" is MNIST's name for test).
_STEMS = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
_SUFFIXES = ("-idx{d}-ubyte", ".idx{d}-ubyte")  # the original / Kaggle spellings


class IdxError(ValueError):
    """An IDX file that is missing, truncated or not what its split needs."""


@dataclasses.dataclass(frozen=True)
class IdxSplit:
    """The two files of one split."""

    images: str
    labels: str


def _find_one(folder: str, stem: str, dims: int) -> str | None:
    for suffix in _SUFFIXES:
        base = os.path.join(folder, stem + suffix.format(d=dims))
        for path in (base, base + ".gz"):
            if os.path.isfile(path):
                return path
    return None


def _candidate_folders(data_dir: str, name: str) -> list[str]:
    """`data_dir` itself, then where torchvision leaves its downloads."""
    torch_names = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
    folders = [data_dir, os.path.join(data_dir, "raw")]
    if name in torch_names:
        folders.append(os.path.join(data_dir, torch_names[name], "raw"))
    return folders


def find_idx_files(data_dir: str, name: str = "") -> dict[str, IdxSplit] | None:
    """The train and test IDX files under `data_dir`, or None when it holds none of them.

    Args:
        data_dir: a folder with the four files (or torchvision's `<Name>/raw/` below it).
        name: the dataset's name ("mnist", "fashion_mnist"), for torchvision's folder name.

    Raises:
        IdxError: some of the four files are there and others are missing.
    """
    data_dir = os.path.expanduser(data_dir)
    for folder in _candidate_folders(data_dir, name):
        found = {
            (split, kind): _find_one(folder, stem, 3 if kind == "images" else 1)
            for split, stems in _STEMS.items()
            for kind, stem in zip(("images", "labels"), stems, strict=True)
        }
        present = [k for k, v in found.items() if v]
        if not present:
            continue
        missing = [f"{split} {kind}" for (split, kind), v in found.items() if v is None]
        if missing:
            raise IdxError(
                f"{folder} holds IDX files but not the {', '.join(missing)}: it needs "
                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                "t10k-labels-idx1-ubyte (each may end in .gz)."
            )
        return {split: IdxSplit(found[split, "images"], found[split, "labels"]) for split in _STEMS}
    return None


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _header(f, path: str, dims: int) -> tuple[int, ...]:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] != _UBYTE or magic[3] != dims:
        raise IdxError(
            f"{path} is not an IDX file of unsigned bytes with {dims} dimension(s) "
            f"(magic number {magic.hex() or 'missing'}, expected 0000080{dims}). "
            "Is it the right file, or a download error page?"
        )
    raw = f.read(4 * dims)
    if len(raw) < 4 * dims:
        raise IdxError(f"{path} is truncated inside its header.")
    return struct.unpack(f">{dims}I", raw)


def _read(
    path: str, dims: int, *, header_only: bool = False
) -> tuple[tuple[int, ...], np.ndarray | None]:
    """(shape, values) of one IDX file; values None with `header_only`."""
    try:
        with _open(path) as f:
            shape = _header(f, path, dims)
            if header_only:
                return shape, None
            expected = int(np.prod(shape))
            data = f.read(expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IdxError(f"{path} cannot be read ({type(e).__name__}: {e}).") from None
    dims_text = "x".join(map(str, shape))
    if len(data) < expected:
        raise IdxError(
            f"{path} is truncated: its header says {dims_text} = {expected:,} values, the file "
            f"holds {len(data):,}. Download it again."
        )
    if len(data) > expected:
        raise IdxError(
            f"{path} holds more than the {dims_text} = {expected:,} values its header says. "
            "Download it again."
        )
    return shape, np.frombuffer(data, np.uint8).reshape(shape)


def _check_labels(labels: np.ndarray, path: str, num_classes: int) -> None:
    if labels.size and labels.max() >= num_classes:
        bad = np.unique(labels[labels >= num_classes])
        raise IdxError(
            f"{path} has labels outside [0, {num_classes}): {bad[:5].tolist()}. Is it a "
            "dataset with more classes (EMNIST letters, say) under another name?"
        )


def check_split(split: IdxSplit, *, num_classes: int) -> tuple[int, int, int]:
    """Check one split's files without reading its images: headers, sizes and labels.

    Returns:
        (count, rows, cols).

    Raises:
        IdxError: a wrong magic number, a truncated or overlong file, image and label counts
            that differ, or labels out of range.
    """
    shape, _ = _read(split.images, 3, header_only=True)
    _expect_size(split.images, shape)
    (count,), labels = _read(split.labels, 1)
    if count != shape[0]:
        raise IdxError(
            f"{split.images} holds {shape[0]:,} images but {split.labels} {count:,} labels; "
            "the two files must come from the same split."
        )
    _check_labels(labels, split.labels, num_classes)
    return shape


def _expect_size(path: str, shape: tuple[int, ...]) -> None:
    """A cheap size check: exact for plain files; gzip's trailer holds the size mod 2^32."""
    expected = 4 + 4 * len(shape) + int(np.prod(shape))
    if path.endswith(".gz"):
        try:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                actual = struct.unpack("<I", f.read(4))[0]
        except OSError as e:
            raise IdxError(f"{path} cannot be read ({e}).") from None
        if actual == expected % 2**32:
            return
        # A truncated gzip stream has no trailer: read it through to say so clearly.
        _read(path, len(shape))
        raise IdxError(f"{path} is damaged: its gzip trailer does not match its contents.")
    actual = os.path.getsize(path)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise IdxError(
            f"{path} is {what}: {actual:,} bytes where its header needs {expected:,}. "
            "Download it again."
        )


def read_split(
    split: IdxSplit, *, num_classes: int = 10, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one split: (`[n, H, W]` uint8 images, `[n]` int32 labels), `rows` of them if given.

    Raises:
        IdxError: as `check_split`.
    """
    (count,), labels = _read(split.labels, 1)
    _check_labels(labels, split.labels, num_classes)
    shape, images = _read(split.images, 3)
    if count != shape[0]:
        raise IdxError(
            f"{split.images} holds {shape[0]:,} images but {split.labels} {count:,} labels; "
            "the two files must come from the same split."
        )
    if rows is not None:
        images, labels = images[rows], labels[rows]
    return images, labels.astype(np.int32)
