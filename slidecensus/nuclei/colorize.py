"""Yuan & Suh's neural stain normaliser: colourise grey levels in the target lab's style.

A compact network after Iizuka et al. and Yuan & Suh: a grey-level encoder (strides 2, 4,
8), a global feature branch (image-level context, pooled to one vector), a fusion layer
and a colourising decoder. It reads the CIE lightness L of an image, standardised by the
slide's own tissue statistics, and predicts the chroma a and b at a quarter of the
resolution (chroma is smooth), upsampled bilinearly. The output keeps the input's L, so the
structure of the image cannot change; only its colours move to the target's.

Trained on patches of the target style alone (:func:`train_colorizer`): any input reduced to
its grey levels then comes out in that style. For tiling:

- the global vector is computed **once per slide** (:func:`fit_neural`) from patches of the
  slide and given to every tile, as the Reinhard statistics are;
- the tile halo is the network's receptive field, measured from the gradient of one output
  pixel (StarDist's method), and tiles start on multiples of the network's stride, so tiled
  equals whole.

References
----------
.. [1] H. Yuan, S. Suh, "Neural stain normalization and unsupervised classification of cell
   nuclei in histopathological breast cancer images", arXiv:1811.03815, 2018.
.. [2] S. Iizuka, E. Simo-Serra, H. Ishikawa, "Let there be color!", ACM TOG 35(4), 2016.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..hardware import cpu_bf16_native
from ..weightsfile import CheckpointError, load_weights_file, save_weights_file
from .normalize import StainTarget, cielab_to_rgb, rgb_to_cielab, stain_target
from .stain import tissue_pixels

__all__ = [
    "COLORIZER_FORMAT",
    "DEFAULT_LIGHTNESS",
    "LIGHTNESS",
    "Colorizer",
    "ColorizerConfig",
    "NeuralNormalizer",
    "colorize",
    "fit_neural",
    "lightness_fraction",
    "load_colorizer",
    "receptive_field",
    "save_colorizer",
    "train_colorizer",
]

log = logging.getLogger(__name__)

COLORIZER_FORMAT = "slidecensus.colorizer"
COLORIZER_VERSION = 1
#: The network's total stride: tiles start on multiples of it.
STRIDE = 8
#: What happens to the input's lightness: ``keep`` it (Yuan & Suh: the structure cannot
#: change), or ``match`` its tissue mean and spread to the target's (linear, so the
#: structure is kept but the tones move: closer histograms, lower SSIM to the input), or a
#: fraction between the two (``0.75``: three quarters of the way to the match).
LIGHTNESS = ("keep", "match")
#: The default: three quarters of the way. On MoNuSeg (benchmarks/bench_normalize) keeping
#: L left the histograms further from the target than the raw images (correlation 0.23 vs
#: 0.29, dark target) and matching it fully cost SSIM (0.86); 0.75 was closer than Macenko
#: on both targets measured and than Reinhard on the median-lightness one, at SSIM >= 0.92.
DEFAULT_LIGHTNESS = "0.75"


def lightness_fraction(value: str | float) -> float:
    """``keep`` = 0, ``match`` = 1, or a number from 0 to 1; anything else is refused."""
    if value in LIGHTNESS:
        return float(LIGHTNESS.index(value))
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0.0 <= f <= 1.0:
        raise InvalidInputError(f"lightness must be keep, match or a fraction from 0 to 1, "
                                f"got {value!r}")
    return f
#: Scale of the predicted chroma (the head's output times this, plus the target's mean).
AB_SCALE = 32.0


@dataclass(frozen=True)
class ColorizerConfig:
    """Network and training settings of the colourising normaliser (saved with it)."""

    width: int = 16
    global_dim: int = 32
    patch: int = 128
    batch: int = 16
    iterations: int = 1500
    lr: float = 2e-3
    gamma_jitter: float = 0.3  # log-uniform gamma on L/100, so other labs' tones are covered
    contrast_jitter: float = 0.2  # of the standardised L
    amp_cpu: bool = True  # bf16 autocast on CPU for training (inference stays fp32: bf16
    # moved single pixels by up to 13 grey levels for a 9 % gain, benchmarks/bench_normalize)
    seed: int = 0


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # batch norm, not group or instance norm: in eval mode it is per pixel, so tiles agree
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Colorizer(nn.Module):
    """Grey-level encoder, global branch, fusion and decoder; L in, (a, b) out."""

    def __init__(self, width: int = 16, global_dim: int = 32) -> None:
        super().__init__()
        w = width
        self.enc1 = _block(1, w, 2)                                       # 1/2
        self.enc2 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))  # 1/4
        self.enc3 = nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w),
                                  _block(4 * w, 4 * w, dilation=2))      # 1/8
        self.glob = nn.Sequential(_block(4 * w, 4 * w, 2), _block(4 * w, 4 * w, 2))
        self.glob_fc = nn.Sequential(nn.Linear(4 * w, global_dim), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(nn.Conv2d(4 * w + global_dim, 4 * w, 1), nn.ReLU(inplace=True))
        self.dec = nn.Sequential(_block(6 * w, 2 * w), _block(2 * w, 2 * w))
        self.head = nn.Conv2d(2 * w, 2, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features at 1/4 and 1/8 of the input's resolution."""
        f4 = self.enc2(self.enc1(x))
        return f4, self.enc3(f4)

    def global_vector(self, f8: torch.Tensor) -> torch.Tensor:
        """Image-level context: the global branch pooled over the image (batch, global_dim)."""
        return self.glob_fc(self.glob(f8).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """(a, b) at the input's resolution (in units of :data:`AB_SCALE`, centred on the
        target's mean). ``g``: a fixed global vector (the slide's); default the input's own."""
        f4, f8 = self.encode(x)
        if g is None:
            g = self.global_vector(f8)
        gmap = g.to(f8.dtype)[:, :, None, None].expand(-1, -1, f8.shape[2], f8.shape[3])
        h = self.fuse(torch.cat([f8, gmap], dim=1))
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        h = self.dec(torch.cat([h, f4], dim=1))
        ab = self.head(h)
        return F.interpolate(ab, scale_factor=4, mode="bilinear", align_corners=False)


def receptive_field(model: Colorizer, size: int = 256) -> int:
    """Radius (px) of the input that one output pixel depends on, measured from the
    gradient of the centre pixel with respect to the input (StarDist's approach)."""
    net = model.float().eval()
    # a random input (on zeros every ReLU sits at its kink and passes no gradient)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, size, size, generator=gen).requires_grad_(True)
    g = torch.rand(1, net.glob_fc[0].out_features, generator=gen)
    out = net(x, g)
    c = size // 2
    out[0, :, c, c].sum().backward()
    nz = torch.nonzero(x.grad[0, 0].abs() > 0)
    if len(nz) == 0:
        return STRIDE
    r = int(max((nz[:, 0] - c).abs().max(), (nz[:, 1] - c).abs().max()))
    if r >= c - 1:
        return receptive_field(model, 2 * size)
    return r


def _standardise(lum: np.ndarray, l_mean: float, l_std: float) -> np.ndarray:
    return ((np.asarray(lum, np.float32) - np.float32(l_mean)) / np.float32(l_std)).astype(
        np.float32)


def _tissue_l_stats(lum: np.ndarray, rgb: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of L over the tissue pixels (all pixels if < 100)."""
    m = tissue_pixels(rgb)
    v = lum[m] if m.sum() >= 100 else lum.reshape(-1)
    return float(v.mean()), float(max(v.std(), 1e-3))


# --- training ----------------------------------------------------------------------------


def _patch_sampler(images: Sequence[np.ndarray], patch: int, rng: np.random.Generator):
    """Draws (L, a, b) patches of ``patch`` px from the images, tissue-weighted, flipped and
    rotated at random. Images smaller than a patch are padded by reflection."""
    labs = []
    for im in images:
        im = np.asarray(im)[..., :3]
        if min(im.shape[:2]) < patch:
            py, px = max(0, patch - im.shape[0]), max(0, patch - im.shape[1])
            im = np.pad(im, ((0, py), (0, px), (0, 0)), mode="reflect")
        labs.append(rgb_to_cielab(im))
    area = np.array([lab.shape[0] * lab.shape[1] for lab in labs], dtype=np.float64)

    def draw(n: int) -> np.ndarray:
        out = np.empty((n, 3, patch, patch), dtype=np.float32)
        for i, j in enumerate(rng.choice(len(labs), n, p=area / area.sum())):
            lab = labs[j]
            y = rng.integers(lab.shape[0] - patch + 1)
            x = rng.integers(lab.shape[1] - patch + 1)
            p = lab[y:y + patch, x:x + patch]
            p = np.rot90(p, rng.integers(4))
            out[i] = (p[:, ::-1] if rng.random() < 0.5 else p).transpose(2, 0, 1)
        return out

    return labs, draw


def _amp(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" or (enabled and cpu_bf16_native()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_colorizer(images: Sequence[np.ndarray], config: ColorizerConfig | None = None, *,
                    name: str = "target", device: str | None = None,
                    progress: Callable[[int, int, float], None] | None = None
                    ) -> dict[str, Any]:
    """Train the colouriser on images of the target style; returns the model's payload
    (what :func:`save_colorizer` writes and :func:`load_colorizer` reads).

    Parameters
    ----------
    images : sequence of ndarray (h, w, 3)
        Patches or whole images of the reference style, 0-255.
    config : ColorizerConfig, optional
    name : str
        The target's name, recorded.
    device : str, optional
        ``cuda`` when available, else ``cpu`` (default).
    progress : callable, optional
        ``progress(iteration, iterations, loss)`` every 50 iterations.
    """
    cfg = ColorizerConfig() if config is None else config
    images = [np.asarray(im) for im in images]
    if not images:
        raise InvalidInputError("no target images to train the neural normaliser on")
    target = stain_target(images, name=name)  # refuses grey-level targets
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labs, draw = _patch_sampler(images, cfg.patch, rng)
    stats = [_tissue_l_stats(rgb_to_cielab(im[..., :3])[..., 0], im[..., :3]) for im in images]
    l_mean = float(np.mean([s[0] for s in stats]))
    l_std = float(np.mean([s[1] for s in stats]))
    ab_mean = [float(np.mean([lab[..., c].mean() for lab in labs])) for c in (1, 2)]
    net = Colorizer(cfg.width, cfg.global_dim).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations,
                                                pct_start=0.1)
    abm = torch.tensor(ab_mean, device=dev)[None, :, None, None]
    t0, loss_avg = time.perf_counter(), float("nan")
    net.train()
    for it in range(cfg.iterations):
        p = draw(cfg.batch)
        lum = p[:, 0]
        # tone jitter of the grey input: other labs' slides are lighter, darker, flatter
        gam = np.exp(rng.uniform(-cfg.gamma_jitter, cfg.gamma_jitter, (cfg.batch, 1, 1)))
        lum = 100.0 * np.clip(lum / 100.0, 0.0, 1.0) ** gam
        x = _standardise(lum, l_mean, l_std)
        x = x * rng.uniform(1 - cfg.contrast_jitter, 1 + cfg.contrast_jitter, (cfg.batch, 1, 1))
        xt = torch.from_numpy(x.astype(np.float32))[:, None].to(dev)
        ab = (torch.from_numpy(p[:, 1:]).to(dev) - abm) / AB_SCALE
        with _amp(dev, cfg.amp_cpu):
            pred = net(xt)
        loss = F.smooth_l1_loss(pred.float(), ab, beta=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        v = float(loss.detach())
        loss_avg = v if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * v
        if progress is not None and (it + 1) % 50 == 0:
            progress(it + 1, cfg.iterations, loss_avg)
    net.eval()
    secs = time.perf_counter() - t0
    log.info("neural normaliser trained: %d iterations in %.0f s (loss %.4f)",
             cfg.iterations, secs, loss_avg)
    rf = receptive_field(Colorizer(cfg.width, cfg.global_dim).eval())
    return {"config": asdict(cfg),
            "weights": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "target": target.as_dict(), "l_mean": l_mean, "l_std": l_std, "ab_mean": ab_mean,
            "receptive_field_px": rf,
            "summary": {"time_s": secs, "loss": loss_avg, "device": str(dev),
                        "n_images": len(images), "torch": str(torch.__version__)}}


def save_colorizer(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a trained colouriser (weights, settings, target statistics) atomically."""
    return save_weights_file(payload, path, COLORIZER_FORMAT, COLORIZER_VERSION)


@dataclass
class _Loaded:
    net: Colorizer
    payload: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)


_CACHE: dict[tuple[str, float, int], _Loaded] = {}


def load_colorizer(path: str | Path) -> dict[str, Any]:
    """Read a colouriser file (``weights_only=True``); a cell model or other file is refused
    with a one-line :class:`~slidecensus.weightsfile.CheckpointError`."""
    return load_weights_file(path, COLORIZER_FORMAT, COLORIZER_VERSION,
                             ("config", "weights", "target", "l_mean", "l_std"),
                             "neural-normaliser")


def _network(path: str | Path) -> _Loaded:
    """The loaded network of ``path``, cached per process (keyed by path, mtime and size)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise CheckpointError(p, "no such neural-normaliser file") from None
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    hit = _CACHE.get(key)
    if hit is None:
        payload = load_colorizer(p)
        cfg = ColorizerConfig(**payload["config"])
        net = Colorizer(cfg.width, cfg.global_dim)
        try:
            net.load_state_dict(payload["weights"])
        except RuntimeError as exc:
            raise CheckpointError(p, f"weights do not fit the network ({str(exc)[:120]})"
                                  ) from exc
        net.eval()
        hit = _CACHE[key] = _Loaded(net, payload)
    return hit


@dataclass(frozen=True)
class NeuralNormalizer:
    """A slide's fitted neural normaliser: the model file, the slide's L statistics and
    global vector. Picklable (tasks carry it; workers load the network once)."""

    model_path: str
    l_mean: float
    l_std: float
    global_vec: tuple[float, ...]
    halo_px: int
    target: StainTarget
    method: str = "neural"
    amp: bool = False
    tile: int = 1024
    lightness: str | float = DEFAULT_LIGHTNESS
    stride: int = STRIDE

    def __post_init__(self) -> None:
        lightness_fraction(self.lightness)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The normalised image, float32 RGB (0-255); L is the input's."""
        return colorize(rgb, self.model_path, self.l_mean, self.l_std,
                        np.array(self.global_vec, np.float32), halo=self.halo_px,
                        tile=self.tile, amp=self.amp, lightness=self.lightness)


def _net_input(lum: np.ndarray, l_mean: float, l_std: float) -> torch.Tensor:
    return torch.from_numpy(_standardise(lum, l_mean, l_std))[None, None]


def _pad_to(x: torch.Tensor, mult: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % mult, (-w) % mult
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def colorize(rgb: np.ndarray, model_path: str | Path, l_mean: float, l_std: float,
             global_vec: np.ndarray, *, halo: int | None = None, tile: int = 1024,
             amp: bool = False, lightness: str | float = DEFAULT_LIGHTNESS) -> np.ndarray:
    """Colourise ``rgb`` with a trained model, tile by tile; float32 RGB, 0-255.

    Tiles of ``tile`` px (a multiple of the stride) are run with ``halo`` px of context
    (default: the model's receptive field), clipped at the image's edges, so the result
    does not depend on ``tile``. ``lightness``: see :data:`LIGHTNESS`.
    """
    a = np.asarray(rgb)[..., :3]
    if a.ndim != 3:
        raise InvalidInputError(f"expected an RGB image (h, w, 3), got shape {np.shape(rgb)}")
    loaded = _network(model_path)
    payload = loaded.payload
    if halo is None:
        halo = int(payload.get("receptive_field_px", 64))
    halo = -(-halo // STRIDE) * STRIDE
    tile = max(STRIDE, tile - tile % STRIDE)
    lab = rgb_to_cielab(a)
    abm = np.array(payload.get("ab_mean", [0.0, 0.0]), np.float32)
    g = torch.from_numpy(np.asarray(global_vec, np.float32))[None]
    h, w = a.shape[:2]
    out_ab = np.empty((h, w, 2), np.float32)
    with loaded.lock, torch.inference_mode(), _amp(torch.device("cpu"), amp):
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                y0, x0 = max(0, y - halo), max(0, x - halo)
                y1, x1 = min(h, y + tile + halo), min(w, x + tile + halo)
                xin = _pad_to(_net_input(lab[y0:y1, x0:x1, 0], l_mean, l_std), STRIDE)
                pred = loaded.net(xin, g).float()[0].numpy()
                ty1, tx1 = min(h, y + tile), min(w, x + tile)
                out_ab[y:ty1, x:tx1] = pred[:, y - y0:ty1 - y0, x - x0:tx1 - x0].transpose(1, 2, 0)
    lab[..., 1:] = out_ab * np.float32(AB_SCALE) + abm
    frac = lightness_fraction(lightness)
    if frac > 0:
        t_mean, t_std = payload["l_mean"], payload["l_std"]
        lum = (lab[..., 0] - np.float32(l_mean)) * np.float32(t_std / l_std) + np.float32(t_mean)
        lum = lab[..., 0] + np.float32(frac) * (lum - lab[..., 0])
        lab[..., 0] = np.clip(lum, 0.0, 100.0)
    return cielab_to_rgb(lab, keep_lightness=True)


def fit_neural(model_path: str | Path, sample: np.ndarray,
               patches: Sequence[np.ndarray] | None = None, *, amp: bool = False,
               lightness: str | float = DEFAULT_LIGHTNESS, max_patches: int = 16,
               seed: int = 0
               ) -> NeuralNormalizer:
    """Fit a trained colouriser to one slide: its tissue L statistics (from ``sample``, e.g.
    a thumbnail) and its global vector (mean of the global branch over ``patches`` at full
    resolution; default: patches cut from ``sample`` itself)."""
    loaded = _network(model_path)
    payload = loaded.payload
    cfg = ColorizerConfig(**payload["config"])
    s = np.asarray(sample)[..., :3]
    lum = rgb_to_cielab(s)[..., 0]
    l_mean, l_std = _tissue_l_stats(lum, s)
    if patches is None:
        patches = _grid_patches(s, cfg.patch, max_patches, seed)
    feats = []
    with loaded.lock, torch.inference_mode(), _amp(torch.device("cpu"), amp):
        for p in list(patches)[:max_patches]:
            p = np.asarray(p)[..., :3]
            xin = _pad_to(_net_input(rgb_to_cielab(p)[..., 0], l_mean, l_std), STRIDE)
            feats.append(loaded.net.global_vector(loaded.net.encode(xin)[1]).float()[0].numpy())
    gv = np.mean(feats, axis=0) if feats else np.zeros(cfg.global_dim, np.float32)
    return NeuralNormalizer(model_path=str(model_path), l_mean=l_mean, l_std=l_std,
                            global_vec=tuple(float(v) for v in gv),
                            halo_px=-(-int(payload.get("receptive_field_px", 64)) // STRIDE)
                            * STRIDE,
                            target=StainTarget.from_dict(payload["target"]), amp=amp,
                            lightness=lightness)


def _grid_patches(rgb: np.ndarray, patch: int, n: int, seed: int) -> list[np.ndarray]:
    """Up to ``n`` patches of an image, on a grid, the most tissue-rich first (seeded ties)."""
    h, w = rgb.shape[:2]
    if h < patch or w < patch:
        return [rgb]
    ys = np.arange(0, h - patch + 1, patch)
    xs = np.arange(0, w - patch + 1, patch)
    cands = [(int(y), int(x)) for y in ys for x in xs]
    frac = [float(tissue_pixels(rgb[y:y + patch, x:x + patch]).mean()) for y, x in cands]
    order = np.lexsort((np.random.default_rng(seed).random(len(cands)), -np.array(frac)))
    return [rgb[y:y + patch, x:x + patch] for y, x in (cands[i] for i in order[:n])]


def with_tile(norm: NeuralNormalizer, tile: int) -> NeuralNormalizer:
    """The same normaliser run on tiles of ``tile`` px."""
    return replace(norm, tile=tile)
