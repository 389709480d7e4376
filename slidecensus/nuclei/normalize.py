"""Stain normalisation to a reference style, and the metrics that say how close it came.

Three methods live here as pure functions on RGB arrays; the fourth, Yuan & Suh's neural
(colourisation) normaliser, needs torch and lives in :mod:`slidecensus.nuclei.colorize`:

- ``reinhard``: match the lαβ mean and standard deviation of the tissue to the target's
  (Reinhard et al. 2001; :func:`~.stain.reinhard`).
- ``macenko``: deconvolve with the slide's Macenko stain vectors, scale each stain's
  concentration so that its 99th percentile matches the target's, and recompose with the
  target's stain vectors (Macenko et al. 2009).
- ``none``: leave the colours as they are.

Like the segmenter's :class:`~.stain.StainModel`, a :class:`Normalizer` is fitted **once per
slide** from a sample of its pixels and then applied to every tile, so tiles agree.

The metrics are those of Yuan & Suh's Table 1 (Euclidean distance, correlation and Hellinger
distance between colour histograms) plus the grey-level SSIM to the input, which says
whether the structure survived.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInputError
from .stain import (
    TARGET_LAB_MEAN,
    TARGET_LAB_STD,
    _pixels,
    macenko_stain_matrix,
    reinhard,
    rgb_to_lab,
    rgb_to_od,
    tissue_pixels,
)

__all__ = [
    "MACENKO_REF_MATRIX",
    "MACENKO_REF_MAX_CONC",
    "NORM_METHODS",
    "Normalizer",
    "StainNorm",
    "StainTarget",
    "cielab_to_rgb",
    "colour_histograms",
    "fit_normalizer",
    "grey_levels",
    "grey_ssim",
    "histogram_metrics",
    "macenko_transfer",
    "normalized_window",
    "parse_stain_norm",
    "read_normalized",
    "rgb_to_cielab",
    "stain_target",
]

#: Methods of ``slidecensus normalize`` and ``--stain-norm``.
NORM_METHODS = ("reinhard", "macenko", "neural", "none")

#: Reference hematoxylin and eosin OD vectors (columns) and their 99th-percentile
#: concentrations, from Macenko et al.'s reference implementation (``HERef``, ``maxCRef``):
#: the default target of the ``macenko`` method when no target image is given.
MACENKO_REF_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_REF_MAX_CONC = (1.9705, 1.0308)
#: Percentile of the stain concentrations that is matched (Macenko et al.: 99).
MAX_CONC_PERCENTILE = 99.0

# CIE XYZ (D65) from linear sRGB, IEC 61966-2-1; and the D65 white point.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65 = np.array([0.950456, 1.0, 1.088754])
_EPS = (6.0 / 29.0) ** 3


def rgb_to_cielab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of 8-bit-scale sRGB, float32; L in [0, 100].

    The colourising normaliser keeps L and predicts a and b, so the lightness (and with it
    the structure) of the input cannot change.
    """
    c = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92).astype(np.float32)
    xyz = _pixels(lin) @ (_XYZ_FROM_RGB / _D65[:, None]).T.astype(np.float32)
    f = np.where(xyz > _EPS, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29).astype(np.float32)
    lab = np.empty_like(f)
    lab[:, 0] = 116.0 * f[:, 1] - 16.0
    lab[:, 1] = 500.0 * (f[:, 0] - f[:, 1])
    lab[:, 2] = 200.0 * (f[:, 1] - f[:, 2])
    return lab.reshape(np.shape(rgb))


def _lab_to_linear(x: np.ndarray) -> np.ndarray:
    """Linear sRGB (n, 3) of CIE Lab pixels (n, 3), not clipped."""
    fy = (x[:, 0] + 16.0) / 116.0
    f = np.stack([fy + x[:, 1] / 500.0, fy, fy - x[:, 2] / 200.0], axis=1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)).astype(np.float32)
    return xyz @ (_RGB_FROM_XYZ * _D65[None, :]).T.astype(np.float32)


def cielab_to_rgb(lab: np.ndarray, keep_lightness: bool = False) -> np.ndarray:
    """Inverse of :func:`rgb_to_cielab`: float32 sRGB on the 0-255 scale, in gamut.

    Out-of-gamut colours are clipped per channel, which changes their lightness; with
    ``keep_lightness`` their chroma is shrunk towards grey instead (by factors of 0.8) until
    they fit, so L is kept (grey of any L in [0, 100] is in gamut).
    """
    x = _pixels(np.asarray(lab, dtype=np.float32)).copy()
    lin = _lab_to_linear(x)
    if keep_lightness:
        np.clip(x[:, 0], 0.0, 100.0, out=x[:, 0])
        out = np.flatnonzero(((lin < -1e-4) | (lin > 1 + 1e-4)).any(axis=1))
        scale = np.float32(1.0)
        for _ in range(24):
            if not len(out):
                break
            scale *= np.float32(0.8)
            trial = x[out].copy()
            trial[:, 1:] *= scale
            tl = _lab_to_linear(trial)
            fits = ~((tl < -1e-4) | (tl > 1 + 1e-4)).any(axis=1)
            lin[out[fits]] = tl[fits]
            out = out[~fits]
        if len(out):  # still out after 24 steps: grey
            trial = x[out].copy()
            trial[:, 1:] = 0.0
            lin[out] = _lab_to_linear(trial)
    np.clip(lin, 0.0, 1.0, out=lin)
    c = np.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return (np.clip(c, 0.0, 1.0) * 255.0).astype(np.float32).reshape(np.shape(lab))


@dataclass(frozen=True)
class StainTarget:
    """The reference style: what each method maps a slide to.

    Attributes
    ----------
    lab_mean, lab_std : tuple of 3 floats
        lαβ statistics of the target's tissue pixels (Reinhard).
    stain_matrix : tuple of 3 pairs
        Hematoxylin and eosin OD vectors as columns (Macenko).
    max_conc : (float, float)
        99th percentiles of the two stains' concentrations in the target's tissue.
    name : str
        Where it came from (``default`` or the target's file names).
    """

    lab_mean: tuple[float, float, float] = TARGET_LAB_MEAN
    lab_std: tuple[float, float, float] = TARGET_LAB_STD
    stain_matrix: tuple[tuple[float, float], ...] = MACENKO_REF_MATRIX
    max_conc: tuple[float, float] = MACENKO_REF_MAX_CONC
    name: str = "default"

    def as_dict(self) -> dict:
        """Plain values (for the manifest and for checkpoints)."""
        return {"lab_mean": list(self.lab_mean), "lab_std": list(self.lab_std),
                "stain_matrix": [list(r) for r in self.stain_matrix],
                "max_conc": list(self.max_conc), "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> StainTarget:
        return cls(lab_mean=tuple(d["lab_mean"]), lab_std=tuple(d["lab_std"]),
                   stain_matrix=tuple(tuple(r) for r in d["stain_matrix"]),
                   max_conc=tuple(d["max_conc"]), name=str(d.get("name", "")))


def _tissue(px: np.ndarray) -> np.ndarray:
    """Tissue pixels of a pixel list (all of them when fewer than 100 are tissue)."""
    t = px[tissue_pixels(px)]
    return t if len(t) >= 100 else px


def _stain_fit(px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macenko H/E vectors (3, 2) and 99th-percentile concentrations of tissue pixels."""
    od = rgb_to_od(px)
    w = macenko_stain_matrix(od)[:, :2]
    conc = _concentrations(od, w)
    maxc = np.percentile(conc, MAX_CONC_PERCENTILE, axis=0)
    return w, np.maximum(maxc, 1e-3)


def _concentrations(od: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Least-squares H and E concentrations of OD pixels (n, 3) for stain vectors w (3, 2)."""
    return (_pixels(od) @ np.linalg.pinv(np.asarray(w, dtype=np.float64)).T.astype(np.float32))


def stain_target(images: Iterable[np.ndarray] | np.ndarray, name: str = "target",
                 max_pixels: int = 400_000, seed: int = 0) -> StainTarget:
    """The :class:`StainTarget` of one reference image or several (their tissue pooled).

    Raises :class:`InvalidInputError` for a grey-level target: it has no colour to match.
    """
    imgs = [images] if isinstance(images, np.ndarray) else list(images)
    if not imgs:
        raise InvalidInputError("the stain target has no images")
    rng = np.random.default_rng(seed)
    per = max(1, max_pixels // len(imgs))
    parts = []
    for im in imgs:
        px = _pixels(np.asarray(im, dtype=np.float32)[..., :3])
        if len(px) > per:
            px = px[rng.choice(len(px), per, replace=False)]
        parts.append(px)
    px = _tissue(np.concatenate(parts))
    if float(np.abs(px - px.mean(axis=1, keepdims=True)).max(initial=0.0)) < 2.0:
        raise InvalidInputError(f"the stain target {name} is grey-level: a target needs "
                                f"colour to normalise to")
    lab = rgb_to_lab(px).astype(np.float64)
    w, maxc = _stain_fit(px)
    return StainTarget(lab_mean=tuple(float(v) for v in lab.mean(axis=0)),
                       lab_std=tuple(float(v) for v in np.maximum(lab.std(axis=0), 1e-6)),
                       stain_matrix=tuple(tuple(float(v) for v in r) for r in w),
                       max_conc=tuple(float(v) for v in maxc), name=name)


def macenko_transfer(rgb: np.ndarray, src_matrix: np.ndarray, src_max_conc: np.ndarray,
                     tgt_matrix: np.ndarray, tgt_max_conc: np.ndarray) -> np.ndarray:
    """Macenko stain transfer: concentrations under the source stains, rescaled per stain to
    the target's 99th percentile, recomposed with the target stains. Float32 RGB, 0-255.

    White stays white: zero optical density has zero concentration of every stain.

    References
    ----------
    .. [1] M. Macenko et al., "A method for normalizing histology slides for quantitative
       analysis", IEEE ISBI 2009, pp. 1107-1110.
    """
    shape = np.shape(rgb)
    conc = _concentrations(rgb_to_od(_pixels(rgb)), src_matrix)
    conc *= (np.asarray(tgt_max_conc, np.float64) / np.asarray(src_max_conc, np.float64)
             ).astype(np.float32)
    od = conc @ np.asarray(tgt_matrix, dtype=np.float32).T
    out = np.float32(256.0) * np.exp(-od) - np.float32(1.0)
    np.clip(out, 0.0, 255.0, out=out)
    return out.reshape(shape)


@dataclass(frozen=True)
class Normalizer:
    """A slide's fitted normaliser (``reinhard``, ``macenko`` or ``none``): source
    statistics from the slide, the target they map to; applied tile by tile.

    Per-pixel, so tiles need no halo (``halo_px`` = 0) and tiled equals whole exactly.
    """

    method: str
    target: StainTarget = field(default_factory=StainTarget)
    src_lab_mean: tuple[float, float, float] = TARGET_LAB_MEAN
    src_lab_std: tuple[float, float, float] = TARGET_LAB_STD
    src_matrix: tuple[tuple[float, float], ...] = MACENKO_REF_MATRIX
    src_max_conc: tuple[float, float] = MACENKO_REF_MAX_CONC
    halo_px: int = 0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The normalised image, float32 RGB on the 0-255 scale."""
        if self.method == "reinhard":
            return reinhard(rgb, self.src_lab_mean, self.src_lab_std,
                            self.target.lab_mean, self.target.lab_std)
        if self.method == "macenko":
            return macenko_transfer(rgb, np.array(self.src_matrix), np.array(self.src_max_conc),
                                    np.array(self.target.stain_matrix),
                                    np.array(self.target.max_conc))
        return np.asarray(rgb, dtype=np.float32)


def fit_normalizer(method: str, sample: np.ndarray, target: StainTarget | None = None,
                   max_pixels: int = 400_000, seed: int = 0) -> Normalizer:
    """Fit ``method`` (``reinhard``, ``macenko`` or ``none``) to a slide from a sample of its
    pixels (a thumbnail, or the whole image when it is small).

    Parameters
    ----------
    method : str
        One of ``reinhard``, ``macenko``, ``none`` (``neural`` is
        :func:`slidecensus.nuclei.colorize.fit_neural`).
    sample : ndarray, shape (h, w, 3) or (n, 3)
        The slide's pixels, 0-255; the tissue among them is used.
    target : StainTarget, optional
        The reference style (default: Hu et al.'s lαβ target, Macenko's reference stains).
    """
    if method not in ("reinhard", "macenko", "none"):
        raise InvalidInputError(f"fit_normalizer fits reinhard, macenko or none, got {method!r}")
    target = StainTarget() if target is None else target
    if method == "none":
        return Normalizer("none", target)
    px = _pixels(np.asarray(sample, dtype=np.float32)[..., :3])
    if len(px) > max_pixels:
        px = px[np.random.default_rng(seed).choice(len(px), max_pixels, replace=False)]
    px = _tissue(px)
    if method == "reinhard":
        lab = rgb_to_lab(px).astype(np.float64)
        return Normalizer("reinhard", target,
                          src_lab_mean=tuple(float(v) for v in lab.mean(axis=0)),
                          src_lab_std=tuple(float(v) for v in np.maximum(lab.std(axis=0), 1e-6)))
    w, maxc = _stain_fit(px)
    return Normalizer("macenko", target,
                      src_matrix=tuple(tuple(float(v) for v in r) for r in w),
                      src_max_conc=tuple(float(v) for v in maxc))


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """Grey level (ITU-R BT.601 luma) of RGB, float32 on the 0-255 scale."""
    a = np.asarray(rgb, dtype=np.float32)
    return a[..., 0] * np.float32(0.299) + a[..., 1] * np.float32(0.587) + a[..., 2] * np.float32(
        0.114)


def colour_histograms(rgb: np.ndarray | Iterable[np.ndarray], bins: int = 256) -> np.ndarray:
    """Per-channel colour histograms over 0-255, each normalised to sum 1: shape (3, bins).

    Several images pool into one histogram (a target given as a folder).
    """
    imgs = [rgb] if isinstance(rgb, np.ndarray) else list(rgb)
    h = np.zeros((3, bins), dtype=np.float64)
    for im in imgs:
        px = _pixels(np.asarray(im)[..., :3])
        idx = np.clip(np.floor(px.astype(np.float32) * (bins / 256.0)), 0, bins - 1)
        for c in range(3):
            h[c] += np.bincount(idx[:, c].astype(np.intp), minlength=bins)
    s = h.sum(axis=1, keepdims=True)
    return h / np.where(s > 0, s, 1.0)


def histogram_metrics(hist: np.ndarray, target_hist: np.ndarray) -> dict[str, float]:
    """Yuan & Suh's Table 1 metrics between two :func:`colour_histograms`, averaged over
    the three channels: ``euclidean`` (lower is closer), ``correlation`` (Pearson, higher is
    closer) and ``hellinger`` (``sqrt(1 - sum sqrt(p q))``, lower is closer)."""
    p = np.asarray(hist, dtype=np.float64)
    q = np.asarray(target_hist, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise InvalidInputError(f"histograms must have the same (channels, bins) shape, got "
                                f"{p.shape} and {q.shape}")
    euc = np.sqrt(((p - q) ** 2).sum(axis=1))
    pc, qc = p - p.mean(axis=1, keepdims=True), q - q.mean(axis=1, keepdims=True)
    den = np.sqrt((pc**2).sum(axis=1) * (qc**2).sum(axis=1))
    corr = np.where(den > 0, (pc * qc).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)
    hel = np.sqrt(np.clip(1.0 - np.sqrt(p * q).sum(axis=1), 0.0, 1.0))
    return {"euclidean": float(euc.mean()), "correlation": float(corr.mean()),
            "hellinger": float(hel.mean())}


def grey_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of the grey levels of two RGB images (Wang et al. 2004: Gaussian
    window σ 1.5, data range 255)."""
    from skimage.metrics import structural_similarity

    ga, gb = grey_levels(a), grey_levels(b)
    if ga.shape != gb.shape:
        raise InvalidInputError(f"SSIM needs images of one size, got {ga.shape} and {gb.shape}")
    return float(structural_similarity(ga, gb, data_range=255.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


@dataclass(frozen=True)
class StainNorm:
    """What ``--stain-norm`` asks for; part of the census parameters (so a change recomputes).

    Attributes
    ----------
    method : str
        One of :data:`NORM_METHODS`.
    model : str
        The neural normaliser's file (``neural`` only).
    model_sha256 : str
        Its content hash: a retrained file with the same name recomputes.
    target : StainTarget, optional
        ``reinhard`` and ``macenko``: the reference style (default: Hu et al.'s lαβ target
        and Macenko's reference stains).
    cohort : bool
        ``reinhard`` only: normalise the crops to the training cohort's pooled style,
        computed by ``train`` and recorded in the model (``--stain-target cohort``).
    """

    method: str = "reinhard"
    model: str = ""
    model_sha256: str = ""
    target: StainTarget | None = None
    cohort: bool = False

    def __post_init__(self) -> None:
        if self.method not in NORM_METHODS:
            raise InvalidInputError(f"--stain-norm must be one of reinhard, macenko, "
                                    f"neural:MODEL.pt, none; got {self.method!r}")
        if self.method == "neural" and not self.model:
            raise InvalidInputError("--stain-norm neural needs its model: neural:MODEL.pt")
        if self.cohort and (self.method != "reinhard" or self.target is not None):
            raise InvalidInputError("--stain-target cohort is for --stain-norm reinhard")

    @property
    def is_default(self) -> bool:
        """Reinhard without a fixed target: the segmenter calibrates itself and the crops
        keep each slide's colours (or, with ``cohort``, take a model's cohort style)."""
        return self.method == "reinhard" and self.target is None

    def describe(self) -> str:
        if self.method == "neural":
            return f"neural:{self.model}"
        if self.cohort:
            return "reinhard (target cohort)"
        return self.method + (f" (target {self.target.name})" if self.target else "")


def parse_stain_norm(text: str, target: StainTarget | None = None, cohort: bool = False
                     ) -> StainNorm:
    """``reinhard``, ``macenko``, ``none`` or ``neural:PATH`` as a :class:`StainNorm` (the
    neural model's file is hashed here; a missing file is a one-line error). ``cohort``:
    ``--stain-target cohort``."""
    import hashlib
    from pathlib import Path

    text = str(text).strip()
    method, _, model = text.partition(":")
    if method == "neural":
        p = Path(model)
        if not model or not p.is_file():
            raise InvalidInputError(f"--stain-norm neural: no model file {model!r} (train one "
                                    f"with `slidecensus normalize ... --method neural "
                                    f"--save-model N.pt`)")
        if target is not None or cohort:
            raise InvalidInputError("--stain-target does not apply to neural: its target is "
                                    "in the model")
        return StainNorm("neural", str(p), hashlib.sha256(p.read_bytes()).hexdigest())
    if model:
        raise InvalidInputError(f"--stain-norm {method} takes no model, got {text!r}")
    if method == "none" and (target is not None or cohort):
        raise InvalidInputError("--stain-target does not apply to --stain-norm none")
    if cohort and method != "reinhard":
        raise InvalidInputError("--stain-target cohort is for --stain-norm reinhard")
    return StainNorm(method, target=target, cohort=cohort)


def _rgb8(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.round(x), dtype=np.uint8) if x.dtype != np.uint8 else x


def read_normalized(slide, level: int, rx: int, ry: int, rw: int, rh: int, stain
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Read a window and normalise it under the slide's stain norm (``stain.norm``): the
    segmenter's input and the crops' source, both 8-bit RGB.

    - ``stain.norm`` None (the default Reinhard without a target: each slide in its own
      style) and ``none``: the raw window for both.
    - ``reinhard`` to a target: the segmenter reads the raw window (it calibrates itself
      with its own Reinhard step, so a Reinhard target never changes the nuclei) and the
      crops are cut from the normalised window.
    - A normaliser with a halo (the neural one) is run on the window grown by its halo,
      clipped to the slide and started on a multiple of its stride, then trimmed, so tiled
      equals whole.
    """
    norm = getattr(stain, "norm", None)
    if norm is None or norm.method == "none":
        rgb = slide.read_region(level, rx, ry, rw, rh)
        return rgb, rgb
    if norm.method == "reinhard":
        rgb = slide.read_region(level, rx, ry, rw, rh)
        return rgb, _rgb8(norm(rgb))
    out = normalized_window(slide, level, rx, ry, rw, rh, norm)
    return out, out


def normalized_window(slide, level: int, rx: int, ry: int, rw: int, rh: int, norm
                      ) -> np.ndarray:
    """One window of a slide under a fitted normaliser, 8-bit RGB: read with the
    normaliser's halo (clipped to the slide, started on a multiple of its stride) and
    trimmed, so that windows agree with the whole image."""
    m = int(getattr(norm, "halo_px", 0))
    if m == 0:
        return _rgb8(norm(slide.read_region(level, rx, ry, rw, rh)))
    s = int(getattr(norm, "stride", 1))
    if level != 0:
        raise InvalidInputError("stain normalisation with a halo reads level 0 only")
    h, w = slide.shape
    x0, y0 = max(0, (rx - m) // s * s), max(0, (ry - m) // s * s)
    x1, y1 = min(w, rx + rw + m), min(h, ry + rh + m)
    big = norm(slide.read_region(level, x0, y0, x1 - x0, y1 - y0))
    return _rgb8(big[ry - y0:ry - y0 + rh, rx - x0:rx - x0 + rw])
