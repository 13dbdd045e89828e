"""Overlapping regions with different labels: detection, mixed targets, and the post-label rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_precision import assert_all_highest

from defuse_jax import evaluation, region_overlap
from defuse_jax.regions import Regions, region_cholesky


def _regions(means, scale=1.0):
    means = np.asarray(means, np.float32)
    r, dim = means.shape
    cov = np.broadcast_to(scale * np.eye(dim, dtype=np.float32), (r, dim, dim)).copy()
    records = [{"id": i} for i in range(r)]
    return Regions(means, cov, np.full(r, 1 / r, np.float32), np.zeros(0, np.int32), records)


@pytest.mark.parametrize(
    "offset, labels, contested",
    [
        (100.0, {0: 3, 1: 5}, False),  # far apart: nothing shared
        (0.05, {0: 3, 1: 3}, False),  # on top of each other, but one label: nothing to resolve
        (0.05, {0: 3, 1: 5}, True),  # on top of each other with two labels
    ],
)
def test_overlap_summary_finds_regions_of_another_label(offset, labels, contested):
    regions = _regions([[0.0, 0.0], [offset, 0.0]])
    out = region_overlap.overlap_summary(regions, labels, tau=0.01, key=jax.random.key(0))
    assert sorted(out) == [0, 1]
    for rid, other in ((0, 1), (1, 0)):
        if contested:
            # Nearly coincident: about half of each region's samples sit closer to the other.
            assert 0.25 < out[rid]["contested"] < 0.75
            assert list(out[rid]["overlaps"]) == [other]
        else:
            assert out[rid] == {"contested": 0.0, "overlaps": {}}


def test_overlap_summary_covers_only_labeled_regions():
    regions = _regions([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0]])
    out = region_overlap.overlap_summary(regions, {0: 1, 2: 4}, tau=0.01, key=jax.random.key(1))
    assert sorted(out) == [0, 2]  # region 1 is unlabeled: it claims nothing
    assert out[0]["overlaps"] == {} and out[2]["overlaps"] == {}
    assert region_overlap.overlap_summary(regions, {}, tau=0.01, key=jax.random.key(1)) == {}


def test_soft_targets_mix_labels_by_responsibility():
    regions = _regions([[0.0, 0.0], [4.0, 0.0]])
    chol = region_cholesky(regions, tau=1.0)
    density = region_overlap.region_density(regions.means, chol)
    z = jnp.asarray([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [-30.0, 0.0]], jnp.float32)
    targets = np.asarray(
        region_overlap.soft_targets(density, z, jnp.asarray([1, 2]), num_classes=3)
    )
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert targets[0, 1] > 0.99 and targets[2, 2] > 0.99 and targets[3, 1] > 0.99
    np.testing.assert_allclose(targets[1], [0.0, 0.5, 0.5], atol=1e-6)  # the midpoint
    # Responsibilities agree with a float64 evaluation of the two Gaussians.
    d = np.asarray(z, np.float64)[:, None, :] - regions.means.astype(np.float64)[None]
    logp = -0.5 * (d**2).sum(-1)
    want = np.exp(logp - logp.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    got = np.asarray(region_overlap.responsibilities(density, z))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_responsibilities_request_full_precision():
    regions = _regions([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    density = region_overlap.region_density(regions.means, region_cholesky(regions, tau=0.01))
    z = jnp.zeros((4, 3), jnp.float32)
    assert_all_highest([jax.jit(region_overlap.responsibilities).lower(density, z).as_text()])


@pytest.mark.parametrize(
    "per_region, min_error_rate, confirmed",
    [
        ({0: 0.1, 1: 0.9, 2: 0.5}, 0.5, [0, 2]),  # region 1: the classifier agrees with the label
        ({0: 0.1, 1: 0.9, 2: 0.5}, 0.0, [0, 1, 2]),  # threshold 0 counts every labeled region
        ({0: 0.1, 1: 0.9, 2: 0.5}, 1.0, []),
        ({}, 0.5, []),
    ],
)
def test_confirmed_error_regions(per_region, min_error_rate, confirmed):
    got = evaluation.confirmed_error_regions(per_region, min_error_rate=min_error_rate)
    assert got == confirmed
    want = None if not confirmed else float(np.mean([per_region[i] for i in confirmed]))
    assert evaluation.region_accuracy(per_region, got) == want
