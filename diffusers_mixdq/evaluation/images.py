"""Image metrics against the full-precision images (per-image PSNR, SSIM, the pooled PSNR) and the PNG grid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

#: an image this far from its full-precision counterpart (per-image PSNR below, dB) shows another scene: diverged
DIVERGED_DB = 20.0


def per_image_psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB of each image against its reference, both ``(N, C, H, W)``; ``inf`` where they are identical."""
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def diverged_count(psnr: Sequence[float], threshold_db: float = DIVERGED_DB) -> int:
    """How many images have a PSNR below ``threshold_db`` (another scene rather than noise)."""
    return int((np.asarray(psnr, dtype=np.float64) < threshold_db).sum())


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of ``images`` against ``reference``, both ``(N, 3, H, W)`` in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(images, reference, data_range=1.0))


def image_metrics(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB pooled over all images, mean SSIM) of ``images`` against ``reference``. The pooled PSNR is one
    MSE over every image, which a single diverged image dominates: prefer :func:`per_image_psnr`'s median."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(images, reference, data_range=1.0)), ssim(images, reference)


def save_grid(rows: Sequence, path: str | os.PathLike, columns: int | None = None) -> Path:
    """A PNG with one row per ``(label, images)`` or per result (its ``name`` and ``images``): the first ``columns``
    images of each, labelled on the left."""
    from PIL import Image, ImageDraw

    rows = [(r.name, r.images) if hasattr(r, "images") else r for r in rows]
    columns = min(columns or 8, rows[0][1].shape[0])
    h, w = rows[0][1].shape[-2:]
    scale = max(1, 96 // max(h, w))
    cell_h, cell_w = h * scale, w * scale
    label_w = 110
    grid = Image.new("RGB", (label_w + columns * (cell_w + 2), len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, images) in enumerate(rows):
        y = row * (cell_h + 2)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black")
        for col in range(columns):
            arr = (images[col].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            grid.paste(Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST), (label_w + col * (cell_w + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
