"""Training objectives: the annealed beta-VAE ELBO and the classifier's cross-entropy, and
random shifts of a batch's images as a wrapper around any of them (`with_shifts`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from defuse_jax.models import Params
from defuse_jax.train_step import LossFn


def kl_weight(step: jax.Array, *, beta: float, anneal_steps: int) -> jax.Array:
    """Linear KL annealing: 0 at step 0, `beta` from `anneal_steps` on."""
    if anneal_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    frac = jnp.minimum(step.astype(jnp.float32) / float(anneal_steps), 1.0)
    return jnp.float32(beta) * frac


def vae_loss(
    params: Params, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative annealed ELBO with a Bernoulli likelihood; batch["x"]: [B, H, W, C] in [0, 1]
    (and, for a conditional VAE, its classes batch["y"]: [B] int32)."""
    vae = params.module()
    x = batch["x"]
    mean, logvar = vae.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    logits = vae.decode_logits(vae.code(z, batch.get("y")))
    recon = optax.sigmoid_binary_cross_entropy(logits, x).sum(axis=(1, 2, 3))
    kl = 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar).sum(axis=-1)
    w = kl_weight(step, beta=vae.config.beta, anneal_steps=vae.config.kl_anneal_steps)
    recon, kl = recon.mean(), kl.mean()
    return recon + w * kl, {"recon": recon, "kl": kl, "kl_weight": w}


def vae_eval(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example reconstruction error (from the mean code) and KL; [B] each."""
    vae = params.module()
    x = batch["x"]
    mean, logvar = vae.encode(x)
    logits = vae.decode_logits(vae.code(mean, batch.get("y")))
    recon = optax.sigmoid_binary_cross_entropy(logits, x).sum(axis=(1, 2, 3))
    kl = 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar).sum(axis=-1)
    return {"recon": recon, "kl": kl}


def reconstruction_mse(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example mean squared error of the reconstruction from the mean code; [B]. Any model
    with `encode` and `decode` (a user's own, `own_model.ExternalVAE`)."""
    vae = params.module()
    x = batch["x"]
    recon = vae.decode(vae.encode(x)[0])
    return {"recon_mse": ((recon - x) ** 2).mean(axis=(1, 2, 3))}


def classifier_loss(
    params: Params, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean softmax cross-entropy; batch = {"x": [B, H, W, C], "y": [B] int32}."""
    del key, step
    logits = params.module()(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    acc = (logits.argmax(-1) == batch["y"]).astype(jnp.float32).mean()
    return loss, {"accuracy": acc}


def classifier_eval(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example accuracy and loss; [B] each."""
    logits = params.module()(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return {"accuracy": (logits.argmax(-1) == batch["y"]).astype(jnp.float32), "loss": loss}


def random_shifts(x: jax.Array, key: jax.Array, *, most: int) -> jax.Array:
    """Each image of x [B, H, W, C] translated by its own offset of -most..most pixels on
    each axis, drawn from `key`; what moves out of the frame is dropped, what moves in is 0."""
    if most <= 0:
        return x
    b, h, w, c = x.shape
    offsets = jax.random.randint(key, (b, 2), -most, most + 1)
    padded = jnp.pad(x, ((0, 0), (most, most), (most, most), (0, 0)))

    def one(image: jax.Array, offset: jax.Array) -> jax.Array:
        start = (most - offset[0], most - offset[1], 0)
        return jax.lax.dynamic_slice(image, start, (h, w, c))

    return jax.vmap(one)(padded, offsets)


@functools.cache  # one wrapper per loss and size, so that training programs are shared
def with_shifts(loss_fn: LossFn, most: int) -> LossFn:
    """`loss_fn` on the batch's images shifted by up to `most` pixels (`random_shifts`),
    drawn anew every step from the step's key: a model that sees its digits a little off
    centre stops leaning on where the strokes are, and so on the blind spots a classifier
    trained without them has (`TrainConfig.shift`)."""

    def shifted(params, batch, key, step):
        k_shift, k_loss = jax.random.split(key)
        moved = {**batch, "x": random_shifts(batch["x"], k_shift, most=most)}
        return loss_fn(params, moved, k_loss, step)

    return shifted
