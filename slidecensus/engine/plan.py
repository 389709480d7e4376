"""Planning one slide of the census: its parameters, and a plan made once on a worker.

:class:`CensusParams` holds everything that changes the census' numbers (hashed into the
manifest). :func:`plan_slide` opens a slide on a worker, finds tissue, estimates the stain
model once and lays out the tile grid; the :class:`SlidePlan` it returns is small (no
pixels) and is all the client needs to schedule the slide's tasks (:mod:`.tasks`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InvalidInputError, SlideReadError
from ..nuclei.crops import CROP_MODES
from ..nuclei.normalize import StainNorm, StainTarget, fit_normalizer
from ..nuclei.segment import DEFAULT_MPP, Segmenter, SegmentParams, stain_sample, tile_geometry
from ..nuclei.stain import StainModel, estimate_stain_model
from ..tiling import Tile, TissueMask, cached_slide, plan_tiles, tissue_mask_rgb

__all__ = [
    "COHORT_TARGET",
    "TILE_BYTES_PER_PX",
    "TILE_SIZE_RANGE",
    "CensusParams",
    "SlidePlan",
    "cohort_stain_target",
    "fit_neural_to_slide",
    "fit_slide_normalizer",
    "plan_slide",
    "slide_lab_stats",
    "tissue_patches",
]

#: Accepted ``tile_size`` (level-0 px of a tile's core). The upper bound keeps one tile's
#: segmentation within about 2 GB however many nuclei it holds (measured: a 4096-px tile
#: peaks at 1.6-1.9 GB above the worker's base, a 2048-px tile at 0.4-0.5 GB, with 1x to 10x
#: the usual nuclei; the peak follows the pixels, not the nuclei); below the lower bound the
#: halo (up to 96 px a side) would be read more often than the core.
TILE_SIZE_RANGE = (256, 4096)
#: Peak bytes of one tile task per pixel of its read window (conservative, from the same
#: measurements: 82-110 bytes/px on slides that are not binned).
TILE_BYTES_PER_PX = 120


@dataclass(frozen=True)
class CensusParams:
    """Everything that changes the census' numbers (hashed into the manifest)."""

    tile_size: int = 2048
    region_um: float = 256.0
    crop_size: int = 32
    masked_crops: bool = True
    crop_mode: str = ""  # "" = from masked_crops; else nucleus | box | window (the model's)
    crop_window_um: float = 18.0
    min_tissue: float = 0.0
    gallery_crops: int = 256
    seed: int = 0
    segment: SegmentParams = field(default_factory=SegmentParams)
    outlines: bool = False  # keep each nucleus's outline polygon (cells' ``outline_px``)
    stain_norm: StainNorm = field(default_factory=StainNorm)  # before segmentation and crops
    segmenter: Segmenter = field(default_factory=Segmenter)  # --segmenter threshold|unet

    def __post_init__(self) -> None:
        lo, hi = TILE_SIZE_RANGE
        if not (isinstance(self.tile_size, int | np.integer) and lo <= self.tile_size <= hi):
            raise InvalidInputError(f"tile_size must be an integer from {lo} to {hi} px (one "
                                    f"tile's memory grows with its area), got "
                                    f"{self.tile_size!r}")
        if not (math.isfinite(self.region_um) and self.region_um > 0):
            raise InvalidInputError(f"region_um must be a positive number of µm, got "
                                    f"{self.region_um!r}")
        if not 8 <= self.crop_size <= 256:
            raise InvalidInputError(f"crop_size must be from 8 to 256 px, got {self.crop_size}")
        if self.crop_mode not in ("", *CROP_MODES):
            raise InvalidInputError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got "
                                    f"{self.crop_mode!r}")
        if not (math.isfinite(self.crop_window_um) and self.crop_window_um > 0):
            raise InvalidInputError(f"crop_window_um must be a positive number of µm, got "
                                    f"{self.crop_window_um!r}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InvalidInputError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.gallery_crops < 0:
            raise InvalidInputError(f"gallery_crops must be >= 0, got {self.gallery_crops}")

    def crops_mode(self) -> str:
        """The crop mode in force: ``crop_mode``, or the paper's from ``masked_crops``."""
        return self.crop_mode or ("nucleus" if self.masked_crops else "box")

    def with_model_crops(self, spec: dict | None) -> CensusParams:
        """These parameters with the crops a model was trained on (its config's
        :meth:`~slidecensus.models.TrainConfig.crop_spec`: mode, window and, for guided
        models, size in px); unchanged for None."""
        if not spec:
            return self
        from dataclasses import replace

        return replace(self, crop_mode=str(spec["mode"]),
                       crop_window_um=float(spec.get("window_um", self.crop_window_um)),
                       crop_size=int(spec.get("size", self.crop_size)))

    def tile_peak_bytes(self) -> int:
        """Conservative peak memory of one tile task (read window with a 128-px halo)."""
        return TILE_BYTES_PER_PX * (self.tile_size + 256) ** 2

    def digest(self) -> str:
        """Stable hash of the parameters."""
        d = asdict(self)
        if self.segmenter.is_default:  # the default keeps the digest of earlier runs
            d.pop("segmenter")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SlidePlan:
    """What the client needs to schedule one slide: small, no pixels."""

    path: str
    mpp: float
    mpp_known: bool
    shape: tuple[int, int]
    tiles: tuple[Tile, ...]
    stain: StainModel
    tissue: TissueMask
    notes: tuple[str, ...] = ()  # warnings for slides.csv (conversions, no tissue)


def plan_slide(path: str, mpp: float | None, params: CensusParams) -> SlidePlan:
    """Open a slide on a worker, find tissue, estimate the stain model once, plan tiles.

    Raises SlideReadError for an image too small to hold one nucleus (a 1 x 1 px file is
    not a slide); the plan's ``notes`` say what was converted and whether tissue was found.
    """
    slide = cached_slide(path, mpp=mpp)
    slide_mpp = slide.mpp if slide.mpp is not None else DEFAULT_MPP
    nucleus_um = 2 * math.sqrt(params.segment.min_area_um2 / math.pi)
    h, w = slide.shape
    if min(h, w) * slide_mpp < nucleus_um:
        raise SlideReadError(path, f"image too small for a census: {w} x {h} px "
                                   f"({w * slide_mpp:.2g} x {h * slide_mpp:.2g} µm at "
                                   f"{slide_mpp} µm/px); the smallest nucleus counted is "
                                   f"{nucleus_um:.1f} µm across")
    thumb = slide.thumbnail(1024)
    mask = TissueMask(tissue_mask_rgb(thumb),
                      float(np.mean([slide.shape[0] / thumb.shape[0],
                                     slide.shape[1] / thumb.shape[1]])))
    # one stain model per slide, from the same sample segment_file uses
    sample = stain_sample(slide, with_mask=False)[0]
    norm, seg_sample = fit_slide_normalizer(params.stain_norm, slide, sample, mask)
    stain = replace(estimate_stain_model(seg_sample), norm=norm)
    tile_size, halo = (params.tile_size, params.segment.for_mpp(slide_mpp).halo_px)
    if not params.segmenter.is_default:  # the U-Net's halo covers its receptive field
        tile_size, halo = tile_geometry(params.segment, params.segmenter, slide_mpp, tile_size)
    tiles = plan_tiles(slide, tile_size=tile_size, halo=halo, level=0, mask=mask,
                       min_tissue=params.min_tissue)
    notes = list(slide.conversions)
    if not tiles:
        notes.append("no tissue found (no tile to segment)")
    return SlidePlan(path, slide_mpp, slide.mpp is not None, slide.shape, tuple(tiles), stain,
                     mask, tuple(notes))



#: The neural normaliser in the pipeline keeps each slide's lightness: the segmenter
#: calibrates its own tones, and moving them towards a target's cost segmentation on
#: MoNuSeg (Dice 0.629 -> 0.566, AJI 0.350 -> 0.313 at 0.75; benchmarks/bench_normalize).
PIPELINE_LIGHTNESS = "keep"
#: Level-0 patches of a slide that fit the neural normaliser (its global vector and the
#: segmenter's stain model on normalised pixels), and their side in px.
NEURAL_FIT_PATCHES = 16
NEURAL_FIT_PATCH_PX = 256
#: A slide with at most this many level-0 pixels is read whole for that fit.
NEURAL_FIT_WHOLE_PX = 4096 * 4096


def fit_slide_normalizer(spec: StainNorm, slide: Any, sample: np.ndarray,
                         mask: TissueMask | None = None, seed: int = 0
                         ) -> tuple[Any, np.ndarray]:
    """Fit ``spec`` to one slide: (the normaliser, or None for the default Reinhard; the
    pixels the segmenter's stain model is then estimated on).

    ``reinhard``, ``macenko`` and ``none`` are fitted on ``sample`` (the slide's
    thumbnail-sized stain sample). ``neural`` takes its slide statistics from level-0
    patches in tissue (the network runs at full resolution): the whole image when it is
    small, else :data:`NEURAL_FIT_PATCHES` patches placed on the tissue mask, seeded.
    """
    if spec.is_default:
        return None, sample
    if spec.method != "neural":
        norm = fit_normalizer(spec.method, sample, spec.target)
        # reinhard: the segmenter calibrates itself on the raw pixels (read_normalized)
        return norm, (norm(sample) if spec.method == "macenko" else sample)
    norm, pixels = fit_neural_to_slide(spec.model, slide, mask, seed)
    return norm, np.concatenate([norm(p).reshape(-1, 3) for p in pixels])[None]


def fit_neural_to_slide(model: str, slide: Any, mask: TissueMask | None = None, seed: int = 0,
                        lightness: str | float = PIPELINE_LIGHTNESS) -> tuple[Any, list]:
    """A neural normaliser fitted to one slide from level-0 pixels (the network runs at full
    resolution): the whole image when it is small, else :data:`NEURAL_FIT_PATCHES`
    patches on the tissue mask, seeded. Returns (the normaliser, those pixels)."""
    from ..nuclei.colorize import fit_neural

    h, w = slide.shape
    if h * w <= NEURAL_FIT_WHOLE_PX:
        whole = slide.read_region(0, 0, 0, w, h)
        return fit_neural(model, whole, seed=seed, lightness=lightness), [whole]
    patches = tissue_patches(slide, mask, NEURAL_FIT_PATCHES, NEURAL_FIT_PATCH_PX, seed)
    norm = fit_neural(model, np.concatenate([p.reshape(-1, 3) for p in patches])[None],
                      patches, lightness=lightness)
    return norm, patches


def tissue_patches(slide: Any, mask: TissueMask | None, n: int, size: int, seed: int
                    ) -> list[np.ndarray]:
    """``n`` level-0 patches of ``size`` px centred on tissue pixels of the mask (any
    pixels without one), seeded."""
    h, w = slide.shape
    rng = np.random.default_rng(seed)
    if mask is not None and mask.mask.any():
        ys, xs = np.nonzero(mask.mask)
        pick = rng.choice(len(ys), min(n, len(ys)), replace=False)
        d = mask.downsample
        centres = [((ys[i] + 0.5) * d, (xs[i] + 0.5) * d) for i in pick]
    else:
        centres = list(zip(rng.uniform(0, h, n), rng.uniform(0, w, n), strict=True))
    out = []
    for cy, cx in centres:
        y = int(np.clip(cy - size / 2, 0, max(0, h - size)))
        x = int(np.clip(cx - size / 2, 0, max(0, w - size)))
        out.append(slide.read_region(0, x, y, min(size, w), min(size, h)))
    return out


#: The name of the cohort's own style as a stain target (the default crop normalisation).
COHORT_TARGET = "cohort"


def slide_mpp(path: str, mpp: float | None) -> float:
    """A slide's µm/px as the census uses it (its own, the cohort's override, or the
    default); a worker task."""
    slide = cached_slide(path, mpp=mpp)
    return float(slide.mpp) if slide.mpp is not None else DEFAULT_MPP


def guided_crop_size(mpps: list[float] | np.ndarray, window_um: float = 18.0) -> int:
    """The crop side (px) for a guided model trained on slides at ``mpps`` µm/px: 64 where
    the window spans more than 48 of the slides' own pixels (median slide), else 32.

    Larger crops keep the texture that tells close types apart (blood cells at 0.1 µm/px:
    macro F1 0.932 at 32 px, 0.953 at 64, docs/benchmarks.md); a crop larger than the
    slide's own pixels adds only interpolation, at 4x the cost (a 20x slide, 0.5 µm/px,
    holds 36 px in 18 µm).
    """
    m = np.asarray(mpps, float)
    m = m[np.isfinite(m) & (m > 0)]
    if m.size == 0:
        raise InvalidInputError("no slide resolution (µm/px) to size the guided crops by")
    return 64 if window_um / float(np.median(m)) > 48 else 32


def model_crop_spec(model_config: dict) -> dict:
    """How the census must cut crops for a model, from its stored configuration: mode,
    window (µm) and size (px; 32 for InfoGAN models and guided ones from before the size
    was stored)."""
    return {"mode": model_config.get("crop_mode", "nucleus"),
            "window_um": float(model_config.get("crop_window_um", 18.0)),
            "size": int(model_config.get("crop_size", 32))}


def slide_lab_stats(path: str, mpp: float | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The lαβ mean and standard deviation of one slide's tissue (its stain sample), as the
    per-slide Reinhard fit computes them; a worker task."""
    slide = cached_slide(path, mpp=mpp)
    norm = fit_normalizer("reinhard", stain_sample(slide, with_mask=False)[0])
    return norm.src_lab_mean, norm.src_lab_std


def cohort_stain_target(stats: list[tuple[tuple[float, ...], tuple[float, ...]]]
                        ) -> StainTarget:
    """The cohort's own style: the mean of its slides' lαβ means and standard deviations.

    ``--stain-target cohort`` maps every slide's crops to it, which removes slide-to-slide
    colour differences without squeezing the cohort's stain into another one (Reinhard to
    Hu et al.'s H&E target cost 0.09 of Q's purity on May-Grünwald-Giemsa blood cells).
    """
    if not stats:
        raise InvalidInputError("no slide statistics to pool into a cohort style")
    means = np.array([m for m, _ in stats], dtype=np.float64)
    stds = np.array([s for _, s in stats], dtype=np.float64)
    return StainTarget(lab_mean=tuple(float(v) for v in means.mean(axis=0)),
                       lab_std=tuple(float(v) for v in stds.mean(axis=0)),
                       name=COHORT_TARGET)
