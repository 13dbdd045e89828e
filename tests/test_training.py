"""Training: resume reproduces the uninterrupted run (also after SIGKILL); clear errors."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from defuse_jax import cli, data, train_models
from defuse_jax.checkpoint import CheckpointError
from defuse_jax.models import ClassifierConfig
from defuse_jax.training import TrainConfig

SMALL = ClassifierConfig(kind="mlp", hidden=32)
FAST = TrainConfig(epochs=2, batch_size=32, learning_rate=3e-3, checkpoint_every=10)


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset(data.DataConfig(max_train=512, max_test=128))


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params.state)]


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_classifier_learns_and_resume_matches_uninterrupted(digits, tmp_path):
    full = train_models.train_classifier(
        digits,
        out_dir=str(tmp_path / "full"),
        config=SMALL,
        train=dataclasses.replace(FAST, epochs=4),
    )
    assert full.metrics["accuracy"] > 0.6  # 4 epochs on 256 digits, far above chance (0.1)
    assert len(full.history) == 4 and "test_accuracy" in full.history[-1]
    # Stop after 2 epochs, then resume to 4 in the same directory.
    part = str(tmp_path / "part")
    train_models.train_classifier(digits, out_dir=part, config=SMALL, train=FAST)
    resumed = train_models.train_classifier(
        digits, out_dir=part, config=SMALL, train=dataclasses.replace(FAST, epochs=4)
    )
    _assert_same(full.params, resumed.params)
    assert len(resumed.history) == 4
    # A finished run reloads without training and gives the same weights.
    reloaded, cfg = train_models.load_trained(part)
    assert cfg == SMALL
    _assert_same(full.params, reloaded)


def test_same_seed_same_result_other_seed_differs(digits, tmp_path):
    a = train_models.train_classifier(digits, out_dir=str(tmp_path / "a"), config=SMALL, train=FAST)
    b = train_models.train_classifier(digits, out_dir=str(tmp_path / "b"), config=SMALL, train=FAST)
    c = train_models.train_classifier(
        digits, out_dir=str(tmp_path / "c"), config=SMALL, train=dataclasses.replace(FAST, seed=1)
    )
    _assert_same(a.params, b.params)
    assert not np.array_equal(_leaves(a.params)[0], _leaves(c.params)[0])


def test_vae_trains_and_writes_reconstructions(digits, tmp_path):
    out = str(tmp_path / "vae")
    vae = train_models.train_vae(digits, out_dir=out, train=dataclasses.replace(FAST, epochs=3))
    first, last = vae.history[0], vae.history[-1]
    assert last["recon"] < first["recon"]
    assert os.path.getsize(os.path.join(out, "reconstructions.png")) > 1000
    assert os.path.exists(os.path.join(out, "config.json"))


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_deleted(digits, tmp_path):
    out = tmp_path / "clf"
    train_models.train_classifier(digits, out_dir=str(out), config=SMALL, train=FAST)
    ckpt = out / "ckpt"
    latest = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    for root, _, files in os.walk(ckpt / str(latest)):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"not a checkpoint")
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(CheckpointError, match=str(ckpt)):
        train_models.train_classifier(digits, out_dir=str(out), config=SMALL, train=FAST)
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_changed_config_refuses_to_resume(digits, tmp_path):
    out = str(tmp_path / "clf")
    train_models.train_classifier(digits, out_dir=out, config=SMALL, train=FAST)
    with pytest.raises(CheckpointError, match="different configuration.*hidden"):
        train_models.train_classifier(
            digits, out_dir=out, config=ClassifierConfig(kind="mlp", hidden=64), train=FAST
        )


@pytest.mark.parametrize(
    "y,match",
    [(np.array([0, 1, 10]), r"\[0, 10\).*\[10\]"), (np.array([0.0, 1.0, 2.0]), "integer")],
)
def test_labels_out_of_range(y, match):
    with pytest.raises((ValueError, TypeError), match=match):
        train_models.check_labels(y, 10, what="Training labels")


def _cli(out, *extra):
    return [
        "train-classifier", "--out", str(out),
        "--max-train", "512", "--max-test", "64", "--clf-kind", "mlp", "--clf-hidden", "32",
        "--clf-batch-size", "32", "--clf-checkpoint-every", "40", "--no-progress", *extra,
    ]  # fmt: skip


def test_sigkill_then_restart_matches_uninterrupted_run(tmp_path):
    epochs = ["--clf-epochs", "30"]  # 480 steps: long enough to be killed mid-way
    assert cli.main(_cli(tmp_path / "ref", *epochs)) == 0
    ckpt = tmp_path / "killed" / "train" / "classifier" / "ckpt"
    cmd = [sys.executable, "-m", "defuse_jax.cli", *_cli(tmp_path / "killed", *epochs)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= 80:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in ckpt.glob("*") if p.name.isdigit())
    assert killed_at < 480
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    a, _ = train_models.load_trained(str(tmp_path / "ref" / "train" / "classifier"))
    b, _ = train_models.load_trained(str(tmp_path / "killed" / "train" / "classifier"))
    _assert_same(a, b)
