"""``slidecensus segmenter train``: a U-Net from unlabelled images alone.

1. Each image is read, Reinhard-normalised with its own stain model and resampled to the
   model's µm/px; the threshold segmenter finds its clearest nuclei (their textures), and
   whatever else could be a nucleus is cut out of the background (:func:`background_holes`:
   by default nucleus-shaped or hematoxylin-dominated parts of a liberal threshold, so dark
   stroma and membranes stay in the background as the negatives they are)
   (:func:`bank_from_image`).
2. Synthetic patches with exact labels are drawn from those textures (:mod:`.synthpatch`).
3. Optionally (``--importance``; off by default, as measured) each patch is weighted by
   how real it looks (:mod:`.importance`), against random real patches of the same images.
4. The U-Net is trained on them (:func:`~.unet.train_unet`), its batch-norm statistics are
   re-estimated on the real images (:func:`~.unet.adapt_batch_norm`, AdaBN), and it is
   written with its configuration and a record of how it was made (:func:`~.unet.save_unet`).

No annotation is read at any step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import InvalidInputError
from .synthpatch import SynthRanges, TextureBank, synth_patches, texture_bank
from .unet import UNetConfig, adapt_batch_norm, save_unet, train_unet

__all__ = ["BACKGROUND_RULES", "SegmenterTraining", "background_holes", "bank_from_image",
           "real_patches", "to_model_resolution", "train_segmenter"]

log = logging.getLogger(__name__)

#: Hematoxylin intensity (0-255 scale, as ``SegmentParams.hematoxylin_threshold``) below
#: which a pixel may be nucleus and is kept out of the synthetic background.
LIBERAL_THRESHOLD = 175.0
#: The largest region read from one slide for training (level-0 px a side).
MAX_READ_PX = 3000
#: Real patches of the training images whose statistics the batch norms take (AdaBN).
ADAPT_PATCHES = 960
#: How :func:`background_holes` decides what could be a nucleus (``SegmenterTraining.background``).
BACKGROUND_RULES = ("shaped", "liberal")
#: ``shaped``: liberal-threshold parts kept as possible nuclei when nucleus-shaped (after an
#: opening of this radius, µm) ...
SHAPE_OPENING_UM = 1.0
#: ... at most this large (µm²) ...
SHAPE_MAX_AREA_UM2 = 150.0
#: ... this solid and at most this eccentric,
SHAPE_MIN_SOLIDITY, SHAPE_MAX_ECCENTRICITY = 0.8, 0.95
#: or, whatever their shape, where hematoxylin OD exceeds eosin OD by this much.
HEMATOXYLIN_MARGIN_OD = 0.4


@dataclass(frozen=True)
class SegmenterTraining:
    """How ``segmenter train`` makes a model (all recorded in the weights file)."""

    n_patches: int = 2400
    patch_px: int = 96
    iterations: int = 1500
    batch: int = 16
    hard: bool = True
    # Hou et al.'s importance weights are an option: with hard examples they cost 0.04
    # AJI on unseen MoNuSeg images and made training 4x longer (docs/benchmarks.md)
    importance: bool = False
    importance_iterations: int = 300
    importance_clip: float = 10.0
    # what is cut out of the background: "shaped" (the default since it measured +0.017 AJI
    # on unseen MoNuSeg images over 3 seeds) or "liberal" (everything dark, as before)
    background: str = "shaped"
    # AdaBN: batch-norm statistics re-estimated on real patches of the training images
    adapt_bn: bool = True
    seed: int = 0
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUND_RULES:
            raise InvalidInputError(f"background must be one of {', '.join(BACKGROUND_RULES)},"
                                    f" got {self.background!r}")


def to_model_resolution(rgb: np.ndarray, mpp: float, model_mpp: float) -> np.ndarray:
    """RGB (float32) resampled from ``mpp`` to ``model_mpp`` µm/px: block means for an
    integer ratio (as the threshold segmenter bins), bilinear otherwise."""
    from scipy import ndimage as ndi

    from .segment import _bin_rgb

    r = model_mpp / mpp
    f = round(r)
    if f >= 1 and abs(r - f) < 0.02 * r:
        return np.asarray(_bin_rgb(rgb, f), np.float32)
    zoom = (1 / r, 1 / r, 1)
    return ndi.zoom(np.asarray(rgb, np.float32), zoom, order=1, grid_mode=True,
                    mode="nearest")


def background_holes(hematoxylin_od: np.ndarray, eosin_od: np.ndarray, mpp: float,
                     rule: str = "shaped") -> np.ndarray:
    """Pixels that could belong to a nucleus, to be cut out of the synthetic background.

    ``liberal``: every pixel darker in hematoxylin than :data:`LIBERAL_THRESHOLD`. That also
    cuts out dark stroma, membranes and cytoplasm, so the network never sees them as
    background and takes them for nuclei on real tissue. ``shaped`` keeps of that mask only
    the parts shaped like a nucleus (compact blobs after a small opening) and the pixels
    clearly dominated by hematoxylin; elongated, eosin-dominated structures stay in the
    background as real negatives.

    Parameters
    ----------
    hematoxylin_od, eosin_od : ndarray, shape (h, w)
        Stain concentrations (optical density) at ``mpp`` µm/px.
    mpp : float
    rule : ``shaped`` or ``liberal``

    Returns
    -------
    ndarray of bool
    """
    from skimage.measure import regionprops
    from skimage.morphology import disk

    if rule not in BACKGROUND_RULES:
        raise InvalidInputError(f"unknown background rule {rule!r}")
    h = np.asarray(hematoxylin_od, np.float32)
    e = np.asarray(eosin_od, np.float32)
    liberal = h > float(np.log(256.0 / (LIBERAL_THRESHOLD + 1.0)))
    if rule == "liberal":
        return liberal
    opened = ndi.binary_opening(liberal, disk(max(1, round(SHAPE_OPENING_UM / mpp))))
    lab, n = ndi.label(opened)
    keep = np.zeros(n + 1, bool)
    for r in regionprops(lab):
        keep[r.label] = (r.area * mpp * mpp <= SHAPE_MAX_AREA_UM2
                         and r.solidity >= SHAPE_MIN_SOLIDITY
                         and r.eccentricity <= SHAPE_MAX_ECCENTRICITY)
    return keep[lab] | (liberal & (h - e > HEMATOXYLIN_MARGIN_OD))


def bank_from_image(rgb: np.ndarray, mpp: float, model_mpp: float = 0.5, seed: int = 0,
                    background: str = "shaped") -> tuple[TextureBank, np.ndarray]:
    """The texture bank of one image and the image itself, normalised at the model's µm/px.

    ``background`` is the :func:`background_holes` rule.

    Returns
    -------
    (bank, normalised)
        :class:`~.synthpatch.TextureBank` and the Reinhard-normalised image (float32).
    """
    from .segment import SegmentParams, segment_image
    from .stain import as_rgb8, estimate_stain_model, stain_concentrations

    rgb = as_rgb8(rgb)
    sm = estimate_stain_model(rgb)
    labels, _ = segment_image(rgb, mpp=mpp, stain_model=sm)
    small = to_model_resolution(rgb, mpp, model_mpp)
    h, e = stain_concentrations(np.clip(small, 0, 255), sm)
    norm = sm.normalize(np.clip(small, 0, 255))
    lab = _nearest(labels, small.shape[:2])
    maybe = background_holes(h, e, model_mpp, background)
    min_px = max(4, round(SegmentParams().min_area_um2 / model_mpp**2))
    return texture_bank(norm, lab, maybe, min_area_px=min_px, seed=seed), norm


def _nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Labels resampled to ``shape`` by nearest neighbour (pixel centres)."""
    h, w = labels.shape
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
    return labels[ys[:, None], xs[None, :]]


def real_patches(images: Sequence[np.ndarray], n: int, size_px: int, seed: int = 0
                 ) -> np.ndarray:
    """``n`` random real patches (uint8) of side ``size_px``, from the images in turn."""
    rng = np.random.default_rng(seed)
    usable = [im for im in images if min(im.shape[:2]) >= size_px]
    if not usable:
        raise InvalidInputError(f"no image is at least {size_px} px at the model's "
                                f"resolution")
    out = np.empty((n, size_px, size_px, 3), np.uint8)
    for i in range(n):
        im = usable[i % len(usable)]
        y = int(rng.integers(0, im.shape[0] - size_px + 1))
        x = int(rng.integers(0, im.shape[1] - size_px + 1))
        out[i] = np.clip(np.rint(im[y:y + size_px, x:x + size_px]), 0, 255)
    return out


def _read_image(path: str | Path) -> tuple[np.ndarray, float]:
    """Level-0 pixels (at most :data:`MAX_READ_PX` a side, centred) and µm/px of a file."""
    from ..tiling import open_slide
    from .segment import DEFAULT_MPP

    with open_slide(path) as slide:
        h, w = slide.shape
        rh, rw = min(h, MAX_READ_PX), min(w, MAX_READ_PX)
        y, x = (h - rh) // 2, (w - rw) // 2
        rgb = slide.read_region(0, x, y, rw, rh)
        return np.asarray(rgb), float(slide.mpp if slide.mpp is not None else DEFAULT_MPP)


def train_segmenter(
    paths: Sequence[str | Path],
    out: str | Path,
    training: SegmenterTraining | None = None,
    config: UNetConfig | None = None,
    ranges: SynthRanges | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    command: str = "",
) -> Path:
    """Train a U-Net segmenter on synthetic patches made from ``paths`` and write it.

    Parameters
    ----------
    paths : sequence of path-like
        Unlabelled images or slides (anything ``open_slide`` reads).
    out : path-like
        The weights file to write.
    training, config, ranges : optional
        How to train, the network, the synthetic nuclei (defaults: their classes').
    progress : callable, optional
        ``progress(stage, done, total)``.
    command : str
        The command line that asked for it (recorded).

    Returns
    -------
    Path
        The written file.
    """
    import torch

    training = SegmenterTraining() if training is None else training
    config = UNetConfig() if config is None else config
    ranges = SynthRanges() if ranges is None else ranges
    if not paths:
        raise InvalidInputError("segmenter train needs at least one image")
    if training.patch_px % config.divisor:
        raise InvalidInputError(f"patch_px must be a multiple of {config.divisor}")
    t0 = time.perf_counter()
    banks, normed, names = [], [], []
    for i, p in enumerate(paths):
        rgb, mpp = _read_image(p)
        bank, norm = bank_from_image(rgb, mpp, config.mpp, seed=training.seed + i,
                                     background=training.background)
        if min(norm.shape[:2]) < training.patch_px:
            raise InvalidInputError(f"{p}: {norm.shape[1]} x {norm.shape[0]} px at "
                                    f"{config.mpp} µm/px is smaller than a training patch "
                                    f"({training.patch_px} px)")
        banks.append(bank)
        normed.append(norm)
        names.append(Path(p).name)
        if progress is not None:
            progress("textures", i + 1, len(paths))
    if not any(b.nuclei for b in banks):
        raise InvalidInputError("the threshold segmenter found no nucleus in the images; "
                                "nothing to take nuclear texture from")
    t_bank = time.perf_counter() - t0
    x, y = synth_patches(banks, training.n_patches, seed=training.seed,
                         size_px=training.patch_px, mpp=config.mpp, ranges=ranges,
                         hard=training.hard)
    t_synth = time.perf_counter() - t0 - t_bank
    weights = None
    wstats: dict = {}
    if training.importance:
        real = real_patches(normed, max(256, training.n_patches // 2), training.patch_px,
                            seed=training.seed)
        weights = importance_weights_for(real, x, training)
        wstats = {"min": float(weights.min()), "max": float(weights.max()),
                  "std": float(weights.std())}
    t_weights = time.perf_counter() - t0 - t_bank - t_synth

    def show(it: int, total: int, loss: float) -> None:
        if progress is not None:
            progress("train", it, total)
        log.info("iteration %d/%d loss %.4f", it, total, loss)

    net, tlog = train_unet(x, y, weights, config, iterations=training.iterations,
                           batch=training.batch, seed=training.seed,
                           max_seconds=training.max_seconds, progress=show)
    t_adapt = 0.0
    if training.adapt_bn:
        t1 = time.perf_counter()
        real = real_patches(normed, ADAPT_PATCHES, training.patch_px, seed=training.seed + 1)
        adapt_batch_norm(net, real)
        t_adapt = time.perf_counter() - t1
    record = {
        "command": command,
        "images": names,
        "training": {k: v for k, v in training.__dict__.items()},
        "ranges": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in ranges.__dict__.items()},
        "iterations_done": tlog.iterations,
        "losses": tlog.losses,
        "seconds": {"textures": t_bank, "synthesis": t_synth, "importance": t_weights,
                    "train": tlog.seconds, "adapt_bn": t_adapt,
                    "total": time.perf_counter() - t0},
        "importance_weights": wstats,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    return save_unet(net, config, out, record)


def importance_weights_for(real: np.ndarray, synth: np.ndarray,
                           training: SegmenterTraining) -> np.ndarray:
    """The importance weights of ``synth`` against ``real`` (two-fold discriminators)."""
    from .importance import importance_weights

    return importance_weights(real, synth, iterations=training.importance_iterations,
                              clip=training.importance_clip, seed=training.seed)

