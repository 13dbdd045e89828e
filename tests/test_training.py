"""Training: resume reproduces the uninterrupted run (also after SIGKILL); clear errors."""

import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from defuse_jax import cli, data, fixed_order_grads, losses, train_models, training
from defuse_jax.checkpoint import CheckpointError
from defuse_jax.models import VAE, Classifier, ClassifierConfig, Params, VAEConfig, params_of
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


def _overwrite_every_file(step_dir):
    for root, _, files in os.walk(step_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"not a checkpoint")


def _zero_the_largest_file(step_dir):
    """64 zero bytes over the start of the largest file: the metadata reads, the arrays do not."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    with open(max(files, key=os.path.getsize), "r+b") as fh:
        fh.write(bytes(64))


@pytest.mark.parametrize("damage", [_overwrite_every_file, _zero_the_largest_file])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_deleted(
    digits, tmp_path, capfd, damage
):
    out, config = tmp_path / "clf", SMALL
    train_models.train_classifier(digits, out_dir=str(out), config=config, train=FAST)
    ckpt = out / "ckpt"
    latest = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    damage(ckpt / str(latest))
    before = sorted(p.name for p in ckpt.iterdir())
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=str(ckpt)) as err:
        train_models.train_classifier(digits, out_dir=str(out), config=config, train=FAST)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    # One message, no TensorStore spec; Orbax's own warnings and tracebacks stay off the terminal.
    assert len(str(err.value).splitlines()) == 1 and "TensorStore" not in str(err.value)
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err and "absl" not in printed.err, printed.err[-2000:]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_restore_keeps_orbax_reports_off_the_terminal(monkeypatch, verbose):
    """What Orbax reports when a restore fails (absl warnings; the tracebacks of the reads it
    abandons, which Python reports as unraisable) is hidden, unless DEFUSE_JAX_TRACEBACK=1."""
    import logging
    import sys

    import absl.logging

    from defuse_jax import checkpoint

    if verbose:
        monkeypatch.setenv("DEFUSE_JAX_TRACEBACK", "1")
    else:
        monkeypatch.delenv("DEFUSE_JAX_TRACEBACK", raising=False)
    shown = []  # what would reach the terminal
    monkeypatch.setattr(sys, "unraisablehook", lambda u: shown.append(str(u.exc_value)))

    class Record(logging.Handler):
        def emit(self, record):
            shown.append(record.getMessage())

    handler = Record(level=logging.WARNING)
    logging.getLogger("absl").addHandler(handler)

    class Abandoned:
        def __del__(self):
            raise RuntimeError("abandoned read")

    try:
        with checkpoint.quiet_restore():
            absl.logging.warning("Item 'state' could not be restored")
            Abandoned()
    finally:
        logging.getLogger("absl").removeHandler(handler)
    assert shown == (["Item 'state' could not be restored", "abandoned read"] if verbose else [])


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


def _reference_fit(params, loss_fn, train_data, config, *, epoch_steps=None):
    """`fit`'s documented order as a plain loop of the jitted step, one call per step: epoch e's
    batches from permutation(fold_in(data_key, e)) (its first `epoch_steps`), the step noise
    from the step key."""
    n = len(train_data["x"])
    optimizer = training.make_optimizer(config)
    step = jax.jit(training._step_fn(loss_fn, params.graphdef, optimizer))
    state = training.TrainState(
        jnp.zeros((), jnp.int32), params.state, optimizer.init(params.state)
    )
    root = jax.random.key(config.seed)
    data_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    for epoch in range(config.epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n))
        for pos in range(min(n // config.batch_size, epoch_steps or n)):
            rows = order[pos * config.batch_size : (pos + 1) * config.batch_size]
            state, _ = step(state, {k: v[rows] for k, v in train_data.items()}, step_key)
    return state.params


@pytest.mark.parametrize("fed", [False, True])
def test_every_loop_form_gives_the_reference_loops_weights(fed, tmp_path, monkeypatch):
    """Each loop form `fit` can run (the backend's default among them) trains the weights a plain
    loop of the jitted step trains: "steps" bit for bit on one device (batch 30 does not split
    over the 4 forced devices), the scan (XLA fuses a loop body its own way) and the batch
    sharded over the 4 devices (batch 32) to float32 rounding. `fed`: the several-process path
    (each process hands in its rows of every batch), run here by one process with 4 devices.
    (A conv model's scanned step is checked in tests/test_conv_layers.py.)"""
    assert training.default_loop() in training.LOOP_FORMS
    monkeypatch.setattr(training.distributed, "is_distributed", lambda: fed)
    config = ClassifierConfig(kind="mlp", hidden=16)
    model = Classifier(config, image_shape=(8, 8, 1), num_classes=3, rngs=nnx.Rngs(0))
    params = params_of(model)
    rng = np.random.default_rng(0)
    train_data = {
        "x": rng.random((100, 8, 8, 1), dtype=np.float32),
        "y": rng.integers(0, 3, 100).astype(np.int32),
    }
    # The fed path shards every batch over all devices: only batch 32 splits.
    for batch_size, exact in ((32, False),) if fed else ((30, True), (32, False)):
        # Segments end at checkpoints (every 2 steps) and epochs (3 steps): 2, 1, 1, 2 steps.
        train = TrainConfig(epochs=2, batch_size=batch_size, checkpoint_every=2, keep_checkpoints=1)
        want = jax.tree.leaves(_reference_fit(params, losses.classifier_loss, train_data, train))
        for loop in training.LOOP_FORMS:
            got, history = training.fit(
                params, losses.classifier_loss, train_data, config=train, progress=False,
                checkpoint_dir=str(tmp_path / f"{loop}{batch_size}"), fingerprint={}, loop=loop,
            )  # fmt: skip
            assert len(history) == 2
            for g, w in zip(jax.tree.leaves(got.state), want, strict=True):
                if exact and loop == "steps":
                    np.testing.assert_array_equal(g, w, err_msg=loop)
                else:
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=loop)


@pytest.mark.parametrize("loop", training.LOOP_FORMS)
def test_fits_of_one_model_and_loss_share_one_compiled_program(tmp_path, loop):
    """An ensemble's members (other seeds) and the correction's weights (other data) compile
    their steps once; another learning rate is another program."""
    traces = []

    def loss(params, batch, key, step):  # a Python side effect: runs once per trace
        traces.append(1)
        return losses.classifier_loss(params, batch, key, step)

    rng = np.random.default_rng(0)
    train_data = {"x": rng.random((64, 8, 8, 1), dtype=np.float32),
                  "y": rng.integers(0, 3, 64).astype(np.int32)}  # fmt: skip
    config = ClassifierConfig(kind="mlp", hidden=16)
    runs = [(0, 1e-3), (1, 1e-3), (2, 1e-3), (0, 3e-3)]  # (seed, learning rate)
    for i, (seed, lr) in enumerate(runs):
        model = Classifier(config, image_shape=(8, 8, 1), num_classes=3, rngs=nnx.Rngs(seed))
        train = TrainConfig(epochs=1, batch_size=32, learning_rate=lr, seed=seed)
        training.fit(
            params_of(model), loss, train_data, config=train, progress=False,
            checkpoint_dir=str(tmp_path / str(i)), fingerprint={}, loop=loop,
        )  # fmt: skip
        if i == 2:
            assert len(traces) == 1  # three seeds, one program (before: one per fit)
    assert len(traces) == 2  # the other learning rate


def test_a_fit_from_committed_weights_compiles_its_segment_once(tmp_path):
    """Weights on a device (restored, or the correction's classifier) beside a fresh optimizer
    state: the first segment runs the program every later one runs (it compiled two)."""
    loss = functools.partial(losses.classifier_loss)  # its own entry among the segments
    model = Classifier(ClassifierConfig(kind="mlp", hidden=16), image_shape=(8, 8, 1),
                       num_classes=3, rngs=nnx.Rngs(0))  # fmt: skip
    params = params_of(model)
    params = Params(params.graphdef, jax.device_put(params.state, jax.devices()[0]))
    rng = np.random.default_rng(0)
    train_data = {"x": rng.random((64, 8, 8, 1), dtype=np.float32),
                  "y": rng.integers(0, 3, 64).astype(np.int32)}  # fmt: skip
    training.fit(
        params, loss, train_data, config=TrainConfig(epochs=3, batch_size=30), progress=False,
        checkpoint_dir=str(tmp_path / "ckpt"), fingerprint={}, loop="scan",
    )  # fmt: skip
    (segment,) = [run for key, run in training._SEGMENTS.items() if key[1] is loss]
    assert segment._cache_size() == 1


def _fit_vae(digits, tmp_path, name, train, *, loop="scan"):
    vae = VAE(VAEConfig(kind="mlp", latent_dim=4, hidden=32), image_shape=(8, 8, 1),
              rngs=nnx.Rngs(0))  # fmt: skip
    got, _ = training.fit(
        params_of(vae), losses.vae_loss, {"x": digits.x_train}, config=train, progress=False,
        checkpoint_dir=str(tmp_path / name), fingerprint={}, loop=loop,
    )  # fmt: skip
    return _leaves(got)


def test_fixed_order_sums_train_the_same_bits_on_every_device_count(digits, tmp_path, monkeypatch):
    """`reduction_shards`: the VAE (its noise drawn per shard) trained on the 4 forced devices,
    through the several-process path (`fed`, each process handing in its rows) and on one
    device is the same to the bit. The default reduction on 1 and 4 devices differs by float32
    rounding after these 16 steps (checked, as the premise)."""
    train = TrainConfig(epochs=1, batch_size=32, checkpoint_every=16, reduction_shards=4)
    default = dataclasses.replace(train, reduction_shards=0)
    four = _fit_vae(digits, tmp_path, "four", train)
    four_default = _fit_vae(digits, tmp_path, "four_default", default)
    with monkeypatch.context() as m:
        m.setattr(training.distributed, "is_distributed", lambda: True)
        fed = _fit_vae(digits, tmp_path, "fed", train)
    monkeypatch.setattr(training, "_data_mesh", lambda batch_size: None)
    one = _fit_vae(digits, tmp_path, "one", train)
    one_default = _fit_vae(digits, tmp_path, "one_default", default)
    assert any(np.any(a != b) for a, b in zip(four_default, one_default, strict=True))
    for other in (fed, one):
        for a, b in zip(four, other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mesh", [False, True])
def test_fixed_order_gradient_is_the_batch_gradient(digits, mesh):
    """Without noise in the loss, the ordered mean over 4 shards is the whole batch's loss and
    gradient, to float32 rounding (on one device and over the 4 forced devices)."""
    params = params_of(Classifier(SMALL, image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0)))
    batch = {"x": jnp.asarray(digits.x_train[:64]), "y": jnp.asarray(digits.y_train[:64])}

    def objective(state, b, key):
        return losses.classifier_loss(Params(params.graphdef, state), b, key, jnp.int32(0))

    grid = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)) if mesh else None
    fixed = jax.jit(fixed_order_grads.value_and_grad(objective, shards=4, mesh=grid))
    (loss, metrics), grads = fixed(params.state, batch, jax.random.key(0))
    (want_loss, want_metrics), want = jax.value_and_grad(objective, has_aux=True)(
        params.state, batch, jax.random.key(0)
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], want_metrics["accuracy"], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "shards, batch_size, match",
    [(3, 32, "does not divide batch_size 32"), (2, 32, "cannot be spread over 4 devices"),
     (-1, 32, "reduction_shards=-1; it must be an integer >= 0")],
)  # fmt: skip
def test_reduction_shards_that_do_not_fit_are_clear_errors(shards, batch_size, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train = TrainConfig(epochs=1, batch_size=batch_size, reduction_shards=shards)
        _fit_vae(data.load_dataset(data.DataConfig(max_train=64, max_test=8)), tmp_path, "x", train)


def test_unknown_loop_form_is_a_clear_error(digits, tmp_path):
    with pytest.raises(ValueError, match="loop 'unrolled'; use one of"):
        training.fit(
            params_of(Classifier(SMALL, image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))),
            losses.classifier_loss, {"x": digits.x_train, "y": digits.y_train}, config=FAST,
            checkpoint_dir=str(tmp_path), fingerprint={}, loop="unrolled",
        )  # fmt: skip


def test_eval_every_evaluates_on_schedule_and_after_the_last_epoch(digits, tmp_path):
    model = Classifier(SMALL, image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    test = {"x": digits.x_test, "y": digits.y_test}
    _, history = training.fit(
        params_of(model), losses.classifier_loss, {"x": digits.x_train, "y": digits.y_train},
        config=dataclasses.replace(FAST, epochs=5), checkpoint_dir=str(tmp_path),
        fingerprint={}, eval_fn=losses.classifier_eval, eval_data=test, eval_every=2,
        progress=False,
    )  # fmt: skip
    assert [h["epoch"] for h in history if "test_accuracy" in h] == [2, 4, 5]


@pytest.mark.parametrize("most", [0, 1, 3])
def test_random_shifts_move_each_image_by_its_own_offset_within_range(most):
    x = np.zeros((64, 9, 9, 1), np.float32)
    x[:, 4, 4, 0] = 1.0  # one bright pixel in the middle
    moved = np.asarray(losses.random_shifts(jnp.asarray(x), jax.random.key(0), most=most))
    where = np.argwhere(moved[..., 0] == 1.0)  # [image, row, col] per bright pixel
    assert len(where) == 64  # every pixel lands in the frame (4 >= most)
    offsets = where[:, 1:] - 4
    assert np.abs(offsets).max() == most and moved.sum() == 64
    if most:  # offsets of their own: the range is used on both axes and in both directions
        assert len({tuple(o) for o in offsets}) > 1 and offsets.min() == -most
    again = losses.random_shifts(jnp.asarray(x), jax.random.key(0), most=most)
    np.testing.assert_array_equal(moved, np.asarray(again))


def test_shifted_training_trains_on_moved_images_and_refuses_data_without_images(digits, tmp_path):
    seen = []

    def loss(params, batch, key, step):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), batch["x"])
        return losses.classifier_loss(params, batch, key, step)

    small = {"x": digits.x_train[:64], "y": digits.y_train[:64].astype(np.int32)}
    model = Classifier(SMALL, image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    shifted = dataclasses.replace(FAST, epochs=1, shift=1)
    training.fit(params_of(model), loss, small, config=shifted, checkpoint_dir=str(tmp_path),
                 fingerprint={}, progress=False, loop="steps")  # fmt: skip
    originals = {x.tobytes() for x in small["x"]}
    moved = [x for batch in seen for x in batch]
    assert len(moved) == 64 and sum(x.tobytes() not in originals for x in moved) > 32
    with pytest.raises(ValueError, match="shift 1 moves images"):
        training.fit(params_of(model), loss, {"x": np.zeros((64, 3), np.float32),
                     "y": small["y"]}, config=shifted, checkpoint_dir=str(tmp_path / "b"),
                     fingerprint={}, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="shift"):
        TrainConfig(shift=-1)
