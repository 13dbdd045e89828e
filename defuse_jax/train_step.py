"""The compiled train step and the loop forms that run it (`training.fit` drives them).

A step differentiates the loss of one batch with respect to the trainable weights
(`models.split_trainable`) and applies the optax update; `reduction_shards` > 0 sums its gradient
in a fixed order (`fixed_order_grads`). A segment of steps runs either as one `lax.scan` (one
dispatch) or as one dispatch of the jitted, donated step per step (`LOOP_FORMS`); over several
processes the batches come in as inputs (`make_fed_segment`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from defuse_jax import fixed_order_grads
from defuse_jax.models import Params, split_trainable

Batch = Mapping[str, jax.Array]
# loss_fn(params, batch, key, step) -> (scalar loss, {metric name: scalar})
LossFn = Callable[[Params, Batch, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    step: jax.Array  # [] int32, number of completed steps
    params: Any  # nnx.State of the model weights
    opt_state: Any  # optax state of the trainable weights (`models.split_trainable`)


def _step_fn(
    loss_fn: LossFn,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    *,
    reduction_shards: int = 0,
    mesh: Mesh | None = None,
):
    def train_step(state: TrainState, batch: Batch, step_key: jax.Array):
        key = jax.random.fold_in(step_key, state.step)

        # Only the trainable weights are differentiated and updated; the rest (frozen weights,
        # batch statistics) go through unchanged. The project's models are all trainable.
        trainable, fixed = split_trainable(state.params)

        def objective(t, b, k):
            return loss_fn(Params(graphdef, nnx.merge_state(t, fixed)), b, k, state.step)

        if reduction_shards:
            vg = fixed_order_grads.value_and_grad(objective, shards=reduction_shards, mesh=mesh)
        else:
            vg = jax.value_and_grad(objective, has_aux=True)
        (loss, metrics), grads = vg(trainable, batch, key)
        # optax mixes Python floats with int32 step counts internally.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params = nnx.merge_state(optax.apply_updates(trainable, updates), fixed)
        return TrainState(state.step + 1, params, opt_state), {"loss": loss, **metrics}

    return train_step


def _reduction(shards: int, batch_sharding: NamedSharding | None) -> dict[str, Any]:
    mesh = batch_sharding.mesh if batch_sharding is not None else None
    return {"reduction_shards": shards, "mesh": mesh}


def _step_if(step, ok: jax.Array, state: TrainState, batch: Batch, step_key: jax.Array):
    """One train step when `ok`, else the state unchanged and zero metrics (fixed-length scans)."""
    new, metrics = step(state, batch, step_key)
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    return new, jax.tree.map(lambda m: jnp.where(ok, m, jnp.zeros_like(m)), metrics)


LOOP_FORMS = ("scan", "steps")
# How `fit` runs the steps of a segment, by backend. "scan": one `lax.scan` per segment, one
# dispatch; "steps": one dispatch of the jitted, donated step per step. On a 2-core CPU the scan
# was faster for every model once the conv layers' gradients were loop-friendly (conv_layers.py;
# `defuse-jax bench train` measures both forms). GPU and TPU: the scan, which dispatches once
# (not measured on them yet).
_LOOP_BY_BACKEND = {"cpu": "scan", "gpu": "scan", "tpu": "scan"}


def default_loop(params: Params | None = None) -> str:
    """The loop form `fit` uses on this backend when not told otherwise, for `params`' model.

    A model whose module says `scan_friendly_gradients = False` (a user's own, `own_model`,
    whose convolutions are not the project's `conv_layers`) gets "steps" on a CPU: inside a scan
    XLA:CPU runs autodiff's convolution gradients on a slow path (a linen CNN, 28x28, batch 64,
    2-core CPU: 731 ms per step against 175 ms as a top-level jitted step,
    `scripts/own_model_loop.py`).
    """
    backend = jax.default_backend()
    if backend == "cpu" and params is not None:
        if not getattr(params.module(), "scan_friendly_gradients", True):
            return "steps"
    return _LOOP_BY_BACKEND.get(backend, "scan")


def _gather(data: Batch, i: jax.Array, batch_sharding: NamedSharding | None) -> Batch:
    batch = {k: v[i] for k, v in data.items()}
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return batch


def make_train_segment(
    loss_fn: LossFn,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    *,
    batch_sharding: NamedSharding | None = None,
    reduction_shards: int = 0,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `segment(state, data, idx, valid, step_key) -> (state, metrics)`.

    Runs `len(idx)` steps as one `lax.scan` (one dispatch instead of one per step), gathering
    each batch from the device-resident `data`. Steps whose `valid` flag is False leave the state
    untouched, so segments have a fixed length and compile once.

    Args (of the returned function):
        state: the train state (donated).
        data: {name: [N, ...]} device arrays.
        idx: [L, B] int32 example indices per step.
        valid: [L] bool, which steps to run.
        step_key: root key of the per-step noise.

    Returns:
        (state, metrics) with metrics {name: [L]} (zeros where not valid).

    `reduction_shards` > 0 sums each step's gradient in a fixed order (`fixed_order_grads`),
    over the devices of `batch_sharding`'s mesh.
    """
    step = _step_fn(loss_fn, graphdef, optimizer, **_reduction(reduction_shards, batch_sharding))

    def segment(state, data, idx, valid, step_key):
        def body(st, inputs):
            i, ok = inputs
            return _step_if(step, ok, st, _gather(data, i, batch_sharding), step_key)

        return jax.lax.scan(body, state, (idx, valid))

    return jax.jit(segment, donate_argnums=0)


def make_train_steps(
    loss_fn: LossFn,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    *,
    batch_sharding: NamedSharding | None = None,
    reduction_shards: int = 0,
) -> Callable[..., tuple[TrainState, dict[str, np.ndarray]]]:
    """`make_train_segment`'s segment as one dispatch per step ("steps" loop form).

    The same arguments and results; the valid steps (a prefix of `valid`) each run the jitted
    step once, with the state donated, gathering the batch on the device. Its metrics come back
    as host arrays.
    """
    step = _step_fn(loss_fn, graphdef, optimizer, **_reduction(reduction_shards, batch_sharding))

    def step_at(state, data, idx, j, step_key):
        return step(state, _gather(data, idx[j], batch_sharding), step_key)

    one = jax.jit(step_at, donate_argnums=0)

    def segment(state, data, idx, valid, step_key):
        # idx goes to the devices once per segment, placed like the data.
        placement = next(iter(data.values())).sharding
        idx = jax.device_put(np.asarray(idx), placement)
        return _stepwise(lambda st, j: one(st, data, idx, j, step_key), state, valid)

    return segment


def _stepwise(one: Callable, state: TrainState, valid: np.ndarray):
    """Run `one(state, j)` for each valid step j; metrics {name: [L]} on the host, zeros after."""
    count = int(np.sum(valid))
    per_step = []
    for j in range(count):
        state, metrics = one(state, np.int32(j))
        per_step.append(metrics)
    per_step = jax.device_get(per_step)  # one wait at the segment's end, not one per step
    names = per_step[0].keys() if per_step else ()
    out = {}
    for k in names:
        out[k] = np.zeros(len(valid), np.asarray(per_step[0][k]).dtype)
        out[k][:count] = [m[k] for m in per_step]
    return state, out


def make_fed_segment(
    loss_fn: LossFn,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    *,
    loop: str = "scan",
    reduction_shards: int = 0,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`make_train_segment` for a mesh over several processes: the batches come in as inputs.

    A `segment(state, batches, valid, key_data) -> (state, metrics)`, with batches
    {name: [L, B, ...]} (global arrays sharded over B, each process holding its devices' rows),
    valid [L] bool and key_data the [2] uint32 data of the step key (a host value, the same on
    every process). The steps compute what `make_train_segment`'s compute on the same batches,
    as one scan or (`loop="steps"`) one dispatch per step. `reduction_shards` > 0: gradients
    summed in a fixed order over the devices of `mesh` (`fixed_order_grads`).
    """
    step = _step_fn(loss_fn, graphdef, optimizer, reduction_shards=reduction_shards, mesh=mesh)
    if loop == "steps":

        def step_at(state, batches, j, key_data):
            batch = {k: v[j] for k, v in batches.items()}
            return step(state, batch, jax.random.wrap_key_data(key_data))

        one = jax.jit(step_at, donate_argnums=0)
        return lambda state, batches, valid, key_data: _stepwise(
            lambda st, j: one(st, batches, j, key_data), state, valid
        )

    def segment(state, batches, valid, key_data):
        step_key = jax.random.wrap_key_data(key_data)

        def body(st, inputs):
            batch, ok = inputs
            return _step_if(step, ok, st, batch, step_key)

        return jax.lax.scan(body, state, (batches, valid))

    return jax.jit(segment, donate_argnums=0)
