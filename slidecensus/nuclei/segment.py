"""Nuclei segmentation of H&E tiles and images (DESIGN.md, steps 3-5).

Per tile (:func:`segment_tile`, a pure function):

1. Reinhard-normalise and deconvolve with the slide's :class:`~.stain.StainModel`;
   keep the hematoxylin concentration (:func:`~.stain.stain_concentrations`).
2. Global threshold (the paper's 120 on the 0-255 hematoxylin intensity scale).
3. Fill holes; drop objects under ``min_area_um2``.
4. Remove thin protrusions (an opening by a disk of radius ``protrusion_um``, the effect of
   HistomicsTK's ``compact`` / Wienert's minimum model) and open with a square kernel of
   ``opening_um`` (the paper's 7 x 7).
5. Split touching nuclei: marker-controlled watershed on the distance transform, markers
   at regional maxima of the distance (after ``split_smooth_um`` smoothing) that are at least
   ``split_min_distance_um`` apart; drop fragments under ``min_area_um2``.
6. Measure every label with bincount-style reductions (no per-object Python loop).

Parameters are physical (µm, µm²) and converted with :meth:`SegmentParams.for_mpp`. An image
without µm/px uses :data:`DEFAULT_MPP` (0.25 µm/px), at which the defaults equal the paper's
pixel values (200 px minimum area, 7 x 7 opening, compaction 3 px).

A nucleus belongs to the tile whose *core* holds its centroid, so segmenting a slide as tiles
with a halo (:func:`segment_file`) gives the same nuclei as segmenting it whole.

With a :class:`Segmenter` of kind ``unet`` (``--segmenter unet``), steps 2-5 are replaced by
the U-Net of :mod:`.unet` (trained on synthetic patches, Hou et al.) on the Reinhard-normalised
tile and its watershed instance step; the stain features, the filters of step 6 and the
tiling are the same, and the halo also covers the network's measured receptive field.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from ..errors import InvalidInputError
from .normalize import read_normalized
from .stain import StainModel, as_rgb8, estimate_stain_model, stain_concentrations

__all__ = [
    "CELL_COLUMNS",
    "DEFAULT_MPP",
    "SEGMENTERS",
    "PixelParams",
    "SegmentParams",
    "Segmenter",
    "empty_cell_table",
    "label_nuclei",
    "measure_cells",
    "segment_file",
    "segment_image",
    "segment_tile",
    "tile_geometry",
]

log = logging.getLogger(__name__)

#: µm/px assumed for images that carry none (40x scanners): the paper's pixel parameters
#: (200 px area, 7 x 7 opening) are the physical defaults converted at this resolution.
DEFAULT_MPP = 0.25

#: Columns and dtypes of the cell table (also of an empty one).
CELL_COLUMNS: dict[str, str] = {
    "cell_id": "int64",
    "x_px": "float64",
    "y_px": "float64",
    "x_um": "float64",
    "y_um": "float64",
    "area_px": "int64",
    "area_um2": "float64",
    "bbox_x0": "int64",
    "bbox_y0": "int64",
    "bbox_x1": "int64",
    "bbox_y1": "int64",
    "eccentricity": "float32",
    "solidity": "float32",
    "mean_hematoxylin": "float32",
    "mean_eosin": "float32",
}


def empty_cell_table() -> pd.DataFrame:
    """A cell table with no rows and every column typed (:data:`CELL_COLUMNS`)."""
    return pd.DataFrame({k: pd.Series([], dtype=v) for k, v in CELL_COLUMNS.items()})


@dataclass(frozen=True)
class PixelParams:
    """:class:`SegmentParams` converted to pixels (see :meth:`SegmentParams.for_mpp`).

    ``bin`` is the integer binning from the image to the working resolution; ``mpp`` and all
    ``*_px`` values except ``halo_px`` and ``edge_sliver_px`` are at the working resolution;
    those two are in pixels of the input image (``halo_px`` a multiple of ``bin``).
    """

    mpp: float
    bin: int
    threshold_od: float
    smooth_px: float
    min_area_px: int
    max_area_px: int
    protrusion_px: int
    opening_px: int
    split_smooth_px: float
    split_min_distance_px: int
    halo_px: int
    max_eccentricity: float = 1.0
    edge_sliver_px: float = 0.0
    min_iod_um2: float = 0.0
    min_relative_hematoxylin: float = 0.0


@dataclass(frozen=True)
class SegmentParams:
    """Segmentation parameters in physical units.

    Attributes
    ----------
    hematoxylin_threshold : float
        Foreground where the deconvolved hematoxylin *intensity* (0 = saturated stain,
        255 = none) is below this; 120 in Hu et al. Compared internally in OD units.
    min_area_um2 : float
        Smallest nucleus (12.5 µm² = 200 px at 0.25 µm/px, the paper's value).
    max_area_um2 : float
        Largest object kept after splitting (clumps that could not be split, stain debris).
    protrusion_um : float
        Radius of the disk opening that removes thin protrusions (HistomicsTK compaction 3 px).
    opening_um : float
        Side of the square opening kernel (the paper's 7 x 7 px), rounded to an odd number
        of pixels so the opening does not shift objects.
    split_smooth_um : float
        Gaussian sigma applied to the distance transform before finding split markers.
    split_min_distance_um : float
        Smallest distance between two markers of the watershed split.
    max_eccentricity : float
        Objects more elongated than this (eccentricity of the moment ellipse; 0.9 is an axis
        ratio of 2.3) are dropped: spindle-shaped stromal and endothelial nuclei and streaks,
        which the census of marrow cells does not count. 1 keeps all.
    edge_sliver_um : float
        A nucleus cut by the edge of the image data (the read window's edge; inside a slide
        that edge is in the halo, so only the slide's own border counts) whose visible part
        has its centroid closer than this to that edge is a sliver and dropped: less than
        about half of it is in the image. 0 keeps all.
    min_iod_um2 : float
        Smallest integrated hematoxylin optical density of a nucleus (area in µm² times its
        mean hematoxylin OD; µm²·OD). The integrated OD measures the amount of stained
        chromatin, the quantity of DNA image cytometry, so it does not depend on how the
        chromatin is spread: a small dark nucleus (lymphocyte, late erythroblast) passes, a
        small pale object (a tangential cap of a nucleus, out-of-focus or basophilic debris)
        does not. 0 (the default) keeps all. On the bone-marrow tuning images 12 raises F1
        0.871 -> 0.877 (held out 0.859 -> 0.862), but it costs MoNuSeg about 0.02 Dice and
        detection F1, whose annotators mark small pale nuclei too: a choice of convention.
    min_relative_hematoxylin : float
        Objects whose mean hematoxylin OD is below this fraction of the slide's Otsu split
        (``StainModel.nuclear_split_od``: where its tissue's hematoxylin separates into
        nuclear and other stain) are dropped: stained material paler than the slide's own
        nuclei, above the fixed threshold only because the slide is pale overall. On
        Romanowsky (MGG, Giemsa) blood smears these are the denser red cells: 0.8 drops 95
        of 166 non-central objects of 300 blood-cell images and keeps every central
        leukocyte and platelet, while bone-marrow F1 and MoNuSeg (training images) Dice,
        AJI and F1 are unchanged to 4 decimals (docs/segmentation.md). 0 keeps all.
    halo_um : float
        Halo of tiles: at least the diameter of the largest nucleus.
    work_mpp : float
        Working resolution: images finer than this are binned by the largest integer factor
        that keeps them at or finer than it (0.25 µm/px -> 2 x 2 bins). Measured on the
        bone-marrow set: the same F1 as at full resolution, four times less work.
    """

    hematoxylin_threshold: float = 135.0
    smooth_um: float = 0.625
    min_area_um2: float = 9.375
    max_area_um2: float = 400.0
    protrusion_um: float = 0.5
    opening_um: float = 1.75
    split_smooth_um: float = 0.25
    split_min_distance_um: float = 2.0
    max_eccentricity: float = 0.9
    edge_sliver_um: float = 1.5
    min_iod_um2: float = 0.0
    min_relative_hematoxylin: float = 0.8
    halo_um: float = 24.0
    work_mpp: float = 0.5

    def __post_init__(self) -> None:
        import dataclasses

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, int | float) and math.isfinite(v)):
                raise InvalidInputError(f"{f.name} must be a finite number, got {v!r}")
        if not 0.0 < self.hematoxylin_threshold < 255.0:
            raise InvalidInputError(
                f"hematoxylin_threshold must be in (0, 255), got {self.hematoxylin_threshold}"
            )
        for name in ("min_area_um2", "max_area_um2", "halo_um", "work_mpp"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_area_um2 >= self.max_area_um2:
            raise InvalidInputError(f"min_area_um2 ({self.min_area_um2}) must be below "
                                    f"max_area_um2 ({self.max_area_um2})")
        if not 0.0 < self.max_eccentricity <= 1.0:
            raise InvalidInputError(
                f"max_eccentricity must be in (0, 1], got {self.max_eccentricity}"
            )
        for name in ("smooth_um", "protrusion_um", "opening_um", "split_smooth_um",
                     "split_min_distance_um", "edge_sliver_um", "min_iod_um2",
                     "min_relative_hematoxylin"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {getattr(self, name)}")

    def for_mpp(self, mpp: float | None) -> PixelParams:
        """Convert to pixels at ``mpp`` µm/px (``None``: :data:`DEFAULT_MPP`).

        Parameters
        ----------
        mpp : float or None
            µm per pixel of the image to segment.

        Returns
        -------
        PixelParams
        """
        mpp = DEFAULT_MPP if mpp is None else float(mpp)
        if not (math.isfinite(mpp) and mpp > 0):
            raise InvalidInputError(f"mpp must be a positive number of µm/px, got {mpp}")
        f = max(1, math.floor(self.work_mpp / mpp + 1e-6))
        halo = math.ceil(self.halo_um / mpp)
        halo = -(-halo // f) * f  # a multiple of the bin, so tile grids stay bin-aligned
        mpp = mpp * f  # everything below is in pixels of the working resolution
        a = mpp * mpp
        return PixelParams(
            mpp=mpp,
            bin=f,
            threshold_od=float(np.log(256.0 / (self.hematoxylin_threshold + 1.0))),
            smooth_px=self.smooth_um / mpp,
            min_area_px=max(1, round(self.min_area_um2 / a)),
            max_area_px=max(1, round(self.max_area_um2 / a)),
            protrusion_px=round(self.protrusion_um / mpp),
            opening_px=2 * math.floor(self.opening_um / mpp / 2) + 1,  # odd: no shift
            split_smooth_px=self.split_smooth_um / mpp,
            split_min_distance_px=max(1, round(self.split_min_distance_um / mpp)),
            halo_px=halo,
            max_eccentricity=float(self.max_eccentricity),
            edge_sliver_px=self.edge_sliver_um / (mpp / f),  # in pixels of the input image
            min_iod_um2=float(self.min_iod_um2),
            min_relative_hematoxylin=float(self.min_relative_hematoxylin),
        )


def segment_params_from(overrides: list[str] | tuple[str, ...] = ()) -> SegmentParams:
    """:class:`SegmentParams` with ``NAME=VALUE`` overrides (the CLI's ``--set``), checked.

    Raises
    ------
    InvalidInputError
        For an unknown name, a value that is not a number, or a value out of range; the
        message lists the names.
    """
    import dataclasses

    names = [f.name for f in dataclasses.fields(SegmentParams)]
    kw: dict[str, float] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise InvalidInputError(f"--set {item!r}: expected NAME=VALUE with NAME one of "
                                    f"{', '.join(names)}")
        try:
            kw[name] = float(value)
        except ValueError:
            raise InvalidInputError(f"--set {item!r}: {value.strip()!r} is not a number"
                                    ) from None
    return SegmentParams(**kw)


#: The segmenters ``--segmenter`` chooses from.
SEGMENTERS = ("threshold", "unet")


@dataclass(frozen=True)
class Segmenter:
    """Which segmenter labels the nuclei (``--segmenter``, ``--segmenter-model``).

    Part of the census parameters, so a run with another segmenter or another model file
    recomputes.

    Attributes
    ----------
    kind : str
        ``threshold`` (the paper's pipeline) or ``unet`` (:mod:`.unet`).
    model : str
        ``unet``: the model file ("" = the one shipped in the package).
    model_sha256 : str
        Its content hash (a retrained file with the same name recomputes).
    """

    kind: str = "threshold"
    model: str = ""
    model_sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SEGMENTERS:
            raise InvalidInputError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, "
                                    f"got {self.kind!r}")
        if self.kind == "threshold" and self.model:
            raise InvalidInputError("--segmenter-model is for --segmenter unet")

    @property
    def is_default(self) -> bool:
        """The threshold segmenter (the default)."""
        return self.kind == "threshold"

    @classmethod
    def resolve(cls, kind: str = "threshold", model: str | os.PathLike | None = None
                ) -> Segmenter:
        """The spec with its model file checked and hashed now, so a corrupt or foreign file
        is refused in one line before any work starts."""
        if kind != "unet":
            return cls(kind, str(model or ""))
        from .unet import default_model_path, file_sha256, load_unet

        path = Path(model) if model else default_model_path()
        load_unet(path)  # raises CheckpointError (one line) for a bad file
        return cls("unet", str(model or ""), file_sha256(path))

    def network(self):
        """The loaded :class:`~.unet.UNetSegmenter` (cached per process); None for threshold."""
        if self.kind != "unet":
            return None
        from ..hardware import cpu_bf16_native
        from .unet import cached_unet, unet_device

        # bf16 where the CPU runs it natively: the shipped model's MoNuSeg and marrow scores
        # match fp32 within 0.0005 (docs/benchmarks.md, the learned segmenter). On a GPU it
        # stays fp32 until bf16 is measured there.
        device = unet_device()
        bf16 = device == "cpu" and cpu_bf16_native()
        return cached_unet(self.model, self.model_sha256, bf16=bf16, device=device)

    def describe(self) -> str:
        """``threshold``, ``unet`` or ``unet:PATH``."""
        return self.kind + (f":{self.model}" if self.model else "")


def tile_geometry(params: SegmentParams, segmenter: Segmenter | None, mpp: float | None,
                  tile_size: int) -> tuple[int, int]:
    """(tile size, halo) in level-0 px for ``segmenter`` at ``mpp``.

    Threshold: the halo of ``params`` and a tile size that is a multiple of the bin. U-Net:
    the halo also holds the network's receptive field beyond the largest nucleus, and both
    are multiples of the bin times the network's pooling divisor, so every tile's pooling
    grid is the whole slide's (tiled equals whole).
    """
    pp = params.for_mpp(mpp)
    net = segmenter.network() if segmenter is not None else None
    if net is None:
        return max(pp.bin, tile_size - tile_size % pp.bin), pp.halo_px
    level_mpp = pp.mpp / pp.bin
    diameter_um = 2 * math.sqrt(params.max_area_um2 / math.pi)
    halo_um = max(params.halo_um, diameter_um + net.receptive_radius_um)
    step = pp.bin * net.config.divisor
    halo = -(-math.ceil(halo_um / level_mpp) // step) * step
    return max(step, tile_size - tile_size % step), halo


# --------------------------------------------------------------------------- morphology


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """Fill background components that do not touch the image border (one labelling pass)."""
    bg, n = ndi.label(~fg)
    if n == 0:
        return fg
    border = np.zeros(n + 1, bool)
    for edge in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
        border[edge] = True
    border[0] = True
    return fg | ~border[bg]


def _area_filter(labels: np.ndarray, n: int, min_px: int, max_px: int | None = None):
    """Zero labels whose pixel count is outside [min_px, max_px]; returns keep-mask per label."""
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= min_px
    if max_px is not None:
        keep &= area <= max_px
    keep[0] = False
    return keep, area


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r + r  # the usual "round" digital disk


def _open(fg: np.ndarray, footprint: np.ndarray | None = None, size: int = 0) -> np.ndarray:
    """Binary opening through grey min/max filters (separable for a square ``size``)."""
    u = fg.view(np.uint8)
    if footprint is not None:
        e = ndi.minimum_filter(u, footprint=footprint, mode="constant", cval=0)
        return ndi.maximum_filter(e, footprint=footprint, mode="constant", cval=0).view(bool)
    e = ndi.minimum_filter(u, size=size, mode="constant", cval=0)
    return ndi.maximum_filter(e, size=size, mode="constant", cval=0).view(bool)


def label_nuclei(hematoxylin_od: np.ndarray, pp: PixelParams) -> np.ndarray:
    """Label nuclei in a hematoxylin concentration image (steps 2-5 of the module docstring).

    Parameters
    ----------
    hematoxylin_od : ndarray of float, shape (h, w)
        Hematoxylin concentration in OD units (:func:`~.stain.stain_concentrations`).
    pp : PixelParams
        Parameters in pixels (:meth:`SegmentParams.for_mpp`).

    Returns
    -------
    ndarray of int32, shape (h, w)
        0 = background, 1..n = nuclei (consecutive).

    References
    ----------
    .. [1] B. Hu et al., IEEE JBHI 23(3):1316-1328, 2019 (threshold, fill, area, opening).
    .. [2] S. Wienert et al., "Detection and segmentation of cell nuclei in virtual microscopy
       images: a minimum-model approach", Scientific Reports 2:503, 2012 (protrusions).
    .. [3] L. Vincent, P. Soille, "Watersheds in digital spaces", IEEE PAMI 13(6), 1991.
    """
    h = np.asarray(hematoxylin_od)
    if h.ndim != 2:
        raise InvalidInputError(f"expected a 2-D hematoxylin image, got shape {h.shape}")
    if pp.smooth_px > 0:
        h = ndi.gaussian_filter(h.astype(np.float32, copy=False), pp.smooth_px, truncate=3.0)
    fg = h > pp.threshold_od
    if not fg.any():
        return np.zeros(h.shape, np.int32)
    fg = _fill_holes(fg)
    lab, n = ndi.label(fg)
    keep, _ = _area_filter(lab, n, pp.min_area_px)
    fg = keep[lab]
    if pp.protrusion_px > 0:
        fg = _open(fg, footprint=_disk(pp.protrusion_px))
    if pp.opening_px > 1:
        fg = _open(fg, size=pp.opening_px)
    if not fg.any():
        return np.zeros(h.shape, np.int32)
    # split touching nuclei: watershed of the distance transform from its regional maxima
    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    if pp.split_smooth_px > 0:
        dist = ndi.gaussian_filter(dist, pp.split_smooth_px, truncate=3.0)
    k = 2 * pp.split_min_distance_px + 1
    peaks = (ndi.maximum_filter(dist, size=k) == dist) & fg
    markers, _ = ndi.label(peaks, structure=np.ones((3, 3), bool))
    lab = watershed(-dist, markers, mask=fg)
    n = int(lab.max())
    keep, _ = _area_filter(lab, n, pp.min_area_px, pp.max_area_px)
    new = np.zeros(n + 1, np.int32)
    new[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new[lab]


# --------------------------------------------------------------------------- measurement

_N_DIRECTIONS = 16  # support-line directions of the convex-hull polygon (solidity)


def measure_cells(
    labels: np.ndarray,
    hematoxylin_od: np.ndarray,
    eosin_od: np.ndarray,
    mpp: float,
    core: tuple[int, int, int, int] | None = None,
    scale: int = 1,
) -> pd.DataFrame:
    """Cell table of a label image, computed with sorted-segment reductions.

    Parameters
    ----------
    labels : ndarray of int, shape (h, w)
        Nuclei labels, 0 = background.
    hematoxylin_od, eosin_od : ndarray of float, shape (h, w)
        Stain concentrations (OD) for the mean-stain features.
    mpp : float
        µm per pixel of the *output* coordinates (for ``*_um`` columns).
    core : (x0, y0, x1, y1), optional
        Keep only nuclei whose centroid (output coordinates) lies in ``[x0, x1) x [y0, y1)``.
    scale : int
        Output pixels per label pixel (the binning of the working resolution): centroids,
        boxes and areas are reported as those of the label image upsampled by ``scale``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CELL_COLUMNS`, coordinates local to ``labels``; ``cell_id`` is the
        label value. ``solidity`` is area over the area of the convex polygon bounded by
        support lines in 16 directions around the pixel squares (an upper bound of the
        hull within 2%, so solidity is at most 2% low).
    """
    lab = np.asarray(labels)
    flat = lab.ravel()
    idx = np.flatnonzero(flat)
    if idx.size == 0:
        return empty_cell_table()
    lv = flat[idx]
    order = np.argsort(lv, kind="stable")
    idx, lv = idx[order], lv[order]
    starts = np.flatnonzero(np.r_[True, lv[1:] != lv[:-1]])
    ids = lv[starts].astype(np.int64)
    w = lab.shape[1]
    ys, xs = np.divmod(idx, w)
    xs = xs.astype(np.float64)
    ys = ys.astype(np.float64)
    area = np.diff(np.r_[starts, idx.size]).astype(np.int64)
    sx = np.add.reduceat(xs, starts)
    sy = np.add.reduceat(ys, starts)
    cx, cy = sx / area, sy / area
    ox, oy = (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5
    if core is not None:
        x0, y0, x1, y1 = core
        inside = (ox >= x0) & (ox < x1) & (oy >= y0) & (oy < y1)
    else:
        inside = np.ones(len(ids), bool)
    # central second moments (+1/12 per pixel, the moments of a unit square)
    rep = np.repeat(np.arange(len(ids)), area)
    dx, dy = xs - cx[rep], ys - cy[rep]
    mxx = np.add.reduceat(dx * dx, starts) / area + 1 / 12
    myy = np.add.reduceat(dy * dy, starts) / area + 1 / 12
    mxy = np.add.reduceat(dx * dy, starts) / area
    common = np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
    l1 = (mxx + myy) / 2 + common
    l2 = (mxx + myy) / 2 - common
    ecc = np.sqrt(np.clip(1 - l2 / l1, 0, 1))
    # convex hull area from support functions h(theta) of the pixel squares
    th = np.pi * np.arange(_N_DIRECTIONS) / _N_DIRECTIONS * 2
    hull = np.zeros(len(ids))
    hs = np.empty((_N_DIRECTIONS, len(ids)))
    for k, t in enumerate(th):
        c, s = math.cos(t), math.sin(t)
        proj = dx * c + dy * s
        hs[k] = np.maximum.reduceat(proj, starts) + 0.5 * (abs(c) + abs(s))
    # polygon of the support lines: vertex between lines k and k+1; area by the formula
    # A = 1/2 sum_k h_k * (edge length on line k)
    dth = 2 * np.pi / _N_DIRECTIONS
    hn, hp = np.roll(hs, -1, axis=0), np.roll(hs, 1, axis=0)
    edge = (hn - hs * math.cos(dth)) / math.sin(dth) + (hp - hs * math.cos(dth)) / math.sin(dth)
    hull = 0.5 * (hs * edge).sum(axis=0)
    solidity = np.clip(area / np.maximum(hull, area), 0, 1)
    hv = np.asarray(hematoxylin_od, dtype=np.float64).ravel()[idx]
    ev = np.asarray(eosin_od, dtype=np.float64).ravel()[idx]
    mh = np.add.reduceat(hv, starts) / area
    me = np.add.reduceat(ev, starts) / area
    bx0 = np.minimum.reduceat(xs, starts).astype(np.int64) * scale
    bx1 = (np.maximum.reduceat(xs, starts).astype(np.int64) + 1) * scale
    by0 = np.minimum.reduceat(ys, starts).astype(np.int64) * scale
    by1 = (np.maximum.reduceat(ys, starts).astype(np.int64) + 1) * scale
    area_out = area * (scale * scale)
    m = inside
    table = pd.DataFrame(
        {
            "cell_id": ids[m],
            "x_px": ox[m],
            "y_px": oy[m],
            "x_um": ox[m] * mpp,
            "y_um": oy[m] * mpp,
            "area_px": area_out[m],
            "area_um2": area_out[m] * (mpp * mpp),
            "bbox_x0": bx0[m],
            "bbox_y0": by0[m],
            "bbox_x1": bx1[m],
            "bbox_y1": by1[m],
            "eccentricity": ecc[m],
            "solidity": solidity[m],
            "mean_hematoxylin": mh[m],
            "mean_eosin": me[m],
        }
    )
    return table.astype(CELL_COLUMNS).reset_index(drop=True)


# --------------------------------------------------------------------------- tiles, images


def _check_core(core, shape) -> tuple[int, int, int, int]:
    h, w = shape
    if core is None:
        return 0, 0, w, h
    if len(core) != 4:
        raise InvalidInputError(f"expected core=(x0, y0, x1, y1), got {core!r}")
    x0, y0, x1, y1 = (int(v) for v in core)
    if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
        raise InvalidInputError(
            f"core {core!r} must lie inside the read window of width {w} and height {h}"
        )
    return x0, y0, x1, y1


def _bin_rgb(rgb: np.ndarray, f: int) -> np.ndarray:
    """Mean of f x f blocks (float32); the image is edge-padded to a multiple of f."""
    if f == 1:
        return rgb
    h, w = rgb.shape[:2]
    ph, pw = -h % f, -w % f
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    acc = np.zeros(((h + ph) // f, (w + pw) // f, 3), np.uint16)
    for i in range(f):
        for j in range(f):
            acc += rgb[i::f, j::f]
    return acc.astype(np.float32) * np.float32(1.0 / (f * f))


def _object_rejects(table: pd.DataFrame, pp: PixelParams, shape,
                    split_od: float = 0.0) -> np.ndarray:
    """Rows to drop: too little chromatin, paler than the slide's nuclei (``split_od``, the
    stain model's Otsu split), too elongated, or a sliver cut by the image edge."""
    drop = table["eccentricity"].to_numpy() > pp.max_eccentricity
    if pp.min_relative_hematoxylin > 0 and split_od > 0:
        drop |= table["mean_hematoxylin"].to_numpy() < pp.min_relative_hematoxylin * split_od
    if pp.min_iod_um2 > 0:
        iod = table["area_um2"].to_numpy() * table["mean_hematoxylin"].to_numpy()
        drop |= iod < pp.min_iod_um2
    m = pp.edge_sliver_px
    if m > 0 and len(table):
        h, w = shape
        x, y = table["x_px"].to_numpy(), table["y_px"].to_numpy()
        drop |= (table["bbox_x0"].to_numpy() <= 0) & (x + 0.5 < m)
        drop |= (table["bbox_y0"].to_numpy() <= 0) & (y + 0.5 < m)
        drop |= (table["bbox_x1"].to_numpy() >= w) & (w - 0.5 - x < m)
        drop |= (table["bbox_y1"].to_numpy() >= h) & (h - 0.5 - y < m)
    return drop


def _segment(rgb, stain_model, params, mpp, core, want_labels=False, segmenter=None):
    rgb = as_rgb8(rgb)
    pp = params.for_mpp(mpp)
    core = _check_core(core, rgb.shape[:2])
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], np.int32), empty_cell_table()
    small = _bin_rgb(rgb, pp.bin)
    h, e = stain_concentrations(small, stain_model)
    net = segmenter.network() if segmenter is not None else None
    if net is None:
        labels = label_nuclei(h, pp)
    else:
        labels = net.label(stain_model.normalize(small), pp.mpp, pp.min_area_px,
                           pp.max_area_px)
    table = measure_cells(labels, h, e, pp.mpp / pp.bin, core, scale=pp.bin)
    if net is not None and net.config.min_relative_iod_um2 > 0:
        # the model's own filter, in µm² at the slide's nuclear split OD
        floor = net.config.min_relative_iod_um2 * stain_model.nuclear_split_od
        if floor > pp.min_iod_um2:
            pp = replace(pp, min_iod_um2=float(floor))
    drop = _object_rejects(table, pp, rgb.shape[:2], stain_model.nuclear_split_od)
    if drop.any():
        gone = np.zeros(int(labels.max()) + 1, bool)
        gone[table["cell_id"].to_numpy()[drop]] = True
        labels[gone[labels]] = 0
        table = table[~drop].reset_index(drop=True)
    if want_labels and pp.bin > 1:
        f = pp.bin
        labels = np.repeat(np.repeat(labels, f, axis=0), f, axis=1)[: rgb.shape[0], : rgb.shape[1]]
    return labels, table


def shift_cells(table: pd.DataFrame, dx: int, dy: int, mpp: float) -> pd.DataFrame:
    """Move a tile's cell table from read-window to slide (level-0) coordinates, in place.

    Pixel columns are offset by the window's origin (``dx``, ``dy``) and the µm columns
    recomputed at ``mpp``; returns the same table.
    """
    for c in ("x_px", "bbox_x0", "bbox_x1"):
        table[c] += dx
    for c in ("y_px", "bbox_y0", "bbox_y1"):
        table[c] += dy
    table["x_um"] = table["x_px"] * mpp
    table["y_um"] = table["y_px"] * mpp
    return table


def segment_tile_with_labels(
    rgb_with_halo: np.ndarray,
    stain_model: StainModel,
    params: SegmentParams | None = None,
    core: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    segmenter: Segmenter | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """:func:`segment_tile` plus the int32 label image of the read window (for crops).

    Labels are at the window's resolution (ids = ``table.cell_id``; nuclei whose centroid
    lies outside the core keep their labels but have no row).
    """
    params = SegmentParams() if params is None else params
    return _segment(rgb_with_halo, stain_model, params, mpp, core, want_labels=True,
                    segmenter=segmenter)


def segment_tile(
    rgb_with_halo: np.ndarray,
    stain_model: StainModel,
    params: SegmentParams | None = None,
    core: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    segmenter: Segmenter | None = None,
) -> pd.DataFrame:
    """Segment the nuclei of one tile read with its halo; a pure function.

    Parameters
    ----------
    rgb_with_halo : ndarray, shape (h, w, 3)
        The read window (core plus halo). Gray, RGBA and 16-bit are converted (:func:`as_rgb8`).
    stain_model : StainModel
        The slide's model, estimated once (:func:`~.stain.estimate_stain_model`).
    params : SegmentParams, optional
        Physical parameters (default :class:`SegmentParams`).
    core : (x0, y0, x1, y1), optional
        The core inside the read window; only nuclei whose centroid lies in it are returned.
        Default: the whole window.
    mpp : float, optional
        µm/px of the tile (default :data:`DEFAULT_MPP`).
    segmenter : Segmenter, optional
        Default: the threshold segmenter.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CELL_COLUMNS` in coordinates of the read window (callers add the
        window's offset); empty but typed when there are no nuclei.
    """
    params = SegmentParams() if params is None else params
    return _segment(rgb_with_halo, stain_model, params, mpp, core, segmenter=segmenter)[1]


def segment_image(
    rgb: np.ndarray,
    mpp: float | None = None,
    params: SegmentParams | None = None,
    stain_model: StainModel | None = None,
    segmenter: Segmenter | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment a whole in-memory image: estimate the stain model on it, then segment.

    Parameters
    ----------
    rgb : ndarray, shape (h, w, 3)
        The image (converted with :func:`as_rgb8`).
    mpp : float, optional
        µm/px (default :data:`DEFAULT_MPP`).
    params : SegmentParams, optional
    stain_model : StainModel, optional
        Use this model instead of estimating one on the image.
    segmenter : Segmenter, optional
        Default: the threshold segmenter.

    Returns
    -------
    (labels, table)
        int32 label image at the input's resolution (ids = ``table.cell_id``; binned
        segmentations are upsampled by pixel replication) and the cell table.
    """
    rgb = as_rgb8(rgb)
    params = SegmentParams() if params is None else params
    if stain_model is None:
        stain_model = estimate_stain_model(rgb)
    return _segment(rgb, stain_model, params, mpp, None, want_labels=True, segmenter=segmenter)


def _write_parquet_atomic(table: pd.DataFrame, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stain_sample(slide: Any, max_side: int = 512, with_mask: bool = True):
    """A small RGB image of the whole slide (the stain model's sample) and its tissue mask.

    ``segment_file`` and the census both estimate the slide's stain model from this sample,
    so the two give the same nuclei.

    The coarsest level no smaller than about 2048 px is read whole and strided down to at
    most ``max_side`` px; the tissue mask comes from ``tissue_mask_rgb`` on that image
    (``None`` when ``with_mask`` is false).
    """
    from ..tiling import TissueMask, tissue_mask_rgb

    h0, w0 = slide.shape
    lvl = slide.best_level(max(1.0, max(h0, w0) / 2048))
    lh, lw = slide.levels[lvl].shape
    rgb = as_rgb8(slide.read_region(lvl, 0, 0, lw, lh))
    k = max(1, -(-max(lh, lw) // max_side))
    small = np.ascontiguousarray(rgb[::k, ::k])
    if not with_mask:
        return small, None
    try:
        mask = np.asarray(tissue_mask_rgb(small), bool)
    except ValueError:  # degenerate thumbnails (e.g. a single pixel) use the brightness mask
        mask = None
    ds = float(slide.levels[lvl].downsample) * k
    return small, (TissueMask(mask, ds) if mask is not None else None)


def segment_file(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    mpp: float | None = None,
    params: SegmentParams | None = None,
    tile_size: int = 2048,
    *,
    crops: str | os.PathLike | None = None,
    crop_masked: bool = True,
    geojson: str | os.PathLike | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    normalizer: Callable[[Any, np.ndarray, Any], tuple[Any, np.ndarray]] | None = None,
    segmenter: Segmenter | None = None,
) -> pd.DataFrame:
    """Segment every nucleus of an image or slide file and write the cell table as Parquet.

    The stain model is estimated once from tissue pixels of a low-resolution level; tiles of
    level 0 are then read with a halo of ``params.halo_um`` and segmented one after another,
    each keeping the nuclei whose centroid lies in its core. Coordinates are level-0.
    Optionally the same pass writes every nucleus's 32 x 32 crop and its outline; all
    outputs are written aside and renamed into place, so a failed run leaves none half-done.

    Parameters
    ----------
    path : path-like
        Image or slide (anything :func:`slidecensus.tiling.open_slide` reads).
    out : path-like, optional
        Parquet file to write (atomically: a temporary name, then ``os.replace``).
    mpp : float, optional
        µm/px when the file has none (default :data:`DEFAULT_MPP`); overrides nothing when
        the file has its own.
    params : SegmentParams, optional
    tile_size : int
        Core size of tiles in level-0 pixels (rounded down to a multiple of the working
        bin so that every tile bins on the same grid as the whole slide).
    crops : path-like, optional
        Write the crops (n, 32, 32, 3) uint8, row ``i`` = ``cell_id`` ``i``: ``.zarr`` (a
        Zarr v3 array, streamed tile by tile) or ``.npy`` (held in memory: about 3 kB a
        cell). See :func:`~.crops.extract_crops`.
    crop_masked : bool
        Crops "with segmentation" (outside the nucleus white, the paper's) or the plain
        bounding-box window.
    geojson : path-like, optional
        Write the nuclei as QuPath detections with polygon outlines
        (:mod:`~.outlines`), streamed.
    progress : callable, optional
        Called as ``progress(tiles_done, tiles_total, nuclei_so_far)`` once the tiles are
        planned and after each tile (a display's hook; nothing here prints).
    normalizer : callable, optional
        The stain normalisation (``--stain-norm``) to fit once to the slide, called as
        ``normalizer(slide, sample, tissue_mask)`` and returning (the fitted normaliser, the
        pixels to estimate the stain model on); see
        :func:`slidecensus.engine.plan.fit_slide_normalizer`. Default: Reinhard, done by the
        segmenter itself. Tiles are then read through :func:`~.normalize.read_normalized`.
    segmenter : Segmenter, optional
        Default: the threshold segmenter (:meth:`Segmenter.resolve` checks a model file).

    Returns
    -------
    pandas.DataFrame
        The cell table (:data:`CELL_COLUMNS`, ``cell_id`` = 0..n-1 in tile order).
    """
    for target in (out, crops, geojson):
        if target is not None and Path(target).is_dir() and Path(target).suffix != ".zarr":
            raise InvalidInputError(f"{target} is a folder; give a file path")
    sinks: list[_CropSink | _GeoSink] = []
    try:
        crop_sink = _CropSink(Path(crops), crop_masked) if crops is not None else None
        sinks += [crop_sink] if crop_sink is not None else []
        geo_sink = _GeoSink(Path(geojson)) if geojson is not None else None
        sinks += [geo_sink] if geo_sink is not None else []
        table = _segment_slide(path, mpp, params, tile_size, crop_sink, geo_sink, progress,
                               normalizer, segmenter)
        for sink in sinks:  # every output complete under its temporary name ...
            sink.finish()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    for sink in sinks:  # ... then renamed into place, the table last
        sink.place()
    if out is not None:
        _write_parquet_atomic(table, Path(out))
    return table


def _segment_slide(path, mpp, params, tile_size, crop_sink, geo_sink, progress=None,
                   normalizer=None, segmenter=None) -> pd.DataFrame:
    """The tile loop of :func:`segment_file`; feeds the optional crop and outline sinks."""
    from ..tiling import open_slide, plan_tiles

    params = SegmentParams() if params is None else params
    with open_slide(path, mpp=mpp) as slide:
        slide_mpp = slide.mpp if slide.mpp is not None else (mpp or DEFAULT_MPP)
        tile_size, halo = tile_geometry(params, segmenter, slide_mpp, tile_size)
        tiles = plan_tiles(slide, tile_size=tile_size, halo=halo, level=0)
        # the tissue mask only drops tiles without tissue: a one-tile plan never drops its
        # tile (a mask of >= 100 pixels covers it), so the mask is computed only for more
        sample, tmask = stain_sample(slide, with_mask=len(tiles) > 1)
        # the brightness mask of estimate_stain_model (what the parameters were tuned with);
        # the saturation-based tissue mask only drops tiles without tissue
        use = tmask.mask if tmask is not None and tmask.mask.sum() >= 100 else None
        norm, seg_sample = (None, sample) if normalizer is None else normalizer(
            slide, sample, tmask)
        model = replace(estimate_stain_model(seg_sample), norm=norm)
        log.debug("stain model from %d pixels: %s", model.n_pixels, model)
        if use is not None:
            tiles = plan_tiles(slide, tile_size=tile_size, halo=halo, level=0, mask=tmask)
        parts, n = [], 0
        want_labels = crop_sink is not None or geo_sink is not None
        if progress is not None:
            progress(0, len(tiles), 0)
        for i, t in enumerate(tiles):
            rgb, crop_rgb = read_normalized(slide, 0, t.rx, t.ry, t.rw, t.rh, model)
            if not want_labels:
                tab = segment_tile(rgb, model, params, core=t.core_in_read, mpp=slide_mpp,
                                   segmenter=segmenter)
            else:
                labels, tab = segment_tile_with_labels(rgb, model, params,
                                                       core=t.core_in_read, mpp=slide_mpp,
                                                       segmenter=segmenter)
                if len(tab) and crop_sink is not None:
                    crop_sink.add(crop_rgb, labels, tab)
                if len(tab) and geo_sink is not None:
                    from .outlines import nucleus_outlines

                    polys = nucleus_outlines(labels, tab["cell_id"].to_numpy(),
                                             tab[["x_px", "y_px"]].to_numpy())
                    polys += (t.rx, t.ry)
            if len(tab):
                shift_cells(tab, t.rx, t.ry, slide_mpp)
                tab["cell_id"] = np.arange(n, n + len(tab), dtype=np.int64)
                n += len(tab)
                parts.append(tab)
                if geo_sink is not None:
                    geo_sink.add(tab, polys)
            if progress is not None:
                progress(i + 1, len(tiles), n)
    table = pd.concat(parts, ignore_index=True) if parts else empty_cell_table()
    table["cell_id"] = np.arange(len(table), dtype=np.int64)
    return table.astype(CELL_COLUMNS)


def _aside(final: Path) -> Path:
    """A unique temporary name next to ``final`` (same folder, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent / f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``. A directory there (an earlier Zarr store) is first
    renamed aside and deleted only once the new one is in place, so a failure keeps it."""
    if not (final.is_dir() and not final.is_symlink()):
        os.replace(tmp, final)
        return
    import shutil

    old = _aside(final)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


class _CropSink:
    """32 x 32 crops of every nucleus, tile by tile, into ``.zarr`` (streamed) or ``.npy``."""

    def __init__(self, final: Path, masked: bool) -> None:
        if final.suffix.lower() not in (".zarr", ".npy"):
            raise InvalidInputError(f"crops must be written to a .zarr or .npy path, got "
                                    f"{final}")
        self.final, self.masked, self.tmp = final, masked, _aside(final)
        self.parts: list[np.ndarray] = []  # .npy: every crop; .zarr: less than one chunk
        self.array = None
        if final.suffix.lower() == ".zarr":
            import zarr

            self.array = zarr.create_array(str(self.tmp), shape=(0, 32, 32, 3),
                                           chunks=(self.CHUNK, 32, 32, 3), dtype=np.uint8,
                                           zarr_format=3)

    def add(self, rgb: np.ndarray, labels: np.ndarray, tab: pd.DataFrame) -> None:
        from .crops import extract_crops

        self.parts.append(extract_crops(rgb, labels, tab, masked=self.masked))
        if self.array is not None and sum(map(len, self.parts)) >= self.CHUNK:
            self._flush(whole_chunks=True)

    CHUNK = 4096

    def _flush(self, whole_chunks: bool) -> None:
        """Append buffered crops to the Zarr array in whole chunks (each chunk is encoded
        once), or all of them at the end."""
        c = np.concatenate(self.parts)
        n = len(c) - len(c) % self.CHUNK if whole_chunks else len(c)
        if n:
            self.array.append(c[:n], axis=0)
        self.parts = [c[n:]] if n < len(c) else []

    def finish(self) -> None:
        if self.array is not None:
            if self.parts:
                self._flush(whole_chunks=False)
            self.array.attrs.update({"crop": "masked" if self.masked else "box",
                                     "rows": "cell_id"})
        else:
            c = (np.concatenate(self.parts) if self.parts
                 else np.zeros((0, 32, 32, 3), np.uint8))
            with open(self.tmp, "wb") as fh:
                np.save(fh, c)

    def place(self) -> None:
        _put_in_place(self.tmp, self.final)

    def abort(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.unlink(missing_ok=True)


class _GeoSink:
    """Nucleus outlines as QuPath detections, streamed into a GeoJSON file."""

    def __init__(self, final: Path) -> None:
        from .geojson import GeoJSONWriter

        self.final, self.tmp = final, _aside(final)
        self.writer = GeoJSONWriter(self.tmp)

    def add(self, tab: pd.DataFrame, polys: np.ndarray) -> None:
        from .outlines import outline_features

        self.writer.write(outline_features(tab, polys))

    def finish(self) -> None:
        self.writer.close()

    def place(self) -> None:
        _put_in_place(self.tmp, self.final)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)

