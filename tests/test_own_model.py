"""The user's own models (`own_model`): the three forms a classifier comes in, what the
correction may change in each, the entry points and checkpoints of the command line, and the
checks that run before any stage. The whole pipeline on such models: tests/test_pipeline.py."""

import dataclasses
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx

from defuse_jax import losses, own_model
from defuse_jax.models import Frozen, Params, split_trainable
from defuse_jax.training import TrainConfig, fit

SHAPE, CLASSES = (8, 8, 1), 10


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.Dense(16)(x.reshape(x.shape[0], -1))
        x = linen.BatchNorm(use_running_average=True)(x)
        return linen.Dense(CLASSES)(linen.relu(x))


class NNXConv(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(4 * 8 * 8, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.drop(self.bn(nnx.relu(self.conv(x))))
        return self.out(x.reshape(x.shape[0], -1))


def _linen():
    module = LinenMLP()
    return module, module.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))


def _pair():
    params = {"w": jnp.full((64, CLASSES), 0.01), "b": jnp.zeros(CLASSES)}
    return (lambda p, x: x.reshape(len(x), -1) @ p["w"] + p["b"]), params


def _direct(kind, model):
    """The model's logits, called as its author would at inference."""
    if kind == "nnx":
        copy = nnx.merge(*nnx.split(model))
        copy.eval()
        return copy
    fn, params = (model[0].apply, model[1]) if kind == "linen" else model
    return lambda x: fn(params, x)


# kind: (build, frozen regex, the paths training must keep fixed whatever the regex)
FORMS = {
    "nnx": (lambda: NNXConv(nnx.Rngs(0)), "conv/", {"bn/mean", "bn/var", "drop/rngs/count"}),
    "linen": (_linen, "Dense_0", {"batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"}),
    "function": (_pair, "^b$", set()),
}


def _save(path, tree):
    """Save as a user would (Orbax saves in the background: wait for it)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(path), tree)


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


@pytest.mark.parametrize("kind", sorted(FORMS))
def test_each_form_gives_the_models_own_logits(kind):
    build, _, _ = FORMS[kind]
    model, x = build(), _images(5)
    clf = own_model.as_classifier(model)
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda p, x: p.module()(x))(clf, x)),
        np.asarray(_direct(kind, model)(x)),
        rtol=1e-6,
        atol=1e-6,
    )
    assert own_model.describe(clf)["kind"] == kind


def test_preprocess_runs_inside_the_model():
    fn, params = _pair()
    plain = own_model.as_classifier((fn, params))
    shifted = own_model.as_classifier((fn, params), preprocess=lambda x: 2.0 * x - 1.0)
    x = _images(3)
    np.testing.assert_allclose(
        np.asarray(shifted.module()(x)), np.asarray(plain.module()(2.0 * x - 1.0)), rtol=1e-6
    )


def _changed(before: Params, after: Params) -> set[str]:
    module = before.module()
    old, new = module.weights, after.module().weights
    return {
        path
        for path, a, b in zip(module.paths, old, new, strict=True)
        if not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
    }


@pytest.mark.parametrize("kind", sorted(FORMS))
def test_training_changes_only_the_trainable_weights(kind, tmp_path):
    """Frozen paths, batch statistics, RNG state and integer leaves stay; the rest is trained."""
    build, frozen, always_fixed = FORMS[kind]
    clf = own_model.as_classifier(build(), frozen=frozen)
    module = clf.module()
    fixed = {p for p, w in zip(module.paths, module.weights, strict=True) if isinstance(w, Frozen)}
    assert always_fixed <= fixed
    assert {p for p in module.paths if re.search(frozen, p)} <= fixed
    trainable, rest = split_trainable(clf.state)
    assert len(jax.tree.leaves(trainable)) == len(module.paths) - len(fixed) > 0
    x = _images(64)
    y = np.random.default_rng(1).integers(0, CLASSES, 64).astype(np.int32)
    trained, _ = fit(
        clf, losses.classifier_loss, {"x": x, "y": y},
        config=TrainConfig(epochs=1, batch_size=16, learning_rate=1e-2),
        checkpoint_dir=str(tmp_path / "ckpt"), fingerprint={}, progress=False,
    )  # fmt: skip
    assert _changed(clf, trained) == set(module.paths) - fixed


@pytest.mark.parametrize("kind", sorted(FORMS))
def test_saved_weights_load_back_into_the_users_structure(kind, tmp_path):
    build, _, _ = FORMS[kind]
    model = build()
    clf = own_model.as_classifier(model)
    moved = Params(
        clf.graphdef, jax.tree.map(lambda a: a + 1 if a.dtype == jnp.float32 else a, clf.state)
    )
    own_model.save_user_params(moved, str(tmp_path / "own"))
    if kind == "nnx":  # the README's two lines, for an NNX module
        nnx.update(
            model, ocp.StandardCheckpointer().restore(str(tmp_path / "own"), nnx.state(model))
        )
        loaded = own_model.as_classifier(model)
    else:
        template = model[1]
        restored = ocp.StandardCheckpointer().restore(str(tmp_path / "own"), template)
        loaded = own_model.as_classifier((model[0], restored))
    assert own_model.describe(loaded)["sha256"] == own_model.describe(moved)["sha256"]
    assert own_model.describe(loaded)["sha256"] != own_model.describe(clf)["sha256"]


def test_the_digest_follows_the_weights_and_the_frozen_set():
    fn, params = _pair()
    base = own_model.describe(own_model.as_classifier((fn, params)))
    same = own_model.describe(own_model.as_classifier((fn, dict(params))))
    other = own_model.describe(own_model.as_classifier((fn, {**params, "b": params["b"] + 1e-3})))
    assert base["sha256"] == same["sha256"] != other["sha256"]
    assert base["num_weights"] == 64 * CLASSES + CLASSES


# --------------------------------------------------------------------------------------------
# Checks before any stage: each bad input, one clear line.


def _bad(apply_fn):
    return own_model.as_classifier((apply_fn, {"w": jnp.ones((64, CLASSES))}))


BAD_CLASSIFIERS = {
    "logits of the wrong size": (
        _bad(lambda p, x: (x.reshape(len(x), -1) @ p["w"])[:, :7]),
        r"logits \[batch, 10\]",
    ),
    "one logit vector for the batch": (
        _bad(lambda p, x: (x.reshape(len(x), -1) @ p["w"]).sum(0)),
        r"logits \[batch, 10\]",
    ),
    "an input shape it rejects": (
        _bad(lambda p, x: x.reshape(len(x), 32) @ p["w"]),
        r"rejects images of shape \[4, 8, 8, 1\]",
    ),
    "NaN logits": (_bad(lambda p, x: x.reshape(len(x), -1) @ p["w"] * jnp.nan), "NaN"),
    "integer logits": (
        _bad(lambda p, x: (x.reshape(len(x), -1) @ p["w"]).astype(jnp.int32)),
        "floating-point",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CLASSIFIERS))
def test_a_classifier_that_cannot_serve_is_refused(case):
    clf, message = BAD_CLASSIFIERS[case]
    with pytest.raises(ValueError, match=message):
        own_model.check_classifier(clf, _images(4), CLASSES)


def test_a_working_classifier_passes_the_checks():
    fn, params = _pair()
    own_model.check_classifier(own_model.as_classifier((fn, params)), _images(4), CLASSES)


@pytest.mark.parametrize(
    "model, message",
    [
        ("not a model", "NNX module, \\(linen_module, variables\\) or \\(apply_fn, params\\)"),
        ((LinenMLP(), {"batch_stats": {}}), "'params' collection"),
    ],
)
def test_what_is_not_a_classifier_is_named(model, message):
    with pytest.raises(TypeError, match=message):
        own_model.as_classifier(model)


def _vae(decode_shape=SHAPE):
    def encode(p, x):
        return x.reshape(len(x), -1) @ p["e"]

    def decode(p, z):
        return jax.nn.sigmoid(z @ p["d"]).reshape(len(z), *decode_shape)

    size = int(np.prod(decode_shape))
    return encode, decode, {"e": jnp.ones((64, 3)) * 0.01, "d": jnp.ones((3, size)) * 0.01}


def test_a_vae_pair_encodes_decodes_and_is_checked():
    vae = own_model.as_vae(_vae())
    own_model.check_vae(vae, _images(4))
    mean, logvar = vae.module().encode(_images(2))
    assert mean.shape == logvar.shape == (2, 3) and not np.asarray(logvar).any()
    assert all(isinstance(w, Frozen) for w in vae.module().weights)  # never trained
    with pytest.raises(ValueError, match=r"decoder returns \[4, 4, 4, 1\]"):
        own_model.check_vae(own_model.as_vae(_vae((4, 4, 1))), _images(4))


def test_a_trained_conditional_vae_is_checked_with_the_labels():
    from flax import nnx

    from defuse_jax import models

    config = models.VAEConfig(latent_dim=3, hidden=16, conditional=True)
    vae = models.params_of(
        models.VAE(config, image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    )
    own_model.check_vae(vae, _images(4), np.arange(4))
    with pytest.raises(ValueError, match="pass the labels y"):
        own_model.check_vae(vae, _images(4))


# --------------------------------------------------------------------------------------------
# The command line's entry points and checkpoints.


ENTRY_MODULE = """
import jax
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 2, (3, 3), rngs=rngs)
        self.out = nnx.Linear(2 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


def make():
    return Net(nnx.Rngs(1))


def double(x):
    return 2.0 * x


def encode(p, x):
    return x.reshape(len(x), -1) @ p["e"]


def decode(p, z):
    return jax.nn.sigmoid(z @ p["d"]).reshape(len(z), 8, 8, 1)


def make_vae():
    return encode, decode, {"e": jnp.zeros((64, 3)), "d": jnp.zeros((3, 64))}
"""


@pytest.fixture
def entry_module(tmp_path, monkeypatch):
    """A module `mymodels` on the path: `make()` returns an NNX module, `double` preprocesses."""
    (tmp_path / "mymodels.py").write_text(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    import mymodels

    yield mymodels
    sys.modules.pop("mymodels", None)


def test_an_entry_point_and_its_checkpoint_give_the_saved_weights(entry_module, tmp_path):
    trained = entry_module.Net(nnx.Rngs(7))  # other weights than make()'s
    _save(tmp_path / "ckpt", nnx.state(trained))
    own = own_model.OwnModel(
        "mymodels:make", ckpt=str(tmp_path / "ckpt"), preprocess="mymodels:double"
    )
    clf = own_model.from_entry_point(own)
    expect = own_model.as_classifier(trained, preprocess=entry_module.double)
    x = _images(3)
    np.testing.assert_allclose(
        np.asarray(clf.module()(x)), np.asarray(expect.module()(x)), rtol=1e-6
    )
    assert own_model.describe(clf)["name"] == "mymodels:make"


def test_a_vae_entry_point_and_its_checkpoint(entry_module, tmp_path):
    weights = {"e": jnp.full((64, 3), 0.5), "d": jnp.full((3, 64), -0.5)}
    _save(tmp_path / "vae", weights)
    vae = own_model.from_entry_point(
        own_model.OwnModel("mymodels:make_vae", ckpt=str(tmp_path / "vae")), role="vae"
    )
    x = _images(2)
    np.testing.assert_allclose(
        np.asarray(vae.module().decode(vae.module().encode(x)[0])),
        np.asarray(entry_module.decode(weights, entry_module.encode(weights, x))),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_package_xyz:make", "cannot import 'no_such_package_xyz'"),
        ("mymodels:missing", "mymodels has no function 'missing'"),
    ],
)
def test_an_entry_point_that_cannot_be_loaded_is_named(entry_module, spec, message):
    with pytest.raises(ValueError, match=message):
        own_model.from_entry_point(own_model.OwnModel(spec))


def test_a_checkpoint_that_does_not_fit_the_template_is_named(entry_module, tmp_path):
    fn, params = _pair()
    _save(tmp_path / "pair", params)
    with pytest.raises(ValueError, match="does not fit the weights the entry point builds"):
        own_model.from_entry_point(own_model.OwnModel("mymodels:make", ckpt=str(tmp_path / "pair")))
    with pytest.raises(ValueError, match="no checkpoint directory"):
        own_model.from_entry_point(own_model.OwnModel("mymodels:make", ckpt=str(tmp_path / "none")))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"fn": "mymodels.make"}, "package.module:function"),
        ({"fn": "m:f", "preprocess": "not a spec"}, "package.module:function"),
        ({"fn": "m:f", "frozen": "(unclosed"}, "regular expression"),
    ],
)
def test_own_model_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        own_model.OwnModel(**fields)


def test_own_model_settings_round_trip_through_the_run_config():
    from defuse_jax.run_config import RunConfig, config_from_dict

    config = RunConfig(own_classifier=own_model.OwnModel("m:f", ckpt="/c", frozen="conv"))
    assert config_from_dict(dataclasses.asdict(config)) == config


def test_optax_sees_only_the_trainable_weights():
    clf = own_model.as_classifier(_linen(), frozen="Dense_0")
    trainable, _ = split_trainable(clf.state)
    state = optax.adam(1e-3).init(trainable)
    assert len(jax.tree.leaves(state[0].mu)) == len(jax.tree.leaves(trainable))


def test_a_users_model_trains_one_dispatch_per_step_on_a_cpu():
    """Inside a scan XLA:CPU runs autodiff's convolution gradients on a slow path; the project's
    conv layers avoid it, a user's may not (`training.default_loop`)."""
    from defuse_jax.models import Classifier, ClassifierConfig, params_of
    from defuse_jax.training import default_loop

    ours = params_of(Classifier(ClassifierConfig(kind="conv"), image_shape=(8, 8, 1),
                                num_classes=CLASSES, rngs=nnx.Rngs(0)))  # fmt: skip
    assert default_loop(own_model.as_classifier(_linen())) == "steps"
    assert default_loop(ours) == default_loop() == "scan"
