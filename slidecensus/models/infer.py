"""Inference with a trained cell model: clusters of real crops, D features, generator grids.

Q(c | x) of Hu et al. assigns each real cell crop to one of ``k`` clusters (the argmax);
the probabilities are kept for the census. :func:`load_model` reads a checkpoint once per
process (cached by path, modification time and device) so that census tasks running in
the same worker reuse it; :func:`predict` streams any number of crops in batches.

References
----------
.. [1] B. Hu et al. "Unsupervised Learning for Cell-level Visual Representation in
   Histopathology Images with Generative Adversarial Networks." IEEE JBHI 23(3), 2019.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..hardware import use_bf16
from .checkpoint import CheckpointError, load_checkpoint
from .networks import (
    ColourHistogram,
    CriticHead,
    QHead,
    build_generator,
    build_trunk,
    q_input,
    q_input_dim,
    trunk_dim,
)
from .train import TrainConfig, colour_branch, resolve_device, to_model_input, validate_crops

__all__ = ["CellModel", "d_features", "generation_grid", "load_model", "predict",
           "write_png"]


@dataclass(eq=False)
class CellModel:
    """A trained model in evaluation mode on one device.

    Attributes
    ----------
    config : TrainConfig
        The configuration it was trained with (``k``, ``z_dim``, ``width``...).
    summary : dict
        Training summary from the checkpoint (iterations, time, seed, versions, history).
    generator, trunk, d_head, q_head : torch.nn.Module
        The networks, in eval mode, on ``device``.
    device : torch.device
    colour : ColourHistogram or None
        The fixed colour branch of Q's input (``config.q_colour``).
    """

    config: TrainConfig
    summary: dict[str, Any]
    generator: torch.nn.Module
    trunk: torch.nn.Module
    d_head: CriticHead
    q_head: QHead
    device: torch.device
    colour: ColourHistogram | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def k(self) -> int:
        """Number of clusters."""
        return self.config.k

    @classmethod
    def from_checkpoint(cls, path: str | Path,
                        device: str | torch.device | None = None) -> CellModel:
        """Build a model from a checkpoint file without caching (see :func:`load_model`)."""
        data = load_checkpoint(path)
        cfg = TrainConfig.from_dict(data["config"])
        dev = resolve_device(device)
        w = data["weights"]
        dim = trunk_dim(cfg.arch, cfg.width)
        g = build_generator(cfg.arch, cfg.k, cfg.z_dim, cfg.width)
        g.load_state_dict(w["G"])
        trunk = build_trunk(cfg.arch, cfg.width)
        trunk.load_state_dict(w["D_trunk"])
        d_head = CriticHead(dim)
        d_head.load_state_dict(w["D_head"])
        q_head = QHead(q_input_dim(cfg.arch, cfg.width, cfg.q_colour), cfg.k,
                       norm=cfg.q_norm, hidden=dim)
        q_head.load_state_dict(w["Q_head"])
        mods = [m.to(dev).eval().requires_grad_(False) for m in (g, trunk, d_head, q_head)]
        colour = colour_branch(cfg, dev)
        return cls(cfg, data["summary"], *mods, device=dev, colour=colour)


_CACHE: dict[tuple[str, int, str], CellModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(path: str | Path, device: str | torch.device | None = None) -> Any:
    """Load a checkpoint once per process and device; later calls return the same object.

    The cache key includes the file's modification time, so a retrained model at the same
    path is reloaded. An InfoGAN checkpoint gives a :class:`CellModel`, a guided one
    (``slidecensus.guided``) a :class:`~.guided.GuidedModel` (always on the CPU).

    Raises
    ------
    CheckpointError
        Missing file, foreign file, or incompatible format version.
    """
    path = Path(path).resolve()
    dev = resolve_device(device)
    mtime = path.stat().st_mtime_ns if path.exists() else -1
    key = (str(path), mtime, str(dev))
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = _from_checkpoint(path, dev)
            _CACHE[key] = model
    return model


def _from_checkpoint(path: Path, dev: torch.device) -> Any:
    """The model of either kind of cell-model checkpoint, told apart by its format."""
    from .guided import GUIDED_FORMAT, GuidedModel

    try:
        return CellModel.from_checkpoint(path, dev)
    except CheckpointError as exc:
        if f"found {GUIDED_FORMAT!r}" not in exc.reason:
            raise
    return GuidedModel.from_checkpoint(path)


def _autocast(model: CellModel) -> contextlib.AbstractContextManager:
    cfg = model.config
    if use_bf16(model.device.type, cfg.amp, cfg.amp_cpu):
        return torch.autocast(model.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(crops: np.ndarray, batch_size: int, device: torch.device):
    pin = device.type == "cuda"
    for start in range(0, len(crops), batch_size):
        t = torch.from_numpy(crops[start:start + batch_size])
        if pin:
            t = t.pin_memory()
        yield to_model_input(t.to(device, non_blocking=True))


def predict(model: CellModel, crops: np.ndarray,
            batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Cluster real crops with Q: argmax cluster and the probabilities Q(c | x).

    Parameters
    ----------
    model : CellModel
    crops : ndarray of uint8, shape (N, 32, 32, 3)
        N may be 0; large N is streamed ``batch_size`` crops at a time.
    batch_size : int
        Crops per forward pass.

    Returns
    -------
    clusters : ndarray of int64, shape (N,)
    probs : ndarray of float32, shape (N, k)
        Rows sum to 1.
    """
    crops = np.asarray(crops)
    if getattr(model, "guided", False):  # a guided model: its head's class probabilities
        from .guided import predict_guided

        return predict_guided(model, crops, batch_size=min(batch_size, 1024))[:2]
    if len(crops) == 0 and crops.shape[1:] == (32, 32, 3):
        return np.zeros(0, np.int64), np.zeros((0, model.k), np.float32)
    crops = validate_crops(crops)
    probs = np.empty((len(crops), model.k), np.float32)
    pos = 0
    with model.lock, torch.inference_mode(), _autocast(model):
        for x in _batches(crops, batch_size, model.device):
            p = F.softmax(model.q_head(q_input(model.trunk, x, model.colour)).float(), dim=1)
            probs[pos:pos + len(p)] = p.cpu().numpy()
            pos += len(p)
    return probs.argmax(axis=1).astype(np.int64), probs


def d_features(model: CellModel, crops: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Critic features of Hu et al.'s Table I: every block's output max-pooled to 4 x 4 and
    concatenated, float32 (4 * 16 * width columns for the paper's trunk).

    These feed a linear SVM where labels exist (the evaluation lives outside this package).
    """
    crops = validate_crops(crops)
    parts = []
    with model.lock, torch.inference_mode(), _autocast(model):
        for x in _batches(crops, batch_size, model.device):
            parts.append(model.trunk.table1_features(x).float().cpu().numpy())
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(parts)


def generation_grid(model: CellModel, n_rows: int = 8, seed: int = 0,
                    pad: int = 2) -> np.ndarray:
    """G's samples as one RGB image: rows share z, columns share the code c (Hu et al.,
    Fig. 3), so each column shows what one cluster looks like.

    Returns
    -------
    ndarray of uint8, shape (n_rows * (32 + pad) + pad, k * (32 + pad) + pad, 3)
        White padding between the tiles.
    """
    k, zd = model.k, model.config.z_dim
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, zd, generator=gen).repeat_interleave(k, dim=0)
    c = torch.arange(k).repeat(n_rows)
    with model.lock, torch.inference_mode():
        img = model.generator(z.to(model.device), F.one_hot(c, k).float().to(model.device))
    tiles = ((img.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    tiles = tiles.permute(0, 2, 3, 1).numpy().reshape(n_rows, k, 32, 32, 3)
    s = 32 + pad
    grid = np.full((n_rows * s + pad, k * s + pad, 3), 255, np.uint8)
    for r in range(n_rows):
        for j in range(k):
            grid[pad + r * s: pad + r * s + 32, pad + j * s: pad + j * s + 32] = tiles[r, j]
    return grid


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 RGB image as PNG (imagecodecs, imported only here)."""
    import imagecodecs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(image, dtype=np.uint8)))
    return path
