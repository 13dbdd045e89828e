"""One process of a 2-process run of the whole pipeline (tests/test_multihost_pipeline.py starts
two of these, each with 2 forced CPU devices, talking over gloo).

Usage: python multihost_pipeline_worker.py PORT PROCESS_ID RUN_DIR WRITES_JSON
(each process may be given its own RUN_DIR, to test a directory that is not shared)

Besides running `pipeline.run(RUN_DIR, MICRO)`, it records, with a Python audit hook, every file
this process opens for writing, renames or removes under RUN_DIR (WRITES_JSON, rewritten as they
happen, since the process may be killed), and prints "restored <dir> at step N" when training
resumes from a checkpoint.
"""

import dataclasses
import json
import os
import sys

from defuse_jax.correction import CorrectConfig
from defuse_jax.data import DataConfig
from defuse_jax.models import VAEConfig
from defuse_jax.regions import DistillConfig
from defuse_jax.run_config import DEFAULT_SEARCH, RunConfig
from defuse_jax.training import TrainConfig

# Small enough for two processes on two shared cores; batch sizes split over 4 devices. The
# classifier checkpoints every 8 of its 32 steps, so that a kill mid-training leaves one to resume
# from; the rest save only at the end (a multi-host save costs about a second here). Gradients
# are summed in a fixed order over 4 shards (`fixed_order_grads`), so that 2 x 2 devices train
# what 1 x 4 do, to the bit.
_TRAIN = dict(batch_size=32, learning_rate=2e-3, reduction_shards=4)
MICRO = RunConfig(
    data=DataConfig(max_train=256, max_test=96),
    # The unconditional VAE: what is checked here (the same bits on every topology, failures)
    # does not depend on it, and the default's pilot and per-class mixtures cost ~30 s here.
    vae=VAEConfig(kind="mlp"),
    vae_train=TrainConfig(epochs=6, **_TRAIN),
    classifier_train=TrainConfig(epochs=4, checkpoint_every=8, **_TRAIN),
    max_sources=48,
    search=dataclasses.replace(DEFAULT_SEARCH, num_samples=32, chunk_size=512),
    distill=DistillConfig(n_components=4, max_iter=60, min_codes=3, error_samples=16),
    grid_samples=4,
    correct=CorrectConfig(
        epochs=1,
        batch_size=32,
        lams=(0.003, 0.01),
        select_samples=64,
        reduction_shards=4,
    ),  # fmt: skip
    oracle_members=1,
    progress=False,
)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _record_writes(run_dir: str, out: str) -> None:
    root = os.path.abspath(run_dir) + os.sep
    seen: list[list[str]] = []

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
            )
            paths = [path] if writing else []
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.move"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for p in paths:
            p = os.path.abspath(os.fsdecode(p)) if not isinstance(p, int) else ""
            if p.startswith(root) or p == root[:-1]:
                seen.append([event, os.path.relpath(p, root)])
                with open(out, "w") as f:  # outside the run directory: not recorded
                    json.dump(seen, f)

    sys.addaudithook(hook)


def main(port: str, process_id: str, run_dir: str, writes: str) -> None:
    from defuse_jax import distributed

    distributed.initialize(
        coordinator=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(process_id),
        timeout_s=60,
        heartbeat_timeout_s=10,
    )
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")  # as tests/conftest.py
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    from defuse_jax import checkpoint, pipeline

    restore = checkpoint.Checkpointer.restore_latest

    def restore_latest(self, target):
        out = restore(self, target)
        if out is not None and self.fingerprint is not None:
            print(f"restored {os.path.relpath(self.directory, run_dir)} at step "
                  f"{self.latest_step()}", flush=True)  # fmt: skip
        return out

    checkpoint.Checkpointer.restore_latest = restore_latest
    _record_writes(run_dir, writes)
    try:
        pipeline.run(run_dir, MICRO, log=lambda s: print(s, flush=True))
    except distributed.DistributedError as e:
        print(f"DistributedError: {e}", flush=True)
        sys.exit(3)
    print("pipeline finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
