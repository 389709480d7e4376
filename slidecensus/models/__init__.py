"""torch models: InfoGAN with a WGAN-GP loss, training, batched inference, metrics.

The cell representation model of Hu et al. (2019): a generator G, a critic D and an
auxiliary network Q sharing D's residual trunk, trained without labels so that Q sorts
32 x 32 cell crops into ``k`` clusters. Uses torch and numpy only.

Typical use::

    from slidecensus.models import TrainConfig, train_infogan, load_model, predict
    train_infogan(crops_uint8, TrainConfig(k=5), "model.pt")
    model = load_model("model.pt")          # cached per process
    clusters, probs = predict(model, crops_uint8)
"""

from .checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from .infer import CellModel, d_features, generation_grid, load_model, predict, write_png
from .metrics import entropy, f_score, purity
from .networks import CriticHead, CriticTrunk, Generator, QHead
from .train import TrainConfig, format_progress, gradient_penalty, train_infogan

__all__ = [
    "FORMAT_VERSION",
    "CellModel",
    "CheckpointError",
    "CriticHead",
    "CriticTrunk",
    "Generator",
    "QHead",
    "TrainConfig",
    "d_features",
    "entropy",
    "f_score",
    "format_progress",
    "generation_grid",
    "gradient_penalty",
    "load_checkpoint",
    "load_model",
    "predict",
    "purity",
    "save_checkpoint",
    "train_infogan",
    "write_png",
]
