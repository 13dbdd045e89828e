"""Writing files that survive a crash, and small readers.

Every file the library writes goes through :func:`atomic_write`: a kill or a power loss leaves
either the previous file or the complete new one at the path, never half a file that a rerun
could trust.

In a run over several processes (`defuse_jax.distributed`) only process 0 writes: every writer
here (`atomic_write`, `make_dirs`, `move`, `remove`, `copy_file`) is a no-op on the other
processes, and every process waits at a barrier before (no one still reads the old file) and
after (everyone sees the new one). All processes must therefore call the writers in the same
order, as they do when they run the same code.

Example:
    >>> with atomic_write("run/label/labels.csv", newline="") as f:
    ...     f.write("region_id,label\\n")
    >>> write_npz("run/search/errors.npz", z=codes)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, Literal

import numpy as np

from defuse_jax import distributed


@contextlib.contextmanager
def _process_zero(what: str) -> Iterator[bool]:
    """Yields whether this process writes (process 0, or the only one), between two barriers
    when there are several processes."""
    distributed.barrier(f"before {what}")
    yield distributed.is_main()
    distributed.barrier(f"after {what}")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: Literal["w", "wb"] = "w",
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open `path` for writing so that it appears complete or not at all.

    The data goes to a temporary file with a unique name in the same directory (concurrent
    writers never share one, and the rename stays on one file system). When the block ends
    without an exception the file is flushed and fsynced, renamed over `path`, and the directory
    is fsynced, so after a power loss the path holds the old or the whole new content: without
    the first fsync a file system may commit the rename before the data (an empty file), without
    the second the rename itself may be lost. On an exception the temporary file is removed and
    `path` is left as it was.

    Args:
        path: the file to (over)write; parent directories are created.
        mode: "w" (text) or "wb" (binary).
        encoding: text encoding (text mode only).
        newline: passed to `open` in text mode ("" for the csv module).

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    with _process_zero(f"writing {path}") as writes:
        if writes:
            with _atomic_write(path, mode, encoding=encoding, newline=newline) as f:
                yield f
        else:  # another process writes the file: this one's content goes nowhere
            yield io.BytesIO() if "b" in mode else io.StringIO()


@contextlib.contextmanager
def _atomic_write(path: str, mode: str, *, encoding: str, newline: str | None) -> Iterator[IO[Any]]:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 rather than tempfile.mkstemp: the finished file gets the permissions a
    # plain open() would give it (umask applied), not mkstemp's owner-only 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    text = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    try:
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable (a no-op where the OS cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames need no directory fsync
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network, FUSE) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def copy_tree(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the directory `src` to `dest` so that `dest` appears whole or not at all (a copy
    under `<dest>.partial`, then one rename; process 0 only). An existing `dest` is kept."""
    src, dest = os.fspath(src), os.fspath(dest)
    with _process_zero(f"copying {src}") as writes:
        if not writes or os.path.exists(dest) or not os.path.isdir(src):
            return
        tmp = f"{dest}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dest)
        _fsync_directory(os.path.dirname(os.path.abspath(dest)))


def make_dirs(path: str | os.PathLike) -> None:
    """`os.makedirs(path, exist_ok=True)` (process 0 only, see the module docstring)."""
    with _process_zero(f"creating {os.fspath(path)}") as writes:
        if writes:
            os.makedirs(path, exist_ok=True)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`shutil.move(src, dst)`, creating dst's parent (process 0 only)."""
    with _process_zero(f"moving {os.fspath(src)}") as writes:
        if writes:
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            shutil.move(src, dst)


def remove(path: str | os.PathLike) -> None:
    """`os.remove(path)` (process 0 only)."""
    with _process_zero(f"removing {os.fspath(path)}") as writes:
        if writes:
            os.remove(path)


def prune_dirs(parent: str | os.PathLike, *, keep: str) -> None:
    """Remove every folder in the cache folder `parent` but `keep` (process 0 lists and
    removes, between one pair of barriers; best effort, as befits a cache, never results)."""
    with _process_zero(f"pruning {os.fspath(parent)}") as writes:
        if writes and os.path.isdir(parent):
            for entry in os.scandir(parent):
                if entry.name != keep and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` atomically, with its permissions and times (process 0 only)."""
    with _process_zero(f"copying {os.fspath(src)}") as writes:
        if writes:
            with (
                open(src, "rb") as f,
                _atomic_write(os.fspath(dst), "wb", encoding="utf-8", newline=None) as out,
            ):
                shutil.copyfileobj(f, out)
            shutil.copystat(src, dst)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write `obj` as JSON (sorted keys; unknown types as strings) with :func:`atomic_write`."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=True, default=str)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez` with :func:`atomic_write` (read back with `np.load(..., allow_pickle=False)`)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 digest of a file's bytes (read in 1 MiB blocks: any size fits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_sha256(arrays: Iterable[Any], *, names: Sequence[str] | None = None) -> str:
    """Hex SHA-256 of arrays' bytes (C order), one after the other: the identity of data or
    weights. With `names` (one per array), each array's name, dtype and shape go before its
    bytes, so that a renamed, cast or reshaped array changes the digest too."""
    digest = hashlib.sha256()
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if names is not None:
            digest.update(f"{names[i]}|{a.dtype}|{a.shape}|".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def json_digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj` as canonical JSON (sorted keys; what JSON cannot
    hold, as text): the fingerprint of a configuration."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
