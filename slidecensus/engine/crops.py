"""32 x 32 cell crops as Hu et al. build them (DESIGN.md, step 5).

Each crop is a square window centred on the nucleus' bounding box: 32 x 32 pixels of the
image when the box fits, otherwise a window whose side is the box's long side, resampled
(bilinear) to 32 x 32, so the long side of a large nucleus spans the crop exactly.
"With segmentation" (``masked=True``, the paper's default) sets every pixel outside the
nucleus' mask to white; "without segmentation" keeps the window's pixels. Pixels beyond the
image border are white in both.

All crops are built in one vectorised gather; there is no per-cell Python loop.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InvalidInputError
from .stain import as_rgb8

__all__ = ["extract_crops"]

_NEEDED = ("cell_id", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


def extract_crops(
    rgb: np.ndarray,
    labels: np.ndarray,
    table: pd.DataFrame,
    size: int = 32,
    masked: bool = True,
) -> np.ndarray:
    """Cut a nucleus-centred ``size`` x ``size`` RGB crop for every row of ``table``.

    Parameters
    ----------
    rgb : ndarray, shape (h, w, 3)
        The image the table was measured on (converted with :func:`~.stain.as_rgb8`).
    labels : ndarray of int, shape (h, w)
        Label image whose values are ``table.cell_id`` (as from
        :func:`~.segment.segment_image`).
    table : pandas.DataFrame
        Cell table with ``cell_id`` and ``bbox_x0, bbox_y0, bbox_x1, bbox_y1`` (pixels of
        ``rgb``, end exclusive).
    size : int
        Crop side (32 in the paper).
    masked : bool
        True: pixels outside the nucleus are white ("with segmentation"); False: the
        window's image pixels are kept ("without segmentation").

    Returns
    -------
    ndarray of uint8, shape (n, size, size, 3)

    References
    ----------
    .. [1] B. Hu et al., "Unsupervised learning for cell-level visual representation in
       histopathology images with generative adversarial networks", IEEE JBHI 23(3), 2019.
    """
    img = as_rgb8(rgb)
    lab = np.asarray(labels)
    if lab.shape != img.shape[:2]:
        raise InvalidInputError(
            f"labels shape {lab.shape} does not match image shape {img.shape[:2]}"
        )
    missing = [c for c in _NEEDED if c not in table.columns]
    if missing:
        raise InvalidInputError(f"cell table lacks columns {missing}; expected {list(_NEEDED)}")
    if size < 1:
        raise InvalidInputError(f"size must be >= 1, got {size}")
    n = len(table)
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    x0 = table["bbox_x0"].to_numpy(np.int64)
    y0 = table["bbox_y0"].to_numpy(np.int64)
    bw = table["bbox_x1"].to_numpy(np.int64) - x0
    bh = table["bbox_y1"].to_numpy(np.int64) - y0
    ids = table["cell_id"].to_numpy(np.int64)
    side = np.maximum(size, np.maximum(bw, bh))  # window side in image pixels
    # window origin: the box centred in the window (integer, so unscaled crops are exact)
    wx = x0 - (side - bw) // 2
    wy = y0 - (side - bh) // 2
    # sample positions: pixel centres of the crop mapped into the window
    scale = side / size  # >= 1
    j = np.arange(size, dtype=np.float64) + 0.5
    sx = wx[:, None] + j[None, :] * scale[:, None] - 0.5  # (n, size)
    sy = wy[:, None] + j[None, :] * scale[:, None] - 0.5
    h, w = lab.shape
    # pad once by one white pixel so bilinear taps at the border stay in bounds
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), constant_values=255).astype(np.float32)
    lpad = np.pad(lab, 1, constant_values=0)
    fx, fy = np.floor(sx), np.floor(sy)
    ax, ay = (sx - fx)[:, None, :, None], (sy - fy)[:, :, None, None]
    ix0 = np.clip(fx.astype(np.int64) + 1, 0, w + 1)
    iy0 = np.clip(fy.astype(np.int64) + 1, 0, h + 1)
    ix1 = np.clip(ix0 + 1, 0, w + 1)
    iy1 = np.clip(iy0 + 1, 0, h + 1)
    yy0, yy1 = iy0[:, :, None], iy1[:, :, None]
    xx0, xx1 = ix0[:, None, :], ix1[:, None, :]
    out = (
        pad[yy0, xx0] * (1 - ay) * (1 - ax)
        + pad[yy0, xx1] * (1 - ay) * ax
        + pad[yy1, xx0] * ay * (1 - ax)
        + pad[yy1, xx1] * ay * ax
    )
    # nearest sample for masks and for "outside the image"
    nx = np.clip(np.floor(sx + 0.5).astype(np.int64) + 1, 0, w + 1)
    ny = np.clip(np.floor(sy + 0.5).astype(np.int64) + 1, 0, h + 1)
    inside_x = (sx > -0.5) & (sx < w - 0.5)
    inside_y = (sy > -0.5) & (sy < h - 0.5)
    valid = inside_y[:, :, None] & inside_x[:, None, :]
    if masked:
        valid &= lpad[ny[:, :, None], nx[:, None, :]] == ids[:, None, None]
    out = np.rint(out).astype(np.uint8)
    out[~valid] = 255
    return out
