"""One reusable optax training loop: a jitted, buffer-donating train step and a resumable fit.

Randomness is a pure function of (seed, step): the batch order of epoch e comes from
`fold_in(data_key, e)` and the step's noise from `fold_in(step_key, step)`, so a run resumed from
any checkpoint repeats exactly what the uninterrupted run would have done.

Loop forms. Between checkpoints and epoch ends the steps run as one `lax.scan` (one dispatch),
or with `loop="steps"` as one dispatch of the jitted step each; both train the same weights
(`tests/test_training.py` checks them against a plain loop of the step). The scan is the default
on every backend: on a 2-core CPU it ran 0.63-0.97x the bare step's time per step
(`defuse-jax bench train`); GPU and TPU are not measured yet.

Devices. With one process the training data sits on the devices and each step gathers its batch
there, split over the local devices when the batch size allows. Over several processes
(`defuse_jax.distributed`) the batch is split over the devices of all of them: each process
gathers only its devices' rows of every batch on the host and hands them over
(`jax.make_array_from_callback`), the parameters are replicated on every device, and Orbax
saves and restores the checkpoints with its own multi-host protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from defuse_jax import distributed, fixed_order_grads, losses
from defuse_jax.batching import map_batches
from defuse_jax.checkpoint import Checkpointer
from defuse_jax.config_checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPTIONAL_POSITIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_fields,
    fingerprint_fields,
)
from defuse_jax.models import Params, split_trainable

# The step and its loop forms live in train_step; these names are part of training's API.
from defuse_jax.train_step import (  # noqa: F401
    LOOP_FORMS,
    Batch,
    LossFn,
    TrainState,
    _step_fn,
    default_loop,
    make_fed_segment,
    make_train_segment,
    make_train_steps,
)

# eval_fn(params, batch) -> {metric name: [batch] per-example values}
EvalFn = Callable[[Params, Batch], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every training stage.

    Attributes:
        epochs: passes over the training data (the last partial batch of an epoch is dropped so
            every step has the same shape); None: from the data size (`training_lengths`; the
            pipeline and `train_models` resolve it, `fit` needs a number).
        batch_size: examples per step (split across devices when divisible by their count).
        learning_rate: optimiser step size.
        optimizer: "adam", "adamw" or "sgd" (with `momentum`).
        momentum: SGD momentum.
        weight_decay: decoupled weight decay (adamw only).
        seed: seed of this model's initialisation and batch order.
        checkpoint_every: save a checkpoint every this many steps (and at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        reduction_shards: 0: each step's gradient is summed over the batch and the devices in
            the backend's order, which differs between topologies (1 device, 4 devices, 2
            processes x 2 devices train slightly different weights). S > 0: the batch is cut
            into S shards whose gradients are added in a fixed order, so that every topology
            whose device count divides S trains the same bits (`fixed_order_grads`; S divides
            batch_size).
        shift: 0, or translate every training image by up to this many pixels on each axis,
            drawn anew every step (`losses.with_shifts`; data augmentation). The oracle
            trains with it (`stages.label`): without it, it shares the blind spots of a
            classifier of its kind.

    Display settings (the progress bar) are not here: they change no result, so they are
    arguments of `fit` and stay out of every fingerprint.
    """

    epochs: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    reduction_shards: int = 0
    shift: int = 0

    LATER_DEFAULTS: ClassVar[dict[str, Any]] = {"reduction_shards": 0, "shift": 0}

    def __post_init__(self):
        check_fields(self, {
            "epochs": OPTIONAL_POSITIVE_INT, "batch_size": POSITIVE_INT, "learning_rate": POSITIVE,
            "momentum": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
            "checkpoint_every": POSITIVE_INT, "keep_checkpoints": POSITIVE_INT,
            "reduction_shards": NON_NEGATIVE_INT, "shift": NON_NEGATIVE_INT,
        })  # fmt: skip
        if self.reduction_shards and self.batch_size % self.reduction_shards:
            raise ValueError(
                f"reduction_shards {self.reduction_shards} does not divide batch_size "
                f"{self.batch_size}: every shard must hold as many examples; use a divisor."
            )


def initial_state(optimizer: optax.GradientTransformation, weights: Any) -> TrainState:
    """Step 0 of a run from `weights` (an nnx.State): the optimiser sees only the trainable
    ones (`models.split_trainable`), so frozen weights and batch statistics carry no state."""
    return TrainState(
        jnp.zeros((), jnp.int32), weights, optimizer.init(split_trainable(weights)[0])
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax optimiser named by `config`: one object per setting in a process (optax's
    transformations are pure functions), so that fits with equal settings can share a compiled
    program (`_segment_program`)."""
    return _optimizer(config.optimizer, config.learning_rate, config.weight_decay, config.momentum)


@functools.lru_cache(maxsize=16)
def _optimizer(
    name: str, learning_rate: float, weight_decay: float, momentum: float | None
) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum)
    raise ValueError(f"Unknown optimizer {name!r}; use 'adam', 'adamw' or 'sgd'.")


_SEGMENTS: dict[tuple, Callable] = {}


def _segment_program(make: Callable, loss_fn, graphdef, optimizer, **options) -> Callable:
    """`make(loss_fn, graphdef, optimizer, **options)` (a segment runner of `train_step`), made
    once per distinct arguments in this process, so that fits of one model and objective share
    its jitted program and compile it once: an oracle ensemble's members (same architecture),
    the correction's runs of every region weight (one loss, the weight in the data). Before,
    each fit made its own (the correction of the digits run compiled 8 segments, 8.3 of its
    12.7 s without a compilation cache, on a 2-core CPU)."""
    key = (make, loss_fn, graphdef, optimizer, tuple(sorted(options.items())))
    if key not in _SEGMENTS:
        if len(_SEGMENTS) >= 16:  # a loss may close over arrays (the correction's regions)
            _SEGMENTS.clear()
        _SEGMENTS[key] = make(loss_fn, graphdef, optimizer, **options)
    return _SEGMENTS[key]


def _global_batches(
    data: Mapping[str, np.ndarray], idx: np.ndarray, sharding: NamedSharding
) -> dict[str, jax.Array]:
    """{name: [L, B, ...]} global arrays of the rows `idx` [L, B]: this process gathers (on the
    host) only the rows of its own devices."""

    def one(v: np.ndarray) -> jax.Array:
        shape = idx.shape + v.shape[1:]
        return jax.make_array_from_callback(
            shape,
            sharding,
            lambda index: v[idx[index[0], index[1]]][(slice(None),) * 2 + index[2:]],
        )

    return {k: one(np.asarray(v)) for k, v in data.items()}


def _replicated(tree: Any, sharding: NamedSharding) -> Any:
    """`tree`'s arrays (the same on every process) as global arrays replicated by `sharding`."""

    def one(a: Any) -> jax.Array:
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def save_finished(
    params: Params, config: TrainConfig, checkpoint_dir: str, *, fingerprint: dict[str, Any]
) -> None:
    """Save a finished model where `train_models.load_trained` reads it: a one-step checkpoint
    with a fresh optimiser state (a model to use, not a run to resume). Call it on every process
    of a distributed run (Orbax writes the replicated arrays once)."""
    state: Any = initial_state(make_optimizer(config), params.state)._replace(
        step=jnp.ones((), jnp.int32)
    )
    if distributed.is_distributed():
        state = _replicated(state, NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P()))
    ckpt = Checkpointer(checkpoint_dir, fingerprint=fingerprint, save_every=1)
    ckpt.save(1, state, force=True)
    ckpt.close()


def _local(tree: Any) -> Any:
    """A replicated global tree's copy on this process's first device."""
    return jax.tree.map(lambda a: a.addressable_data(0), tree)


@functools.lru_cache(maxsize=64)
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)


def evaluate(
    eval_fn: EvalFn, params: Params, data: Mapping[str, np.ndarray], *, batch_size: int = 512
) -> dict[str, float]:
    """Mean of `eval_fn`'s per-example metrics over `data`, in fixed-size padded batches."""
    step = _jitted(eval_fn)
    per_example = map_batches(lambda batch: step(params, batch), data, batch_size=batch_size)
    if per_example is None:
        return {}
    return {k: float(np.mean(v, dtype=np.float64)) for k, v in per_example.items()}


def _segment_length(checkpoint_every: int, steps_per_epoch: int, cap: int = 64) -> int:
    """Fixed scan length: at most `cap` and no longer than an epoch or a checkpoint interval."""
    return max(1, min(cap, checkpoint_every, steps_per_epoch))


def _data_mesh(batch_size: int) -> Mesh | None:
    devices = jax.devices()
    if distributed.is_distributed():
        if batch_size % len(devices):
            raise ValueError(
                f"batch_size {batch_size} does not split over the {len(devices)} devices of "
                f"the {jax.process_count()} processes, and a distributed run shards every batch "
                f"over all of them: use a multiple of {len(devices)}."
            )
        return Mesh(np.asarray(devices), ("data",))
    if len(devices) > 1 and batch_size % len(devices) == 0:
        return Mesh(np.asarray(devices), ("data",))
    return None


def fit(
    params: Params,
    loss_fn: LossFn,
    train_data: Mapping[str, np.ndarray],
    *,
    config: TrainConfig,
    checkpoint_dir: str,
    fingerprint: dict[str, Any],
    eval_fn: EvalFn | None = None,
    eval_data: Mapping[str, np.ndarray] | None = None,
    eval_every: int = 1,
    on_epoch: Callable[[Params, dict[str, float]], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    loop: str | None = None,
    epoch_steps: int | None = None,
) -> tuple[Params, list[dict[str, float]]]:
    """Train `params` on `train_data`, resuming from `checkpoint_dir` if it holds a checkpoint.

    Args:
        params: the initial model (used as-is for a fresh run, as the shape template on resume).
        loss_fn: `(params, batch, key, step) -> (loss, metrics)`.
        train_data: arrays with a common leading dimension, e.g. {"x": [N, H, W, C], "y": [N]}.
        config: optimisation settings.
        checkpoint_dir: where checkpoints are saved and resumed from.
        fingerprint: settings that must match for a resume (model config, data, train config).
        eval_fn: optional per-example metrics, evaluated on `eval_data` every `eval_every`
            epochs and after the last one.
        eval_data: arrays for `eval_fn`.
        eval_every: epochs between evaluations (they change no result: only which history
            records carry `test_*` metrics).
        on_epoch: called with the weights and the history record after every epoch, before
            that epoch's checkpoint (e.g. to keep the best epoch); what it adds to the record
            goes into the history. On a resume, the epochs after the restored checkpoint are
            run, and reported, again.
        desc: progress-bar label.
        progress: show a progress bar.
        loop: "scan" or "steps" (`LOOP_FORMS`); None: this backend's for this model
            (`default_loop`). Both run the same steps on the same batches; the scan dispatches
            once per segment.
        epoch_steps: at most this many steps per epoch (None: a full pass). Epoch e then
            trains on the first `epoch_steps` batches of its own shuffle of the data: the
            correction's rounds on a large training split (`training_lengths`).

    Returns:
        (trained params, per-epoch history of train and eval metrics).
    """
    loop = default_loop(params) if loop is None else loop
    if loop not in LOOP_FORMS:
        raise ValueError(f"loop {loop!r}; use one of {LOOP_FORMS} (or None for the backend's).")
    n = len(next(iter(train_data.values())))
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {n} training examples; lower it."
        )
    if config.epochs is None:
        raise ValueError(
            "TrainConfig.epochs is None (from the data size): resolve it first, e.g. "
            "training_lengths.train_epochs(config, VAE_BUDGET, n_train), or set a number."
        )
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}.")
    if epoch_steps is not None:
        if epoch_steps < 1:
            raise ValueError(f"epoch_steps must be >= 1 or None, got {epoch_steps}.")
        steps_per_epoch = min(steps_per_epoch, epoch_steps)
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}.")
    if config.shift:
        if "x" not in train_data or np.ndim(train_data["x"]) != 4:
            raise ValueError(
                f"TrainConfig.shift {config.shift} moves images, but train_data has no "
                "images [N, H, W, C] under 'x'; set shift=0."
            )
        loss_fn = losses.with_shifts(loss_fn, config.shift)
    total_steps = config.epochs * steps_per_epoch
    mesh = _data_mesh(config.batch_size)  # raises early when a distributed batch cannot split
    if config.reduction_shards:
        fixed_order_grads.check_devices(
            config.reduction_shards, mesh.devices.size if mesh is not None else 1
        )
    optimizer = make_optimizer(config)
    # Copy: the train step donates its state, and the caller keeps its `params`.
    init = jax.tree.map(jnp.copy, params.state)
    state = initial_state(optimizer, init)
    # Epochs and checkpoint cadence may change between resumes (e.g. to train longer).
    resumable = fingerprint_fields(config)
    for k in ("epochs", "checkpoint_every", "keep_checkpoints"):
        resumable.pop(k)
    ckpt = Checkpointer(
        checkpoint_dir,
        fingerprint={**fingerprint, "train": resumable, "steps_per_epoch": steps_per_epoch},
        save_every=config.checkpoint_every,
        keep=config.keep_checkpoints,
    )
    history: list[dict[str, float]] = []
    replicated = NamedSharding(mesh, P()) if mesh else None
    sharded = NamedSharding(mesh, P("data")) if mesh else None
    fed = distributed.is_distributed()  # each process feeds its rows of every batch
    if fed:  # global before the restore, so that Orbax restores onto every process's devices
        state = _replicated(state, replicated)
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        history = list(meta.get("history", []))
    start = int(state.step)

    if fed:
        data = {k: np.asarray(v) for k, v in train_data.items()}
    else:
        data = {k: jax.device_put(np.asarray(v), replicated) for k, v in train_data.items()}
        # Every leaf committed, as the step's outputs are: a fresh optimizer state beside
        # restored (committed) weights made the first segment compile a program for its mixed
        # placement and the second one another (the correction compiled each of its runs twice).
        state = jax.device_put(state, replicated if replicated is not None else jax.devices()[0])

    root = jax.random.key(config.seed)
    data_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    seg_len = _segment_length(config.checkpoint_every, steps_per_epoch)
    if fed:
        run_fed = _segment_program(make_fed_segment, loss_fn, params.graphdef, optimizer,
                                   loop=loop, reduction_shards=config.reduction_shards,
                                   mesh=mesh)  # fmt: skip
        key_data = np.asarray(jax.random.key_data(step_key))
        steps_sharding = NamedSharding(mesh, P(None, "data"))

        def run_segment(state, data, idx, valid, step_key):
            del step_key  # fed as key_data
            return run_fed(state, _global_batches(data, idx, steps_sharding), valid, key_data)

    else:
        make = make_train_segment if loop == "scan" else make_train_steps
        run_segment = _segment_program(make, loss_fn, params.graphdef, optimizer,
                                       batch_sharding=sharded,
                                       reduction_shards=config.reduction_shards)  # fmt: skip

    def batch_indices(step: int) -> np.ndarray:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.asarray(
                jax.random.permutation(jax.random.fold_in(data_key, epoch), n)
            )
        return perms[epoch][pos * config.batch_size : (pos + 1) * config.batch_size]

    perms: dict[int, np.ndarray] = {}
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=desc,
        disable=not progress or not distributed.is_main(),
    )
    sums: dict[str, float] = {}
    ran = 0
    t0 = time.perf_counter()
    step = start
    while step < total_steps:
        # A segment ends at the next epoch end or checkpoint, whichever comes first.
        epoch_end = (step // steps_per_epoch + 1) * steps_per_epoch
        ckpt_next = (step // config.checkpoint_every + 1) * config.checkpoint_every
        count = min(epoch_end, ckpt_next, total_steps, step + seg_len) - step
        idx = np.zeros((seg_len, config.batch_size), np.int32)
        for i in range(count):
            idx[i] = batch_indices(step + i)
        valid = np.arange(seg_len) < count
        state, metrics = run_segment(state, data, idx, valid, step_key)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(np.asarray(v)[:count].sum())
        ran += count
        step += count
        bar.update(count)
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            # Steps of a resumed partial epoch are averaged over what this process ran.
            record = {"epoch": epoch, **{k: v / ran for k, v in sums.items()}}
            current = Params(params.graphdef, _local(state.params) if fed else state.params)
            evaluate_now = epoch % eval_every == 0 or step == total_steps
            if eval_fn is not None and eval_data is not None and evaluate_now:
                ev = evaluate(eval_fn, current, eval_data)
                record.update({f"test_{k}": v for k, v in ev.items()})
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if on_epoch is not None:
                on_epoch(current, record)
            bar.set_postfix(
                {
                    k: f"{v:.4g}"
                    for k, v in record.items()
                    if k != "epoch" and not isinstance(v, list)
                }
            )
            sums, ran = {}, 0
        ckpt.save(step, state, meta={"history": history}, force=step == total_steps)
    bar.close()
    ckpt.close()
    if fed:  # this process's copy, on its first device like the caller's
        return Params(params.graphdef, _local(state.params)), history
    # Hand back the weights placed like the caller's, so they mix with its other arrays.
    shardings = jax.tree.map(lambda a: a.sharding, params.state)
    return Params(params.graphdef, jax.device_put(state.params, shardings)), history
