"""Which numerics run at full float32 and which at the backend's fast default: the one place
that says so.

Accelerators change float32 matmuls behind the user's back: on a GPU, JAX's default precision
for float32 `dot_general` and convolutions is TF32 (a 10-bit mantissa, about 1e-3 relative
error); on a TPU it is one or a few bfloat16 passes. That is fine for training and for the
search's forward pass, and ruinous for statistics: a mixture's second moments minus the outer
product of its means cancel to a covariance that TF32 rounding makes indefinite (the fit then
fails with an "ill-defined empirical covariance" error, or silently loses accuracy).

| computation | precision |
|---|---|
| mixture fits, predict/score, k-means init (`defuse_jax.mixture`) | `exact`: full float32 |
| region sampling from N(mean, tau * cov) (`regions.sample_regions`) | `exact`: full float32 |
| training, correction, the search's forward pass, evaluation forward passes | backend default |
| the search with `compute_dtype="bfloat16"` | bfloat16 on purpose |

Evaluation statistics (accuracies, counts, error rates) are computed from integer predictions
on the host, so no matmul precision enters them.

`exact` is scoped to the code it wraps (`jax.default_matmul_precision` inside the traced
function): it never changes a process-wide setting, so a user's own models keep their fast
default. Every `dot_general` traced under it carries `precision=HIGHEST` in the lowered program,
which is what the tests check (a CPU cannot show TF32, but it shows the request).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import jax

EXACT = "highest"

F = TypeVar("F", bound=Callable)


def exact(fn: F) -> F:
    """Wraps `fn` so every matmul/einsum/convolution it traces runs at full float32.

    Works both inside and outside `jax.jit`: apply it to the function that `jit` traces (or to
    an eager function) and the scoped precision is in force while its body is traced.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision(EXACT):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
