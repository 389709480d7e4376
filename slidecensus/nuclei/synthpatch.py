"""Synthetic training patches for the learned segmenter: nuclei drawn where we know the truth.

After Hou et al. (CVPR 2019): polygon nuclei of random size, shape, density and clustering
(ranges in µm) are painted over real background, with real nuclear texture, so masks and
instance labels are exact by construction. Textures come from the target images themselves:

- :func:`texture_bank`: from one real image (Reinhard-normalised RGB at the model's
  resolution) and the threshold segmenter's labels of it, the *background* (every pixel that
  could be nucleus, from a liberal hematoxylin threshold, filled from its surroundings) and
  a list of real *nuclei* (their pixels and masks).
- :func:`synth_patch`: one patch (uint8 RGB, int32 instance labels) from a bank and a seed:
  nuclei painted in order (a later one occludes an earlier one, and the labels follow),
  edges blended, then colour, blur and noise varied over the whole patch. With ``hard``:
  touching and overlapping nuclei, pale nuclei, and non-nuclear debris (red-cell discs, dark
  specks, thin streaks) that stays background.
- :func:`synth_patches`: many patches from several banks, seeded.

Every function is pure: arrays and a seed in, arrays out.

References
----------
.. [1] L. Hou, A. Agarwal, D. Samaras, T. Kurc, R. Gupta, J. Saltz, "Robust histopathology
   image analysis: to label or to synthesize?", CVPR 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon

from ..errors import InvalidInputError

__all__ = [
    "SynthRanges",
    "TextureBank",
    "nucleus_polygon",
    "synth_patch",
    "synth_patches",
    "texture_bank",
]


@dataclass(frozen=True)
class SynthRanges:
    """Ranges (physical units) the synthetic nuclei are drawn from.

    Attributes
    ----------
    diameter_um : (lo, hi)
        Equivalent diameter of a nucleus (µm), drawn log-uniformly.
    aspect : (lo, hi)
        Ratio of the long to the short axis.
    irregularity : (lo, hi)
        Relative amplitude of the low-frequency radial perturbation of the outline.
    density_per_1000um2 : (lo, hi)
        Nuclei per 1000 µm² of patch (placement rejects too much overlap, so dense draws
        saturate).
    cluster_fraction : (lo, hi)
        Share of nuclei placed around a few cluster centres rather than uniformly.
    cluster_sigma_um : (lo, hi)
        Spread of a cluster (µm).
    pale_fraction : float
        Hard examples: share of nuclei blended halfway into the background.
    overlap : float
        Hard examples: the largest share of a nucleus another may cover (touching and
        overlapping nuclei); without hard examples nuclei keep 1 px apart.
    debris_per_1000um2 : (lo, hi)
        Hard examples: non-nuclear objects per 1000 µm².
    """

    diameter_um: tuple[float, float] = (4.5, 11.0)
    aspect: tuple[float, float] = (1.0, 1.8)
    irregularity: tuple[float, float] = (0.0, 0.12)
    density_per_1000um2: tuple[float, float] = (2.0, 22.0)
    cluster_fraction: tuple[float, float] = (0.0, 0.8)
    cluster_sigma_um: tuple[float, float] = (4.0, 14.0)
    pale_fraction: float = 0.15
    overlap: float = 0.25
    debris_per_1000um2: tuple[float, float] = (0.0, 3.0)


@dataclass(frozen=True)
class TextureBank:
    """Real textures of one image: its nucleus-free background and a list of its nuclei."""

    background: np.ndarray  # (h, w, 3) float32, 0-255
    nuclei: tuple[tuple[np.ndarray, np.ndarray], ...]  # (pixels (h, w, 3) float32, mask)
    background_std: float = 4.0


def _fill_masked(rgb: np.ndarray, hole: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    """Fill ``hole`` pixels by normalised Gaussian convolution of the others, coarser and
    coarser until none is left (Knutsson's normalised convolution)."""
    out = rgb.copy()
    keep = (~hole).astype(np.float32)
    todo = hole.copy()
    for s in sigmas:
        if not todo.any():
            break
        wsum = ndi.gaussian_filter(keep, s)
        got = wsum > 1e-3
        for c in range(3):
            v = ndi.gaussian_filter(rgb[..., c] * keep, s)
            ch = out[..., c]
            sel = todo & got
            ch[sel] = v[sel] / wsum[sel]
        todo &= ~got
    if todo.any():
        out[todo] = rgb[~hole].mean(axis=0) if (~hole).any() else 220.0
    return out


def texture_bank(
    rgb: np.ndarray,
    labels: np.ndarray,
    maybe_nucleus: np.ndarray,
    min_area_px: int = 12,
    max_nuclei: int = 2000,
    seed: int = 0,
) -> TextureBank:
    """The real textures of one image.

    Parameters
    ----------
    rgb : ndarray, shape (h, w, 3)
        The image, Reinhard-normalised, at the model's resolution (0-255).
    labels : ndarray of int, shape (h, w)
        Nuclei found by the threshold segmenter (their textures are kept).
    maybe_nucleus : ndarray of bool, shape (h, w)
        Every pixel that could belong to a nucleus (a liberal threshold); with ``labels``
        dilated by 2 px it is removed from the background and filled from around it.
    min_area_px, max_nuclei : int
        Nuclei smaller than this are not kept; at most this many (a seeded sample).

    Returns
    -------
    TextureBank
    """
    img = np.asarray(rgb, dtype=np.float32)
    lab = np.asarray(labels)
    if img.ndim != 3 or img.shape[2] != 3 or lab.shape != img.shape[:2]:
        raise InvalidInputError(f"expected rgb (h, w, 3) and labels (h, w), got {img.shape} "
                                f"and {lab.shape}")
    hole = ndi.binary_dilation((lab > 0) | np.asarray(maybe_nucleus, bool), iterations=2)
    bg = _fill_masked(img, hole, (3.0, 8.0, 24.0))
    rest = ~hole
    hp = img - ndi.gaussian_filter(img, (2, 2, 0))
    std = float(hp[rest].std()) if rest.sum() > 100 else 4.0
    nuclei = []
    objs = ndi.find_objects(lab)
    ids = [i for i, sl in enumerate(objs, start=1) if sl is not None]
    rng = np.random.default_rng(seed)
    if len(ids) > max_nuclei:
        ids = sorted(rng.choice(ids, max_nuclei, replace=False).tolist())
    for i in ids:
        sl = objs[i - 1]
        m = lab[sl] == i
        if m.sum() < min_area_px or min(m.shape) < 3:
            continue
        px = img[sl].copy()
        px[~m] = px[m].mean(axis=0)  # no background inside a painted nucleus
        nuclei.append((px, m))
    return TextureBank(bg, tuple(nuclei), std)


def nucleus_polygon(rng: np.random.Generator, radius_px: float, aspect: float,
                    irregularity: float, n_vertices: int = 24) -> np.ndarray:
    """Vertices (n, 2) as (y, x) of a random nucleus outline centred on 0.

    An ellipse of the given equivalent radius and axis ratio, rotated at random, whose
    radius is perturbed by a few low harmonics of relative amplitude ``irregularity``.
    """
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4):
        r += irregularity / k * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.6, 1.4)
    a, b = radius_px * math.sqrt(aspect), radius_px / math.sqrt(aspect)
    x, y = a * r * np.cos(t), b * r * np.sin(t)
    th = rng.uniform(0, np.pi)
    c, s = math.cos(th), math.sin(th)
    return np.column_stack([s * x + c * y, c * x - s * y])


def _raster(poly: np.ndarray, cy: float, cx: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows and columns inside the polygon centred at (cy, cx), clipped to ``shape``."""
    return draw_polygon(poly[:, 0] + cy, poly[:, 1] + cx, shape=shape)


def _resize(a: np.ndarray, h: int, w: int, order: int) -> np.ndarray:
    """``a`` resampled to (h, w) (leading axes only)."""
    zoom = (h / a.shape[0], w / a.shape[1]) + (1,) * (a.ndim - 2)
    out = ndi.zoom(a, zoom, order=order, mode="nearest", grid_mode=True)
    return out[:h, :w]


def _centres(rng, n: int, size: int, frac: float, sigma_px: float) -> np.ndarray:
    """``n`` centres (y, x): a share ``frac`` around a few cluster centres, the rest uniform."""
    n_cl = int(round(n * frac))
    uni = rng.uniform(0, size, (n - n_cl, 2))
    if n_cl == 0:
        return uni
    k = max(1, int(rng.integers(1, 4)))
    heads = rng.uniform(0, size, (k, 2))
    cl = heads[rng.integers(0, k, n_cl)] + rng.normal(0, sigma_px, (n_cl, 2))
    return np.concatenate([uni, np.clip(cl, 0, size - 1)])


def _debris(rng, img: np.ndarray, n: int, mpp: float) -> None:
    """Paint ``n`` non-nuclear objects in place: red-cell discs, dark specks, thin streaks."""
    size = img.shape[0]
    for _ in range(n):
        kind = rng.choice(3, p=(0.5, 0.25, 0.25))
        cy, cx = rng.uniform(0, size, 2)
        if kind == 0:  # red blood cell: eosinophilic disc with a paler centre
            r = rng.uniform(3.0, 4.0) / mpp
            poly = nucleus_polygon(rng, r, rng.uniform(1.0, 1.3), 0.03)
            rr, cc = _raster(poly, cy, cx, img.shape[:2])
            col = np.array([rng.uniform(185, 225), rng.uniform(70, 120), rng.uniform(100, 145)])
            d = np.hypot(rr - cy, cc - cx) / max(r, 1.0)
            a = (0.55 + 0.35 * np.clip(d, 0, 1))[:, None] * rng.uniform(0.6, 1.0)
            img[rr, cc] = (1 - a) * img[rr, cc] + a * col
        elif kind == 1:  # dark speck, smaller than any nucleus counted
            r = rng.uniform(0.5, 1.2) / mpp
            poly = nucleus_polygon(rng, r, 1.2, 0.1, 12)
            rr, cc = _raster(poly, cy, cx, img.shape[:2])
            img[rr, cc] = rng.uniform(40, 90, 3) * np.array([1.0, 0.8, 1.1])
        else:  # thin dark streak (a fibre or a fold)
            length = rng.uniform(8, 25) / mpp
            th = rng.uniform(0, np.pi)
            t = np.linspace(-length / 2, length / 2, int(length * 2) + 2)
            width = max(1, int(round(rng.uniform(0.5, 1.0) / mpp)))
            yy = (cy + t * math.sin(th)).round().astype(int)
            xx = (cx + t * math.cos(th)).round().astype(int)
            col = rng.uniform(80, 140, 3) * np.array([1.0, 0.7, 1.0])
            for o in range(width):
                y, x = yy + o, xx
                ok = (y >= 0) & (y < size) & (x >= 0) & (x < size)
                img[y[ok], x[ok]] = 0.5 * img[y[ok], x[ok]] + 0.5 * col


def synth_patch(
    bank: TextureBank,
    seed: int | np.random.SeedSequence,
    size_px: int = 96,
    mpp: float = 0.5,
    ranges: SynthRanges = SynthRanges(),
    hard: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic patch and its exact instance labels.

    Parameters
    ----------
    bank : TextureBank
        Real textures (:func:`texture_bank`); needs at least one nucleus.
    seed : int or SeedSequence
        Everything random comes from it: same bank and seed, same patch.
    size_px : int
        Side of the patch (px at ``mpp``).
    mpp : float
        µm/px of the bank and the patch (the model's resolution).
    ranges : SynthRanges
    hard : bool
        Add hard examples: touching/overlapping and pale nuclei, non-nuclear debris.

    Returns
    -------
    (rgb, labels)
        uint8 (size, size, 3) and int32 (size, size): 0 = background, 1..n = nuclei.
    """
    if not bank.nuclei:
        raise InvalidInputError("the texture bank holds no nucleus to paint")
    rng = np.random.default_rng(seed)
    bh, bw = bank.background.shape[:2]
    if bh < size_px or bw < size_px:
        raise InvalidInputError(f"background {bw} x {bh} px is smaller than a patch of "
                                f"{size_px} px")
    y0, x0 = rng.integers(0, bh - size_px + 1), rng.integers(0, bw - size_px + 1)
    img = bank.background[y0:y0 + size_px, x0:x0 + size_px].copy()
    img = np.rot90(img, int(rng.integers(4)))
    img = np.ascontiguousarray(img[:, ::-1] if rng.random() < 0.5 else img)
    img += rng.normal(0, bank.background_std, img.shape).astype(np.float32)
    shape = (size_px, size_px)
    area_um2 = (size_px * mpp) ** 2
    if hard:
        _debris(rng, img, int(rng.poisson(rng.uniform(*ranges.debris_per_1000um2)
                                          * area_um2 / 1000)), mpp)
    n_try = int(rng.poisson(rng.uniform(*ranges.density_per_1000um2) * area_um2 / 1000))
    centres = _centres(rng, n_try, size_px, rng.uniform(*ranges.cluster_fraction),
                       rng.uniform(*ranges.cluster_sigma_um) / mpp)
    labels = np.zeros(shape, np.int32)
    taken = np.zeros(shape, bool)
    areas: list[int] = [0]
    n = 0
    lo, hi = np.log(ranges.diameter_um)
    for cy, cx in centres:
        d_px = math.exp(rng.uniform(lo, hi)) / mpp
        poly = nucleus_polygon(rng, d_px / 2, rng.uniform(*ranges.aspect),
                               rng.uniform(*ranges.irregularity))
        rr, cc = _raster(poly, cy, cx, shape)
        if rr.size < 4:
            continue
        if hard:
            under = labels[rr, cc]
            if (under > 0).mean() > ranges.overlap:
                continue
            ids, cnt = np.unique(under[under > 0], return_counts=True)
            if any(c > ranges.overlap * areas[i] for i, c in zip(ids, cnt, strict=True)):
                continue
        elif taken[rr, cc].any():
            continue
        n += 1
        labels[rr, cc] = n
        areas.append(rr.size)
        taken[np.clip(rr + 1, 0, size_px - 1), cc] = True  # keeps untouching nuclei apart
        taken[np.clip(rr - 1, 0, size_px - 1), cc] = True
        taken[rr, np.clip(cc + 1, 0, size_px - 1)] = True
        taken[rr, np.clip(cc - 1, 0, size_px - 1)] = True
        # texture: a real nucleus stretched over the polygon's bounding box
        px, _m = bank.nuclei[int(rng.integers(len(bank.nuclei)))]
        r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        if rng.random() < 0.5:
            px = px.transpose(1, 0, 2)
        tex = _resize(px, r1 - r0, c1 - c0, 1)
        local = np.zeros((r1 - r0 + 4, c1 - c0 + 4), np.float32)
        local[rr - r0 + 2, cc - c0 + 2] = 1.0
        alpha = ndi.gaussian_filter(local, rng.uniform(0.4, 0.9))
        strength = rng.uniform(0.35, 0.65) if hard and rng.random() < ranges.pale_fraction \
            else 1.0
        ys0, xs0 = r0 - 2, c0 - 2
        sy0, sx0 = max(ys0, 0), max(xs0, 0)
        sy1, sx1 = min(ys0 + local.shape[0], size_px), min(xs0 + local.shape[1], size_px)
        a = alpha[sy0 - ys0:sy1 - ys0, sx0 - xs0:sx1 - xs0, None] * strength
        tpad = np.pad(tex, ((2, 2), (2, 2), (0, 0)), mode="edge")
        t = tpad[sy0 - ys0:sy1 - ys0, sx0 - xs0:sx1 - xs0]
        region = img[sy0:sy1, sx0:sx1]
        region += a * (t - region)
    # keep only labels that are still a visible nucleus, renumbered 1..n
    if n:
        cnt = np.bincount(labels.ravel(), minlength=n + 1)
        keep = cnt >= 4
        keep[0] = False
        lut = np.zeros(n + 1, np.int32)
        lut[keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
        labels = lut[labels]
    # whole-patch colour, blur and noise
    gain = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    gamma = np.float32(rng.uniform(0.85, 1.15))
    img = 255.0 * (np.clip(img * gain, 0, 255) / 255.0) ** gamma
    if rng.random() < 0.5:
        img = ndi.gaussian_filter(img, (rng.uniform(0.3, 1.0),) * 2 + (0,))
    img += rng.normal(0, rng.uniform(0, 3), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def synth_patches(
    banks: list[TextureBank] | tuple[TextureBank, ...],
    n: int,
    seed: int = 0,
    size_px: int = 96,
    mpp: float = 0.5,
    ranges: SynthRanges = SynthRanges(),
    hard: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` patches from the banks in turn: uint8 (n, size, size, 3), int32 (n, size, size).

    Patch ``i`` depends only on ``seed`` and ``i`` (a spawned seed sequence), so a longer
    run starts with the same patches.
    """
    banks = [b for b in banks if b.nuclei]
    if not banks:
        raise InvalidInputError("no texture bank with nuclei to synthesise from")
    seqs = np.random.SeedSequence(seed).spawn(n)
    rgb = np.empty((n, size_px, size_px, 3), np.uint8)
    lab = np.empty((n, size_px, size_px), np.int32)
    for i in range(n):
        rgb[i], lab[i] = synth_patch(banks[i % len(banks)], seqs[i], size_px, mpp, ranges, hard)
    return rgb, lab
