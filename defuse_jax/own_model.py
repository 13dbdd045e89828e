"""Debug your own classifier: a model defined outside the project, in the form every stage uses.

Defuse debugs a given classifier. `as_classifier` takes one as a researcher holds it:

- an NNX module (its `nnx.Param` weights are trained by the correction; batch statistics and
  other variables stay as they are, and the module is called in evaluation mode);
- a linen module with its variables, `(module, variables)` (the `params` collection is trained;
  every other collection, such as `batch_stats`, stays fixed and the module is applied without
  mutable collections, i.e. as at inference);
- a generic pair `(apply_fn, params)` with `apply_fn(params, x) -> logits [B, num_classes]`.

Each is called on images in the dataset's layout, `x: [B, H, W, C]` float32 in [0, 1];
`preprocess` maps them to what the model was trained on (another range, a normalisation, a
layout). `frozen` names weights the correction keeps fixed (a regular expression searched in the
weight's path, such as `params/Dense_0/kernel` or `conv/kernel`, or a predicate on the path);
integer and key-typed leaves are always kept fixed.

The result is a `models.Params` like the project's own classifier, so the search, the mixture,
the labels, the correction and the report need nothing else. `describe` gives the identity the
run's fingerprints cover (a digest of the weights and the model's name): other weights redo the
search and everything after it.

`load_entry_point` and `restore` serve the command line's `--classifier-fn module:function`
and `--classifier-ckpt PATH`.

Example:
    >>> clf = as_classifier((linen_model, variables), preprocess=lambda x: (x - 0.5) / 0.5)
    >>> pipeline.run("runs/mine", config, dataset=ds, classifier=clf)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from defuse_jax.checkpoint import error_line, quiet_restore
from defuse_jax.files import arrays_sha256
from defuse_jax.models import Frozen, Params, mean_code

Preprocess = Callable[[jax.Array], jax.Array]
FrozenSpec = str | Callable[[str], bool] | None


@dataclasses.dataclass(frozen=True)
class OwnModel:
    """A model defined outside the project, named by its entry point: the command line's
    `--classifier-fn`, `--classifier-ckpt`, `--classifier-frozen`, `--classifier-preprocess`
    (and `--vae-fn`, `--vae-ckpt`).

    Attributes:
        fn: "package.module:function"; `function()` returns what `as_classifier` takes (an
            NNX module, `(linen_module, variables)` or `(apply_fn, params)`), or for a VAE what
            `as_vae` takes (`(encode_fn, decode_fn, params)`): the trained weights, or a
            template of them that `ckpt` fills in.
        ckpt: an Orbax checkpoint of the weights (a directory written by
            `orbax.checkpoint.StandardCheckpointer`; for an NNX module, of `nnx.state(module)`),
            restored into what `fn` returns. None: `fn` returns the trained weights.
        frozen: a regular expression of the weight paths the correction keeps fixed.
        preprocess: "package.module:function" of `x [B, H, W, C] in [0, 1] -> the model's
            input` (`as_classifier`'s `preprocess`).
    """

    fn: str
    ckpt: str | None = None
    frozen: str | None = None
    preprocess: str | None = None

    def __post_init__(self):
        for what, spec in (("fn", self.fn), ("preprocess", self.preprocess)):
            if spec is not None and not (
                isinstance(spec, str) and re.fullmatch(r"[\w.]+:[\w.]+", spec)
            ):
                raise ValueError(
                    f"An entry point ({what}) names a function as 'package.module:function', "
                    f"got {spec!r}."
                )
        if self.frozen is not None:
            try:
                re.compile(self.frozen)
            except re.error as e:
                raise ValueError(
                    f"frozen is a regular expression of weight paths; {self.frozen!r} is not "
                    f"one ({e})."
                ) from None


class _Weights(nnx.Module):
    """A pytree of weights as NNX variables: its leaves, in order, each an `nnx.Param` (trained
    by the correction) or a `models.Frozen` (kept fixed); `params()` rebuilds the pytree, so the
    module is pure and jits like the project's own models."""

    # Its convolutions, if any, are not the project's loop-friendly ones (`conv_layers`): `fit`
    # dispatches its steps one by one on a CPU (`training.default_loop`).
    scan_friendly_gradients = False

    def __init__(self, params: Any, *, fixed: Callable[[str, Any], bool], name: str, kind: str):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.name, self.kind = name, kind
        self.paths = tuple(_path(p) for p, _ in flat)
        # Key-typed leaves (an NNX module's RNG state) are kept as their raw key data.
        self.key_impls = tuple(_key_impl(leaf) for _, leaf in flat)
        weights = []
        for path, (_, leaf), impl in zip(self.paths, flat, self.key_impls, strict=True):
            value = jax.random.key_data(leaf) if impl else jnp.asarray(leaf)
            trainable = jnp.issubdtype(value.dtype, jnp.floating) and not impl
            weights.append(
                nnx.Param(value) if trainable and not fixed(path, leaf) else Frozen(value)
            )
        self.weights = nnx.List(weights)

    def params(self) -> Any:
        """The weights as the model's own pytree (the `params` it was built from)."""
        leaves = [
            jax.random.wrap_key_data(w[...], impl=impl) if impl else w[...]
            for w, impl in zip(self.weights, self.key_impls, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class ExternalClassifier(_Weights):
    """A classifier defined outside the project: `apply_fn(params, preprocess(x))`."""

    def __init__(
        self,
        apply_fn: Callable[[Any, jax.Array], jax.Array],
        params: Any,
        *,
        fixed: Callable[[str, Any], bool],
        preprocess: Preprocess | None = None,
        name: str,
        kind: str,
    ):
        super().__init__(params, fixed=fixed, name=name, kind=kind)
        self.apply_fn, self.preprocess = apply_fn, preprocess

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] in [0, 1] -> logits [B, num_classes]."""
        if self.preprocess is not None:
            x = self.preprocess(x)
        return self.apply_fn(self.params(), x)


class ExternalVAE(_Weights):
    """A generative model defined outside the project: `encode_fn(params, x)` gives the mean
    code (or `(mean, logvar)`), `decode_fn(params, z)` the images. Never trained: every weight
    is frozen."""

    def __init__(self, encode_fn: Callable, decode_fn: Callable, params: Any, *, name: str):
        super().__init__(params, fixed=lambda path, leaf: True, name=name, kind="function")
        self.encode_fn, self.decode_fn = encode_fn, decode_fn

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, H, W, C] in [0, 1] -> (mean [B, L], logvar [B, L]; zeros if not given)."""
        out = self.encode_fn(self.params(), x)
        mean, logvar = out if isinstance(out, tuple) else (out, jnp.zeros_like(out))
        return mean, logvar

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, L] -> x: [B, H, W, C] in [0, 1]."""
        return self.decode_fn(self.params(), z)


def _path(keys: tuple[Any, ...]) -> str:
    """A leaf's path as "a/b/0" (NNX variables' trailing `.value` left out)."""
    parts = []
    for k in keys:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def _key_impl(leaf: Any) -> str | None:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(leaf))
    return None


def _matcher(frozen: FrozenSpec) -> Callable[[str], bool]:
    if frozen is None:
        return lambda path: False
    if isinstance(frozen, str):
        pattern = re.compile(frozen)
        return lambda path: pattern.search(path) is not None
    if callable(frozen):
        return frozen
    raise TypeError(
        f"frozen is a regular expression of weight paths or a predicate on them, got {frozen!r}."
    )


def _qualname(obj: Any) -> str:
    """ "module.Name" of a class or function (of an instance: of its class)."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def as_classifier(
    model: Any,
    *,
    preprocess: Preprocess | None = None,
    frozen: FrozenSpec = None,
    name: str | None = None,
) -> Params:
    """The user's classifier in the form the stages use.

    Args:
        model: an NNX module; `(linen_module, variables)`; `(apply_fn, params)` with
            `apply_fn(params, x) -> logits [B, num_classes]`; or a `Params` (the project's own
            classifier, returned as it is).
        preprocess: `x [B, H, W, C] in [0, 1] -> the model's input`, inside the model (so the
            search differentiates through it and the correction trains through it).
        frozen: the weights the correction keeps fixed: a regular expression searched in each
            weight's path ("params/Dense_0/kernel" for linen, "conv/kernel" for NNX, the
            pytree's keys for a pair) or a predicate on the path.
        name: what the run's records call the model (default: its class or function's name).

    Raises:
        TypeError: `model` is none of these.
    """
    if isinstance(model, Params):
        if preprocess is not None or frozen is not None:
            raise ValueError(
                "preprocess and frozen apply to a model defined outside the project; the "
                "project's own classifier (a Params) takes neither."
            )
        return model
    match = _matcher(frozen)
    if isinstance(model, nnx.Module):
        copy = nnx.merge(*nnx.split(model))  # the user's module is left as it is
        copy.eval()  # dropout off, batch norm on its running statistics
        graphdef, state = nnx.split(copy)
        trainable = {
            _path(p)
            for p, v in jax.tree_util.tree_flatten_with_path(
                state, is_leaf=lambda v: isinstance(v, nnx.Variable)
            )[0]
            if isinstance(v, nnx.Param)
        }
        apply_fn = _NNXApply(graphdef)
        fixed = lambda path, leaf: path not in trainable or match(path)  # noqa: E731
        kind, params, default_name = "nnx", state, _qualname(type(model))
    elif isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], linen.Module):
        module, variables = model
        if not isinstance(variables, dict) or "params" not in variables:
            raise TypeError(
                "A linen classifier comes with its variables, (module, variables) where "
                "variables = module.init(...) holds a 'params' collection; got "
                f"{type(variables).__name__} with keys {list(getattr(variables, 'keys', list)())}."
            )
        apply_fn = _LinenApply(module)
        fixed = lambda path, leaf: not path.startswith("params/") or match(path)  # noqa: E731
        kind, params, default_name = "linen", dict(variables), _qualname(type(module))
    elif isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
        apply_fn, params = model
        fixed = lambda path, leaf: match(path)  # noqa: E731
        kind, default_name = "function", _qualname(apply_fn)
    else:
        raise TypeError(
            "classifier must be an NNX module, (linen_module, variables) or (apply_fn, params) "
            f"with apply_fn(params, x) -> logits; got {type(model).__name__}."
        )
    module = ExternalClassifier(
        apply_fn, params, fixed=fixed, preprocess=preprocess, name=name or default_name,
        kind=kind,
    )  # fmt: skip
    graphdef, state = nnx.split(module)
    return Params(graphdef, state)


class _NNXApply:
    """`(state, x) -> nnx.merge(graphdef, state)(x)`: an NNX module as an apply function."""

    def __init__(self, graphdef: Any):
        self.graphdef = graphdef

    def __call__(self, state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(self.graphdef, state)(x)


class _LinenApply:
    """`(variables, x) -> module.apply(variables, x)`, at inference (no mutable collection)."""

    def __init__(self, module: linen.Module):
        self.module = module

    def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
        return self.module.apply(variables, x)


def as_vae(vae: Any, *, name: str | None = None) -> Params:
    """The user's generative model in the form the stages use.

    Args:
        vae: the project's VAE (`Params`, e.g. from `train_models.load_trained`), returned as
            it is; or `(encode_fn, decode_fn, params)` with `encode_fn(params, x [B, H, W, C]
            in [0, 1]) -> mean [B, L]` (or `(mean, logvar)`) and `decode_fn(params, z [B, L])
            -> images [B, H, W, C] in [0, 1]`.
        name: what the run's records call it (default: the decoder function's name).
    """
    if isinstance(vae, Params):
        return vae
    if isinstance(vae, tuple) and len(vae) == 3 and callable(vae[0]) and callable(vae[1]):
        encode_fn, decode_fn, params = vae
        module = ExternalVAE(encode_fn, decode_fn, params, name=name or _qualname(decode_fn))
        return Params(*nnx.split(module))
    raise TypeError(
        "vae must be the project's VAE (Params) or (encode_fn, decode_fn, params); got "
        f"{type(vae).__name__}."
    )


def is_external(classifier: Params) -> bool:
    """Whether `classifier` is a model defined outside the project (`as_classifier`)."""
    return isinstance(classifier.module(), _Weights)


def describe(model: Params) -> dict[str, Any]:
    """What identifies a model in the run's records and fingerprints: its name, kind, number of
    weights, which are frozen, and the SHA-256 of all of them (path, dtype, shape and bytes)."""
    module = model.module()
    if isinstance(module, _Weights):
        named = list(zip(module.paths, (w[...] for w in module.weights), strict=True))
        frozen = [
            p for p, w in zip(module.paths, module.weights, strict=True) if isinstance(w, Frozen)
        ]
        name, kind = module.name, module.kind
    else:  # the project's own model, given as weights
        named = [
            (_path(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(model.state)[0]
        ]
        frozen, name, kind = [], _qualname(type(module)), "project"
    preprocess = getattr(module, "preprocess", None)
    return {
        "name": name,
        "kind": kind,
        "num_weights": int(sum(np.size(leaf) for _, leaf in named)),
        "frozen": frozen,
        "preprocess": None if preprocess is None else _qualname(preprocess),
        "sha256": arrays_sha256([leaf for _, leaf in named], names=[p for p, _ in named]),
    }


def user_params(classifier: Params) -> Any:
    """An external classifier's weights as the user's own pytree (the linen variables, the
    pair's params, or the NNX module's `nnx.State`), for saving and loading back."""
    return classifier.module().params()


# --------------------------------------------------------------------------------------------
# The command line: entry points and checkpoints.


def load_entry_point(spec: str, *, flag: str) -> Callable[..., Any]:
    """The function `spec` ("package.module:function") names; `flag` names it in errors.

    Raises:
        ValueError: the module cannot be imported, or has no such callable.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing it
        raise ValueError(
            f"{flag} {spec}: cannot import {module_name!r} ({type(e).__name__}: {e}). "
            "Install the package or add its directory to PYTHONPATH."
        ) from e
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"{flag} {spec}: {module_name} has no function {attr!r}.")
    return fn


def restore(made: Any, ckpt: str, *, what: str) -> Any:
    """`made` (what an entry point returned) with its weights restored from the Orbax
    checkpoint `ckpt`: an NNX module is updated in place from a checkpoint of
    `nnx.state(module)`; in a tuple, the last element is the weights' template.

    Raises:
        ValueError: `ckpt` is missing or does not fit the weights' structure and shapes.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(ckpt)
    if not os.path.isdir(path):
        raise ValueError(f"{what}: no checkpoint directory there.")
    if isinstance(made, nnx.Module):
        template = nnx.state(made)
    elif isinstance(made, tuple) and len(made) in (2, 3):
        template = made[-1]
    else:
        raise TypeError(
            f"{what}: the entry point returned {type(made).__name__}; it returns an NNX module, "
            "(linen_module, variables), (apply_fn, params) or (encode_fn, decode_fn, params)."
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
        with quiet_restore():  # Orbax's reports of a failed restore stay off the terminal
            restored = ocp.StandardCheckpointer().restore(path, abstract)
    except Exception as e:  # orbax raises several types for a tree or shape mismatch
        raise ValueError(
            f"{what}: the checkpoint does not fit the weights the entry point builds "
            f"({error_line(e)}). Check that it was saved from the same model."
        ) from None
    if isinstance(made, nnx.Module):
        nnx.update(made, restored)
        return made
    return (*made[:-1], restored)


def from_entry_point(own: OwnModel, *, role: str = "classifier") -> Params:
    """The model `own` names, restored from its checkpoint (the command line's route).

    Args:
        own: the entry point and checkpoint.
        role: "classifier" (`as_classifier`) or "vae" (`as_vae`).
    """
    made = load_entry_point(own.fn, flag=f"--{role}-fn")()
    if own.ckpt is not None:
        made = restore(made, own.ckpt, what=f"--{role}-ckpt {own.ckpt}")
    if role == "vae":
        return as_vae(made, name=own.fn)
    preprocess = own.preprocess and load_entry_point(own.preprocess, flag="--classifier-preprocess")
    return as_classifier(made, preprocess=preprocess, frozen=own.frozen, name=own.fn)


def save_user_params(classifier: Params, path: str) -> None:
    """Save an external classifier's weights in the user's own structure (`user_params`) as an
    Orbax checkpoint at `path` (replaced if there; Orbax writes it under a temporary name and
    renames it when complete). Load them back into the model with
    `orbax.checkpoint.StandardCheckpointer().restore(path, template)`, where `template` is the
    variables, params or `nnx.state(model)` the model was given with."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), user_params(classifier), force=True)
    checkpointer.wait_until_finished()


# --------------------------------------------------------------------------------------------
# Checks before any stage runs.


def check_classifier(classifier: Params, x: np.ndarray, num_classes: int) -> None:
    """Raise a one-line `ValueError` when `classifier` cannot serve on the dataset's images.

    Args:
        classifier: the classifier (`as_classifier`).
        x: [n, H, W, C] a few of the dataset's images (float32 in [0, 1]).
        num_classes: the dataset's number of classes.
    """
    x = jnp.asarray(x, jnp.float32)
    where = f"images of shape {list(x.shape)} float32 in [0, 1] (the dataset's layout)"
    try:
        out = jax.eval_shape(lambda p, x: p.module()(x), classifier, x)
    except Exception as e:
        raise ValueError(
            f"The classifier rejects {where}: {error_line(e)}. Pass "
            "preprocess= (a function of those images) to map them to the input it expects."
        ) from None
    if not hasattr(out, "shape") or tuple(out.shape) != (len(x), num_classes):
        raise ValueError(
            f"The classifier returns {getattr(out, 'shape', type(out).__name__)} for {where}; "
            f"Defuse needs logits [batch, {num_classes}] for the dataset's {num_classes} classes."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"The classifier returns {out.dtype} logits; Defuse needs floating-point logits."
        )
    logits = np.asarray(jax.jit(lambda p, x: p.module()(x))(classifier, x))
    if not np.isfinite(logits).all():
        raise ValueError(
            f"The classifier returns NaN or infinite logits on {len(x)} of the dataset's test "
            "images: check its weights (a checkpoint from a diverged run?) and its preprocess."
        )


def check_vae(vae: Params, x: np.ndarray, y: np.ndarray | None = None) -> None:
    """Raise a one-line `ValueError` when `vae` cannot encode and decode the dataset's images.

    Args:
        vae: the generative model (`as_vae`).
        x: [n, H, W, C] a few of the dataset's images (float32 in [0, 1]).
        y: [n] their labels (a conditional VAE's code holds the class).
    """
    x = jnp.asarray(x, jnp.float32)
    y = None if y is None else jnp.asarray(y, jnp.int32)

    def round_trip(p, x, y):
        mean, logvar = p.module().encode(x)
        return mean, logvar, p.module().decode(mean_code(p, x, y))

    try:
        mean, logvar, recon = jax.eval_shape(round_trip, vae, x, y)
    except Exception as e:
        raise ValueError(
            f"The VAE cannot encode and decode images of shape {list(x.shape)} float32 in "
            f"[0, 1] (the dataset's layout): {error_line(e)}."
        ) from None
    if len(mean.shape) != 2 or mean.shape[0] != len(x) or tuple(logvar.shape) != mean.shape:
        raise ValueError(
            f"The VAE's encoder returns codes of shape {list(mean.shape)} (log-variances "
            f"{list(logvar.shape)}); Defuse needs [batch, latent_dim]."
        )
    if tuple(recon.shape) != tuple(x.shape):
        raise ValueError(
            f"The VAE's decoder returns {list(recon.shape)} for {len(x)} codes; Defuse needs "
            f"images of the dataset's shape {list(x.shape)}."
        )


def own_models(config: Any, *, classifier: Any = None, vae: Any = None) -> dict[str, Params]:
    """The user's models of a run, given as objects (`classifier`, `vae`, as `pipeline.run`
    takes them) or by the entry points `config` (a `RunConfig`) names (`own_classifier`,
    `own_vae`): {"classifier": ..., "vae": ...}, each only when given.

    Raises:
      ValueError: a model given both ways.
    """
    own = {}
    if classifier is not None and config.own_classifier is not None:
        raise ValueError(
            "Both classifier= and config.own_classifier name the classifier to debug; give one."
        )
    if classifier is not None:
        own["classifier"] = as_classifier(classifier)
    elif config.own_classifier is not None:
        own["classifier"] = from_entry_point(config.own_classifier)
    if vae is not None and config.own_vae is not None:
        raise ValueError("Both vae= and config.own_vae name the VAE to search with; give one.")
    if vae is not None:
        own["vae"] = as_vae(vae)
    elif config.own_vae is not None:
        own["vae"] = from_entry_point(config.own_vae, role="vae")
    return own
