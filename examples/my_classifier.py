"""A classifier defined outside defuse-jax, as a user brings one (docs/own_classifier.md).

A small linen CNN with batch norm, trained on inputs normalised to [-1, 1], saved with Orbax.
Train it, then debug it with Defuse:

    python examples/my_classifier.py --dataset digits --ckpt /tmp/my_classifier
    PYTHONPATH=examples defuse-jax run --out runs/mine \\
        --classifier-fn my_classifier:make --classifier-ckpt /tmp/my_classifier \\
        --classifier-preprocess my_classifier:normalize

`make()` returns `(module, variables)`: the checkpoint is restored into these variables.
Adaptive pooling to 4x4 makes the weights' shapes independent of the image size, so the same
`make()` serves digits (8x8) and Fashion-MNIST (28x28).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen


class CNN(linen.Module):
    num_classes: int = 10

    @linen.compact
    def __call__(self, x, train: bool = False):
        for features, stride in ((32, 1), (64, 2), (64, 2)):
            x = linen.Conv(features, (3, 3), strides=stride)(x)
            x = linen.BatchNorm(use_running_average=not train)(x)
            x = linen.relu(x)
        # Adaptive pooling to 4x4: the weights' shapes do not depend on the image size.
        x = jax.image.resize(x, (x.shape[0], 4, 4, x.shape[-1]), "linear")
        x = linen.relu(linen.Dense(128)(x.reshape(x.shape[0], -1)))
        return linen.Dense(self.num_classes)(x)


def normalize(x):
    """Images in [0, 1] (Defuse's layout) -> the [-1, 1] this model was trained on."""
    return (x - 0.5) / 0.5


def make(num_classes: int = 10):
    """(module, variables): the variables are a template the checkpoint is restored into."""
    module = CNN(num_classes)
    return module, module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def train(x, y, *, epochs: int, batch_size: int = 64, seed: int = 0):
    """Plain optax training with batch statistics; returns the variables."""
    module, variables = make(int(y.max()) + 1)
    opt = optax.adam(1e-3)
    params, stats = variables["params"], variables["batch_stats"]
    state = opt.init(params)

    @jax.jit
    def step(params, stats, state, x, y):
        def loss(params):
            logits, new = module.apply(
                {"params": params, "batch_stats": stats}, normalize(x), train=True,
                mutable=["batch_stats"],
            )  # fmt: skip
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, new["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), stats, state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            params, stats, state = step(params, stats, state, x[idx], y[idx])
    return {"params": params, "batch_stats": stats}


def main() -> None:
    from defuse_jax.data import DataConfig, load_dataset  # only to read the same data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--ckpt", required=True, help="where the Orbax checkpoint goes")
    args = p.parse_args()
    ds = load_dataset(DataConfig(args.dataset, data_dir=args.data_dir, max_train=args.max_train))
    variables = train(ds.x_train, ds.y_train.astype(np.int32), epochs=args.epochs)
    module, _ = make(ds.num_classes)
    logits = module.apply(variables, normalize(ds.x_test))
    print(f"test accuracy {float((logits.argmax(-1) == ds.y_test).mean()):.4f}")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(args.ckpt), variables, force=True)
    print(f"saved {args.ckpt}")


if __name__ == "__main__":
    main()
