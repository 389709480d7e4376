"""torch models: InfoGAN with a WGAN-GP loss, training, batched inference, metrics.

The cell representation model of Hu et al. (2019): a generator G, a critic D and an
auxiliary network Q sharing D's trunk, trained without labels so that Q sorts 32 x 32 cell
crops into ``k`` clusters. Two presets (:mod:`.presets`): ``paper`` (the residual networks
at width 128, a GPU job) and ``fast`` (compact networks, an invariant-information term on
real crops and a k-means refinement of Q: minutes on a CPU). Where cells carry labels, a
guided embedding (:mod:`.guided`, Gräbel et al.) names them instead. Uses torch and numpy
only.

Typical use::

    from slidecensus.models import TrainConfig, train_infogan, load_model, predict
    train_infogan(crops_uint8, TrainConfig(k=5), "model.pt")
    model = load_model("model.pt")          # cached per process
    clusters, probs = predict(model, crops_uint8)
"""

from .augment import AugmentSpec, augment, iic_loss
from .checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from .guided import (
    GuidedConfig,
    GuidedModel,
    active_dims,
    default_guide,
    distance_loss,
    guide2d_loss,
    load_guide,
    predict_guided,
    train_guided,
)
from .infer import CellModel, d_features, generation_grid, load_model, predict, write_png
from .metrics import entropy, f_score, purity
from .networks import CompactGenerator, CompactTrunk, CriticHead, CriticTrunk, Generator, QHead
from .presets import PRESETS, preset_config, resolve_preset
from .refine import kmeans, refine_q_head
from .train import TrainConfig, format_progress, gradient_penalty, train_infogan
from .uncertainty import count_interval, expected_counts, interval_from_moments

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "AugmentSpec",
    "CellModel",
    "CheckpointError",
    "CompactGenerator",
    "CompactTrunk",
    "CriticHead",
    "CriticTrunk",
    "Generator",
    "GuidedConfig",
    "GuidedModel",
    "QHead",
    "TrainConfig",
    "active_dims",
    "augment",
    "count_interval",
    "d_features",
    "default_guide",
    "distance_loss",
    "entropy",
    "expected_counts",
    "f_score",
    "format_progress",
    "generation_grid",
    "gradient_penalty",
    "guide2d_loss",
    "iic_loss",
    "interval_from_moments",
    "kmeans",
    "load_checkpoint",
    "load_guide",
    "load_model",
    "predict",
    "predict_guided",
    "preset_config",
    "purity",
    "refine_q_head",
    "resolve_preset",
    "save_checkpoint",
    "train_guided",
    "train_infogan",
    "write_png",
]
