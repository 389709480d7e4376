"""The learned nuclei segmenter: a compact U-Net trained on synthetic patches; its instance step.

- :class:`UNet` (torch): a narrow U-Net (Ronneberger et al.; compact, as in Yuan & Suh) with
  two outputs per pixel: a foreground logit and a logit of the *normalised distance* (each
  nucleus's distance transform divided by its maximum: 1 at its centre, falling to 0 at its
  edge), so touching nuclei meet in a valley.
- :func:`instances_from_maps`: our own instance step, separate from the network (as in
  StarDist): markers where the distance is high, a watershed of the distance inside the
  foreground, area limits.
- :func:`receptive_radius_px`: measured from the network (zero image vs impulse), so the
  tile halo covers it.
- :func:`predict_maps`: run at the model's resolution, channels-last, optionally under bf16
  autocast; :class:`UNetSegmenter` is a loaded model ready to label a tile.
- :func:`train_unet`: the training loop on synthetic patches (:mod:`.synthpatch`), each
  patch's loss weighted by its importance (:mod:`.importance`); :func:`adapt_batch_norm`
  then re-estimates the batch-norm statistics on real patches (AdaBN, Li et al.).
- :func:`save_unet` / :func:`load_unet`: the weights file (format ``slidecensus.unet``),
  read with ``weights_only=True``; the configuration travels with the weights.
- :func:`default_model_path`: the model that ships in the package (``weights/``).

References
----------
.. [1] O. Ronneberger, P. Fischer, T. Brox, "U-Net: convolutional networks for biomedical
   image segmentation", MICCAI 2015.
.. [2] L. Hou et al., "Robust histopathology image analysis: to label or to synthesize?",
   CVPR 2019.
.. [3] U. Schmidt, M. Weigert, C. Broaddus, G. Myers, "Cell detection with star-convex
   polygons", MICCAI 2018 (receptive field and tile overlap from the network).
.. [4] Y. Li, N. Wang, J. Shi, J. Liu, X. Hou, "Revisiting batch normalization for practical
   domain adaptation", ICLR workshop 2017 (AdaBN).
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..errors import InvalidInputError
from ..weightsfile import CheckpointError, load_weights_file, save_weights_file

__all__ = [
    "UNET_FORMAT",
    "UNET_FORMAT_VERSION",
    "UNetConfig",
    "UNetSegmenter",
    "adapt_batch_norm",
    "default_model_path",
    "distance_targets",
    "fuse_for_inference",
    "instances_from_maps",
    "load_unet",
    "predict_maps",
    "receptive_radius_px",
    "rewrite_unet_config",
    "save_unet",
    "train_unet",
    "unet_device",
]

UNET_FORMAT = "slidecensus.unet"
UNET_FORMAT_VERSION = 1


@dataclass(frozen=True)
class UNetConfig:
    """The network and its instance step; saved beside the weights.

    Attributes
    ----------
    widths : tuple of int
        Channels per level (the first is full resolution); ``len - 1`` poolings.
    mpp : float
        µm/px the model was trained at; images are resampled to it.
    fg_threshold : float
        Foreground where the predicted probability exceeds this.
    marker_threshold : float
        Markers of the watershed where the normalised distance exceeds this.
    min_marker_px : int
        Smaller markers are dropped (noise in the distance map).
    min_relative_iod_um2 : float
        The model's own object filter: a nucleus must hold at least as much hematoxylin
        as this area (µm²) would at the slide's nuclear split OD (the stain model's Otsu
        split between nuclei and the rest); that is, area x mean OD >= this x split OD.
        Relative to the slide's own stain, like ``SegmentParams.min_relative_hematoxylin``,
        so paler labs are not cut harder. A U-Net finds more small pale objects than the
        threshold segmenter; 18 gave the best bone-marrow F1 on the tuning images
        (docs/benchmarks.md). Files saved without it load with 0 (off).
    """

    widths: tuple[int, ...] = (16, 32, 64)
    mpp: float = 0.5
    fg_threshold: float = 0.5
    marker_threshold: float = 0.5
    min_marker_px: int = 3
    min_relative_iod_um2: float = 18.0

    def __post_init__(self) -> None:
        if not self.min_relative_iod_um2 >= 0:
            raise InvalidInputError(f"min_relative_iod_um2 must be >= 0, got "
                                    f"{self.min_relative_iod_um2}")

    @property
    def divisor(self) -> int:
        """Input sides are padded to a multiple of this (one halving per pooling)."""
        return 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (weights-only loadable)."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """The config from :meth:`to_dict`'s dict (unknown keys ignored)."""
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("min_relative_iod_um2", 0.0)  # older files: as they were made
        if "widths" in kw:
            kw["widths"] = tuple(int(w) for w in kw["widths"])
        return cls(**kw)


def _torch():
    import torch

    return torch


def _build(config: UNetConfig):
    """The U-Net as a torch module (built lazily: torch is imported only when needed)."""
    torch = _torch()
    nn = torch.nn
    from ..fastops import max_pool2

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True))

    class UNet(nn.Module):
        """Encoder-decoder with skip connections; 2 output channels (fg, distance) logits."""

        def __init__(self, widths: tuple[int, ...]) -> None:
            super().__init__()
            self.down = nn.ModuleList()
            cin = 3
            for w in widths:
                self.down.append(block(cin, w))
                cin = w
            self.up = nn.ModuleList()
            self.merge = nn.ModuleList()
            for w in reversed(widths[:-1]):
                self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
                self.merge.append(block(2 * w, w))
                cin = w
            self.head = nn.Conv2d(cin, 2, 1)

        def forward(self, x):
            skips = []
            for i, blk in enumerate(self.down):
                x = blk(x if i == 0 else max_pool2(x))
                skips.append(x)
            skips.pop()
            for up, merge in zip(self.up, self.merge, strict=True):
                x = merge(torch.cat([up(x), skips.pop()], dim=1))
            return self.head(x)

    return UNet(config.widths)


def fuse_for_inference(net: Any) -> Any:
    """An inference copy of a trained U-Net with the same outputs and less work.

    Batch norm (its running statistics) is folded into the convolution before it. Each
    decoder's first convolution over ``cat(up, skip)`` becomes two convolutions, one per
    input, whose outputs are summed, so the skip tensors are never copied. On one CPU core
    the concatenations and batch norms were about 45 % of a tile's forward pass.
    """
    torch = _torch()
    nn = torch.nn
    if not hasattr(net, "merge"):
        return net  # already fused, or another module

    def fold(conv: Any, bn: Any) -> Any:
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                        padding=conv.padding, bias=True)
        with torch.no_grad():
            out.weight.copy_(conv.weight.detach() * scale[:, None, None, None])
            b = conv.bias.detach() if conv.bias is not None else 0.0
            out.bias.copy_(bn.bias.detach() + (b - bn.running_mean) * scale)
        return out

    def fused_block(blk: Any) -> Any:
        return nn.Sequential(fold(blk[0], blk[1]), nn.ReLU(inplace=True),
                             fold(blk[3], blk[4]), nn.ReLU(inplace=True))

    def split(conv: Any, n_up: int) -> tuple[Any, Any]:
        a = nn.Conv2d(n_up, conv.out_channels, conv.kernel_size, padding=conv.padding)
        b = nn.Conv2d(conv.in_channels - n_up, conv.out_channels, conv.kernel_size,
                      padding=conv.padding, bias=False)
        with torch.no_grad():
            a.weight.copy_(conv.weight[:, :n_up])
            a.bias.copy_(conv.bias)
            b.weight.copy_(conv.weight[:, n_up:])
        return a, b

    from ..fastops import max_pool2

    class FusedUNet(nn.Module):
        """The inference form of the U-Net (see :func:`fuse_for_inference`)."""

        def __init__(self) -> None:
            super().__init__()
            self.down = nn.ModuleList(fused_block(b) for b in net.down)
            self.up = nn.ModuleList(
                nn.ConvTranspose2d(u.in_channels, u.out_channels, 2, stride=2)
                for u in net.up)
            self.up.load_state_dict(net.up.state_dict())
            self.merge_up, self.merge_skip, self.merge_rest = (
                nn.ModuleList(), nn.ModuleList(), nn.ModuleList())
            for u, blk in zip(net.up, net.merge, strict=True):
                first = fused_block(blk)
                a, b = split(first[0], u.out_channels)
                self.merge_up.append(a)
                self.merge_skip.append(b)
                self.merge_rest.append(nn.Sequential(*list(first)[1:]))
            self.head = nn.Conv2d(net.head.in_channels, net.head.out_channels, 1)
            self.head.load_state_dict(net.head.state_dict())

        def forward(self, x):
            skips = []
            for i, blk in enumerate(self.down):
                x = blk(x if i == 0 else max_pool2(x))
                skips.append(x)
            skips.pop()
            for up, a, b, rest in zip(self.up, self.merge_up, self.merge_skip,
                                      self.merge_rest, strict=True):
                y = a(up(x))
                y += b(skips.pop())
                x = rest(y)
            return self.head(x)

    fused = FusedUNet()
    fused.eval()
    for prm in fused.parameters():
        prm.requires_grad_(False)
    return fused


# --------------------------------------------------------------------------- targets


def distance_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and normalised-distance targets (float32) of an instance label image.

    The distance of a pixel to the nearest pixel outside its own nucleus (so touching
    nuclei are separated), divided by the largest distance in that nucleus.
    """
    lab = np.asarray(labels)
    fg = lab > 0
    if not fg.any():
        z = np.zeros(lab.shape, np.float32)
        return z, z.copy()
    edge = np.zeros_like(fg)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[1:] |= lab[:-1] != lab[1:]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, :-1] != lab[:, 1:]
    dist = ndi.distance_transform_edt(fg & ~(edge & fg))
    dist = np.where(fg, dist + 0.5, 0.0)
    mx = ndi.maximum(dist, lab, index=np.arange(int(lab.max()) + 1))
    mx = np.asarray(mx, dtype=np.float64)
    mx[mx <= 0] = 1.0
    return fg.astype(np.float32), (dist / mx[lab]).astype(np.float32)


# --------------------------------------------------------------------------- instance step


def instances_from_maps(
    fg_prob: np.ndarray,
    dist: np.ndarray,
    config: UNetConfig = UNetConfig(),
    min_area_px: int = 1,
    max_area_px: int | None = None,
) -> np.ndarray:
    """Instance labels from the network's maps: markers, watershed, area limits.

    Parameters
    ----------
    fg_prob, dist : ndarray of float, shape (h, w)
        Foreground probability and normalised distance (both 0-1).
    config : UNetConfig
        Its thresholds.
    min_area_px, max_area_px : int
        Objects outside these areas (px) are dropped.

    Returns
    -------
    ndarray of int32
        0 = background, 1..n consecutive.
    """
    from skimage.segmentation import watershed

    fg = ndi.binary_fill_holes(np.asarray(fg_prob) > config.fg_threshold)
    d = np.asarray(dist, dtype=np.float32)
    seeds, n = ndi.label((d > config.marker_threshold) & fg)
    if n:
        size = np.bincount(seeds.ravel(), minlength=n + 1)
        small = size < config.min_marker_px
        small[0] = False
        if small.any():
            seeds[small[seeds]] = 0
    labels = watershed(-d, seeds, mask=fg)
    # foreground components the markers did not reach become one nucleus each
    rest, m = ndi.label(fg & (labels == 0))
    if m:
        off = int(labels.max())
        labels = np.where(rest > 0, rest + off, labels)
    n = int(labels.max())
    if n == 0:
        return labels.astype(np.int32)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= max(1, min_area_px)
    if max_area_px is not None:
        keep &= area <= max_area_px
    keep[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


# --------------------------------------------------------------------------- inference

#: Mean and spread the network's RGB input (0-255, Reinhard-normalised) is scaled by.
_IN_MEAN, _IN_STD = 160.0, 60.0


#: Side (px at the model's resolution) of the pieces a large image is run in: the network's
#: throughput falls with the side of its input, as the activations leave the cache (one
#: thread, bf16: 5.0 MP/s at 512 px, 3.4 at 1024, 2.7 at 2184).
PIECE_PX = 512


def predict_maps(net: Any, rgb: np.ndarray, divisor: int, bf16: bool = False,
                 piece_px: int | None = None, overlap_px: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probability and normalised distance (float32, (h, w)) of one RGB image.

    The image (0-255, at the model's resolution) is edge-padded at its bottom and right to a
    multiple of ``divisor``; the pad is cut off again. It runs on the network's device
    (a GPU worker's CUDA device, see :func:`load_unet`); ``bf16`` autocasts there.

    With ``piece_px``, an image larger than that is run in pieces of that side (a multiple
    of ``divisor``), each read with ``overlap_px`` more on every side (at least the
    receptive radius, rounded up to ``divisor``) and only its centre kept: the same maps as
    one pass, in less time, since the activations of a small piece stay in the cache.
    """
    a = np.asarray(rgb, dtype=np.float32)
    h, w = a.shape[:2]
    ph, pw = -h % divisor, -w % divisor
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")
    if piece_px is None or max(a.shape[:2]) <= piece_px + 2 * overlap_px:
        y = _forward(net, a, bf16)
        return np.ascontiguousarray(y[0, :h, :w]), np.ascontiguousarray(y[1, :h, :w])
    if piece_px % divisor or overlap_px % divisor:
        raise InvalidInputError(f"piece_px and overlap_px must be multiples of {divisor}")
    H, W = a.shape[:2]
    out = np.empty((2, H, W), np.float32)
    for y0 in range(0, H, piece_px):
        for x0 in range(0, W, piece_px):
            y1, x1 = min(y0 + piece_px, H), min(x0 + piece_px, W)
            ry0, rx0 = max(0, y0 - overlap_px), max(0, x0 - overlap_px)
            ry1, rx1 = min(H, y1 + overlap_px), min(W, x1 + overlap_px)
            y = _forward(net, a[ry0:ry1, rx0:rx1], bf16)
            out[:, y0:y1, x0:x1] = y[:, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
    return np.ascontiguousarray(out[0, :h, :w]), np.ascontiguousarray(out[1, :h, :w])


def _forward(net: Any, a: np.ndarray, bf16: bool) -> np.ndarray:
    """Sigmoid of the network's two outputs (2, h, w) for one float32 image (h, w, 3)."""
    torch = _torch()
    dev = next(net.parameters()).device
    # copied into a fresh channels-last tensor: a view of the numpy array with a batch
    # axis added has a batch stride of 0 or 3, which convolution does not take as
    # channels-last, and the whole network then ran in NCHW, 3x slower on one core
    x = torch.empty((1, 3, a.shape[0], a.shape[1]), memory_format=torch.channels_last)
    x.copy_(torch.from_numpy((a - _IN_MEAN) / _IN_STD).permute(2, 0, 1)[None])
    if dev.type != "cpu":
        x = x.to(dev, non_blocking=True)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        y = net(x)
    return torch.sigmoid(y.float())[0].cpu().numpy()


def receptive_radius_px(net: Any, divisor: int, size: int = 128) -> int:
    """Radius (px at the model's resolution) of the network's receptive field, measured.

    Zero image vs the same with one bright pixel at the centre: the farthest output pixel
    that changes (StarDist's ``_compute_receptive_field``), rounded up.
    """
    torch = _torch()
    size = -(-size // divisor) * divisor
    z = torch.zeros(1, 3, size, size, device=next(net.parameters()).device)
    imp = z.clone()
    c = size // 2
    imp[0, :, c, c] = 1.0
    with torch.inference_mode():
        d = (net(imp) - net(z)).abs().amax(dim=1)[0].cpu().numpy()
    ys, xs = np.nonzero(d > 0)
    if ys.size == 0:
        return 0
    return int(math.ceil(max(np.abs(ys - c).max(), np.abs(xs - c).max())))


def _resample(a: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """``a`` (h, w[, c]) resampled to ``shape`` (bilinear by default)."""
    if a.shape[:2] == tuple(shape):
        return a
    zoom = (shape[0] / a.shape[0], shape[1] / a.shape[1]) + (1,) * (a.ndim - 2)
    out = ndi.zoom(np.asarray(a, np.float32), zoom, order=order, mode="nearest",
                   grid_mode=True)
    return out[: shape[0], : shape[1]]


class UNetSegmenter:
    """A loaded U-Net with its configuration: labels nuclei in working-resolution RGB."""

    def __init__(self, net: Any, config: UNetConfig, record: dict | None = None,
                 bf16: bool = False) -> None:
        self.net = fuse_for_inference(net)
        self.config, self.record, self.bf16 = config, record or {}, bf16
        self._radius: int | None = None

    @property
    def receptive_radius_um(self) -> float:
        """The measured receptive-field radius in µm."""
        if self._radius is None:
            self._radius = receptive_radius_px(self.net, self.config.divisor)
        return self._radius * self.config.mpp

    def maps(self, rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
        """Foreground and distance maps of Reinhard-normalised RGB at ``mpp`` µm/px, on the
        same grid (resampled to the model's µm/px and back when they differ by > 2 %)."""
        h, w = rgb.shape[:2]
        r = mpp / self.config.mpp
        if abs(r - 1.0) > 0.02:
            shape = (max(1, round(h * r)), max(1, round(w * r)))
            fg, d = predict_maps(self.net, _resample(rgb, shape), self.config.divisor,
                                 self.bf16, **self._pieces())
            return _resample(fg, (h, w)), _resample(d, (h, w))
        return predict_maps(self.net, rgb, self.config.divisor, self.bf16, **self._pieces())

    def _pieces(self) -> dict[str, int | None]:
        """How :func:`predict_maps` cuts large images: pieces on the CPU (cache), one pass
        on a GPU."""
        if next(self.net.parameters()).device.type != "cpu":
            return {"piece_px": None, "overlap_px": 0}
        div = self.config.divisor
        r = int(math.ceil(self.receptive_radius_um / self.config.mpp))
        return {"piece_px": PIECE_PX - PIECE_PX % div, "overlap_px": -(-r // div) * div}

    def label(self, rgb: np.ndarray, mpp: float, min_area_px: int = 1,
              max_area_px: int | None = None) -> np.ndarray:
        """Instance labels (int32) of Reinhard-normalised RGB (0-255) at ``mpp`` µm/px."""
        fg, d = self.maps(rgb, mpp)
        return instances_from_maps(fg, d, self.config, min_area_px, max_area_px)


def adapt_batch_norm(net: Any, patches: np.ndarray, batch: int = 16) -> Any:
    """Re-estimate ``net``'s batch-norm statistics on real patches, in place (AdaBN).

    A U-Net trained on synthetic patches keeps their feature statistics; on real tissue the
    activations are distributed otherwise. Replacing each batch norm's running mean and
    variance by their average over real, unlabelled patches (no weight changes) adapts it
    at the cost of forward passes: +0.002 to +0.011 AJI on unseen MoNuSeg images in 3 seeds.

    Parameters
    ----------
    net : the training-form U-Net (not :func:`fuse_for_inference`'s)
    patches : ndarray of uint8, shape (n, s, s, 3)
        Reinhard-normalised real patches at the model's resolution, ``s`` a multiple of the
        network's divisor.
    batch : int

    Returns
    -------
    The same network, in eval mode.
    """
    torch = _torch()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = np.asarray(patches)
    if x.ndim != 4 or x.shape[3] != 3 or len(x) == 0:
        raise InvalidInputError(f"expected patches (n, s, s, 3), got {x.shape}")
    if not bns:
        return net
    dev = next(net.parameters()).device
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
    net.train()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = torch.from_numpy((x[i:i + batch].astype(np.float32) - _IN_MEAN) / _IN_STD)
                xb = xb.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
                net(xb.to(dev))
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        net.eval()
    return net


# --------------------------------------------------------------------------- files


def default_model_path() -> Path:
    """The U-Net that ships in the package (trained by ``slidecensus segmenter train``)."""
    return Path(__file__).resolve().parent / "weights" / "unet-default.pt"


def save_unet(net: Any, config: UNetConfig, path: str | Path, record: dict | None = None
              ) -> Path:
    """Write the weights, the configuration and how it was trained (weights-only readable)."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    payload = {"config": config.to_dict(), "weights": state, "record": record or {}}
    return save_weights_file(payload, path, UNET_FORMAT, UNET_FORMAT_VERSION)


def rewrite_unet_config(path: str | Path, out: str | Path, **changes: Any) -> Path:
    """A copy of a U-Net file with some configuration fields changed: the same weights and
    record (e.g. ``min_relative_iod_um2=0`` for a model without its object filter)."""
    data = load_weights_file(path, UNET_FORMAT, UNET_FORMAT_VERSION, ("config", "weights"),
                             "U-Net segmenter")
    config = UNetConfig.from_dict(dict(data["config"]))
    net = _build(config)
    net.load_state_dict(data["weights"])
    new = UNetConfig.from_dict({**config.to_dict(), **changes})
    return save_unet(net, new, out, dict(data.get("record") or {}))


def file_sha256(path: str | Path) -> str:
    """Content hash of a model file (recorded in the manifest: a retrained file recomputes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_unet(path: str | Path | None = None, bf16: bool = False,
              device: str | None = None) -> UNetSegmenter:
    """Read a U-Net file with ``weights_only=True`` (None: the shipped default), ready for
    inference on ``device`` (None: CUDA where the process sees a GPU, else the CPU).

    Raises
    ------
    CheckpointError
        In one line, for a missing, damaged or foreign file, or weights that do not fit the
        configuration they came with.
    """
    path = default_model_path() if path is None else Path(path)
    data = load_weights_file(path, UNET_FORMAT, UNET_FORMAT_VERSION, ("config", "weights"),
                             "U-Net segmenter")
    try:
        config = UNetConfig.from_dict(dict(data["config"]))
        net = _build(config)
        net.load_state_dict(data["weights"])
    except Exception as exc:  # wrong shapes, missing keys, bad config values
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise CheckpointError(path, f"weights do not fit the U-Net configuration "
                                    f"({type(exc).__name__}: {first[:200]})") from exc
    net.eval()
    torch = _torch()
    net = net.to(memory_format=torch.channels_last)
    seg = UNetSegmenter(net, config, dict(data.get("record") or {}), bf16=bf16)
    dev = torch.device(unet_device() if device is None else device)
    if dev.type != "cpu":
        seg.net = seg.net.to(dev)
    return seg


def unet_device() -> str:
    """Where the U-Net runs in this process: ``cuda`` when torch sees a GPU, else ``cpu``."""
    return "cuda" if _torch().cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def cached_unet(path: str, sha256: str = "", bf16: bool = False,
                device: str | None = None) -> UNetSegmenter:
    """:func:`load_unet` once per process, file and device (workers segment many tiles
    with it)."""
    return load_unet(path or None, bf16=bf16, device=device)


# --------------------------------------------------------------------------- training


@dataclass
class TrainLog:
    """What one training run did (kept in the weights file's ``record``)."""

    iterations: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def train_unet(
    rgb: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    config: UNetConfig = UNetConfig(),
    iterations: int = 1500,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[Any, TrainLog]:
    """Train a U-Net on patches and their instance labels.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (n, s, s, 3)
        Patches (synthetic), Reinhard-normalised colours.
    labels : ndarray of int, shape (n, s, s)
        Their instance labels.
    weights : ndarray of float, shape (n,), optional
        Importance of each patch (mean 1; :func:`~.importance.importance_weights`); each
        patch's loss is multiplied by it. None: all 1.
    config : UNetConfig
    iterations, batch, lr, seed : training length, batch size, Adam's rate (cosine decay),
        and the seed of the initial weights and the batch order.
    max_seconds : float, optional
        Stop early after this much wall time.
    progress : callable, optional
        ``progress(iteration, iterations, loss)`` every 50 iterations.

    Returns
    -------
    (net, TrainLog)
        The network in eval mode, channels-last.
    """
    torch = _torch()
    x = np.asarray(rgb)
    if x.ndim != 4 or x.shape[3] != 3 or labels.shape != x.shape[:3]:
        raise InvalidInputError(f"expected patches (n, s, s, 3) and labels (n, s, s), got "
                                f"{x.shape} and {np.shape(labels)}")
    if x.shape[1] % config.divisor or x.shape[2] % config.divisor:
        raise InvalidInputError(f"patch side must be a multiple of {config.divisor}, got "
                                f"{x.shape[1]}")
    n = len(x)
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or (w < 0).any():
        raise InvalidInputError(f"expected {n} finite non-negative patch weights")
    tg = np.empty((n, 2) + x.shape[1:3], np.float32)
    for i in range(n):
        tg[i, 0], tg[i, 1] = distance_targets(labels[i])
    torch.manual_seed(seed)
    net = _build(config)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, iterations),
                                                pct_start=0.1)
    xs = torch.from_numpy((x.astype(np.float32) - _IN_MEAN) / _IN_STD).permute(0, 3, 1, 2)
    ts = torch.from_numpy(tg)
    ws = torch.from_numpy(w)
    rng = np.random.default_rng(seed)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    log = TrainLog()
    t0 = time.perf_counter()
    net.train()
    order = rng.permutation(n)
    pos = 0
    for it in range(iterations):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = torch.from_numpy(order[pos:pos + batch])
        pos += batch
        xb, tb, wb = xs[idx], ts[idx], ws[idx]
        k = int(rng.integers(4))
        if k:
            xb, tb = torch.rot90(xb, k, (2, 3)), torch.rot90(tb, k, (2, 3))
        if rng.random() < 0.5:
            xb, tb = xb.flip(3), tb.flip(3)
        xb = xb.contiguous(memory_format=torch.channels_last)
        out = net(xb)
        per = (bce(out[:, 0], tb[:, 0], reduction="none").mean(dim=(1, 2))
               + 2.0 * bce(out[:, 1], tb[:, 1], reduction="none").mean(dim=(1, 2)))
        loss = (per * wb).sum() / wb.sum().clamp_min(1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.iterations = it + 1
        if it % 50 == 0 or it == iterations - 1:
            log.losses.append(float(loss.detach()))
            if progress is not None:
                progress(it + 1, iterations, float(loss.detach()))
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    log.seconds = time.perf_counter() - t0
    net.eval()
    return net, log
