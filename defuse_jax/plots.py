"""Image grids and simple figures written as PNG (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    *,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
    cell_inches: float = 1.0,
) -> str:
    """Save images [N, H, W, C] in [0, 1] as one PNG grid; returns the path.

    Args:
        images: [N, H, W, C] floats in [0, 1] (C = 1 or 3).
        path: output PNG path (parent directories are created).
        ncols: images per row.
        titles: optional per-image captions (e.g. the classifier's prediction).
        row_labels: optional per-row labels shown on the left.
        suptitle: optional figure title.
        cell_inches: size of one cell.
    """
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * cell_inches, nrows * cell_inches * 1.15), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        img = images[i]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(img)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
        if row_labels is not None and i % ncols == 0 and i // ncols < len(row_labels):
            ax.set_ylabel(row_labels[i // ncols], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)
