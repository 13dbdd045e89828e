"""Image grids written as PNG with Pillow (no figure per grid); matplotlib set headless."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported for the report's figures)
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from defuse_jax.files import atomic_write  # noqa: E402

_TEXT_H = 14  # pixels of one caption line


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> None:
    """Lay out a matplotlib figure, write it as PNG atomically, and close it (also on error)."""
    try:
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    *,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
    cell: int = 64,
) -> str:
    """Save images [N, H, W, C] in [0, 1] as one PNG grid; returns the path.

    Args:
        images: [N, H, W, C] floats in [0, 1] (C = 1 or 3).
        path: output PNG path (parent directories are created).
        ncols: images per row.
        titles: optional per-image captions (e.g. the classifier's prediction).
        row_labels: optional per-row labels shown on the left.
        suptitle: optional title line on top.
        cell: side of one image cell in pixels (images are scaled up with nearest neighbour,
            so 8x8 digits stay crisp).
    """
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n = len(images)
    if n == 0:
        raise ValueError("save_image_grid needs at least one image.")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got {images.shape}.")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    h, w = images.shape[1:3]
    scale = max(1, cell // max(h, w))
    ch, cw = h * scale, w * scale
    cap = _TEXT_H if titles is not None else 0
    left = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = _TEXT_H + 6 if suptitle else 0
    pad = 4
    width = left + ncols * (cw + pad) + pad
    height = top + nrows * (ch + cap + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if suptitle:
        draw.text((pad, 3), suptitle, fill="black", font=font)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        x0 = left + pad + c * (cw + pad)
        y0 = top + pad + r * (ch + cap + pad)
        rgb = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
        tile = (rgb * 255.0 + 0.5).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
        canvas.paste(Image.fromarray(tile), (x0, y0 + cap))
        if titles is not None:
            draw.text((x0, y0), str(titles[i])[: max(4, cw // 6)], fill="black", font=font)
    if row_labels:
        for r, label in enumerate(row_labels[:nrows]):
            y = top + pad + r * (ch + cap + pad) + cap + ch // 2 - 5
            draw.text((4, y), str(label), fill="black", font=font)
    with atomic_write(path, "wb") as f:
        canvas.save(f, format="PNG")
    return os.fspath(path)
