"""The report's two plots: the error codes' latent PCA by region, and region accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from defuse_jax.plots import plt, save_figure
from defuse_jax.report.text import _NA, _region_label


def pca_2d(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project codes [M, L] on their first two principal components (numpy SVD).

    Returns:
        ([M, 2] projection, [2] fraction of the variance each component explains). With L = 1 or
        rank-deficient codes the missing components are zeros.
    """
    x = np.asarray(codes, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    proj = np.zeros((x.shape[0], 2))
    proj[:, :k] = x @ vt[:k].T
    total = float(np.sum(s**2))
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return proj, explained


def plot_latent_pca(
    path: str, codes: np.ndarray, assignment: np.ndarray, *, title: str | None = None
) -> str:
    """Scatter the error codes in 2-D PCA coordinates, coloured by region; returns path."""
    proj, explained = pca_2d(codes)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    outside = assignment < 0
    if outside.any():
        ax.scatter(*proj[outside].T, s=4, c="lightgrey", alpha=0.6, label="no region")
    region_ids = np.unique(assignment[~outside])
    cmap = plt.get_cmap("tab20" if len(region_ids) > 10 else "tab10")
    for i, rid in enumerate(region_ids):
        pts = proj[assignment == rid]
        color = cmap(i % cmap.N)
        ax.scatter(*pts.T, s=6, color=color, alpha=0.7, label=f"region {rid}")
        cx, cy = pts.mean(axis=0)
        ax.annotate(
            str(rid),
            (cx, cy),
            ha="center",
            va="center",
            fontsize=9,
            weight="bold",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.85},
        )
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title(title or f"Error codes in latent space (M = {len(proj)})", fontsize=10)
    if 0 < len(region_ids) <= 20:  # a legend with dozens of entries hides the points
        ax.legend(fontsize=7, markerscale=2, loc="best", framealpha=0.8)
    save_figure(fig, path)
    return path


def plot_region_accuracy(
    path: str,
    regions: Sequence[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    overall_before: float | None,
    overall_after: float | None,
    overall_of: str = "all regions",
) -> str:
    """Grouped bars of accuracy before/after per region, dashed lines for the region accuracy
    (the mean over `overall_of`, which need not be every region drawn); returns path."""
    n = len(regions)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * n + 2.0), 4.0))
    x = np.arange(n)
    width = 0.38
    for offset, key, color, name in (
        (-width / 2, "accuracy_before", "tab:red", "before"),
        (width / 2, "accuracy_after", "tab:green", "after"),
    ):
        values = [r.get(key) for r in regions]
        heights = [100.0 * v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + offset, heights, width, color=color, label=name)
        for bar, v in zip(bars, values, strict=True):
            if v is None:  # make a missing value visible instead of a silent zero bar
                ax.text(bar.get_x() + bar.get_width() / 2, 1.0, _NA, ha="center", fontsize=7)
    for value, color, name in (
        (overall_before, "tab:red", f"region accuracy before\n({overall_of})"),
        (overall_after, "tab:green", f"region accuracy after\n({overall_of})"),
    ):
        if value is not None:
            ax.axhline(100.0 * value, color=color, ls="--", lw=1, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{r['id']}\n({_region_label(r, class_names)})" for r in regions], fontsize=7
    )
    ax.set_xlim(-1.0, n)  # keeps bars narrow when only one or two regions are labeled
    ax.set_xlabel("region (label)")
    ax.set_ylabel("accuracy on held-out region samples (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Region accuracy before / after correction", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)
    return path


# --------------------------------------------------------------------------- markdown
