"""files.atomic_write: whole files or none, unique temporary names, durable renames."""

import os
import stat

import numpy as np
import pytest

from defuse_jax import files


def _names(directory):
    return sorted(os.listdir(directory))


def test_writes_text_and_binary_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "a.csv"  # parent created
    with files.atomic_write(path, newline="") as f:
        f.write("x,y\r\n1,é\n")
    assert path.read_bytes() == "x,y\r\n1,é\n".encode()  # utf-8, newlines untranslated
    with files.atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _names(path.parent) == ["a.csv"]


def test_an_error_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as f:
            f.write("half of the new con")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert _names(tmp_path) == ["report.json"]


def test_concurrent_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    # With one fixed temporary name the inner writer would truncate and steal the outer's file.
    path = tmp_path / "summary.json"
    with files.atomic_write(path) as outer:
        outer.write("outer")
        with files.atomic_write(path) as inner:
            inner.write("inner")
        assert path.read_text() == "inner"
    assert path.read_text() == "outer"
    assert _names(tmp_path) == ["summary.json"]


def test_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    path = tmp_path / "errors.npz"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(kind)
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_npz(path, z=np.arange(3))
    assert events == ["file", "rename", "dir"]


def test_permissions_follow_the_umask_like_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    path = tmp_path / "atomic"
    files.write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_npz_and_json_round_trip(tmp_path):
    arrays = {"z": np.ones((2, 3), np.float32), "label": np.array([1, 2], np.int32)}
    files.write_npz(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert set(z.files) == set(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(z[k], v)
            assert z[k].dtype == v.dtype
    files.write_json(tmp_path / "a.json", {"b": [1, 2], "a": None})
    assert files.read_json(tmp_path / "a.json") == {"a": None, "b": [1, 2]}


def test_rejects_modes_that_do_not_write_a_whole_file(tmp_path):
    with pytest.raises(ValueError, match="whole files"):
        with files.atomic_write(tmp_path / "a", "a"):
            pass


def test_copy_tree_appears_whole_and_keeps_an_existing_copy(tmp_path):
    src = tmp_path / "src"
    (src / "ckpt" / "3").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "ckpt" / "3" / "w").write_bytes(b"1234")
    dest = tmp_path / "out" / "copy"
    dest.parent.mkdir()
    files.copy_tree(src, dest)
    assert (dest / "ckpt" / "3" / "w").read_bytes() == b"1234"
    assert sorted(os.listdir(dest.parent)) == ["copy"]  # no .partial left behind
    (src / "config.json").write_text('{"changed": 1}')
    files.copy_tree(src, dest)  # an existing copy is kept as it is
    assert (dest / "config.json").read_text() == "{}"
