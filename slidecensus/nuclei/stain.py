"""Stain operations: Reinhard normalisation in Ruderman's lαβ space, Macenko stain estimation,
colour deconvolution, and the per-slide :class:`StainModel` that ties them together.

Optical density (OD) here is the natural-log form used by HistomicsTK's ``rgb_to_sda`` with
``I_0 = None``: ``od = ln(256) - ln(rgb + 1)`` for 8-bit RGB, so white (255) has OD 0 and the
"intensity" of a deconvolved stain channel is ``256 * exp(-c) - 1`` (0 = saturated stain,
255 = no stain), the scale on which the paper's hematoxylin threshold of 120 is stated.

The model is estimated **once per slide** (:func:`estimate_stain_model`) from tissue pixels and
then applied to every tile, so neighbouring tiles are normalised and deconvolved identically
(Reinhard statistics computed per tile make tiles disagree; see HistomicsTK's
``reinhard_stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "EOSIN_RJ",
    "HEMATOXYLIN_RJ",
    "LAB_FROM_LMS",
    "LMS_FROM_RGB",
    "TARGET_LAB_MEAN",
    "TARGET_LAB_STD",
    "StainModel",
    "as_rgb8",
    "deconvolve",
    "estimate_stain_model",
    "lab_to_rgb",
    "macenko_stain_matrix",
    "od_to_rgb",
    "order_stains",
    "otsu_split",
    "reinhard",
    "rgb_to_lab",
    "rgb_to_od",
    "stain_concentrations",
    "tissue_pixels",
]

#: RGB -> LMS cone responses, Reinhard et al. (2001), eq. 4 (as in HistomicsTK ``rgb_to_lab``).
LMS_FROM_RGB = np.array(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
)
#: log-LMS -> lαβ, Ruderman et al. (1998); Reinhard et al. (2001), eq. 6.
LAB_FROM_LMS = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
RGB_FROM_LMS = np.linalg.inv(LMS_FROM_RGB)
LMS_FROM_LAB = np.linalg.inv(LAB_FROM_LMS)

#: Target lαβ statistics of Hu et al. (2019), section 2.2 (from HistomicsTK's reference slide).
TARGET_LAB_MEAN = (8.98, 0.08, 0.02)
TARGET_LAB_STD = (0.64, 0.11, 0.03)

#: Reference OD directions of hematoxylin and eosin, Ruifrok & Johnston (2001), table 1
#: (HistomicsTK ``stain_color_map``). Used to *identify* the Macenko vectors by direction
#: and as the fallback stain matrix when an image has too little stain to estimate one.
HEMATOXYLIN_RJ = (0.65, 0.70, 0.29)
EOSIN_RJ = (0.07, 0.99, 0.11)

#: Largest plausible angle between an estimated hematoxylin OD vector and Ruifrok's. Measured
#: on real H&E (8 Kainz marrow images, 10 MoNuSeg images, CMU-1-Small-Region): 6-21 degrees.
#: A blast-rich synthetic marrow (pixels nearly all nuclei) gave 48 degrees, and with it the
#: census found 16% of the nuclei instead of 93%.
MAX_HEMATOXYLIN_ANGLE_DEG = 30.0

_LN256 = float(np.log(256.0))
#: Macenko's OD-magnitude floor: 16 on HistomicsTK's 0-255 SDA scale, in natural-log OD.
MIN_OD_MAGNITUDE = 16.0 / 255.0 * _LN256


def as_rgb8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as an 8-bit ``(h, w, 3)`` RGB array, converting what can be converted.

    Grayscale ``(h, w)`` or ``(h, w, 1)`` is replicated to three channels; RGBA drops alpha
    (pixels with alpha 0 become white); 16-bit input is scaled by 255/65535; float input in
    [0, 1] is scaled by 255. Anything else raises :class:`InvalidInputError`.

    Parameters
    ----------
    image : ndarray
        Image array, rows x columns [x channels].

    Returns
    -------
    ndarray of uint8, shape (h, w, 3)
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InvalidInputError(
            f"expected an RGB image of shape (h, w, 3) (or gray (h, w), RGBA (h, w, 4)), "
            f"got shape {a.shape}"
        )
    alpha = a[..., 3] if a.shape[2] == 4 else None
    a = a[..., :3]
    if a.dtype == np.uint8:
        out = np.ascontiguousarray(a)
    elif a.dtype == np.uint16:
        out = np.round(a.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif a.dtype.kind == "f":
        if a.size and (np.nanmin(a) < 0.0 or np.nanmax(a) > 1.0):
            raise InvalidInputError(
                f"expected a float image in [0, 1], got values in "
                f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]"
            )
        out = np.round(np.nan_to_num(a) * 255.0).astype(np.uint8)
    elif a.dtype == np.bool_:
        out = a.astype(np.uint8) * np.uint8(255)
    else:
        raise InvalidInputError(
            f"expected an 8-bit, 16-bit or float [0, 1] image, got dtype {a.dtype}"
        )
    if alpha is not None:
        transparent = alpha == 0
        if transparent.any():
            out = out.copy()
            out[transparent] = 255
    return out


def _pixels(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` -> ``(n, 3)`` float32 view/copy."""
    return np.asarray(rgb, dtype=np.float32).reshape(-1, 3)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert RGB (0-255) to Ruderman's lαβ space.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3)
        RGB values on the 0-255 scale (any real dtype).

    Returns
    -------
    ndarray of float32, same shape
        lαβ coordinates (natural log of LMS cone responses, decorrelated).

    References
    ----------
    .. [1] D. Ruderman, T. Cronin, C. Chiao, "Statistics of cone responses to natural images:
       implications for visual coding", J. Opt. Soc. Am. A 15:2036-2045, 1998.
    .. [2] E. Reinhard, M. Ashikhmin, B. Gooch, P. Shirley, "Color transfer between images",
       IEEE CG&A 21(5):34-41, 2001.
    """
    shape = np.shape(rgb)
    lms = _pixels(rgb) @ LMS_FROM_RGB.T.astype(np.float32)
    np.maximum(lms, np.finfo(np.float64).eps, out=lms)
    np.log(lms, out=lms)
    return (lms @ LAB_FROM_LMS.T.astype(np.float32)).reshape(shape)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab` (no clipping); float32 RGB on the 0-255 scale."""
    shape = np.shape(lab)
    lms = _pixels(lab) @ LMS_FROM_LAB.T.astype(np.float32)
    np.exp(lms, out=lms)
    return (lms @ RGB_FROM_LMS.T.astype(np.float32)).reshape(shape)


def reinhard(
    rgb: np.ndarray,
    src_mean: np.ndarray | tuple[float, float, float],
    src_std: np.ndarray | tuple[float, float, float],
    target_mean: tuple[float, float, float] = TARGET_LAB_MEAN,
    target_std: tuple[float, float, float] = TARGET_LAB_STD,
) -> np.ndarray:
    """Reinhard colour normalisation: match lαβ mean and standard deviation to a target.

    The source statistics are arguments, not computed here, so that statistics estimated once
    per slide apply to every tile. The affine map in lαβ is folded into a single 3 x 3 map in
    log-LMS, so the whole transform costs one log and one exp per channel.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3)
        RGB image, 0-255 scale.
    src_mean, src_std : array_like, shape (3,)
        lαβ statistics of the source (slide) tissue.
    target_mean, target_std : tuple of 3 floats
        lαβ statistics to map to (default: Hu et al.'s target).

    Returns
    -------
    ndarray of float32, same shape
        Normalised RGB clipped to [0, 255] (not rounded).

    References
    ----------
    .. [1] E. Reinhard et al., "Color transfer between images", IEEE CG&A 21(5), 2001.
    .. [2] B. Hu et al., "Unsupervised learning for cell-level visual representation in
       histopathology images with generative adversarial networks", IEEE JBHI 23(3), 2019.
    """
    shape = np.shape(rgb)
    m = _reinhard_loglms_map(src_mean, src_std, target_mean, target_std)
    out = _reinhard_pixels(_pixels(rgb), *m)
    return out.reshape(shape)


def _reinhard_loglms_map(src_mean, src_std, target_mean, target_std):
    """(A, b) such that log-LMS_out = log-LMS_in @ A + b realises the lαβ affine map."""
    s_mean = np.asarray(src_mean, dtype=np.float64)
    s_std = np.asarray(src_std, dtype=np.float64)
    scale = np.asarray(target_std, dtype=np.float64) / s_std
    shift = np.asarray(target_mean, dtype=np.float64) - s_mean * scale
    # row-vector form: lab = loglms @ L.T ; lab' = lab * scale + shift ; loglms' = lab' @ Li.T
    a = LAB_FROM_LMS.T @ np.diag(scale) @ LMS_FROM_LAB.T
    b = shift @ LMS_FROM_LAB.T
    return a.astype(np.float32), b.astype(np.float32)


def _reinhard_pixels(px: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lms = px @ LMS_FROM_RGB.T.astype(np.float32)
    np.maximum(lms, np.float32(np.finfo(np.float64).eps), out=lms)
    np.log(lms, out=lms)
    lms = lms @ a
    lms += b
    np.exp(lms, out=lms)
    out = lms @ RGB_FROM_LMS.T.astype(np.float32)
    np.clip(out, 0.0, 255.0, out=out)
    return out


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``ln(256) - ln(rgb + 1)`` (natural log; 0 for white), float32.

    References
    ----------
    .. [1] A. C. Ruifrok, D. A. Johnston, "Quantification of histochemical staining by color
       deconvolution", Anal. Quant. Cytol. Histol. 23(4):291-299, 2001.
    """
    od = np.asarray(rgb, dtype=np.float32) + np.float32(1.0)
    np.log(od, out=od)
    np.subtract(np.float32(_LN256), od, out=od)
    return od


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: ``256 exp(-od) - 1`` (float32, not clipped)."""
    return np.float32(256.0) * np.exp(-np.asarray(od, dtype=np.float32)) - np.float32(1.0)


def _unit_columns(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w, axis=0, keepdims=True)


def _complete(he: np.ndarray) -> np.ndarray:
    """3 x 3 stain matrix from two unit OD columns; third = normalised cross product."""
    third = np.cross(he[:, 0], he[:, 1])
    n = np.linalg.norm(third)
    third = third / n if n > 0 else np.array([0.0, 0.0, 1.0])
    if third.sum() < 0:
        third = -third
    return np.column_stack([he[:, 0], he[:, 1], third])


#: Default 3 x 3 stain matrix (columns hematoxylin, eosin, residual) from Ruifrok & Johnston.
REFERENCE_STAIN_MATRIX = _complete(
    _unit_columns(np.column_stack([HEMATOXYLIN_RJ, EOSIN_RJ]).astype(np.float64))
)


def order_stains(w: np.ndarray) -> np.ndarray:
    """Order two estimated OD stain vectors as (hematoxylin, eosin) by direction.

    The assignment maximises the summed cosine similarity to the Ruifrok-Johnston reference
    directions over both permutations, so it does not depend on column order.

    Parameters
    ----------
    w : ndarray, shape (3, 2) or (3, 3)
        Stain vectors as columns (only the first two are considered).

    Returns
    -------
    ndarray, shape (3, 3)
        Unit columns: hematoxylin, eosin, and their normalised cross product.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != 3 or w.shape[1] < 2:
        raise InvalidInputError(f"expected stain vectors of shape (3, 2) or (3, 3), got {w.shape}")
    v = _unit_columns(w[:, :2])
    ref = _unit_columns(np.column_stack([HEMATOXYLIN_RJ, EOSIN_RJ]))
    c = v.T @ ref  # c[i, j]: cos(v_i, ref_j)
    if c[1, 0] + c[0, 1] > c[0, 0] + c[1, 1]:
        v = v[:, ::-1]
    return _complete(v)


def macenko_stain_matrix(
    od: np.ndarray,
    min_od_magnitude: float = MIN_OD_MAGNITUDE,
    angle_percentiles: tuple[float, float] = (1.0, 99.0),
    max_h_angle_deg: float = MAX_HEMATOXYLIN_ANGLE_DEG,
) -> np.ndarray:
    """Estimate the hematoxylin and eosin OD vectors with Macenko's method.

    OD pixels with magnitude below ``min_od_magnitude`` are dropped; the rest are projected
    onto the plane of the two leading singular vectors (of the uncentred OD matrix); the
    vectors at the 1st and 99th percentiles of the angle in that plane are the stains.
    Which one is hematoxylin is decided by direction (:func:`order_stains`).

    Parameters
    ----------
    od : ndarray, shape (..., 3)
        Optical densities (natural log, see :func:`rgb_to_od`).
    min_od_magnitude : float
        Magnitude floor; the default is HistomicsTK's 16 on its 0-255 SDA scale.
    angle_percentiles : (float, float)
        Robust extremes of the angle distribution, in percent.
    max_h_angle_deg : float
        An estimated hematoxylin vector further than this from the reference is rejected
        and the reference matrix returned (see :data:`MAX_HEMATOXYLIN_ANGLE_DEG`).

    Returns
    -------
    ndarray, shape (3, 3)
        Unit columns hematoxylin, eosin, residual. When fewer than 100 pixels pass the floor,
        or the two extreme directions coincide (a single colour), the Ruifrok-Johnston
        reference matrix is returned.

    References
    ----------
    .. [1] M. Macenko et al., "A method for normalizing histology slides for quantitative
       analysis", IEEE ISBI 2009, pp. 1107-1110.
    """
    x = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    x = x[np.isfinite(x).all(axis=1)]
    x = x[np.einsum("ij,ij->i", x, x) > min_od_magnitude**2]
    if len(x) < 100:
        return REFERENCE_STAIN_MATRIX.copy()
    # leading singular vectors of x (n x 3) = eigenvectors of x.T x
    _, evecs = np.linalg.eigh(x.T @ x)
    pcs = evecs[:, ::-1][:, :2]
    if pcs[:, 0].sum() < 0:
        pcs[:, 0] = -pcs[:, 0]
    proj = x @ pcs
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, angle_percentiles)
    v = pcs @ np.array([[np.cos(lo), np.cos(hi)], [np.sin(lo), np.sin(hi)]])
    v = np.where(v.sum(axis=0, keepdims=True) < 0, -v, v)
    v = _unit_columns(v)
    if abs(float(v[:, 0] @ v[:, 1])) > 0.995:  # one colour only: two stains not separable
        return REFERENCE_STAIN_MATRIX.copy()
    w = order_stains(v)
    if float(w[:, 0] @ REFERENCE_STAIN_MATRIX[:, 0]) < np.cos(np.radians(max_h_angle_deg)):
        # Implausible hematoxylin: the angle extremes did not hit the two stains (e.g. a
        # blast-rich marrow whose pixels are nearly all nuclei). Keep the reference.
        return REFERENCE_STAIN_MATRIX.copy()
    return w


def deconvolve(od: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Colour deconvolution: stain concentrations ``c`` with ``od = c @ W.T``.

    Parameters
    ----------
    od : ndarray, shape (..., 3)
        Optical densities.
    stain_matrix : ndarray, shape (3, 3)
        Stain OD vectors as columns (e.g. hematoxylin, eosin, residual).

    Returns
    -------
    ndarray of float32, shape (..., 3)
        Concentration (OD units) of each stain, in the column order of ``stain_matrix``.
        ``od_to_rgb`` of a channel gives its intensity image (HistomicsTK's ``StainsFloat``).

    References
    ----------
    .. [1] A. C. Ruifrok, D. A. Johnston, "Quantification of histochemical staining by color
       deconvolution", Anal. Quant. Cytol. Histol. 23(4):291-299, 2001.
    """
    w = np.asarray(stain_matrix, dtype=np.float64)
    if w.shape != (3, 3):
        raise InvalidInputError(f"expected a (3, 3) stain matrix, got {w.shape}")
    q = np.linalg.inv(w).T.astype(np.float32)
    shape = np.shape(od)
    return (_pixels(od) @ q).reshape(shape)


def tissue_pixels(rgb: np.ndarray, max_brightness: float = 220.0) -> np.ndarray:
    """Boolean mask of pixels that are not background (mean RGB below ``max_brightness``)."""
    a = np.asarray(rgb)
    return a.reshape(-1, 3).mean(axis=1, dtype=np.float32).reshape(a.shape[:-1]) < max_brightness


@dataclass(frozen=True)
class StainModel:
    """Per-slide stain model: Reinhard source statistics and the Macenko stain matrix.

    Estimated once (:func:`estimate_stain_model`) and passed unchanged to every tile.

    Attributes
    ----------
    lab_mean, lab_std : tuple of 3 floats
        lαβ statistics of the slide's tissue pixels (the Reinhard source).
    stain_matrix : tuple of 3 tuples
        Rows of the 3 x 3 matrix whose columns are the OD directions of hematoxylin, eosin
        and the residual, estimated on the *normalised* tissue pixels.
    target_mean, target_std : tuple of 3 floats
        Reinhard target (default: Hu et al.).
    n_pixels : int
        Number of tissue pixels it was estimated from (0 = defaults, no tissue found).
    nuclear_split_od : float
        Otsu's split of the hematoxylin concentrations (OD) of those tissue pixels: where
        the slide's own nuclear stain separates from the rest of its stained material.
        0 = unknown (no filter relative to it; see ``SegmentParams.min_relative_hematoxylin``).
    norm : callable, optional
        The slide's fitted stain normaliser (``--stain-norm``; see
        :func:`~.normalize.read_normalized`); None = the default Reinhard, done here.
    """

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    stain_matrix: tuple[tuple[float, float, float], ...] = field(
        default_factory=lambda: tuple(map(tuple, REFERENCE_STAIN_MATRIX.tolist()))
    )
    target_mean: tuple[float, float, float] = TARGET_LAB_MEAN
    target_std: tuple[float, float, float] = TARGET_LAB_STD
    n_pixels: int = 0
    nuclear_split_od: float = 0.0
    norm: Any = None

    @property
    def matrix(self) -> np.ndarray:
        """The stain matrix as a (3, 3) float64 array (columns H, E, residual)."""
        return np.array(self.stain_matrix, dtype=np.float64)

    @classmethod
    def identity(cls) -> StainModel:
        """A model that leaves colours unchanged (source = target) with reference stains."""
        return cls(lab_mean=TARGET_LAB_MEAN, lab_std=TARGET_LAB_STD)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """Reinhard-normalise ``rgb`` with this model (float32, 0-255)."""
        return reinhard(rgb, self.lab_mean, self.lab_std, self.target_mean, self.target_std)


def estimate_stain_model(
    rgb: np.ndarray,
    mask: np.ndarray | None = None,
    max_pixels: int = 200_000,
    seed: int = 0,
) -> StainModel:
    """Estimate a :class:`StainModel` from an image or a sample of pixels.

    Reinhard statistics are the lαβ mean and standard deviation of the tissue pixels; the
    Macenko stain matrix is then estimated on those pixels *after* normalisation, matching
    the order of the paper's pipeline (normalise, then deconvolve).

    Parameters
    ----------
    rgb : ndarray, shape (h, w, 3) or (n, 3)
        Image (e.g. a low-resolution level of the slide) or pixel list, 0-255.
    mask : ndarray of bool, optional
        Tissue pixels to use (same leading shape as ``rgb``). Default: :func:`tissue_pixels`.
    max_pixels : int
        At most this many pixels are examined: larger inputs are subsampled with a regular
        stride from a seeded random offset.
    seed : int
        Seed of the subsample offset.

    Returns
    -------
    StainModel
        With ``n_pixels == 0`` and default statistics when fewer than 100 tissue pixels exist.
    """
    a = np.asarray(rgb)
    if a.ndim < 2 or a.shape[-1] != 3:
        raise InvalidInputError(f"expected RGB pixels of shape (..., 3), got {a.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != a.shape[:-1]:
            raise InvalidInputError(
                f"mask shape {mask.shape} does not match image shape {a.shape[:-1]}"
            )
        mask = mask.reshape(-1)
    px = a.reshape(-1, 3)
    if len(px) > max_pixels:
        # a seeded random offset, then a regular stride: cheap and spread over the image
        step = -(-len(px) // max_pixels)
        start = int(np.random.default_rng(seed).integers(step))
        px = px[start::step]
        mask = None if mask is None else mask[start::step]
    px = px[tissue_pixels(px) if mask is None else mask]
    if len(px) < 100:
        return StainModel.identity()
    lab = rgb_to_lab(px).astype(np.float64)
    mean = lab.mean(axis=0)
    std = lab.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    norm = reinhard(px, mean, std)
    od = rgb_to_od(norm)
    w = macenko_stain_matrix(od)
    hema = deconvolve(od, w)[..., 0]
    return StainModel(
        lab_mean=tuple(float(v) for v in mean),
        lab_std=tuple(float(v) for v in std),
        stain_matrix=tuple(tuple(float(v) for v in row) for row in w),
        n_pixels=len(px),
        nuclear_split_od=otsu_split(hema),
    )


def otsu_split(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` (scikit-image's, 256 bins), or 0.0 when the values are
    empty or constant and so have no split."""
    from skimage.filters import threshold_otsu

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        return 0.0
    return float(threshold_otsu(v))


def stain_concentrations(rgb: np.ndarray, model: StainModel) -> tuple[np.ndarray, np.ndarray]:
    """Normalise, deconvolve and return the hematoxylin and eosin concentrations (OD units).

    The fused fast path of ``deconvolve(rgb_to_od(model.normalize(rgb)), model.matrix)``.

    Parameters
    ----------
    rgb : ndarray, shape (h, w, 3)
        8-bit RGB image.
    model : StainModel
        Per-slide model.

    Returns
    -------
    (hematoxylin, eosin) : two float32 arrays of shape (h, w)
    """
    h, w = np.shape(rgb)[:2]
    a, b = _reinhard_loglms_map(model.lab_mean, model.lab_std, model.target_mean, model.target_std)
    px = _reinhard_pixels(_pixels(rgb), a, b)
    px += np.float32(1.0)
    np.log(px, out=px)
    q = np.linalg.inv(model.matrix).T[:, :2]
    # c = (ln256 - ln(rgb+1)) @ q = ln256 * colsum(q) - ln(rgb+1) @ q
    c = px @ (-q).astype(np.float32)
    c += (np.float32(_LN256) * q.sum(axis=0)).astype(np.float32)
    return c[:, 0].reshape(h, w), c[:, 1].reshape(h, w)
