"""Flax NNX models (a beta-VAE and a classifier) and the pure functions later stages call.

The search and mixture code never touch NNX objects: they receive `Params` (a pytree holding the
graph definition as static data and the weights as leaves) and call `encode`, `decode` and
`logits`, which are safe under `jit`, `vmap` and `grad` because they rebuild the module from
(graphdef, state) on every trace instead of mutating it.

Example:
    >>> from flax import nnx
    >>> vae = VAE(VAEConfig(kind="mlp", latent_dim=8), image_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    >>> vp = params_of(vae)
    >>> x = decode(vp, jnp.zeros((2, 8)))  # [2, 8, 8, 1] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from defuse_jax.conv_layers import (
    conv2d,
    conv_few_outputs_of_phases,
    conv_transpose_stride2,
    phase_conv,
)

ImageShape = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and objective of the VAE.

    Attributes:
        kind: "mlp" for tiny images (e.g. 8x8 digits), "conv" for 28x28 and larger or colour
            images (height and width must be divisible by 4).
        latent_dim: size of the latent code (the reference uses 10-15).
        hidden: width of the MLP layers / of the conv bottleneck dense layer.
        channels: conv channels of the two stride-2 stages (conv kind only).
        beta: weight of the KL term at the end of annealing (the reference uses 4).
        kl_anneal_steps: steps over which the KL weight rises linearly from 0 to beta.
        conditional: decode from a style code and the class (a class-conditional VAE): the
            latent code is `[style (latent_dim), class block (num_classes)]`, the class block
            `CLASS_SCALE * one_hot(class)`. The encoder reads the image alone; the decoder
            reads the style and the class block's argmax, so a perturbed style keeps the
            class, and the search (which leaves the class block alone) finds images of the
            source class the classifier gets wrong rather than class changes. A run's VAE
            chosen from the image shape is conditional (`train_models.default_vae_config`);
            --no-vae-conditional gives the reference's.
    """

    kind: Literal["mlp", "conv"] = "mlp"
    latent_dim: int = 8
    hidden: int = 256
    channels: tuple[int, int] = (32, 64)
    beta: float = 1.0
    kl_anneal_steps: int = 500
    conditional: bool = False

    LATER_DEFAULTS: ClassVar[dict[str, Any]] = {"conditional": False}


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the classifier.

    Attributes:
        kind: "mlp" or "conv".
        hidden: width of the hidden dense layers.
        channels: conv channels of the two conv stages (conv kind only).
    """

    kind: Literal["mlp", "conv"] = "mlp"
    hidden: int = 256
    channels: tuple[int, int] = (32, 64)


def _check_image_shape(image_shape: ImageShape, kind: str) -> ImageShape:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}.")
    if kind not in ("mlp", "conv"):
        raise ValueError(f"Unknown model kind {kind!r}; use 'mlp' or 'conv'.")
    if kind == "conv" and (shape[0] % 4 or shape[1] % 4):
        raise ValueError(
            f"The conv model needs height and width divisible by 4, got {shape[:2]}; "
            "resize the data (DataConfig.image_size) or use kind='mlp'."
        )
    return shape  # type: ignore[return-value]


def check_images(x: jax.Array, image_shape: ImageShape, *, what: str) -> None:
    """Raise a clear error (at trace time, before compiling) if `x` is not a batch of images."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{what} expects floating-point images in [0, 1], got dtype {x.dtype}; "
            "convert with x.astype(np.float32) / 255 for uint8 images."
        )
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{what} expects images of shape [batch, {', '.join(map(str, image_shape))}], "
            f"got {tuple(x.shape)}."
        )


def host_lecun_normal(
    key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> jax.Array:
    """LeCun truncated-normal kernel init drawn with NumPy from the JAX key.

    Same distribution as `jax.nn.initializers.lecun_normal()`, but eager model construction
    compiles no XLA program per weight shape (that costs seconds per layer on a CPU). Under a
    trace (e.g. `nnx.eval_shape`) it falls back to the JAX initializer.
    """
    if isinstance(key, jax.core.Tracer):
        return jax.nn.initializers.lecun_normal()(key, shape, dtype)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
    rng = np.random.default_rng(seed)
    fan_in = math.prod(shape[:-1])
    w = rng.standard_normal(shape)
    bad = np.abs(w) > 2.0
    while bad.any():  # truncate to +-2 std by resampling, as jax.random.truncated_normal does
        w[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(w) > 2.0
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
    return jnp.asarray((w * std).astype(np.dtype(dtype)))


def _conv(layer: nnx.Conv, x: jax.Array) -> jax.Array:
    # The layer's own parameters through `conv2d`, whose gradient stays fast inside the training
    # loop's scan on XLA:CPU (conv_layers.py); the same values as calling the layer.
    return conv2d(
        x, layer.kernel[...], layer.bias[...], strides=layer.strides, padding=layer.padding
    )


def _kernel_bias(layer: nnx.Module) -> tuple[jax.Array, jax.Array]:
    return layer.kernel[...], layer.bias[...]


def _pool2(x: jax.Array) -> jax.Array:
    # 2x2 average pooling as a reshape-mean (flax's avg_pool breaks under strict promotion).
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class _MLP(nnx.Module):
    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, kernel_init=host_lecun_normal, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, h: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = nnx.relu(h)
        return h


DECODER_FORMULATIONS = ("phase", "native")
# The conv decoder's formulation per backend, from measurements (same parameters and outputs,
# tests/test_conv_layers.py): "phase" (conv_layers.py: dense phase convolutions) was 1.34x
# faster on a 2-core CPU, where XLA lowers stride-2 transposed convolutions over zero-dilated
# inputs; "native" leaves the layers to XLA (cuDNN on a GPU). On one H200 (JAX 0.11.2, conv
# forward at batch 16,384, `bench search --decoders phase native`) phase was faster too: 2.63M
# vs 1.89M samples/s in float32, 3.17M vs 2.65M in bfloat16. TPU: not measured yet.
_DECODER_BY_BACKEND = {"cpu": "phase", "gpu": "phase", "tpu": "phase"}
_decoder_override: str | None = None


def decoder_formulation() -> str:
    """The conv decoder formulation in force: `set_decoder_formulation`'s, else the backend's."""
    if _decoder_override is not None:
        return _decoder_override
    return _DECODER_BY_BACKEND.get(jax.default_backend(), "phase")


def set_decoder_formulation(name: str | None) -> None:
    """Force "phase" or "native" for programs traced from now on (None: by backend again).

    A benchmark's switch: functions already traced keep the formulation they were traced with.
    """
    global _decoder_override
    if name is not None and name not in DECODER_FORMULATIONS:
        raise ValueError(f"decoder formulation {name!r}; use one of {DECODER_FORMULATIONS}.")
    _decoder_override = name


# The class block of a conditional VAE's code is CLASS_SCALE * one_hot(class): far enough from
# the other classes' blocks (CLASS_SCALE * sqrt(2)) that a mixture never merges two classes'
# codes, where the style coordinates spread over a few units.
CLASS_SCALE = 10.0


class VAE(nnx.Module):
    """A Gaussian-latent VAE with a Bernoulli (sigmoid) decoder, optionally class-conditional
    (`VAEConfig.conditional`: its code is `[style, class block]`, `code_dim` wide)."""

    def __init__(
        self,
        config: VAEConfig,
        *,
        image_shape: ImageShape,
        rngs: nnx.Rngs,
        num_classes: int | None = None,
    ):
        self.config = config
        self.image_shape = _check_image_shape(image_shape, config.kind)
        h, w, c = self.image_shape
        lat, hid = config.latent_dim, config.hidden
        if lat < 1:
            raise ValueError(f"latent_dim must be >= 1, got {lat}.")
        if config.conditional and (num_classes is None or num_classes < 2):
            raise ValueError(
                "A conditional VAE (VAEConfig.conditional) decodes from the class: pass the "
                f"dataset's num_classes (at least 2), got {num_classes}."
            )
        self.num_classes = int(num_classes) if config.conditional else 0
        dec_in = lat + self.num_classes  # the decoder reads the style and a one-hot class
        if config.kind == "mlp":
            n = h * w * c
            self.enc = _MLP([n, hid, hid, 2 * lat], rngs=rngs)
            self.dec = _MLP([dec_in, hid, hid, n], rngs=rngs)
        else:
            c1, c2 = config.channels
            self.conv1 = nnx.Conv(
                c, c1, (4, 4), strides=2, padding="SAME", kernel_init=host_lecun_normal, rngs=rngs
            )
            self.conv2 = nnx.Conv(
                c1, c2, (4, 4), strides=2, padding="SAME", kernel_init=host_lecun_normal, rngs=rngs
            )
            flat = (h // 4) * (w // 4) * c2
            self.enc_head = _MLP([flat, hid, 2 * lat], rngs=rngs)
            self.dec_head = _MLP([dec_in, hid, flat], rngs=rngs)
            self.deconv1 = nnx.ConvTranspose(
                c2,
                c1,
                (4, 4),
                strides=(2, 2),
                padding="SAME",
                kernel_init=host_lecun_normal,
                rngs=rngs,
            )
            self.deconv2 = nnx.ConvTranspose(
                c1,
                c1,
                (4, 4),
                strides=(2, 2),
                padding="SAME",
                kernel_init=host_lecun_normal,
                rngs=rngs,
            )
            self.out = nnx.Conv(
                c1, c, (3, 3), padding="SAME", kernel_init=host_lecun_normal, rngs=rngs
            )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, H, W, C] in [0, 1] -> (mean, logvar), each [B, latent]."""
        check_images(x, self.image_shape, what="VAE.encode")
        if self.config.kind == "mlp":
            stats = self.enc(x.reshape(x.shape[0], -1))
        else:
            h = nnx.relu(_conv(self.conv1, x))
            h = nnx.relu(_conv(self.conv2, h))
            stats = self.enc_head(nnx.relu(h.reshape(h.shape[0], -1)))
        mean, logvar = jnp.split(stats, 2, axis=-1)
        return mean, logvar

    @property
    def code_dim(self) -> int:
        """Width of a latent code: the style, plus the class block of a conditional VAE."""
        return self.config.latent_dim + self.num_classes

    def code(self, style: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """The latent code of a style `[B, latent]` (and, conditional, classes `y: [B]`):
        `[B, code_dim]`, the style followed by `CLASS_SCALE * one_hot(y)`."""
        if not self.num_classes:
            return style
        if y is None:
            raise ValueError(
                "A conditional VAE's code holds the class: pass the labels y with the images."
            )
        block = jax.nn.one_hot(y, self.num_classes, dtype=style.dtype) * CLASS_SCALE
        return jnp.concatenate([style, block.astype(style.dtype)], axis=-1)

    def decode_logits(self, z: jax.Array) -> jax.Array:
        """z: [B, code_dim] -> Bernoulli logits [B, H, W, C]."""
        if z.ndim != 2 or z.shape[-1] != self.code_dim:
            raise ValueError(
                f"decode expects latent codes of shape [batch, {self.code_dim}], "
                f"got {tuple(z.shape)}."
            )
        if self.num_classes:  # the class is the block's argmax, whatever its exact values
            lat = self.config.latent_dim
            cls = jnp.argmax(z[:, lat:], axis=-1)
            onehot = jax.nn.one_hot(cls, self.num_classes, dtype=z.dtype)
            z = jnp.concatenate([z[:, :lat], onehot], axis=-1)
        h, w, c = self.image_shape
        if self.config.kind == "mlp":
            return self.dec(z).reshape(z.shape[0], h, w, c)
        c2 = self.config.channels[1]
        g = nnx.relu(self.dec_head(z)).reshape(z.shape[0], h // 4, w // 4, c2)
        if decoder_formulation() == "native":
            return self.out(nnx.relu(self.deconv2(nnx.relu(self.deconv1(g)))))
        # Same parameters and outputs as calling the layers, without the zero-dilated transposed
        # convolutions XLA would run (conv_layers.py has the measurements).
        # The last transposed convolution's phases go to the output layer as they are: its
        # 28x28 activations, the decoder's widest, are never interleaved.
        g = conv_transpose_stride2(g, *_kernel_bias(self.deconv1), activation=nnx.relu)
        y = phase_conv(g, *_kernel_bias(self.deconv2), activation=nnx.relu)
        return conv_few_outputs_of_phases(y, *_kernel_bias(self.out))

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, code_dim] -> images [B, H, W, C] in [0, 1]."""
        return nnx.sigmoid(self.decode_logits(z))


class Classifier(nnx.Module):
    """An image classifier returning logits."""

    def __init__(
        self,
        config: ClassifierConfig,
        *,
        image_shape: ImageShape,
        num_classes: int,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.image_shape = _check_image_shape(image_shape, config.kind)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.num_classes = int(num_classes)
        h, w, c = self.image_shape
        if config.kind == "mlp":
            self.head = _MLP([h * w * c, config.hidden, config.hidden, num_classes], rngs=rngs)
        else:
            c1, c2 = config.channels
            self.conv1 = nnx.Conv(
                c, c1, (3, 3), padding="SAME", kernel_init=host_lecun_normal, rngs=rngs
            )
            self.conv2 = nnx.Conv(
                c1, c2, (3, 3), padding="SAME", kernel_init=host_lecun_normal, rngs=rngs
            )
            flat = (h // 4) * (w // 4) * c2
            self.head = _MLP([flat, config.hidden, num_classes], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] in [0, 1] -> logits [B, num_classes]."""
        check_images(x, self.image_shape, what="Classifier")
        if self.config.kind == "conv":
            x = nnx.relu(_conv(self.conv1, x))
            x = _pool2(x)
            x = nnx.relu(_conv(self.conv2, x))
            x = _pool2(x)
        return self.head(x.reshape(x.shape[0], -1))


class Ensemble(nnx.Module):
    """Classifiers that vote by their mean probability (the oracle, `stages.label.train_oracle`).

    Called like a classifier: x [B, H, W, C] -> [B, num_classes], the log of the members' mean
    softmax (float32), so that its argmax is the ensemble's prediction and its softmax the mean
    probability.
    """

    def __init__(self, members: list[nnx.Module]):
        if not members:
            raise ValueError("An ensemble needs at least one member classifier.")
        self.members = nnx.List(members)

    def __call__(self, x: jax.Array) -> jax.Array:
        log_probs = jnp.stack(
            [jax.nn.log_softmax(m(x).astype(jnp.float32), axis=-1) for m in self.members]
        )
        return jax.nn.logsumexp(log_probs, axis=0) - np.float32(np.log(len(self.members)))


def ensemble_members(params: Params) -> list[Params]:
    """The members of `ensemble_of`'s result, each a classifier `Params` ([params] itself when
    it is no `Ensemble`)."""
    module = params.module()
    if not isinstance(module, Ensemble):
        return [params]
    return [params_of(m) for m in module.members]


def ensemble_of(members: list[Params]) -> Params:
    """One classifier `Params` from several: the member itself when there is one, else their
    `Ensemble`."""
    if len(members) == 1:
        return members[0]
    return params_of(Ensemble([m.module() for m in members]))


@struct.dataclass
class Params:
    """A model as a pure pytree: the NNX graph definition (static) and its weights (leaves)."""

    graphdef: Any = struct.field(pytree_node=False)
    state: Any  # nnx.State of nnx.Param leaves

    def module(self) -> Any:
        """Rebuild the NNX module (cheap; done at trace time inside jitted code)."""
        return nnx.merge(self.graphdef, self.state)


class Frozen(nnx.Variable):
    """A weight that training keeps fixed (a user's classifier's frozen layers, `own_model`)."""


def split_trainable(state: Any) -> tuple[Any, Any]:
    """(the weights training updates: the `nnx.Param` variables; the rest, which it keeps
    fixed: `Frozen` weights and collections such as batch statistics). `nnx.merge_state`
    joins them back; every weight of the project's own models is trainable."""
    return nnx.split_state(state, nnx.Param, ...)


def params_of(model: nnx.Module) -> Params:
    """Split an NNX model into a pure `Params` pytree."""
    graphdef, state = nnx.split(model)
    return Params(graphdef, state)


def encode(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, H, W, C] -> (mean [B, L], logvar [B, L])."""
    return params.module().encode(x)


def mean_code(params: Params, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """The latent code of images at their posterior mean: x [B, H, W, C] (and their classes
    y [B], which a conditional VAE's code holds) -> [B, code_dim]."""
    module = params.module()
    mean = module.encode(x)[0]
    return module.code(mean, y) if isinstance(module, VAE) else mean


def style_dims(params: Params) -> int | None:
    """How many leading coordinates of the VAE's code are free to perturb: a conditional VAE's
    style (its class block stays the source's); None: all of them."""
    module = params.module()
    return module.config.latent_dim if isinstance(module, VAE) and module.num_classes else None


def decode(params: Params, z: jax.Array) -> jax.Array:
    """z: [B, L] -> x: [B, H, W, C] in [0, 1]."""
    return params.module().decode(z)


def logits(params: Params, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> logits [B, num_classes]."""
    return params.module()(x)


def num_params(params: Params) -> int:
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params.state)))


def cast_params(params: Params, dtype: Any) -> Params:
    """A copy of `params` with every floating-point weight cast to `dtype` (e.g. "bfloat16").

    Flax layers compute in the promoted dtype of their input and their weights, so a bfloat16
    input with float32 weights still computes in float32; casting the weights is what makes a
    forward pass really run in bfloat16. Non-float leaves (counters, integer buffers) are kept.
    """
    dtype = jnp.dtype(dtype)

    def cast(a):
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return Params(params.graphdef, jax.tree.map(cast, params.state))


def validity_function(
    readers: Sequence[Params], *, compute_dtype: str = "float32"
) -> Callable[[jax.Array], jax.Array]:
    """The search's `validity_fn` from its auxiliary classifiers, weights in `compute_dtype`.

    Args:
      readers: one classifier (images [B, H, W, C] -> logits [B, C]), or a committee of G that
        must all read the source class (the oracle's shift groups,
        `train_models.load_shift_groups`).

    Returns:
      x -> logits [B, C] for one reader, [G, B, C] for a committee.
    """
    if not readers:
        raise ValueError("validity_function needs at least one classifier.")
    if compute_dtype != "float32":
        readers = [cast_params(r, compute_dtype) for r in readers]
    if len(readers) == 1:
        return functools.partial(logits, readers[0])
    return functools.partial(_committee_logits, tuple(readers))


def _committee_logits(readers: tuple[Params, ...], x: jax.Array) -> jax.Array:
    return jnp.stack([logits(r, x) for r in readers])


def search_functions(
    vae: Params, classifier: Params, *, compute_dtype: str = "float32"
) -> tuple[Any, Any]:
    """(decode_fn, classify_fn) for `latent_search`, with the weights in `compute_dtype`.

    Pass the same `compute_dtype` as the `SearchConfig`'s: the search casts z to it, and these
    functions hold weights of that dtype, so the whole forward pass runs in it.

    Returns:
        decode_fn: z [B, L] -> images [B, H, W, C]; classify_fn: images -> logits [B, C].
    """
    if compute_dtype != "float32":
        vae, classifier = cast_params(vae, compute_dtype), cast_params(classifier, compute_dtype)
    return functools.partial(decode, vae), functools.partial(logits, classifier)
