"""The tile grid: pure arithmetic on sizes, then tiles placed on a slide's level.

A tile has a *core* (the cells whose centroids fall there belong to it) and a *read window*
= core grown by the halo and clipped to the level. Cores partition the level exactly, so
every nucleus belongs to one tile; the halo must hold the largest nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .slide import Slide
    from .tissue import TissueMask


def grid_windows(
    shape: tuple[int, int], tile_size: int, halo: int = 0
) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """Cores and read windows, row-major, for an image of ``shape`` = (height, width).

    Returns a list of ``((x, y, w, h) core, (rx, ry, rw, rh) read window)``; cores tile the
    image exactly (last row/column narrower), read windows are cores grown by ``halo`` and
    clipped to the image.
    """
    height, width = int(shape[0]), int(shape[1])
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if halo < 0:
        raise ValueError(f"halo must be non-negative, got {halo}")
    out = []
    for y in range(0, height, tile_size):
        h = min(tile_size, height - y)
        for x in range(0, width, tile_size):
            w = min(tile_size, width - x)
            rx, ry = max(0, x - halo), max(0, y - halo)
            rx1, ry1 = min(width, x + w + halo), min(height, y + h + halo)
            out.append(((x, y, w, h), (rx, ry, rx1 - rx, ry1 - ry)))
    return out


@dataclass(frozen=True)
class Tile:
    """One unit of work: a core window and its read window on one level of a slide.

    Coordinates are in pixels of ``level``; ``downsample`` maps them to level 0 and ``mpp``
    (µm/px of this level, None when unknown) to micrometres.
    """

    level: int
    row: int
    col: int
    x: int
    y: int
    w: int
    h: int
    rx: int
    ry: int
    rw: int
    rh: int
    downsample: float = 1.0
    mpp: float | None = None
    tissue: float = 1.0

    @property
    def core_in_read(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the core inside the read window (half-open)."""
        x0, y0 = self.x - self.rx, self.y - self.ry
        return x0, y0, x0 + self.w, y0 + self.h

    @property
    def level0(self) -> tuple[float, float, float, float]:
        """Core (x, y, w, h) in level-0 pixels."""
        d = self.downsample
        return self.x * d, self.y * d, self.w * d, self.h * d

    @property
    def um(self) -> tuple[float, float, float, float] | None:
        """Core (x, y, w, h) in micrometres, or None when µm/px is unknown."""
        if self.mpp is None:
            return None
        m = self.mpp
        return self.x * m, self.y * m, self.w * m, self.h * m


def core_fractions(
    mask: np.ndarray, mask_downsample: float, cores: list[tuple[int, int, int, int]],
    level_downsample: float, dilate: int = 1,
) -> np.ndarray:
    """Fraction of each core (level px) covered by tissue in a low-resolution mask.

    The mask is dilated by ``dilate`` mask pixels first, so cells at the very edge of the
    tissue are not lost to the mask's coarse resolution.
    """
    from scipy import ndimage as ndi

    m = mask.astype(bool)
    if dilate > 0 and m.any():
        m = ndi.binary_dilation(m, iterations=dilate)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    scale = level_downsample / mask_downsample
    out = np.empty(len(cores), np.float64)
    for i, (x, y, w, h) in enumerate(cores):
        x0 = min(int(np.floor(x * scale)), m.shape[1] - 1)
        y0 = min(int(np.floor(y * scale)), m.shape[0] - 1)
        x1 = min(max(int(np.ceil((x + w) * scale)), x0 + 1), m.shape[1])
        y1 = min(max(int(np.ceil((y + h) * scale)), y0 + 1), m.shape[0])
        s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        out[i] = s / ((x1 - x0) * (y1 - y0))
    return out


def plan_tiles(
    slide: Slide,
    tile_size: int = 2048,
    halo: int = 64,
    level: int = 0,
    mask: TissueMask | None = None,
    min_tissue: float = 0.0,
) -> list[Tile]:
    """Tiles of one level of ``slide``, dropping those without tissue.

    Parameters
    ----------
    tile_size, halo : core edge and halo width in pixels of ``level``.
    mask : a tissue mask (see :func:`slidecensus.tiling.tissue_mask`); None keeps all tiles.
    min_tissue : keep tiles whose core has a tissue fraction strictly above this.
    """
    lv = slide.levels[level]
    windows = grid_windows(lv.shape, tile_size, halo)
    if mask is not None:
        fr = core_fractions(mask.mask, mask.downsample, [c for c, _ in windows], lv.downsample)
    else:
        fr = np.ones(len(windows))
    mpp = slide.mpp * lv.downsample if slide.mpp is not None else None
    cols = -(-lv.shape[1] // tile_size)
    tiles = []
    for i, ((x, y, w, h), (rx, ry, rw, rh)) in enumerate(windows):
        if mask is not None and not fr[i] > min_tissue:
            continue
        tiles.append(Tile(level, i // cols, i % cols, x, y, w, h, rx, ry, rw, rh,
                          lv.downsample, mpp, float(fr[i])))
    return tiles


def level_for_mpp(slide: Slide, mpp: float | None) -> int:
    """The finest level at or below the working resolution ``mpp`` (µm/px); 0 if unknown."""
    if mpp is None or slide.mpp is None:
        return 0
    return slide.best_level(mpp / slide.mpp)
