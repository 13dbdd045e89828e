"""MNIST-format IDX files: found under every usual name, read like TFDS data, and every kind of
bad file is one clear error before the run directory changes. Tiny files the tests write."""

import gzip
import os
import struct

import numpy as np
import pytest

from defuse_jax import cli, data, idx_files

N_TRAIN, N_TEST, SIDE = 40, 12, 8


def _write(path, array, *, gz, magic=None):
    header = magic or bytes([0, 0, 0x08, array.ndim])
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train": (rng.integers(0, 256, (N_TRAIN, SIDE, SIDE), dtype=np.uint8),
                  rng.integers(0, 10, N_TRAIN, dtype=np.uint8)),
        "t10k": (rng.integers(0, 256, (N_TEST, SIDE, SIDE), dtype=np.uint8),
                 rng.integers(0, 10, N_TEST, dtype=np.uint8)),
    }  # fmt: skip


def write_dataset(folder, *, gz=True, sep="-", arrays=None):
    """The four files of an MNIST-format dataset in `folder` (sep "." is Kaggle's spelling)."""
    os.makedirs(folder, exist_ok=True)
    arrays = arrays or _arrays()
    suffix = ".gz" if gz else ""
    for split, (images, labels) in arrays.items():
        _write(os.path.join(folder, f"{split}-images{sep}idx3-ubyte{suffix}"), images, gz=gz)
        _write(os.path.join(folder, f"{split}-labels{sep}idx1-ubyte{suffix}"), labels, gz=gz)
    return arrays


@pytest.mark.parametrize(
    "layout, gz, sep",
    [("", True, "-"), ("", False, "-"), ("", False, "."), ("FashionMNIST/raw", True, "-")],
)
def test_found_under_every_usual_name_and_read_as_floats(tmp_path, layout, gz, sep):
    arrays = write_dataset(tmp_path / layout, gz=gz, sep=sep)
    config = data.DataConfig("fashion_mnist", data_dir=str(tmp_path), val_fraction=0.25)
    ds = data.load_dataset(config)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.image_shape == (SIDE, SIDE, 1) and ds.x_train.dtype == np.float32
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (30, 10, N_TEST)
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["t10k"][0] / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
    # Training and validation rows together are the file's rows, each with its own label.
    x = np.concatenate([ds.x_train, ds.x_val])[..., 0]
    y = np.concatenate([ds.y_train, ds.y_val])
    rows = dict(zip((im.tobytes() for im in arrays["train"][0]), arrays["train"][1], strict=True))
    assert sorted(rows) == sorted((xi * 255).round().astype(np.uint8).tobytes() for xi in x)
    for xi, yi in zip(x, y, strict=True):
        assert rows[(xi * 255).round().astype(np.uint8).tobytes()] == yi


def test_caps_take_a_seeded_subset_and_resize(tmp_path):
    write_dataset(tmp_path)
    config = data.DataConfig("mnist", data_dir=str(tmp_path), max_train=20, max_test=5,
                             val_fraction=0.0, image_size=12, seed=3)  # fmt: skip
    a, b = data.load_dataset(config), data.load_dataset(config)
    assert a.x_train.shape == (20, 12, 12, 1) and a.x_test.shape == (5, 12, 12, 1)
    assert a.class_names == tuple("0123456789")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    other = data.load_dataset(data.DataConfig("mnist", data_dir=str(tmp_path), max_train=20,
                                              val_fraction=0.0, image_size=12, seed=4))  # fmt: skip
    assert not np.array_equal(a.y_train, other.y_train)


def _damage(tmp_path, kind):
    """A dataset folder with one kind of damage; returns the file the error must name."""
    arrays = _arrays()
    if kind == "labels out of range":
        arrays["train"] = (arrays["train"][0], np.full(N_TRAIN, 12, np.uint8))
    if kind == "counts differ":
        arrays["t10k"] = (arrays["t10k"][0], arrays["t10k"][1][:-1])
    write_dataset(tmp_path, gz=kind != "truncated plain", arrays=arrays)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    if kind == "wrong magic":
        _write(images, arrays["train"][0], gz=True, magic=b"\x00\x00\x08\x01")
    elif kind == "truncated gzip":
        raw = images.read_bytes()
        images.write_bytes(raw[: len(raw) // 2])
    elif kind == "truncated plain":
        plain = tmp_path / "train-images-idx3-ubyte"
        plain.write_bytes(plain.read_bytes()[:-7])
        return str(plain)
    elif kind == "missing file":
        os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
        return "test labels"
    elif kind == "labels out of range":
        return "train-labels-idx1-ubyte.gz"
    elif kind == "counts differ":
        return "t10k-labels-idx1-ubyte.gz"
    return str(images)


DAMAGE = {
    "wrong magic": "magic number 00000801",
    "truncated gzip": "cannot be read",
    "truncated plain": "is truncated",
    "missing file": "not the test labels",
    "labels out of range": "labels outside [0, 10): [12]",
    "counts differ": "12 images but",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_bad_file_is_one_clear_error_before_the_run_directory_changes(kind, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    named = _damage(folder, kind)
    with pytest.raises(idx_files.IdxError) as e:
        data.check_available(data.DataConfig("fashion_mnist", data_dir=str(folder)))
    assert named in str(e.value) and DAMAGE[kind] in str(e.value)
    run = tmp_path / "run"
    argv = ["run", "--dataset", "fashion_mnist", "--data-dir", str(folder), "--out", str(run)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[0]  # the error; the next line is the DEFUSE_JAX_TRACEBACK hint
    assert named in line and DAMAGE[kind] in line and "Traceback" not in err
    assert not run.exists()


def test_no_idx_files_falls_back_to_tfds(tmp_path):
    assert idx_files.find_idx_files(str(tmp_path), "mnist") is None
    with pytest.raises(data.DatasetNotFoundError, match="not prepared"):
        data.check_available(data.DataConfig("mnist", data_dir=str(tmp_path)))
