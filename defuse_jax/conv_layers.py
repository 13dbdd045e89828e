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
"""

from __future__ import annotations

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


def conv_transpose_stride2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """`nnx.ConvTranspose(kernel_size=(4, 4), strides=(2, 2), padding="SAME")` without zeros.

    Each of the 2x2 output phases is a 2x2 convolution of the input, so the layer is one dense
    2x2 VALID convolution to `4 * out` channels, followed by interleaving the phases.

    Args:
        x: [batch, H, W, in] input.
        kernel: [4, 4, in, out] kernel as stored by `nnx.ConvTranspose`.
        bias: [out] or None.

    Returns:
        [batch, 2H, 2W, out].
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
    y = lax.conv_general_dilated(
        xp, k2, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).reshape(b, h + 1, w + 1, 2, 2, cout)
    # Output (2p + a, 2q + c) is phase (a, c) of window (p + a, q + c).
    out = jnp.stack(
        [jnp.stack([y[:, a : a + h, c : c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)],
        axis=2,
    )  # [batch, H, 2, W, 2, out]
    out = out.reshape(b, 2 * h, 2 * w, cout)
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
    kh, kw, cin, cout = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv_few_outputs needs an odd kernel size, got {kernel.shape}.")
    x, kernel, bias = _promote(x, kernel, bias)
    b, h, w, _ = x.shape
    taps = x.reshape(-1, cin) @ kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
    taps = taps.reshape(b, h, w, kh, kw, cout)
    ph, pw = kh // 2, kw // 2
    taps = jnp.pad(taps, ((0, 0), (ph, ph), (pw, pw), (0, 0), (0, 0), (0, 0)))
    out = sum(taps[:, dy : dy + h, dx : dx + w, dy, dx] for dy in range(kh) for dx in range(kw))
    return out if bias is None else out + bias
