"""Gradients summed in a fixed order, so that training is bit-identical on every topology.

With the default reduction (`TrainConfig.reduction_shards = 0`) a step's gradient is one
`value_and_grad` over the whole batch, and XLA sums it over the devices in whatever order the
topology gives: one device sums inside its matmuls, four devices sum partial gradients with an
all-reduce, and two processes of two devices with a cross-process all-reduce. The float32
rounding differs in each case, and over a long training the differences grow into different
models (different regions downstream).

With `reduction_shards = S` every batch is cut into S equal shards in batch order. Each shard's
gradient is computed on its own (a sequential `lax.map` over the shards a device holds, so each
one is the same program with the same shapes wherever it runs), the S gradients are gathered to
every device in shard order (`all_gather` copies, it does not add), and they are added one after
the other: `((g_0 + g_1) + g_2) + ...`, divided by S. Nothing in that depends on how many devices
or processes hold the shards, so 1 device, 1 process x 4 devices and 2 processes x 2 devices
train the same bits, as long as the device count divides S.

What changes against the default: the loss is the mean of the S shards' losses (the same mean
for per-example losses), and shard j draws its noise from `fold_in(step_key, j)` (the VAE's
reparameterisation, the correction's region samples; a correction shard draws its share,
`region_batch_size / S`, of them).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

# objective(trainable, batch, key) -> (loss, {metric: scalar})
Objective = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def check_devices(shards: int, devices: int) -> None:
    """Raise a one-line error when `devices` does not divide `shards` (`TrainConfig` already
    checks that `shards` divides the batch size)."""
    if shards % devices:
        raise ValueError(
            f"reduction_shards {shards} cannot be spread over {devices} devices: each device "
            f"computes whole shards, so the device count must divide it. Use a multiple of "
            f"{devices}, or 0 for the default (topology-dependent) reduction."
        )


def ordered_mean(stacked: Any) -> Any:
    """`stacked`'s leaves [S, ...] summed over S strictly in order (((x0 + x1) + x2) ...), / S."""

    def one(a: jax.Array) -> jax.Array:
        total = functools.reduce(operator.add, [a[j] for j in range(a.shape[0])])
        return total / a.dtype.type(a.shape[0])

    return jax.tree.map(one, stacked)


def value_and_grad(
    objective: Objective, *, shards: int, mesh: Mesh | None
) -> Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, dict[str, jax.Array]], Any]]:
    """`jax.value_and_grad(objective, has_aux=True)` with the gradient summed in shard order.

    Args:
        objective: `(trainable, batch, key) -> (loss, metrics)`, the mean over `batch`.
        shards: S, the shards every batch is cut into (it divides the batch size).
        mesh: a 1-D mesh over which the batch is split (its size divides S), or None (one
            device computes every shard).

    Returns:
        `(trainable, batch, key) -> ((loss, metrics), grads)`, each the ordered mean over the
        shards; batch: {name: [B, ...]}.
    """
    vg = jax.value_and_grad(objective, has_aux=True)

    def shard_results(trainable, split, key, first):
        # split: {name: [S_local, B / S, ...]}; first: global index of this device's first shard.
        def one(inputs):
            j, batch = inputs
            (loss, metrics), grads = vg(trainable, batch, jax.random.fold_in(key, j))
            return {"loss": loss, **metrics}, grads

        local = next(iter(split.values())).shape[0]
        # Sequential, so that every shard is the same program with the same shapes wherever
        # it runs (a vmap over the local shards would batch them into other kernels).
        return lax.map(one, (first + jnp.arange(local, dtype=jnp.int32), split))

    def run(trainable, batch, key):
        split = {
            k: v.reshape((shards, v.shape[0] // shards) + v.shape[1:]) for k, v in batch.items()
        }
        if mesh is None:
            metrics, grads = shard_results(trainable, split, key, jnp.int32(0))
        else:
            axis = mesh.axis_names[0]
            per_device = shards // mesh.devices.size

            def local(t, s, k):
                first = lax.axis_index(axis).astype(jnp.int32) * per_device
                out = shard_results(t, s, k, first)
                # Copies in device order, which is shard order: no addition happens here.
                return jax.tree.map(lambda a: lax.all_gather(a, axis, tiled=True), out)

            metrics, grads = jax.shard_map(
                local, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=P(), check_vma=False
            )(trainable, split, key)
        metrics = ordered_mean(metrics)
        loss = metrics.pop("loss")
        return (loss, metrics), ordered_mean(grads)

    return run
