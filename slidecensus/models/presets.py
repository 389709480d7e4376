"""Training presets chosen by device: the paper's configuration for GPUs, a fast one for CPUs.

* ``paper``: Hu et al. (2019): the residual networks at width 128, batch 64, Adam at 1e-4,
  5 critic steps per generator step, 10 epochs over the sample, nucleus-box crops with the
  background white, k = 5. About 7 500 generator iterations for 60 000 cells: a GPU job
  (43 s per iteration on one CPU core).
* ``fast``: the same three networks and losses (WGAN-GP, L_Q on generated cells) on
  compact networks, plus a consistency term that asks Q to give two augmented views of a
  real crop the same cluster (IIC, Ji et al. 2019), batch norm in Q's hidden layer, G's
  output bias at the data mean, a fixed physical crop window, and colour histograms of
  the crop next to the trunk's features in Q's input, and a contrastive term (SimCLR's
  NT-Xent) on the trunk's features of the same views, and at the end k-means of the
  trunk's features and the (soft) histograms, each whitened (PCA), the histograms weighted
  2:1, the best of 128 restarts, distilled into Q's head. A
  fixed number of iterations, so training time does not grow with the cohort. Measured in
  docs/benchmarks.md (cell model).
* ``auto``: ``paper`` when the training device is a CUDA GPU, ``fast`` otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import InvalidInputError
from .train import TrainConfig

__all__ = ["PRESETS", "preset_config", "resolve_preset"]

#: Accepted ``--preset`` values.
PRESETS = ("auto", "fast", "paper")

_PAPER: dict[str, Any] = {
    "preset": "paper", "arch": "resnet", "width": 128, "z_dim": 32, "batch_size": 64,
    "lr": 1e-4, "betas": (0.5, 0.9), "n_critic": 5, "lambda_gp": 10.0, "lambda_q": 1.0,
    "epochs": 10.0, "iterations": None, "rotations": True, "augment": "rot90",
    "lambda_iic": 0.0, "over_k": 0, "q_norm": False, "g_bias_mean": False,
    "crop_mode": "nucleus", "amp": True, "amp_cpu": True, "refine": "none",
}

_FAST: dict[str, Any] = {
    "preset": "fast", "arch": "compact", "width": 16, "z_dim": 32, "batch_size": 64,
    "lr": 2e-4, "betas": (0.5, 0.9), "lr_q": 1e-3, "betas_q": (0.9, 0.999), "n_critic": 1,
    "lambda_gp": 10.0, "lambda_q": 1.0, "iterations": 600, "rotations": True,
    "augment": "affine", "lambda_iic": 1.0, "over_k": 40, "iic_batch": 128, "q_norm": True,
    # SimCLR's contrastive term on the same views: blood purity 0.66 -> 0.76 over 3 seeds
    # at the same training time (docs/benchmarks.md, cell model)
    "lambda_nce": 1.0,
    "g_bias_mean": True, "crop_window_um": 18.0, "amp": True,
    # the window as it is (a neutrophil keeps its other lobes), and Q reads the crop's
    # colour histograms next to the trunk: blood purity 0.46 -> 0.56 -> 0.60 (one change
    # at a time, docs/benchmarks.md)
    "crop_mode": "field", "q_colour": True,
    # bf16 on CPU where it is native (AMX / AVX-512 BF16), side by side: Q 5467 vs 4666
    # cells/s per core on AMX, 5128 vs 3566 on AVX-512 BF16 (docs/benchmarks.md)
    "amp_cpu": True,
    "checkpoint_every": 250, "refine": "kmeans",
    # k-means on each feature block whitened to 32 principal components (with a ridge):
    # purity 0.757 -> 0.781 on the blood cells (3 models, fixed crops) and 0.664 -> 0.755
    # on the demo's drawn cells (docs/benchmarks.md, cell model)
    "refine_pca": 32,
    # the histograms with soft (trilinear) bins over a 6 px inner disc, and weighted 2 to
    # 1 against the trunk in the k-means: purity 0.779 -> 0.824 on the blood cells (3
    # models, fixed crops) and 0.749 -> 0.860 on the demo's drawn cells (docs/benchmarks.md)
    "colour_soft": True, "colour_radii": (6.0, 14.0), "refine_colour_weight": 2.0,
    # 128 k-means++ restarts, not 8: on the demo's drawn cells the clusters' purity varied
    # 0.78-0.87 across samples and seeds with 8, 0.85-0.89 with 128 (blood 0.825 -> 0.816);
    # about 4 s for 6000 crops (docs/benchmarks.md, cell model)
    "refine_restarts": 128,
}


def resolve_preset(preset: str, cuda: bool) -> tuple[str, str]:
    """The concrete preset for ``preset`` on a training device with or without CUDA, and
    the reason, for the log."""
    if preset not in PRESETS:
        raise InvalidInputError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if preset != "auto":
        return preset, f"--preset {preset} asked for"
    if cuda:
        return "paper", "auto: the training worker has a CUDA GPU"
    return "fast", "auto: the training worker has no CUDA GPU"


def preset_config(preset: str, *, cuda: bool = False, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` for ``preset`` (``auto`` resolved with ``cuda``), with any
    field overridden by keyword (``k=8``, ``seed=1``, ``iterations=300`` ...).

    Raises
    ------
    InvalidInputError
        An unknown preset or field.
    """
    name, _ = resolve_preset(preset, cuda)
    base = dict(_PAPER if name == "paper" else _FAST)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InvalidInputError(f"unknown training settings: {', '.join(unknown)}")
    base.update({key: v for key, v in overrides.items() if v is not None})
    return TrainConfig(**base)
