"""Guided embeddings (Gräbel et al.): labelled cells placed on a map of the lineages.

Where a few hundred cells carry labels, the census can count named types. An *embedding
guide* puts every cell type at a point of a 2-D map (blasts at the centre, each lineage
along its own direction, maturity growing outwards; :func:`default_guide`). A compact CNN
maps each cell's crop (the census' 18 µm window, 64 x 64 px by default) to an embedding
whose first two dimensions are pulled towards its type's guide point
(:func:`guide2d_loss`) while the pairwise distances of a batch's embeddings follow the
guide's (:func:`distance_loss`); the number of dimensions in use grows with the epoch
(:func:`active_dims`). A small classification head on the embedding
(k nearest neighbours, softmax regression or a one-layer MLP, chosen by validation macro
F1) names each cell. Uses torch, numpy and the standard library only.

Checkpoint layout (``GUIDED_FORMAT``, version ``GUIDED_FORMAT_VERSION``)::

    {"format": "slidecensus.guided", "format_version": 1,
     "config": {...GuidedConfig fields, "kind": "guided"},
     "weights": {"net": state_dict, "head": {kind and tensors}},
     "summary": {"best_epoch", "val_macro_f1", "head", "history", "time_s", ...}}

References
----------
.. [1] P. Gräbel, M. Crysandt, R. Herwartz, M. Hoffmann, B. M. Klinkhammer, P. Boor,
   T. H. Brümmendorf, D. Merhof. "Guided Representation Learning for the Classification
   of Hematopoietic Cells." Bildverarbeitung für die Medizin (BVM) 2021 / MICCAI workshop.
"""

from __future__ import annotations

import copy
import importlib.resources
import math
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..hardware import cpu_bf16_native
from ..weightsfile import load_weights_file, save_weights_file
from .augment import AugmentSpec, augment

__all__ = [
    "GUIDED_FORMAT",
    "GUIDED_FORMAT_VERSION",
    "Guide",
    "GuidePoint",
    "GuidedConfig",
    "GuidedModel",
    "GuidedNet",
    "active_dims",
    "check_labels",
    "default_guide",
    "distance_loss",
    "f1_scores",
    "guide2d_loss",
    "load_guide",
    "parse_guide",
    "predict_guided",
    "stratified_split",
    "train_guided",
]

GUIDED_FORMAT = "slidecensus.guided"
#: Bumped whenever the layout or the network definition changes incompatibly.
GUIDED_FORMAT_VERSION = 1
#: The guide file that ships with slidecensus (haematopoietic types, Gräbel et al. Fig. 2).
DEFAULT_GUIDE = "haematopoietic.toml"


# --------------------------------------------------------------------------- the guide


@dataclass(frozen=True)
class GuidePoint:
    """One cell type on the guide map: its point, and optionally its lineage and maturity."""

    name: str
    x: float
    y: float
    lineage: str = ""
    maturity: float = math.nan


@dataclass(frozen=True)
class Guide:
    """The embedding guide: a point per cell type (order = class order of a model)."""

    points: tuple[GuidePoint, ...]
    source: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.points)

    @property
    def xy(self) -> np.ndarray:
        """(n, 2) float64 guide coordinates."""
        return np.array([[p.x, p.y] for p in self.points], np.float64).reshape(-1, 2)

    def subset(self, names: Sequence[str]) -> Guide:
        """The guide restricted to ``names`` (in that order); all must be in the guide."""
        check_labels(names, self)
        by = {p.name: p for p in self.points}
        return Guide(tuple(by[n] for n in names), self.source)

    def lineages(self) -> dict[str, list[GuidePoint]]:
        """Points of each named lineage, by maturity (for drawing the axes)."""
        out: dict[str, list[GuidePoint]] = {}
        for p in self.points:
            if p.lineage:
                out.setdefault(p.lineage, []).append(p)
        return {k: sorted(v, key=lambda p: (math.inf if math.isnan(p.maturity)
                                            else p.maturity, math.hypot(p.x, p.y)))
                for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (for checkpoints and manifests)."""
        return {"source": self.source,
                "points": [[p.name, float(p.x), float(p.y), p.lineage,
                            None if math.isnan(p.maturity) else float(p.maturity)]
                           for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Guide:
        return cls(tuple(GuidePoint(str(n), float(x), float(y), str(lin or ""),
                                    math.nan if m is None else float(m))
                         for n, x, y, lin, m in d["points"]), str(d.get("source", "")))


def parse_guide(text: str, source: str = "<guide>") -> Guide:
    """A guide from TOML text: ``[types.NAME]`` tables with ``x``, ``y`` and optional
    ``lineage`` (string) and ``maturity`` (number). Every problem is one line naming the
    entry, because a silently skipped type would mislabel cells."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"{source}: not valid TOML: {exc}") from None
    types = data.get("types")
    if not isinstance(types, dict) or not types:
        raise InvalidInputError(f"{source}: needs [types.NAME] tables with x and y")
    points = []
    for name, entry in types.items():
        if str(name).strip().isdigit() or not str(name).strip():
            raise InvalidInputError(f"{source}: types.{name}: a type name must not be a "
                                    f"number (p_<number> columns are cluster ids)")
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{source}: types.{name} must be a table with x and y")
        unknown = sorted(set(entry) - {"x", "y", "lineage", "maturity"})
        if unknown:
            raise InvalidInputError(f"{source}: types.{name} has unknown key(s) "
                                    f"{', '.join(unknown)}; expected x, y, lineage, maturity")
        try:
            x, y = float(entry["x"]), float(entry["y"])
        except KeyError as exc:
            raise InvalidInputError(f"{source}: types.{name} lacks {exc.args[0]}") from None
        except (TypeError, ValueError):
            raise InvalidInputError(f"{source}: types.{name}: x and y must be numbers") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InvalidInputError(f"{source}: types.{name}: x and y must be finite")
        lineage = entry.get("lineage", "")
        if not isinstance(lineage, str):
            raise InvalidInputError(f"{source}: types.{name}: lineage must be a string")
        maturity = entry.get("maturity", math.nan)
        if isinstance(maturity, bool) or not isinstance(maturity, int | float):
            raise InvalidInputError(f"{source}: types.{name}: maturity must be a number")
        points.append(GuidePoint(str(name), x, y, lineage, float(maturity)))
    return Guide(tuple(points), source)


def default_guide() -> Guide:
    """The guide that ships with slidecensus (``models/guides/haematopoietic.toml``)."""
    res = importlib.resources.files(__package__).joinpath("guides", DEFAULT_GUIDE)
    return parse_guide(res.read_text(encoding="utf-8"), f"slidecensus:{DEFAULT_GUIDE}")


def load_guide(path: str | Path | None = None) -> Guide:
    """The guide in the TOML file ``path``, or the default guide when None."""
    if path is None:
        return default_guide()
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"{p}: no such guide file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{p}: not a UTF-8 TOML file") from None
    return parse_guide(text, str(p))


def check_labels(labels: Sequence[str], guide: Guide) -> None:
    """Refuse labels the guide does not place, in one line listing them."""
    known = set(guide.names)
    missing = sorted({str(v) for v in labels} - known)
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more"
                                           if len(missing) > 20 else "")
        raise InvalidInputError(f"label(s) not in the guide {guide.source or ''}: {shown} "
                                f"(add them to a --guide TOML file as [types.NAME] x, y)")


# --------------------------------------------------------------------------- losses


def active_dims(epoch: int, n_max: int) -> int:
    """Growing embeddings: dimensions in use in ``epoch`` (0-based),
    ``min(max(epoch, 2), n_max)`` (Gräbel et al.)."""
    if n_max < 2:
        raise InvalidInputError(f"embedding dimensions must be >= 2, got {n_max}")
    return min(max(int(epoch), 2), n_max)


def guide2d_loss(emb: torch.Tensor, target_xy: torch.Tensor,
                 rest_weight: float = 1.0) -> torch.Tensor:
    """L_guide2D: mean L1 distance of the first two dimensions to the guide points, plus
    ``rest_weight`` times the mean Euclidean norm of the remaining dimensions (kept small,
    so the map stays 2-D).

    ``emb`` (B, n) with n >= 2 (inactive dimensions already zero), ``target_xy`` (B, 2).
    """
    l1 = (emb[:, :2] - target_xy).abs().sum(dim=1)
    rest = emb[:, 2:]
    norm = rest.pow(2).sum(dim=1).add(1e-12).sqrt() if rest.shape[1] else torch.zeros_like(l1)
    if rest.shape[1]:
        norm = torch.where(rest.abs().sum(dim=1) > 0, norm, torch.zeros_like(norm))
    return l1.mean() + rest_weight * norm.mean()


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, B), with a zero (and finite) gradient on the diagonal."""
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    return torch.where(d2 > 0, d2.clamp_min(1e-12).sqrt(), torch.zeros_like(d2))


def distance_loss(emb: torch.Tensor, target_xy: torch.Tensor) -> torch.Tensor:
    """The distance loss: mean absolute difference, over all pairs i < j of the batch,
    between the embeddings' distance and their guide points' distance."""
    b = emb.shape[0]
    if b < 2:
        return emb.sum() * 0.0
    iu = torch.triu_indices(b, b, offset=1, device=emb.device)
    de = _pairwise(emb)[iu[0], iu[1]]
    dg = _pairwise(target_xy.to(emb.dtype))[iu[0], iu[1]]
    return (de - dg).abs().mean()


# --------------------------------------------------------------------------- scores


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class F1 (n_classes,) of integer labels; a class absent from both is NaN."""
    yt, yp = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        tp = np.sum((yt == c) & (yp == c))
        denom = np.sum(yt == c) + np.sum(yp == c)
        if denom:
            out[c] = 2 * tp / denom
    return out


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    f = f1_scores(y_true, y_pred, n_classes)
    return float(np.nanmean(f)) if np.isfinite(f).any() else 0.0


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) indices with ``fraction`` of each class held out (at
    least one cell of every class with two or more)."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(fraction * len(idx)))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1) if len(idx) else 0
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


# --------------------------------------------------------------------------- network


class GuidedNet(nn.Module):
    """A compact CNN: a square crop (64 px by default; any size from 16) ->
    ``n_max``-dimensional embedding (and, with ``n_classes``, a linear layer on it for the
    cross-entropy baseline). Three 2 x 2 poolings, then a global mean.

    ``stem`` stages (one convolution at the input resolution, then a 2 x 2 pooling) bring a
    larger crop (64 px: one stage) down to 32 x 32 before the same layers, so the fine
    texture is seen at about the cost of the 32-px network."""

    def __init__(self, n_max: int = 8, width: int = 32, n_classes: int = 0,
                 stem: int = 0) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        c = width
        first: list[nn.Module] = []
        for i in range(stem):
            first += [*block(3 if i == 0 else c, c), nn.MaxPool2d(2)]
        self.features = nn.Sequential(
            *first,
            *block(c if stem else 3, c), *block(c, c), nn.MaxPool2d(2),  # 16 x 16
            *block(c, 2 * c), *block(2 * c, 2 * c), nn.MaxPool2d(2),  # 8 x 8
            *block(2 * c, 4 * c), nn.MaxPool2d(2),                  # 4 x 4
            *block(4 * c, 4 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(4 * c, 128), nn.ReLU(inplace=True),
                                   nn.Linear(128, n_max))
        self.logits = nn.Linear(n_max, n_classes) if n_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, n_max) of crops x (B, 3, 32, 32) in [-1, 1]."""
        return self.embed(self.features(x))


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GuidedConfig:
    """How a guided model is trained (stored in its checkpoint).

    ``loss`` is ``guided`` (L_guide2D + distance loss, growing embeddings) or ``ce``
    (cross-entropy on a linear layer over the same embedding: the baseline). With
    ``w_ce`` > 0 the guided losses also get ``w_ce`` times that cross-entropy on the
    embedding's active dimensions: the map stays anchored to the guide while the
    dimensions beyond the first two separate types the guide places close together.
    An epoch is one pass over the training cells, or ``min_steps_per_epoch`` batches
    when that is more (a few hundred labels: several augmented passes per epoch). With
    ``views`` (1, 2, 4 or 8) the final embeddings (head fit, census) average that many of
    the crop's rotations and mirror images (:data:`VIEW_ORDER`); the census' cost grows
    with it.
    ``classes`` is the class order; ``guide`` the guide restricted to them (as a dict).
    ``crop_mode`` / ``crop_window_um`` / ``stain_norm`` say how the crops were cut, so the
    census cuts them the same way.
    """

    classes: tuple[str, ...] = ()
    guide: dict[str, Any] = field(default_factory=dict)
    loss: str = "guided"
    n_max: int = 8
    width: int = 32
    # 40 epochs, 64-px crops and 8-view averaging: blood macro F1 0.953 (5-fold CV), against
    # 0.932 at 32 px (0.928 with one view, 0.944 at 64 px with one view); docs/benchmarks.md
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    w_guide: float = 1.0
    w_dist: float = 1.0
    w_rest: float = 1.0
    # the cross-entropy term next to the guided losses: blood macro F1 0.911 -> 0.931 on
    # window crops, 0.912 -> 0.930 (w_ce 1) -> 0.941 (w_ce 3) on field crops, 5-fold CV
    # (docs/benchmarks.md)
    w_ce: float = 3.0
    val_fraction: float = 0.2
    min_steps_per_epoch: int = 25
    # 8 views: 64-px blood F1 0.953 against 0.944 with one view, at 8x the census' cost
    views: int = 8
    heads: tuple[str, ...] = ("knn1", "knn5", "knn11", "linear", "mlp")
    seed: int = 0
    amp_cpu: bool = True
    crop_mode: str = "window"
    crop_window_um: float = 18.0
    crop_size: int = 64
    stem: int = 0
    stain_norm: str = "reinhard"
    crop_lab_target: tuple | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 16 <= self.crop_size <= 128:
            problems.append(f"crop_size must be from 16 to 128 px, got {self.crop_size}")
        if self.views not in (1, 2, 4, 8):
            problems.append(f"views must be 1, 2, 4 or 8, got {self.views}")
        if not 0 <= self.stem <= 2:
            problems.append(f"stem must be 0, 1 or 2 stages, got {self.stem}")
        if self.loss not in ("guided", "ce"):
            problems.append(f"loss must be guided or ce, got {self.loss!r}")
        if not (math.isfinite(self.w_ce) and self.w_ce >= 0):
            problems.append(f"w_ce must be a finite number >= 0, got {self.w_ce}")
        if self.n_max < 2:
            problems.append(f"n_max must be >= 2, got {self.n_max}")
        if self.epochs < 1 or self.batch_size < 2 or self.width < 1:
            problems.append("epochs >= 1, batch_size >= 2 and width >= 1 are needed")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        bad = [h for h in self.heads if _head_kind(h) is None]
        if bad or not self.heads:
            problems.append(f"heads must be among knnK, linear, mlp, softmax; got {bad}")
        if problems:
            raise InvalidInputError("; ".join(problems))

    @property
    def uses_logits(self) -> bool:
        """Whether the network has the linear classification layer (``ce``, or the
        guided losses with a cross-entropy term)."""
        return self.loss == "ce" or self.w_ce > 0

    @property
    def k(self) -> int:
        """Number of classes (the census' k)."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"], d["heads"] = list(self.classes), list(self.heads)
        d["kind"] = "guided"
        d["k"] = self.k
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidedConfig:
        names = {f.name for f in fields(cls)}
        kw = {key: v for key, v in d.items() if key in names}
        kw["classes"] = tuple(kw.get("classes", ()))
        kw["heads"] = tuple(kw.get("heads", cls.heads))
        kw.setdefault("crop_size", 32)  # checkpoints from before crop_size was stored
        if "views" not in kw and "tta" in d:  # ... and before views replaced tta
            kw["views"] = 8 if d["tta"] else 1
        if kw.get("crop_lab_target") is not None:
            kw["crop_lab_target"] = tuple(tuple(v) for v in kw["crop_lab_target"])
        return cls(**kw)

    def crop_spec(self) -> dict[str, Any]:
        """How the census must cut crops for this model (``mode``, ``window_um``,
        ``size`` in px)."""
        return {"mode": self.crop_mode, "window_um": float(self.crop_window_um),
                "size": int(self.crop_size)}


# --------------------------------------------------------------------------- heads


def _head_kind(name: str) -> str | None:
    if name in ("linear", "mlp", "softmax"):
        return name
    if name.startswith("knn") and name[3:].isdigit() and int(name[3:]) >= 1:
        return "knn"
    return None


def _fit_head(name: str, emb: torch.Tensor, y: torch.Tensor, n_classes: int,
              seed: int, steps: int = 300) -> dict[str, Any]:
    """A classification head on embeddings ``emb`` (N, d) with labels ``y`` (N,)."""
    kind = _head_kind(name)
    if kind == "knn":
        return {"kind": "knn", "k": int(name[3:]), "emb": emb.clone(), "y": y.clone()}
    if kind == "softmax":
        return {"kind": "softmax"}
    mean, std = emb.mean(0), emb.std(0).clamp_min(1e-6)
    z = (emb - mean) / std
    gen = torch.Generator().manual_seed(seed)
    d = emb.shape[1]
    if kind == "linear":
        params = [torch.zeros(d, n_classes), torch.zeros(n_classes)]
    else:
        h = 64
        params = [torch.randn(d, h, generator=gen) / math.sqrt(d), torch.zeros(h),
                  torch.randn(h, n_classes, generator=gen) / math.sqrt(h),
                  torch.zeros(n_classes)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.03, weight_decay=1e-3)
    head = {"kind": kind, "mean": mean, "std": std}
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(_head_logits({**head, "w": params}, z, normalised=True), y)
        loss.backward()
        opt.step()
    head["w"] = [p.detach().clone() for p in params]
    return head


def _head_logits(head: dict[str, Any], emb: torch.Tensor, normalised: bool = False
                 ) -> torch.Tensor:
    z = emb if normalised else (emb - head["mean"]) / head["std"]
    w = head["w"]
    if head["kind"] == "linear":
        return z @ w[0] + w[1]
    return F.relu(z @ w[0] + w[1]) @ w[2] + w[3]


def _head_proba(head: dict[str, Any], emb: torch.Tensor, n_classes: int,
                net: GuidedNet | None = None) -> torch.Tensor:
    """Class probabilities (N, n_classes) of embeddings ``emb`` under ``head``."""
    kind = head["kind"]
    if kind == "knn":
        ref, ry = head["emb"], head["y"].long()
        k = min(int(head["k"]), len(ref))
        out = torch.zeros(len(emb), n_classes)
        for s in range(0, len(emb), 2048):
            idx = torch.cdist(emb[s:s + 2048], ref).topk(k, largest=False).indices
            votes = F.one_hot(ry[idx], n_classes).float().sum(1)
            out[s:s + 2048] = (votes + 0.01) / (k + 0.01 * n_classes)
        return out
    if kind == "softmax":
        if net is None or net.logits is None:
            raise InvalidInputError("a softmax head needs the network's linear layer")
        return F.softmax(net.logits(emb), dim=1)
    return F.softmax(_head_logits(head, emb), dim=1)


# --------------------------------------------------------------------------- training


#: Memory layout of the guided network's activations: channels-last with bf16 made a
#: forward pass 1.9x and a training step 1.3x faster than NCHW on one core
#: (docs/benchmarks.md, "Guided embeddings").
CL = torch.channels_last


def _to_input(crops_u8: np.ndarray) -> torch.Tensor:
    """uint8 crops (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], channels-last."""
    return torch.from_numpy(np.ascontiguousarray(crops_u8)).permute(0, 3, 1, 2).float() \
        .div_(127.5).sub_(1.0).contiguous(memory_format=CL)


def _mask(n_active: int, n_max: int) -> torch.Tensor:
    m = torch.zeros(n_max)
    m[:n_active] = 1.0
    return m


def _dihedral(x: torch.Tensor, i: int) -> torch.Tensor:
    """The ``i``-th (0-7) of the 8 rotations and mirror images of a batch (B, C, H, W)."""
    x = torch.rot90(x, i % 4, dims=(2, 3))
    return x.flip(3) if i >= 4 else x


#: The dihedral views in the order test-time averaging takes them: the first two are the
#: crop and its vertical mirror, the first four every mirror, all eight every rotation too.
VIEW_ORDER = (0, 6, 2, 4, 1, 7, 3, 5)


def _embed(net: GuidedNet, crops: np.ndarray, n_active: int, amp: bool,
           batch_size: int = 512, views: int = 1) -> torch.Tensor:
    """Embeddings of uint8 crops in eval mode, inactive dimensions zero (float32, CPU):
    the mean over the first ``views`` of the crop's rotations and mirror images
    (:data:`VIEW_ORDER`; a cell's type does not depend on the slide's orientation)."""
    net.eval()
    mask = _mask(n_active, net.embed[-1].out_features)
    parts = []
    with torch.no_grad(), _autocast(amp):
        for s in range(0, len(crops), batch_size):
            x = _to_input(crops[s:s + batch_size])
            e = torch.stack([net(_dihedral(x, i).contiguous(memory_format=CL)).float()
                             for i in VIEW_ORDER[:views]]).mean(0)
            parts.append(e * mask)
    return torch.cat(parts) if parts else torch.zeros(0, len(mask))


def _autocast(amp: bool):
    import contextlib

    if amp and cpu_bf16_native():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_guided(crops: np.ndarray, labels: Sequence[str], config: GuidedConfig,
                 guide: Guide | None = None, out: str | Path | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> GuidedModel:
    """Train a guided embedding and its head on labelled uint8 crops (N, 32, 32, 3).

    A stratified ``val_fraction`` is held out; the epoch with the best validation macro F1
    (5-nearest-neighbour head for ``guided``, the softmax for ``ce``) is kept, then the
    head is chosen among ``config.heads`` by validation macro F1 and refitted on all cells.
    ``progress`` gets a record per epoch. Writes the checkpoint to ``out`` when given.
    """
    t0 = time.perf_counter()
    crops = np.asarray(crops)
    c = config.crop_size
    if crops.ndim != 4 or crops.shape[1:] != (c, c, 3) or crops.dtype != np.uint8:
        raise InvalidInputError(f"crops must be uint8 (N, {c}, {c}, 3) (the config's "
                                f"crop_size), got {crops.dtype} {crops.shape}")
    labels = np.asarray([str(v) for v in labels])
    if len(labels) != len(crops):
        raise InvalidInputError(f"{len(labels)} labels for {len(crops)} crops")
    guide = guide or default_guide()
    classes = tuple(sorted(set(labels.tolist())))
    if len(classes) < 2:
        raise InvalidInputError(f"training needs at least two cell types, got {list(classes)}")
    guide = guide.subset(classes)
    config = replace(config, classes=classes, guide=guide.to_dict())
    n_cls = len(classes)
    y = np.searchsorted(np.array(classes), labels)
    tr, va = stratified_split(y, config.val_fraction, config.seed)
    if len(tr) < 2 or len(va) < 1:
        raise InvalidInputError(f"{len(labels)} labelled cells are too few to hold out a "
                                f"validation split")
    gxy = torch.tensor(guide.xy, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = GuidedNet(config.n_max, config.width, n_cls if config.uses_logits else 0,
                        config.stem).to(memory_format=CL)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = max(-(-len(tr) // config.batch_size), config.min_steps_per_epoch)
    steps = config.epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps,
                                                pct_start=0.15)
    spec = AugmentSpec()
    rng = np.random.default_rng(config.seed)
    ytr = torch.from_numpy(y[tr])
    best = (-1.0, -1, None, 2)
    history = []
    for epoch in range(config.epochs):
        n_act = config.n_max if config.loss == "ce" else active_dims(epoch, config.n_max)
        mask = _mask(n_act, config.n_max)
        net.train()
        # enough passes over a small label set for ``per_epoch`` batches (each pass is
        # seen under new augmentations); the last short batch of a pass is dropped
        reps = -(-per_epoch * config.batch_size // len(tr))
        perm = np.concatenate([rng.permutation(len(tr)) for _ in range(reps)])
        total, nb = 0.0, 0
        for s in range(0, per_epoch * config.batch_size, config.batch_size):
            b = perm[s:s + config.batch_size]
            if len(b) < 2:
                continue
            x = augment(_to_input(crops[tr[b]]), gen, spec).contiguous(memory_format=CL)
            with _autocast(config.amp_cpu):
                emb = net(x)
            emb = emb.float() * mask
            yb = ytr[b]
            if config.loss == "ce":
                loss = F.cross_entropy(net.logits(emb), yb)
            else:
                t = gxy[yb]
                loss = (config.w_guide * guide2d_loss(emb, t, config.w_rest)
                        + config.w_dist * distance_loss(emb, t))
                if config.w_ce > 0:
                    loss = loss + config.w_ce * F.cross_entropy(net.logits(emb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            nb += 1
        e_tr = _embed(net, crops[tr], n_act, config.amp_cpu)
        e_va = _embed(net, crops[va], n_act, config.amp_cpu)
        with torch.no_grad():
            head = (_fit_head("softmax", e_tr, ytr, n_cls, config.seed)
                    if config.loss == "ce" else _fit_head("knn5", e_tr, ytr, n_cls,
                                                          config.seed))
            pred = _head_proba(head, e_va, n_cls, net).argmax(1).numpy()
        f1 = _macro_f1(y[va], pred, n_cls)
        rec = {"epoch": epoch + 1, "total": config.epochs, "dims": n_act,
               "loss": total / max(nb, 1), "val_macro_f1": f1,
               "time_s": time.perf_counter() - t0}
        history.append(rec)
        if progress is not None:
            progress(dict(rec))
        if f1 >= best[0]:  # ties: the later epoch (further along its schedule)
            best = (f1, epoch + 1, copy.deepcopy(net.state_dict()), n_act)
    net.load_state_dict(best[2])
    n_act = best[3]
    e_all = _embed(net, crops, n_act, config.amp_cpu, views=config.views)
    yall = torch.from_numpy(y)
    heads = [h for h in config.heads if h != "softmax" or config.uses_logits]
    scores = {}
    for h in heads:
        fitted = _fit_head(h, e_all[tr], ytr, n_cls, config.seed)
        with torch.no_grad():
            p = _head_proba(fitted, e_all[va], n_cls, net).argmax(1).numpy()
        scores[h] = _macro_f1(y[va], p, n_cls)
    chosen = max(heads, key=lambda h: (scores[h], -heads.index(h)))
    head = _fit_head(chosen, e_all, yall, n_cls, config.seed)  # refit on every cell
    summary = {"best_epoch": best[1], "val_macro_f1": scores[chosen], "head": chosen,
               "head_scores": scores, "dims": n_act, "n_train": len(tr), "n_val": len(va),
               "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
               "history": history, "time_s": time.perf_counter() - t0,
               "seed": config.seed, "torch": str(torch.__version__)}
    net.eval().requires_grad_(False)
    model = GuidedModel(config, summary, net, head, n_act, torch.device("cpu"))
    if out is not None:
        model.save(out)
    return model


# --------------------------------------------------------------------------- the model


@dataclass(eq=False)
class GuidedModel:
    """A trained guided model in evaluation mode (the census' counterpart of CellModel)."""

    config: GuidedConfig
    summary: dict[str, Any]
    net: GuidedNet
    head: dict[str, Any]
    dims: int
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    guided = True

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    @property
    def guide(self) -> Guide:
        return Guide.from_dict(self.config.guide)

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint (weights-only readable, atomically)."""
        head = {k: v for k, v in self.head.items() if k != "w"}
        for i, w in enumerate(self.head.get("w", [])):
            head[f"w{i}"] = w
        payload = {"config": self.config.to_dict(),
                   "weights": {"net": self.net.state_dict(), "head": head},
                   "summary": {**self.summary, "dims": self.dims}}
        return save_weights_file(payload, path, GUIDED_FORMAT, GUIDED_FORMAT_VERSION)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> GuidedModel:
        """Read a guided checkpoint with ``weights_only=True`` (CPU)."""
        data = load_weights_file(path, GUIDED_FORMAT, GUIDED_FORMAT_VERSION,
                                 ("config", "weights", "summary"), "guided-model")
        cfg = GuidedConfig.from_dict(data["config"])
        net = GuidedNet(cfg.n_max, cfg.width, cfg.k if cfg.uses_logits else 0, cfg.stem)
        net.load_state_dict(data["weights"]["net"])
        net = net.to(memory_format=CL)
        raw = dict(data["weights"]["head"])
        ws = sorted((k for k in raw if k.startswith("w") and k[1:].isdigit()),
                    key=lambda k: int(k[1:]))
        head = {k: v for k, v in raw.items() if k not in ws}
        if ws:
            head["w"] = [raw[k] for k in ws]
        summary = data["summary"]
        return cls(cfg, summary, net.eval().requires_grad_(False), head,
                   int(summary.get("dims", cfg.n_max)), torch.device("cpu"))


def predict_guided(model: GuidedModel, crops: np.ndarray, batch_size: int = 512
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes (N,) int64, probabilities (N, k) float32 and the 2-D guide-map position
    (N, 2) float32 (the embedding's first two dimensions) of uint8 crops (N, c, c, 3), c the
    model's ``crop_size``; on the CPU, averaging the model's ``views``."""
    crops = np.asarray(crops)
    if len(crops) == 0:
        return (np.zeros(0, np.int64), np.zeros((0, model.k), np.float32),
                np.zeros((0, 2), np.float32))
    c = model.config.crop_size
    if crops.ndim != 4 or crops.shape[1:] != (c, c, 3):
        raise InvalidInputError(f"crops must have shape (N, {c}, {c}, 3) (the model's "
                                f"crop_size), got {crops.shape}")
    with model.lock:
        emb = _embed(model.net, crops.astype(np.uint8, copy=False), model.dims,
                     model.config.amp_cpu, batch_size, views=model.config.views)
        with torch.no_grad():
            probs = _head_proba(model.head, emb, model.k, model.net).float().numpy()
    return probs.argmax(1).astype(np.int64), probs.astype(np.float32), \
        emb[:, :2].numpy().astype(np.float32)
