"""The rewritten decoder layers equal the flax layers they replace, values and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from defuse_jax import conv_layers, losses, models, training
from defuse_jax.conv_layers import (
    conv2d,
    conv_few_outputs,
    conv_few_outputs_of_phases,
    conv_transpose_stride2,
    interleave_phases,
    phase_conv,
)

# Host-side init: flax's default initialiser compiles an XLA program per weight shape.
_INIT = dict(kernel_init=models.host_lecun_normal)


def _inputs(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize(
    "height, width, cin, cout, bias",
    [(7, 7, 64, 32, True), (14, 14, 32, 32, True), (3, 5, 2, 3, False), (1, 1, 4, 2, True)],
)
def test_conv_transpose_stride2_matches_flax(height, width, cin, cout, bias):
    layer = nnx.ConvTranspose(
        cin, cout, (4, 4), strides=(2, 2), padding="SAME", use_bias=bias, **_INIT, rngs=nnx.Rngs(1)
    )
    if bias:  # a non-zero bias, so that adding it is checked too
        layer.bias[...] = _inputs((cout,), seed=3)
    x = _inputs((2, height, width, cin))
    b = layer.bias[...] if bias else None
    got = jax.jit(conv_transpose_stride2)(x, layer.kernel[...], b)  # jitted: eager ops compile
    want = layer(x)  # one by one, which made these tests slow
    assert got.shape == (2, 2 * height, 2 * width, cout)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda k, x: jnp.sum(jnp.sin(fn(k, x)))

    ours = jax.jit(jax.grad(loss(lambda k, x: conv_transpose_stride2(x, k, b)), argnums=(0, 1)))
    ref = jax.jit(
        jax.grad(
            loss(
                lambda k, x: jax.lax.conv_transpose(x, k, (2, 2), "SAME") + (0 if b is None else b)
            ),
            argnums=(0, 1),
        )
    )
    for g, r in zip(ours(layer.kernel[...], x), ref(layer.kernel[...], x), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kernel, cin, cout", [((3, 3), 32, 1), ((3, 3), 8, 3), ((5, 3), 4, 2), ((1, 1), 6, 1)]
)
def test_conv_few_outputs_matches_flax(kernel, cin, cout):
    layer = nnx.Conv(cin, cout, kernel, padding="SAME", **_INIT, rngs=nnx.Rngs(2))
    layer.bias[...] = _inputs((cout,), seed=4)
    x = _inputs((3, 9, 6, cin))
    got = jax.jit(conv_few_outputs)(x, layer.kernel[...], layer.bias[...])
    np.testing.assert_allclose(got, layer(x), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda k: jnp.sum(conv_few_outputs(x, k, None) ** 2)))(layer.kernel[...])
    r = jax.jit(jax.grad(lambda k: jnp.sum(_conv(x, k) ** 2)))(layer.kernel[...])
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("height, width, cin, cout", [(14, 14, 32, 1), (3, 5, 4, 3)])
def test_phases_go_to_the_output_layer_uninterleaved(height, width, cin, cout):
    """The decoder's last two layers on phases equal them on the interleaved image: bias and
    relu inside `phase_conv`, and the output convolution's taps taken on the phases."""
    deconv = nnx.ConvTranspose(cin, cin, (4, 4), strides=(2, 2), padding="SAME", **_INIT,
                               rngs=nnx.Rngs(5))  # fmt: skip
    deconv.bias[...] = _inputs((cin,), seed=6)
    out = nnx.Conv(cin, cout, (3, 3), padding="SAME", **_INIT, rngs=nnx.Rngs(7))
    out.bias[...] = _inputs((cout,), seed=8)
    x = _inputs((2, height, width, cin))

    @jax.jit
    def both(x):
        y = phase_conv(x, deconv.kernel[...], deconv.bias[...], activation=nnx.relu)
        image = nnx.relu(conv_transpose_stride2(x, deconv.kernel[...], deconv.bias[...]))
        return (y, image, conv_few_outputs_of_phases(y, out.kernel[...], out.bias[...]),
                conv_few_outputs(image, out.kernel[...], out.bias[...]))  # fmt: skip

    y, image, got, want = both(x)
    assert y.shape == (2, height + 1, width + 1, 2, 2, cin)
    np.testing.assert_array_equal(interleave_phases(y), image)  # the same values, moved
    assert got.shape == (2, 2 * height, 2 * width, cout)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "x_dtype, param_dtype",
    [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)],
)
def test_dtypes_follow_the_flax_layers(x_dtype, param_dtype):
    x = _inputs((2, 3, 5, 4))
    with jax.numpy_dtype_promotion("standard"):  # flax promotes mixed dtypes like this too
        for flax_cls, ours, kw in (
            (nnx.ConvTranspose, conv_transpose_stride2, dict(strides=(2, 2), kernel_size=(4, 4))),
            (nnx.Conv, conv_few_outputs, dict(kernel_size=(3, 3))),
        ):
            layer = flax_cls(
                4, 2, padding="SAME", param_dtype=param_dtype, **_INIT, **kw, rngs=nnx.Rngs(0)
            )
            layer.bias[...] = _inputs((2,), seed=5).astype(param_dtype)
            want = layer(x.astype(x_dtype))
            got = jax.jit(ours)(x.astype(x_dtype), layer.kernel[...], layer.bias[...])
            assert got.dtype == want.dtype
            np.testing.assert_allclose(
                got.astype(jnp.float32), want.astype(jnp.float32), rtol=2e-2, atol=2e-2
            )


@pytest.mark.parametrize(
    "fn, kernel_shape, match",
    [
        (conv_transpose_stride2, (3, 3, 4, 2), "4x4 kernel"),
        (conv_few_outputs, (2, 2, 4, 2), "odd kernel"),
        (phase_conv, (3, 3, 4, 2), "4x4 kernel"),
    ],
)
def test_unsupported_kernels_are_refused(fn, kernel_shape, match):
    with pytest.raises(ValueError, match=match):
        fn(_inputs((1, 3, 3, 4)), jnp.zeros(kernel_shape), None)


def test_conv_vae_decode_equals_the_flax_layers():
    vae = models.VAE(
        models.VAEConfig(kind="conv", latent_dim=4, hidden=16, channels=(8, 16)),
        image_shape=(12, 8, 2),
        rngs=nnx.Rngs(0),
    )
    z = _inputs((5, 4))
    h, w, c = vae.image_shape
    g = nnx.relu(vae.dec_head(z)).reshape(5, h // 4, w // 4, 16)
    want = vae.out(nnx.relu(vae.deconv2(nnx.relu(vae.deconv1(g)))))
    np.testing.assert_allclose(vae.decode_logits(z), want, rtol=1e-5, atol=1e-5)
    assert models.decoder_formulation() == "phase"  # CPU's default
    try:  # the other formulation: the flax layers themselves
        models.set_decoder_formulation("native")
        np.testing.assert_allclose(vae.decode_logits(z), want, rtol=1e-6, atol=1e-6)
    finally:
        models.set_decoder_formulation(None)
    with pytest.raises(ValueError, match="decoder formulation"):
        models.set_decoder_formulation("winograd")


def _lax_conv(x, k, strides, padding):
    return jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "shape, kernel, strides, padding",
    [
        ((3, 14, 14, 1, 8), (3, 3), (1, 1), "SAME"),  # the classifier's layers
        ((2, 9, 7, 8, 5), (4, 4), (2, 2), "SAME"),  # the encoder's, odd sides
        ((2, 10, 9, 2, 3), (5, 2), (3, 1), "VALID"),  # rows the strides never reach
        ((2, 7, 9, 3, 4), (3, 3), (2, 2), ((0, 2), (1, 0))),  # explicit pads
    ],
)
def test_conv2d_equals_lax_values_and_gradients(shape, kernel, strides, padding):
    b, h, w, cin, cout = shape
    rng = np.random.default_rng(0)  # host draws: eager jax.random compiles per shape
    x, k, bias = (
        rng.standard_normal(s, np.float32) for s in ((b, h, w, cin), kernel + (cin, cout), (cout,))
    )

    def value_and_grads(conv):  # one program per side: values and both gradients
        return jax.jit(
            jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=(0, 1))
        )(x, k)

    ours = value_and_grads(lambda x, k: conv2d(x, k, None, strides=strides, padding=padding))
    ref = value_and_grads(lambda x, k: _lax_conv(x, k, strides, padding))
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    with_bias = jax.jit(lambda x, k, b: conv2d(x, k, b, strides=strides, padding=padding))
    np.testing.assert_allclose(
        with_bias(x, k, bias), _lax_conv(x, k, strides, padding) + bias, atol=1e-5
    )


@pytest.mark.parametrize("model", ["classifier", "vae"])
def test_scanned_conv_training_runs_only_library_convolutions(model):
    """Inside the training loop's scan, every convolution XLA:CPU compiles is in the canonical
    NHWC/HWIO form its convolution library runs; autodiff's own transposed convolutions were
    left in other dimension orders there and ran 19x slower (conv_layers.py)."""
    shape = (16, 16, 1)  # at 8x8 XLA swaps a tiny strided input gradient's operands itself
    if model == "vae":
        config = models.VAEConfig(kind="conv", latent_dim=3, hidden=8, channels=(4, 8))
        params = models.params_of(models.VAE(config, image_shape=shape, rngs=nnx.Rngs(0)))
        loss_fn, batch = losses.vae_loss, {"x": jnp.zeros((4, *shape))}
    else:
        config = models.ClassifierConfig(kind="conv", hidden=8, channels=(4, 8))
        clf = models.Classifier(config, image_shape=shape, num_classes=3, rngs=nnx.Rngs(0))
        params, loss_fn = models.params_of(clf), losses.classifier_loss
        batch = {"x": jnp.zeros((4, *shape)), "y": jnp.zeros((4,), jnp.int32)}
    optimizer = training.make_optimizer(training.TrainConfig())
    state = training.TrainState(
        jnp.zeros((), jnp.int32), params.state, optimizer.init(params.state)
    )
    segment = training.make_train_segment(loss_fn, params.graphdef, optimizer)
    idx, valid = jnp.zeros((2, 4), jnp.int32), jnp.ones((2,), bool)
    hlo = segment.lower(state, batch, idx, valid, jax.random.key(0)).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
    assert len(labels) >= (3 if model == "classifier" else 7)  # forward and input gradients
    assert set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.parametrize(
    "shape, kernel, strides",
    [
        ((2, 28, 28, 1, 32), (3, 3), 1),  # the conv classifier's first layer
        ((2, 28, 28, 1, 32), (4, 4), 2),  # the conv VAE's first layer
        ((2, 9, 7, 3, 5), (3, 3), 1),  # colour
    ],
)
def test_few_input_channels_as_broadcast_products(monkeypatch, shape, kernel, strides):
    """The GPU's formulation of few-input-channel convolutions (a sum of broadcast products),
    forced on the CPU: the same values and gradients as the convolution."""
    b, h, w, cin, cout = shape
    x = _inputs((b, h, w, cin))
    k = _inputs(kernel + (cin, cout), seed=1) * 0.3
    bias = _inputs((cout,), seed=2)

    def run(x, k):
        return conv2d(x, k, bias.astype(x.dtype), strides=strides, padding="SAME")

    want = jax.jit(run)(x, k)
    want_grad = jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(run(x, k)))))(k)
    monkeypatch.setattr(conv_layers, "_FEW_INPUTS_BACKENDS", frozenset({"cpu"}))
    got = jax.jit(run)(x, k)  # a new trace: the monkeypatched choice
    got_grad = jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(run(x, k)))))(k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)
    half = jax.jit(run)(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))  # bf16 in, bf16 out
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), want, rtol=3e-2, atol=3e-2)
    assert conv_layers._few_inputs(k) and not conv_layers._few_inputs(jnp.zeros((3, 3, 32, 64)))
