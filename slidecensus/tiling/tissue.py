"""Tissue detection at low resolution, so tiles of bare glass never become tasks.

Bright-field tissue is coloured; glass is white-grey. The score is the HSV saturation of
a thumbnail, thresholded with Otsu's method but clamped to a band so an image that is all
tissue (no glass to contrast with) is not cut in half. Pen marks (green-cyan hues) and
black ink or debris (very dark pixels) are excluded; small specks are dropped.

References
----------
N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. SMC, 1979.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

if TYPE_CHECKING:
    from .slide import Slide

#: Otsu's threshold on saturation is clamped into this band (glass < 0.04 < tissue).
SATURATION_BAND = (0.04, 0.12)


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and its scale: one mask pixel covers ``downsample`` level-0 px."""

    mask: np.ndarray
    downsample: float

    def __iter__(self):
        """Unpack as ``mask, downsample = tissue_mask(slide)``."""
        return iter((self.mask, self.downsample))

    @property
    def fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_mask_rgb(
    rgb: np.ndarray,
    *,
    min_object_px: int = 16,
    band: tuple[float, float] = SATURATION_BAND,
    exclude_pen: bool = True,
) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image (h, w, 3) uint8.

    Parameters
    ----------
    rgb : thumbnail of the slide.
    min_object_px : connected tissue pieces smaller than this (in thumbnail pixels) are
        dropped as dust.
    band : lower and upper clamp of the Otsu threshold on saturation.
    exclude_pen : drop green-cyan marker ink and near-black pixels.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) RGB image, got shape {rgb.shape}")
    f = rgb.astype(np.float32) / 255.0
    mx, mn = f.max(axis=2), f.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    if sat.size and float(sat.max() - sat.min()) > 1e-3:
        thr = float(threshold_otsu(sat))
    else:
        thr = band[1]
    thr = min(max(thr, band[0]), band[1])
    mask = sat > thr
    if exclude_pen:
        r, g, b = f[..., 0], f[..., 1], f[..., 2]
        hue = _hue_degrees(r, g, b, mx, mn)
        # H&E has no green-cyan: any clearly tinted pixel of those hues is marker ink (its
        # blurred rim included, hence the low saturation bar and the one-pixel dilation)
        pen = (sat > 0.08) & (hue > 70) & (hue < 190)
        dark = mx < 0.15  # black ink, folds, debris
        mask &= ~ndi.binary_dilation(pen | dark)
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=1)
    mask = ndi.binary_fill_holes(mask) if mask.any() else mask
    if min_object_px > 1 and mask.any():
        lab, n = ndi.label(mask)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= min_object_px
        keep[0] = False
        mask = keep[lab]
    return mask


def _hue_degrees(r, g, b, mx, mn) -> np.ndarray:
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


def tissue_mask(slide: Slide, max_size: int = 2048, **kwargs) -> TissueMask:
    """Tissue mask of a slide from its thumbnail (long side at most ``max_size`` px)."""
    thumb = slide.thumbnail(max_size)
    h0, w0 = slide.shape
    downsample = float(np.mean([h0 / thumb.shape[0], w0 / thumb.shape[1]]))
    return TissueMask(tissue_mask_rgb(thumb, **kwargs), downsample)
