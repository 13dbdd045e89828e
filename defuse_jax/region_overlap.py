"""Where labeled regions with different labels overlap, and the targets that resolve it.

The correction samples every labeled region r from N(mean_r, tau * cov_r), equally often. When
the sample clouds of two regions with different labels overlap, the same inputs are taught two
labels and the regions pull against each other: one of them can end worse than it started.
With equal sampling, the chance that a code z came from region s is its responsibility

    resp_s(z) = N(z; mean_s, tau cov_s) / sum_t N(z; mean_t, tau cov_t),

and the label z deserves is the responsibility-weighted mix of the region labels: one-hot where
regions do not overlap, split where they do (`soft_targets`). `overlap_summary` measures, for
the report, how much of each region's samples another label claims.

Responsibilities are mixture posteriors, so they are computed at full float32 (`exact`): TF32
would distort the Mahalanobis distances of these narrow (tau = 0.01) Gaussians.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax.precision import exact
from defuse_jax.regions import Regions, region_cholesky, sample_regions


class RegionDensity(NamedTuple):
    """The sampling Gaussians of R labeled regions, ready for log-densities."""

    means: jax.Array  # [R, L]
    whiten: jax.Array  # [R, L, L] inverses of the lower Cholesky factors of tau * cov
    log_norm: jax.Array  # [R] -sum(log diag(chol)): the per-region normaliser (2 pi cancels)


def region_density(means: np.ndarray, chol: np.ndarray) -> RegionDensity:
    """`RegionDensity` from means [R, L] and lower Cholesky factors [R, L, L] (float64 inverse)."""
    chol64 = np.asarray(chol, np.float64)
    eye = np.eye(chol64.shape[-1])
    whiten = np.stack([np.linalg.solve(c, eye) for c in chol64]) if len(chol64) else chol64
    log_norm = -np.log(np.diagonal(chol64, axis1=-2, axis2=-1)).sum(-1)
    return RegionDensity(
        jnp.asarray(means, jnp.float32),
        jnp.asarray(whiten, jnp.float32),
        jnp.asarray(log_norm, jnp.float32),
    )


@exact
def responsibilities(density: RegionDensity, z: jax.Array) -> jax.Array:
    """z [B, L] -> [B, R]: the probability that each code was drawn from each region."""
    diff = z[:, None, :] - density.means[None]  # [B, R, L]
    white = jnp.einsum("rij,brj->bri", density.whiten, diff)
    log_p = -0.5 * jnp.sum(white**2, axis=-1) + density.log_norm  # [B, R]
    return jax.nn.softmax(log_p, axis=-1)


def soft_targets(
    density: RegionDensity, z: jax.Array, labels: jax.Array, *, num_classes: int
) -> jax.Array:
    """z [B, L], region labels [R] -> [B, num_classes]: responsibility-weighted label mixes."""
    return responsibilities(density, z) @ jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def overlap_summary(
    regions: Regions,
    labels: Mapping[int, int],
    *,
    tau: float,
    key: jax.Array,
    samples: int = 256,
) -> dict[int, dict[str, Any]]:
    """How much of each labeled region's samples regions with another label claim.

    Args:
        regions: the distilled regions.
        labels: {region id: class} of the labeled regions.
        tau: the correction's sampling scale.
        key: key of the samples.
        samples: samples drawn per labeled region.

    Returns:
        {region id: {"contested": share of its samples whose own label gets under half the
        responsibility, "overlaps": {other region id: share of its samples that region is the most
        responsible for}}} with only regions of another label in "overlaps".
    """
    ids = np.asarray(sorted(labels), np.int64)
    if len(ids) == 0:
        return {}
    lab = np.asarray([labels[int(i)] for i in ids])
    z = sample_regions(regions, key, samples, tau=tau)[ids]  # [R, n, L]
    density = region_density(regions.means[ids], region_cholesky(regions, tau=tau)[ids])
    resp = np.asarray(responsibilities(density, jnp.asarray(z.reshape(-1, z.shape[-1]))))
    resp = resp.reshape(len(ids), samples, len(ids))
    out: dict[int, dict[str, Any]] = {}
    for r, rid in enumerate(ids):
        own = resp[r][:, lab == lab[r]].sum(-1)  # [n] responsibility of region r's own label
        top = resp[r].argmax(-1)
        overlaps = {
            int(ids[s]): float(np.mean(top == s))
            for s in range(len(ids))
            if lab[s] != lab[r] and np.any(top == s)
        }
        out[int(rid)] = {"contested": float(np.mean(own < 0.5)), "overlaps": overlaps}
    return out
