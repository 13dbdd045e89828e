"""Faster formulations of the conv VAE decoder's layers, with the same parameters and outputs.

The search spends nearly all its time decoding latent codes. On XLA:CPU two decoder layers ran far
below the machine's matmul rate (measured at batch 256, 2-core CPU):

- the stride-2 transposed convolutions, which XLA lowers to a convolution over a zero-dilated
  input, so three quarters of the multiply-adds hit inserted zeros (the 14->28 layer: 16 GFLOP/s);
- the final 3x3 convolution to one image channel, a shape Eigen's convolution handles poorly
  (4 GFLOP/s).

Both are rewritten here as ordinary dense convolutions / matmuls plus reshapes. The results equal
`flax.nnx.ConvTranspose` / `flax.nnx.Conv` to float32 rounding (tests/test_conv_layers.py), the
gradients are those of the same function, and nothing here is CPU-specific: on GPU/TPU these are
ordinary convolutions too.

Separately, `conv2d` is `nnx.Conv`'s convolution with its gradient written out by hand on CPU.
Inside a `lax.scan` (the training loop, the search's gradient mode) XLA:CPU leaves autodiff's
transposed convolutions in the dimension orders they come in, and runs them in its generic loop
emitter instead of its convolution library: the weight gradient of a 14x14, 32 -> 64 channel
layer at batch 64 took 453 ms in a scan against 24 ms outside one, and the conv classifier's
training step 525 ms against 62 ms (2-core CPU, JAX 0.10.2). Here the input gradient is an
ordinary NHWC/HWIO convolution and the weight gradient one matmul over the kernel's taps, which
also beat XLA's own rewrite outside loops (the decoder's 2x2 phase convolutions' weight gradients
ran at 16 GFLOP/s as convolutions). The gradients equal autodiff's to float32 rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _promote(x, kernel, bias):
    """Inputs and parameters in one dtype, as the flax layers do (`nnx.Conv` with dtype=None):
    bf16 parameters with float32 inputs compute in float32, and so on."""
    dtype = jnp.result_type(x, kernel) if bias is None else jnp.result_type(x, kernel, bias)
    return x.astype(dtype), kernel.astype(dtype), None if bias is None else bias.astype(dtype)


# Which taps of a 4-wide kernel reach even (0) and odd (1) output positions of a stride-2
# transposed convolution with SAME padding (flax/lax convention, kernel not flipped).
_PHASE_TAPS = ((0, 2), (1, 3))


def phase_conv(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, activation=None
) -> jax.Array:
    """The four output phases of a stride-2 transposed convolution, not yet interleaved.

    Each of the 2x2 output phases of `nnx.ConvTranspose(kernel_size=(4, 4), strides=(2, 2),
    padding="SAME")` is a 2x2 convolution of the input, so the layer is one dense 2x2 VALID
    convolution to `4 * out` channels. The bias and `activation` (elementwise, e.g. relu) are
    applied here, before any interleaving, so that the compiler can fuse them into the
    convolution (cuDNN's conv + bias + activation on a GPU): the result is the same, since an
    elementwise function commutes with moving elements around.

    Args:
        x: [batch, H, W, in] input.
        kernel: [4, 4, in, out] kernel as stored by `nnx.ConvTranspose`.
        bias: [out] or None.
        activation: an elementwise function applied after the bias, or None.

    Returns:
        [batch, H + 1, W + 1, 2, 2, out]: the layer's output pixel (2i + a, 2j + c) is
        `y[:, i + a, j + c, a, c]` (`interleave_phases` puts them in place).
    """
    if kernel.shape[:2] != (4, 4):
        raise ValueError(f"conv_transpose_stride2 needs a 4x4 kernel, got {kernel.shape}.")
    x, kernel, bias = _promote(x, kernel, bias)
    b, h, w, cin = x.shape
    cout = kernel.shape[-1]
    rows = jnp.asarray(_PHASE_TAPS)  # [phase, tap]
    # k2[dy, dx, in, a, c, out] = kernel[taps[a][dy], taps[c][dx], in, out]
    k2 = kernel[rows[:, :, None, None], rows[None, None, :, :]]  # [a, dy, c, dx, in, out]
    k2 = k2.transpose(1, 3, 4, 0, 2, 5).reshape(2, 2, cin, 4 * cout)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = conv2d(xp, k2, None if bias is None else jnp.tile(bias, 4), padding="VALID")
    if activation is not None:
        y = activation(y)
    return y.reshape(b, h + 1, w + 1, 2, 2, cout)


def interleave_phases(y: jax.Array) -> jax.Array:
    """`phase_conv`'s [batch, H + 1, W + 1, 2, 2, C] phases -> the [batch, 2H, 2W, C] image."""
    b, h1, w1, _, _, c = y.shape
    h, w = h1 - 1, w1 - 1
    # Output (2p + a, 2q + c) is phase (a, c) of window (p + a, q + c).
    out = jnp.stack(
        [jnp.stack([y[:, a : a + h, e : e + w, a, e] for e in (0, 1)], axis=3) for a in (0, 1)],
        axis=2,
    )  # [batch, H, 2, W, 2, C]
    return out.reshape(b, 2 * h, 2 * w, c)


def conv_transpose_stride2(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, activation=None
) -> jax.Array:
    """`nnx.ConvTranspose(kernel_size=(4, 4), strides=(2, 2), padding="SAME")` without zeros,
    then `activation` (elementwise) if given: `interleave_phases(phase_conv(...))`.

    Args:
        x: [batch, H, W, in] input.
        kernel: [4, 4, in, out] kernel as stored by `nnx.ConvTranspose`.
        bias: [out] or None.
        activation: an elementwise function, or None.

    Returns:
        [batch, 2H, 2W, out].
    """
    return interleave_phases(phase_conv(x, kernel, bias, activation))


def _few_outputs_kernel(kernel: jax.Array) -> jax.Array:
    """[kh, kw, in, out] -> [in, kh * kw * out]: one matmul gives every tap of every pixel."""
    kh, kw, cin, cout = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv_few_outputs needs an odd kernel size, got {kernel.shape}.")
    return kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)


def _sum_taps(taps: jax.Array, kernel_shape, bias: jax.Array | None) -> jax.Array:
    """taps [batch, H, W, kh * kw * out] (pixel times kernel tap) -> the SAME convolution
    [batch, H, W, out]: every tap summed at its offset."""
    kh, kw, _, cout = kernel_shape
    b, h, w, _ = taps.shape
    taps = taps.reshape(b, h, w, kh, kw, cout)
    ph, pw = kh // 2, kw // 2
    taps = jnp.pad(taps, ((0, 0), (ph, ph), (pw, pw), (0, 0), (0, 0), (0, 0)))
    out = sum(taps[:, dy : dy + h, dx : dx + w, dy, dx] for dy in range(kh) for dx in range(kw))
    return out if bias is None else out + bias


def conv_few_outputs(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """A stride-1 SAME convolution with few output channels (e.g. to the image's channels).

    One matmul gives every tap's contribution per pixel; the taps are then summed at their
    offsets. Cheap when `kh * kw * out` is small.

    Args:
        x: [batch, H, W, in] input.
        kernel: [kh, kw, in, out] kernel as stored by `nnx.Conv` (odd kh and kw).
        bias: [out] or None.

    Returns:
        [batch, H, W, out].
    """
    x, kernel, bias = _promote(x, kernel, bias)
    b, h, w, cin = x.shape
    taps = x.reshape(-1, cin) @ _few_outputs_kernel(kernel)
    return _sum_taps(taps.reshape(b, h, w, -1), kernel.shape, bias)


def conv_few_outputs_of_phases(
    y: jax.Array, kernel: jax.Array, bias: jax.Array | None
) -> jax.Array:
    """`conv_few_outputs(interleave_phases(y), kernel, bias)` without interleaving `y`.

    The taps matmul runs on the phases as they come out of `phase_conv` (each pixel is one row,
    wherever it sits) and only the taps, `kh * kw * out` channels instead of `in`, are
    interleaved: the wide activations cross memory once less (the decoder's last layer, where
    they are largest). The phase layout has one extra window row and column, (H+1)(W+1)
    against HW pixels, whose taps are computed and dropped.

    Args:
        y: [batch, H + 1, W + 1, 2, 2, in] phases (`phase_conv`).
        kernel: [kh, kw, in, out] kernel as stored by `nnx.Conv` (odd kh and kw).
        bias: [out] or None.

    Returns:
        [batch, 2H, 2W, out].
    """
    y, kernel, bias = _promote(y, kernel, bias)
    k = _few_outputs_kernel(kernel)
    lead, cin = y.shape[:-1], y.shape[-1]
    taps = (y.reshape(-1, cin) @ k).reshape(lead + (k.shape[1],))
    return _sum_taps(interleave_phases(taps), kernel.shape, bias)


_NHWC = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]


def _lax_conv(x, kernel, strides, pads, *, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    return lax.conv_general_dilated(
        x, kernel, strides, pads, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=_NHWC,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_by_hand_grad(x, kernel, strides: tuple[int, int], pads: Pads):
    return _lax_conv(x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
    return _lax_conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    (kh, kw), (h, w), (oh, ow) = kernel.shape[:2], x.shape[1:3], g.shape[1:3]
    # Input gradient: the stride-dilated output gradient correlated with the flipped kernel,
    # its in and out channels swapped; padded so that every input position is reached.
    dx_pads = []
    for (lo, _), k, s, n, o in ((pads[0], kh, strides[0], h, oh), (pads[1], kw, strides[1], w, ow)):
        before = k - 1 - lo
        dx_pads.append((before, n + k - 1 - ((o - 1) * s + 1) - before))
    k_flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
    dx = _lax_conv(g, k_flipped, (1, 1), dx_pads, lhs_dilation=strides)
    # Weight gradient: dk[a, b, i, o] = sum over batch and output positions (p, q) of
    # x_padded[n, s*p + a, s*q + b, i] * g[n, p, q, o]: one matmul of the kernel's taps of the
    # input (im2col, kh * kw copies of x) with g. As a convolution, with the channels as its
    # batch (XLA:CPU's own rewrite), it ran at 16 GFLOP/s and needed a transposed copy of g.
    (lo_h, _), (lo_w, _) = pads
    (s_h, s_w), n, cin = strides, x.shape[0], x.shape[3]
    xp = jnp.pad(x, ((0, 0), (lo_h, max(0, kh + s_h * (oh - 1) - lo_h - h)),
                     (lo_w, max(0, kw + s_w * (ow - 1) - lo_w - w)), (0, 0)))  # fmt: skip
    taps = [
        xp[:, a : a + s_h * (oh - 1) + 1 : s_h, b : b + s_w * (ow - 1) + 1 : s_w]
        for a in range(kh)
        for b in range(kw)
    ]  # each [n, oh, ow, in]
    patches = jnp.stack(taps, axis=3).reshape(n * oh * ow, kh * kw * cin)
    dk = jnp.einsum("pk,po->ko", patches, g.reshape(n * oh * ow, -1))
    dk = dk.reshape(kh, kw, cin, -1)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_by_hand_grad.defvjp(_conv_fwd, _conv_bwd)

# Where the gradient is written out by hand, by backend: XLA:CPU, where autodiff's ran 2-19x
# slower inside loops (module docstring). GPU and TPU keep autodiff's, which their compilers map
# to their backward-convolution kernels (not measured there yet).
_BY_HAND_GRAD_BACKENDS = frozenset({"cpu"})


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """`nnx.Conv`'s convolution (NHWC input, HWIO kernel), with a loop-friendly gradient on CPU.

    The same values as the flax layer, and its gradient to float32 rounding
    (tests/test_conv_layers.py), which on CPU stays fast inside `lax.scan` (module docstring).

    Args:
        x: [batch, H, W, in] input.
        kernel: [kh, kw, in, out] kernel as stored by `nnx.Conv`.
        bias: [out] or None.
        strides: one stride for both axes, or (row, column) strides.
        padding: "SAME", "VALID" or explicit ((lo, hi), (lo, hi)) pads.

    Returns:
        [batch, H', W', out].
    """
    x, kernel, bias = _promote(x, kernel, bias)
    strides = (int(strides),) * 2 if isinstance(strides, int) else tuple(int(s) for s in strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    backend = jax.default_backend()
    if backend in _FEW_INPUTS_BACKENDS and _few_inputs(kernel):
        out = _conv_by_broadcast(x, kernel, strides, pads)
    elif backend in _BY_HAND_GRAD_BACKENDS:
        out = _conv_by_hand_grad(x, kernel, strides, pads)
    else:
        out = _lax_conv(x, kernel, strides, pads)
    return out if bias is None else out + bias


# Where a convolution of few input channels (an image's 1 or 3) runs as a sum of broadcast
# products, one per tap and input channel (`_conv_by_broadcast`), by backend. On one H200
# (JAX 0.11.2, bf16, `scripts/profile_search.py`) cuDNN ran the conv classifier's first layer,
# 1 -> 32 channels, in a generic non-tensor-core kernel that took 42% of the search's forward
# pass; as one matmul over the taps, building the taps (a concatenation) cost as much. As a sum
# of products it is elementwise work that the compiler fuses with the bias, the relu and the
# pooling after it. XLA:CPU keeps its convolution (and its results); TPU: not measured yet.
_FEW_INPUTS_BACKENDS = frozenset({"gpu"})


def _few_inputs(kernel: jax.Array) -> bool:
    """Input channels that tensor cores cannot take whole (not a multiple of 8), few taps."""
    kh, kw, cin, _ = kernel.shape
    return cin % 8 != 0 and kh * kw * cin <= 64


def _conv_by_broadcast(x, kernel, strides, pads):
    """The convolution as a sum over taps and input channels of a strided slice of the input
    times that tap's kernel row: [B, H', W', 1] * [out] each, accumulated in float32."""
    (kh, kw, cin, _), (sh, sw) = kernel.shape, strides
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh = (xp.shape[1] - kh) // sh + 1
    ow = (xp.shape[2] - kw) // sw + 1
    acc = jnp.float32(0)
    for dy in range(kh):
        for dx in range(kw):
            window = xp[:, dy : dy + sh * (oh - 1) + 1 : sh, dx : dx + sw * (ow - 1) + 1 : sw]
            for c in range(cin):
                acc = acc + window[..., c : c + 1].astype(jnp.float32) * kernel[dy, dx, c].astype(
                    jnp.float32
                )
    return acc.astype(x.dtype)
