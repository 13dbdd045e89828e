"""Models: shapes and ranges, pure functions under jit/vmap/grad, clear errors on bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from defuse_jax import models

CASES = [  # (kind, image_shape)
    ("mlp", (8, 8, 1)),
    ("conv", (16, 16, 1)),
    ("conv", (12, 12, 3)),
]


@pytest.mark.parametrize("kind,shape", CASES)
def test_vae_and_classifier_pure_functions(kind, shape):
    vae = models.VAE(
        models.VAEConfig(kind=kind, latent_dim=6, hidden=32, channels=(8, 16)),
        image_shape=shape,
        rngs=nnx.Rngs(0),
    )
    clf = models.Classifier(
        models.ClassifierConfig(kind=kind, hidden=32, channels=(8, 16)),
        image_shape=shape,
        num_classes=5,
        rngs=nnx.Rngs(1),
    )
    vp, cp = models.params_of(vae), models.params_of(clf)
    z = jax.random.normal(jax.random.key(0), (3, 6))
    x = jax.jit(models.decode)(vp, z)
    assert x.shape == (3, *shape)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    mean, logvar = jax.jit(models.encode)(vp, x)
    assert mean.shape == logvar.shape == (3, 6)
    logits = jax.jit(models.logits)(cp, x)
    assert logits.shape == (3, 5)
    # vmap over single examples agrees with the batched call.
    per_example = jax.jit(jax.vmap(lambda zi: models.logits(cp, models.decode(vp, zi[None]))[0]))(z)
    np.testing.assert_allclose(per_example, logits, rtol=1e-4, atol=1e-5)
    # Gradients flow from logits back to the latent code, and to the parameters.
    g = jax.jit(jax.grad(lambda zz: models.logits(cp, models.decode(vp, zz))[:, 0].sum()))(z)
    assert g.shape == z.shape and bool(jnp.any(g != 0))
    # ... and the gradient with respect to the weights is right: along a random direction it
    # matches the central finite difference (a small step: a larger one crosses ReLU kinks).
    loss = jax.jit(
        jax.value_and_grad(lambda s: models.logits(models.Params(cp.graphdef, s), x).sum())
    )
    _, gp = loss(cp.state)
    # (NumPy for the direction and the steps: eager JAX would compile an op per weight shape.)
    rng = np.random.default_rng(2)
    w = jax.tree.map(np.asarray, cp.state)
    d = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), w)
    eps = 1e-4
    step = lambda sign: jax.tree.map(lambda a, b: a + sign * eps * b, w, d)  # noqa: E731
    numeric = (float(loss(step(1.0))[0]) - float(loss(step(-1.0))[0])) / (2 * eps)
    pairs = zip(jax.tree.leaves(gp), jax.tree.leaves(d), strict=True)
    analytic = sum(float(np.vdot(g, b)) for g, b in pairs)
    assert analytic == pytest.approx(numeric, rel=1e-2, abs=1e-2)
    # The weights are arguments, not constants baked in when the function was traced: other
    # weights through the compiled function give their own logits, and the module the first
    # weights came from still holds them.
    halved = jax.tree.map(lambda a: 0.5 * a, w)
    got = jax.jit(models.logits)(models.Params(cp.graphdef, halved), x)
    assert float(got.sum()) == pytest.approx(float(loss(halved)[0]), rel=1e-5, abs=1e-5)
    assert not np.allclose(got, logits, rtol=1e-3)
    np.testing.assert_array_equal(jax.jit(models.logits)(models.params_of(clf), x), logits)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((2, 8, 8, 1), np.float32), ValueError, r"\[batch, 28, 28, 1\]"),
        (np.zeros((28, 28, 1), np.float32), ValueError, "shape"),
        (np.zeros((2, 28, 28, 1), np.uint8), TypeError, "floating-point"),
    ],
)
def test_classifier_rejects_wrong_images(x, error, match):
    clf = models.Classifier(
        models.ClassifierConfig(kind="conv", hidden=8, channels=(4, 4)),
        image_shape=(28, 28, 1),
        num_classes=10,
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(error, match=match):
        jax.jit(models.logits)(models.params_of(clf), jnp.asarray(x))


def test_decode_rejects_wrong_latent_size():
    vae = models.VAE(models.VAEConfig(latent_dim=4), image_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        jax.jit(models.decode)(models.params_of(vae), jnp.zeros((2, 5)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="conv", image_shape=(10, 10, 1)), "divisible by 4"),
        (dict(kind="rnn", image_shape=(8, 8, 1)), "Unknown model kind"),
        (dict(kind="mlp", image_shape=(8, 8)), "height, width, channels"),
    ],
)
def test_model_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.Classifier(
            models.ClassifierConfig(kind=kwargs["kind"]),
            image_shape=kwargs["image_shape"],
            num_classes=10,
            rngs=nnx.Rngs(0),
        )


def test_host_lecun_normal_matches_jax_distribution():
    shape = (64, 256)
    w = np.asarray(models.host_lecun_normal(jax.random.key(3), shape))
    ref = np.asarray(jax.nn.initializers.lecun_normal()(jax.random.key(3), shape))
    assert w.shape == shape and w.dtype == np.float32
    assert abs(w.std() / ref.std() - 1.0) < 0.05
    assert np.abs(w).max() <= 2.0 / np.sqrt(64) / 0.8796 + 1e-6  # truncated at 2 std
    # Deterministic in the key, different across keys.
    np.testing.assert_array_equal(w, models.host_lecun_normal(jax.random.key(3), shape))
    assert not np.array_equal(w, models.host_lecun_normal(jax.random.key(4), shape))


@pytest.mark.parametrize("n, batch_size", [(1, 4), (4, 4), (10, 4), (3, 100)])
def test_map_batches_compiles_once_and_trims_the_padding(n, batch_size):
    from defuse_jax.batching import map_batches

    traces = []

    @jax.jit
    def fn(b):
        traces.append(b["x"].shape)  # runs per trace, not per call
        return {"double": 2 * b["x"], "sum": b["x"].sum(axis=1)}

    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    out = map_batches(fn, {"x": x}, batch_size=batch_size)
    np.testing.assert_array_equal(out["double"], 2 * x)
    np.testing.assert_array_equal(out["sum"], x.sum(axis=1))
    assert traces == [(batch_size, 3)]
    assert map_batches(fn, {"x": x[:0]}, batch_size=batch_size) is None


@pytest.mark.parametrize("kind,shape", CASES[:2])
def test_conditional_vae_code_holds_the_class_and_decodes_its_argmax(kind, shape):
    from defuse_jax import losses

    config = models.VAEConfig(kind=kind, latent_dim=3, hidden=16, channels=(4, 8), conditional=True)
    with pytest.raises(ValueError, match="num_classes"):
        models.VAE(config, image_shape=shape, rngs=nnx.Rngs(0))
    vp = models.params_of(models.VAE(config, image_shape=shape, num_classes=4, rngs=nnx.Rngs(0)))
    assert models.style_dims(vp) == 3
    x = jax.random.uniform(jax.random.key(1), (5, *shape))
    y = jnp.asarray([0, 1, 2, 3, 1])
    z = jax.jit(models.mean_code)(vp, x, y)
    assert z.shape == (5, 3 + 4)
    np.testing.assert_array_equal(z[:, :3], models.encode(vp, x)[0])
    np.testing.assert_array_equal(z[:, 3:], models.CLASS_SCALE * np.eye(4)[np.asarray(y)])
    decode = jax.jit(models.decode)
    # The class is the block's argmax: noise that keeps it decodes the same image, another
    # class decodes another one.
    noisy = z.at[:, 3:].add(jax.random.uniform(jax.random.key(2), (5, 4), maxval=1.0))
    np.testing.assert_array_equal(decode(vp, noisy), decode(vp, z))
    other = z.at[:, 3:].set(models.CLASS_SCALE * np.eye(4)[(np.asarray(y) + 1) % 4])
    assert not np.allclose(decode(vp, other), decode(vp, z))
    # Training needs the classes; the loss is finite with them.
    with pytest.raises(ValueError, match="pass the labels y"):
        losses.vae_loss(vp, {"x": x}, jax.random.key(0), jnp.int32(0))
    loss, _ = losses.vae_loss(vp, {"x": x, "y": y}, jax.random.key(0), jnp.int32(0))
    assert np.isfinite(float(loss))
    # An unconditional VAE's code is its mean, all of it free.
    plain = models.params_of(models.VAE(dataclasses.replace(config, conditional=False),
                                        image_shape=shape, rngs=nnx.Rngs(0)))  # fmt: skip
    assert models.style_dims(plain) is None
    np.testing.assert_array_equal(models.mean_code(plain, x, y), models.encode(plain, x)[0])


@pytest.mark.parametrize(
    "conditional, given, want",
    [(True, None, "CONDITIONAL"), (True, (1.0,), (1.0,)), (False, None, None),
     (False, (0.5, 2.0), (0.5, 2.0))],
)  # fmt: skip
def test_the_search_picks_its_scale_behind_a_conditional_vae_unless_told(conditional, given, want):
    from defuse_jax import identification

    config = models.VAEConfig(latent_dim=3, hidden=16, conditional=conditional)
    vae = models.params_of(
        models.VAE(config, image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    )
    want = identification.CONDITIONAL_SCALES if want == "CONDITIONAL" else want
    assert identification.candidate_scales(given, vae) == want


def test_validity_function_stacks_a_committee_and_casts_its_weights():
    readers = [models.params_of(models.Classifier(models.ClassifierConfig(), image_shape=(8, 8, 1),
                                                  num_classes=10, rngs=nnx.Rngs(i)))
               for i in range(2)]  # fmt: skip
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
    one = models.validity_function(readers[:1])(x)
    np.testing.assert_array_equal(one, models.logits(readers[0], x))
    both = models.validity_function(readers)(x)
    assert both.shape == (2, 3, 10)
    np.testing.assert_array_equal(both[1], models.logits(readers[1], x))
    low = models.validity_function(readers, compute_dtype="bfloat16")(x.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="at least one"):
        models.validity_function([])
