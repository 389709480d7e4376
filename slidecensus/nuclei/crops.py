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
    out = np.empty((n, size, size, 3), np.uint8)
    # Boxes that fit in ``size`` (most nuclei) are plain copies of the window; only larger
    # ones are resampled. Pixels are gathered from the uint8 image with clipped indices and
    # taps outside it are set white, instead of padding a float copy of the whole tile.
    exact = side == size
    if exact.any():
        j = np.arange(size)
        out[exact] = _gather(img, lab, ids[exact], wy[exact, None] + j, wx[exact, None] + j,
                             masked)
    if (~exact).any():
        out[~exact] = _resample(img, lab, ids[~exact], wx[~exact], wy[~exact],
                                side[~exact], size, masked)
    return out


def _gather(img, lab, ids, iy, ix, masked):
    """Crops at integer positions ``iy`` (m, s) x ``ix`` (m, s); white outside the image
    (and outside each nucleus when ``masked``)."""
    h, w = lab.shape
    cy, cx = np.clip(iy, 0, h - 1)[:, :, None], np.clip(ix, 0, w - 1)[:, None, :]
    g = img[cy, cx]
    valid = ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]
    if masked:
        valid &= lab[cy, cx] == ids[:, None, None]
    g[~valid] = 255
    return g


def _resample(img, lab, ids, wx, wy, side, size, masked):
    """Bilinear crops of ``side``-px windows scaled to ``size`` (pixels beyond the image
    are white); mask and image-edge tests use the nearest pixel."""
    h, w = lab.shape
    scale = side / size  # > 1
    j = np.arange(size, dtype=np.float64) + 0.5
    sx = wx[:, None] + j[None, :] * scale[:, None] - 0.5  # (m, size)
    sy = wy[:, None] + j[None, :] * scale[:, None] - 0.5
    fx, fy = np.floor(sx), np.floor(sy)
    ax, ay = (sx - fx)[:, None, :, None], (sy - fy)[:, :, None, None]
    ix0, iy0 = fx.astype(np.int64), fy.astype(np.int64)

    def tap(iy, ix):
        t = img[np.clip(iy, 0, h - 1)[:, :, None], np.clip(ix, 0, w - 1)[:, None, :]]
        off = ~(((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :])
        t[off] = 255
        return t.astype(np.float32)

    # the same sum in the same order as before, so resampled crops stay bit-identical
    out = (tap(iy0, ix0) * (1 - ay) * (1 - ax) + tap(iy0, ix0 + 1) * (1 - ay) * ax
           + tap(iy0 + 1, ix0) * ay * (1 - ax) + tap(iy0 + 1, ix0 + 1) * ay * ax)
    nx = np.floor(sx + 0.5).astype(np.int64)
    ny = np.floor(sy + 0.5).astype(np.int64)
    valid = ((sy > -0.5) & (sy < h - 0.5))[:, :, None] & ((sx > -0.5) & (sx < w - 0.5))[:, None, :]
    if masked:
        cy, cx = np.clip(ny, 0, h - 1)[:, :, None], np.clip(nx, 0, w - 1)[:, None, :]
        valid &= lab[cy, cx] == ids[:, None, None]
    out = np.rint(out).astype(np.uint8)
    out[~valid] = 255
    return out
