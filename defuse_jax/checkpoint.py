"""Orbax checkpoints behind one small class: periodic saves, keep-last-K, automatic resume.

A checkpoint directory belongs to one configuration: every checkpoint stores a JSON
`fingerprint` of the settings that determine its contents, and resuming with different settings
raises `CheckpointError` instead of silently mixing runs or starting afresh. A checkpoint that
cannot be read (corrupt, truncated, wrong shapes) also raises `CheckpointError` naming the
directory, so work is never thrown away without the user deciding to.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from."""


@contextlib.contextmanager
def quiet_restore() -> Iterator[None]:
    """Keeps Orbax's own reports of a failed restore off the terminal: its absl warnings and
    the "Exception ignored in <coroutine>" tracebacks of the reads it abandons (each about 60
    lines of TensorStore spec). The failure itself is raised as one CheckpointError.
    `DEFUSE_JAX_TRACEBACK=1` shows everything."""
    if os.environ.get("DEFUSE_JAX_TRACEBACK"):
        yield
        return
    absl_logger = logging.getLogger("absl")
    level, hook = absl_logger.level, sys.unraisablehook
    absl_logger.setLevel(logging.ERROR + 10)
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()  # the abandoned reads are finalised here, still under the quiet hook
        sys.unraisablehook = hook
        absl_logger.setLevel(level)


def error_line(e: Exception) -> str:
    """The error's type and first line, without the TensorStore spec Orbax appends."""
    text = str(e).split(" See full TensorStore")[0].strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _canonical(obj: Any) -> Any:
    # Round-trip through JSON so tuples/lists and int/float keys compare equal after a reload.
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class Checkpointer:
    """Saves and restores a training state pytree plus JSON metadata.

    Args:
        directory: where the checkpoints live (created if missing).
        fingerprint: JSON-able settings that must match for a resume to be valid; None to
            read checkpoints without checking (read-only loading of a finished model).
        save_every: save when `step % save_every == 0` (and always on `save(..., force=True)`).
        keep: how many of the most recent checkpoints to keep.

    Example:
        >>> ckpt = Checkpointer("/tmp/run/ckpt", fingerprint={"lr": 1e-3}, save_every=100)
        >>> restored = ckpt.restore_latest(init_state)  # None when the directory is empty
        >>> ckpt.save(step, state, meta={"history": []})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fingerprint: dict[str, Any] | None,
        save_every: int = 200,
        keep: int = 3,
    ):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = None if fingerprint is None else _canonical(fingerprint)
        self.save_every = int(save_every)
        # Synchronous saves: the train step donates its buffers, and a run killed mid-save must
        # leave only complete checkpoints behind (Orbax commits a step by an atomic rename).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - re-raised with the directory named
            raise CheckpointError(f"Cannot open checkpoint directory {self.directory}: {e}") from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restore the newest checkpoint shaped like `target`, or None if there is none.

        Args:
            target: a pytree with the structure, shapes and dtypes of the saved state (e.g. the
                freshly initialised state).

        Returns:
            (state, meta) or None.

        Raises:
            CheckpointError: the checkpoint is unreadable or was written by another config.
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        # Check the fingerprint first, so a config change is reported as such (not as a shape
        # mismatch deep inside Orbax).
        try:
            with quiet_restore():
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
            meta = dict(meta["meta"] or {})
        except Exception as e:  # noqa: BLE001 - any failure here means an unusable checkpoint
            raise self._unreadable(step, e) from e
        saved = meta.get("fingerprint")
        if self.fingerprint is not None and saved != self.fingerprint:
            diff = _describe_diff(saved or {}, self.fingerprint)
            raise CheckpointError(
                f"{self.directory} holds checkpoints of a different configuration ({diff}). "
                "Use a new output directory, or rerun with the original settings to resume."
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            with quiet_restore():
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, e) from e
        return restored["state"], meta

    def _unreadable(self, step: int, e: Exception) -> CheckpointError:
        return CheckpointError(
            f"The checkpoint at step {step} in {self.directory} cannot be restored "
            f"({error_line(e)}). It is corrupt or was written by an "
            "incompatible model. Nothing was overwritten: move the directory away (or pass "
            "a new output directory) to start fresh, or fix the configuration to match it."
        )

    def save(
        self, step: int, state: Any, *, meta: dict[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Save if `step` is on the schedule (or `force`); returns whether it saved."""
        if self.fingerprint is None:
            raise CheckpointError(f"{self.directory} was opened read-only (no fingerprint).")
        if not force and step % self.save_every != 0:
            return False
        if self._manager.latest_step() == step:
            return False
        meta = {**(meta or {}), "fingerprint": self.fingerprint, "step": int(step)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_canonical(meta))
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def close(self) -> None:
        self._manager.close()


def _describe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [
        f"{k}: saved {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    ]
    return "; ".join(diffs[:5]) or "unknown difference"
