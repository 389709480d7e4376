"""Unsupervised training of the cell model: InfoGAN with a Wasserstein gradient-penalty loss.

One generator iteration is ``n_critic`` (5) critic steps, then one generator step and one
Q step, all at batch 64 with Adam (lr 1e-4, betas (0.5, 0.9)), as in Hu et al. (2019),
section III:

* critic:     L_D = E[D(G(z, c))] - E[D(x)] + lambda1 * GP,   lambda1 = 10
* generator:  L_G = -E[D(G(z, c))]
* auxiliary:  L_Q = lambda2 * CE(Q(G(z, c)), c),              lambda2 = 1

``GP`` is the gradient penalty of Gulrajani et al. (2017): E[(||grad_x D(x_hat)||_2 - 1)^2]
on random interpolates ``x_hat`` between real and generated crops. Minimising L_Q over G and
Q maximises the variational lower bound on the mutual information I(c; G(z, c)) (Chen et
al., 2016), which is what makes the categories of ``c`` become clusters of cells.

**Epochs.** One epoch is one pass of the critic's *real* batches over the augmented set
(every crop in each of its 4 rotations once), so an epoch is
``ceil(4 N / (batch_size * n_critic))`` generator iterations. For the paper's 60 000 cells
that is 750 iterations per epoch and 7 500 for the default 10 epochs. ``iterations``
overrides the schedule.

**Determinism and resume.** Weights are initialised from ``seed``; every random draw of
training (data order, rotations, z, c, interpolation weights) comes from one CPU
``torch.Generator`` whose state is saved in the checkpoint with the optimiser states and the
data permutation, so an interrupted run resumed from its checkpoint ends with the same
weights as an uninterrupted one (same device, same thread count).

References
----------
.. [1] B. Hu et al. "Unsupervised Learning for Cell-level Visual Representation in
   Histopathology Images with Generative Adversarial Networks." IEEE JBHI 23(3), 2019.
.. [2] I. Gulrajani et al. "Improved Training of Wasserstein GANs." NeurIPS 2017.
.. [3] X. Chen et al. "InfoGAN." NeurIPS 2016.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..hardware import cpu_bf16_reason, use_bf16
from .augment import AugmentSpec, augment, iic_loss, nt_xent
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .networks import (
    ARCHS,
    COLOUR_RADII,
    CROP_SIZE,
    ColourHistogram,
    CriticHead,
    ProjectionHead,
    QHead,
    build_generator,
    build_trunk,
    q_input,
    q_input_dim,
    trunk_dim,
)

__all__ = [
    "NORMALISATION",
    "InfoGANTrainer",
    "TrainConfig",
    "build_networks",
    "colour_branch",
    "critic_loss",
    "format_progress",
    "generator_loss",
    "gradient_penalty",
    "info_loss",
    "resolve_device",
    "sample_code",
    "to_model_input",
    "train_infogan",
    "validate_crops",
]

log = logging.getLogger(__name__)

#: How uint8 crops become network inputs; stored in the checkpoint config.
NORMALISATION = "x / 127.5 - 1"

#: Config keys that fix the shapes of the weights; a resumed run must keep them.
ARCH_KEYS = ("k", "z_dim", "width", "crop_size", "arch", "over_k", "q_norm", "q_colour",
             "colour_soft", "colour_radii")
#: Augmentations of real crops: ``rot90`` the paper's four rotations (critic batches only);
#: ``affine`` adds :func:`~.augment.augment`'s views for the IIC term and the critic.
AUGMENTS = ("rot90", "affine")
#: How crops are cut (see :func:`slidecensus.nuclei.crops.extract_crops`): ``nucleus`` the
#: paper's nucleus box, outside the mask white; ``box`` the same without the mask;
#: ``window`` a fixed physical window (``crop_window_um``) around the nucleus, the other
#: nuclei in it white; ``field`` the same window as it is (nothing whitened).
CROP_MODES = ("nucleus", "box", "window", "field")
#: What follows the adversarial schedule: ``none`` (the paper), or ``kmeans``: k-means on
#: the trunk's features of the real crops, distilled into Q's head (:mod:`.refine`).
REFINES = ("none", "kmeans")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; stored in the checkpoint.

    Defaults are those of Hu et al. except ``width``: 128 channels is the paper's (and
    Gulrajani et al.'s) width, meant for a GPU; 32-64 keeps CPU runs feasible.

    Attributes
    ----------
    k : int
        Values of the categorical code c, i.e. number of cell clusters (paper: 5).
    z_dim : int
        Gaussian noise dimensions (paper: 32; 64 for large cohorts).
    width : int
        Channels of every residual block of G and of the D/Q trunk.
    batch_size, lr, betas, n_critic : int, float, (float, float), int
        Adam optimisation: batch 64, lr 1e-4, betas (0.5, 0.9), 5 critic steps per G step.
    lambda_gp, lambda_q : float
        Weights of the gradient penalty (lambda1 = 10) and of L_Q (lambda2 = 1).
    epochs : float
        Length of training in epochs (see the module docstring for the definition).
    iterations : int or None
        Generator iterations; overrides ``epochs`` when set.
    rotations : bool
        Augment with 90, 180 and 270 degree rotations (paper: yes).
    seed : int
        Seed of weight initialisation and of every random draw of training.
    amp : bool
        bfloat16 autocast for the forward passes on CUDA (the gradient penalty is always
        computed in float32).
    amp_cpu : bool
        The same on CPU, honoured only where the CPU runs bf16 natively (AMX or AVX-512
        BF16: faster than float32 there; emulated bf16 on an AVX2 CPU was 4-5x slower,
        docs/benchmarks.md). See :func:`slidecensus.hardware.cpu_bf16_native`.
    channels_last : bool
        Use the channels-last memory format on CUDA (faster convolutions on tensor cores).
    deterministic : bool
        On CUDA, pick deterministic cuDNN kernels (and no autotuning) so that the same seed
        gives the same weights on the same GPU; False enables ``cudnn.benchmark`` for
        speed. CPU runs are deterministic either way.
    q_trains_trunk : bool
        Whether L_Q also updates the trunk shared with D (as in InfoGAN) or only Q's head.
    checkpoint_every : int
        Write the checkpoint every this many iterations (and at the end).
    crop_size : int
        Side of the crops; only 32 is supported.
    preset : str
        Name of the preset the configuration came from (``paper``, ``fast``, or
        ``custom``); recorded, it changes nothing by itself.
    arch : str
        Network family: ``resnet`` (the paper's residual networks) or ``compact`` (plain
        convolutions with group norm, for CPUs); see :mod:`.networks`.
    lr_q, betas_q : float or None, (float, float) or None
        Adam settings of the Q step (None: ``lr`` and ``betas``).
    q_norm : bool
        Batch norm in Q's hidden layer.
    q_colour : bool
        Q's head reads the crop's colour histograms
        (:class:`~.networks.ColourHistogram`) next to the shared trunk's features.
    colour_soft, colour_radii : bool, (float, float)
        How those histograms are taken: each pixel's vote shared between the bins around
        its colour (trilinear) or in one bin, over an inner disc and a ring of these radii
        (pixels of the 32 px crop). The defaults (hard bins, 8 and 14 px) are what models
        trained before these settings existed used.
    g_bias_mean : bool
        Start G's output bias at the crops' mean colour (so G does not begin as a grey
        image against white-background cells, which drives the early critic far off).
    lambda_iic : float
        Weight of the consistency term on real crops: minus the mutual information between
        Q's clusters of two augmented views of the same crops (IIC, Ji et al. 2019); 0
        turns it off (the paper).
    lambda_nce, nce_temperature : float
        Weight of a contrastive term on the same views (SimCLR's NT-Xent on a projection
        of the trunk's features, Chen et al. 2020): each view must recognise the other
        view of its crop among the batch. It teaches the trunk what tells real cells
        apart, which the critic's game alone does poorly on a small trunk; 0 turns it off.
        Needs ``lambda_iic`` > 0 (it shares its real batches).
    over_k : int
        Clusters of an auxiliary over-clustering head trained with the same term (0: none).
    iic_batch : int
        Real crops per Q step for the consistency term (each seen in two views).
    augment : str
        ``rot90`` (the paper's four rotations) or ``affine`` (rotations by any angle,
        flips, scale, shift, stain jitter and noise for the consistency term's views).
    view_scale : float
        Half-range of the views' zoom (``affine``): each view is scaled by a factor drawn
        from [1 - view_scale, 1 + view_scale]. The crop is a fixed physical window, so
        a nucleus' size is a trait of its type; the views should not teach the trunk to
        ignore it.
    refine, refine_steps : str, int
        ``kmeans``: after the last iteration, cluster the trunk's features of the real
        crops with k-means and train Q's head alone (``refine_steps`` Adam steps) to
        predict those clusters (:mod:`.refine`); ``none``: Q's head as the game left it.
    refine_pca : int
        For ``kmeans``: whiten each feature block (trunk, colour histograms) to this many
        principal components before clustering (:func:`~.refine.cluster_space`); 0 clusters
        the blocks centred and scaled to unit length only.
    refine_colour_weight : float
        For ``kmeans``: the weight of the colour block against the trunk's (1: equal).
    refine_restarts : int
        For ``kmeans``: k-means++ restarts, the one of least inertia kept. The objective
        has many local optima of near-equal inertia and different cell types, so more
        restarts give clusters that vary less from run to run.
    crop_mode, crop_window_um : str, float
        How the census cuts crops for this model: ``nucleus`` (the paper's nucleus box,
        outside the nucleus white), ``box`` (the same unmasked), ``window`` (a fixed
        ``crop_window_um`` window centred on the nucleus, resampled to 32 px, so the crop
        keeps the cell's size and cytoplasm; other nuclei in it white) or ``field`` (the
        same window with nothing whitened: a neutrophil keeps all its lobes).
    """

    k: int = 5
    z_dim: int = 32
    width: int = 128
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    n_critic: int = 5
    lambda_gp: float = 10.0
    lambda_q: float = 1.0
    epochs: float = 10.0
    iterations: int | None = None
    rotations: bool = True
    seed: int = 0
    amp: bool = True
    amp_cpu: bool = False
    channels_last: bool = False
    deterministic: bool = True
    q_trains_trunk: bool = True
    checkpoint_every: int = 500
    crop_size: int = CROP_SIZE
    preset: str = "custom"
    arch: str = "resnet"
    lr_q: float | None = None
    betas_q: tuple[float, float] | None = None
    q_norm: bool = False
    q_colour: bool = False
    colour_soft: bool = False
    colour_radii: tuple[float, float] = COLOUR_RADII
    g_bias_mean: bool = False
    lambda_iic: float = 0.0
    over_k: int = 0
    iic_batch: int = 128
    lambda_nce: float = 0.0
    nce_temperature: float = 0.2
    augment: str = "rot90"
    view_scale: float = 0.15
    crop_mode: str = "nucleus"
    crop_window_um: float = 18.0
    refine: str = "none"
    refine_steps: int = 300
    refine_pca: int = 0
    refine_colour_weight: float = 1.0
    refine_restarts: int = 8
    stain_norm: str = "reinhard"  # how the training crops' tiles were normalised (recorded)
    #: lαβ (mean, std) the crops were Reinhard-normalised to (the cohort's own style, from
    #: the training slides); the census normalises its crops the same way. None: raw crops.
    crop_lab_target: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.augment not in AUGMENTS:
            problems.append(f"augment must be one of {', '.join(AUGMENTS)}, got "
                            f"{self.augment!r}")
        if self.crop_mode not in CROP_MODES:
            problems.append(f"crop_mode must be one of {', '.join(CROP_MODES)}, got "
                            f"{self.crop_mode!r}")
        if not (math.isfinite(self.crop_window_um) and self.crop_window_um > 0):
            problems.append(f"crop_window_um must be a positive number of µm, got "
                            f"{self.crop_window_um!r}")
        if self.lambda_iic < 0:
            problems.append(f"lambda_iic must be >= 0, got {self.lambda_iic}")
        if self.lambda_nce < 0:
            problems.append(f"lambda_nce must be >= 0, got {self.lambda_nce}")
        if self.lambda_nce > 0 and self.lambda_iic <= 0:
            problems.append("lambda_nce needs lambda_iic > 0 (it uses the same real views)")
        if self.nce_temperature <= 0:
            problems.append(f"nce_temperature must be > 0, got {self.nce_temperature}")
        if self.over_k < 0 or self.over_k == 1:
            problems.append(f"over_k must be 0 (no over-clustering head) or >= 2, got "
                            f"{self.over_k}")
        if self.refine not in REFINES:
            problems.append(f"refine must be one of {', '.join(REFINES)}, got {self.refine!r}")
        if self.refine_pca < 0:
            problems.append(f"refine_pca must be >= 0, got {self.refine_pca}")
        if not (math.isfinite(self.refine_colour_weight) and self.refine_colour_weight > 0):
            problems.append(f"refine_colour_weight must be > 0, got "
                            f"{self.refine_colour_weight}")
        if self.refine_restarts < 1:
            problems.append(f"refine_restarts must be >= 1, got {self.refine_restarts}")
        radii = tuple(self.colour_radii)
        if len(radii) != 2 or not (0 < radii[0] < radii[1]):
            problems.append(f"colour_radii must be (inner, outer) px with 0 < inner < outer, "
                            f"got {self.colour_radii}")
        if not (math.isfinite(self.view_scale) and 0 <= self.view_scale < 1):
            problems.append(f"view_scale must be in [0, 1), got {self.view_scale}")
        if self.iic_batch < 2:
            problems.append(f"iic_batch must be >= 2, got {self.iic_batch}")
        if self.lr_q is not None and not self.lr_q > 0:
            problems.append(f"lr_q must be > 0, got {self.lr_q}")
        if self.k < 2:
            problems.append(f"k must be >= 2, got {self.k}")
        if self.z_dim < 1:
            problems.append(f"z_dim must be >= 1, got {self.z_dim}")
        if self.width < 4:
            problems.append(f"width must be >= 4, got {self.width}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2, got {self.batch_size}")
        if self.n_critic < 1:
            problems.append(f"n_critic must be >= 1, got {self.n_critic}")
        if self.iterations is not None and self.iterations < 0:
            problems.append(f"iterations must be >= 0, got {self.iterations}")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.crop_size != CROP_SIZE:
            problems.append(f"crop_size must be {CROP_SIZE}, got {self.crop_size}")
        if problems:
            raise InvalidInputError("invalid TrainConfig: " + "; ".join(problems))

    def iterations_per_epoch(self, n_crops: int) -> int:
        """Generator iterations in one epoch over ``n_crops`` crops (and their rotations)."""
        n_aug = n_crops * (4 if self.rotations else 1)
        return max(1, math.ceil(n_aug / (self.batch_size * self.n_critic)))

    def total_iterations(self, n_crops: int) -> int:
        """Generator iterations of the whole run over ``n_crops`` crops."""
        if self.iterations is not None:
            return int(self.iterations)
        return math.ceil(self.epochs * self.iterations_per_epoch(n_crops))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples) as stored in the checkpoint, plus the normalisation."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["betas_q"] = list(self.betas_q) if self.betas_q is not None else None
        d["colour_radii"] = list(self.colour_radii)
        if self.crop_lab_target is not None:
            d["crop_lab_target"] = [list(v) for v in self.crop_lab_target]
        d["normalisation"] = NORMALISATION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {key: v for key, v in d.items() if key in names}
        for key in ("betas", "betas_q", "colour_radii"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        if kw.get("crop_lab_target") is not None:
            kw["crop_lab_target"] = tuple(tuple(float(x) for x in v)
                                          for v in kw["crop_lab_target"])
        return cls(**kw)

    def crop_spec(self) -> dict[str, Any]:
        """How the census must cut crops for this model (``mode``, ``window_um``)."""
        return {"mode": self.crop_mode, "window_um": float(self.crop_window_um)}


# --------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when available and ``device`` is None, else the device asked for."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def colour_branch(config: TrainConfig, device: str | torch.device = "cpu"
                  ) -> ColourHistogram | None:
    """The fixed colour branch of Q's input that ``config`` asks for (None without
    ``q_colour``), on ``device``."""
    if not config.q_colour:
        return None
    return ColourHistogram(soft=config.colour_soft, radii=config.colour_radii).to(device)


def validate_crops(crops: np.ndarray) -> np.ndarray:
    """Check that ``crops`` is uint8 (N, 32, 32, 3) with N >= 1; return it C-contiguous."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
        raise InvalidInputError(
            f"crops must have shape (N, {CROP_SIZE}, {CROP_SIZE}, 3), got {crops.shape}")
    if crops.dtype != np.uint8:
        raise InvalidInputError(f"crops must be uint8, got {crops.dtype}")
    return np.ascontiguousarray(crops)


def to_model_input(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) or (B, 3, 32, 32) tensor to float32 NCHW in [-1, 1]."""
    if batch_u8.shape[-1] == 3:
        batch_u8 = batch_u8.permute(0, 3, 1, 2)
    return batch_u8.float().div_(127.5).sub_(1.0)


def build_networks(config: TrainConfig) -> nn.ModuleDict:
    """G, the critic trunk, D's head and Q's head, initialised from ``config.seed``.

    The global torch RNG is left as it was (initialisation runs in a forked RNG).
    """
    dim = trunk_dim(config.arch, config.width)
    q_dim = q_input_dim(config.arch, config.width, config.q_colour)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        nets = {
            "G": build_generator(config.arch, config.k, config.z_dim, config.width),
            "D_trunk": build_trunk(config.arch, config.width),
            "D_head": CriticHead(dim),
            "Q_head": QHead(q_dim, config.k, norm=config.q_norm, hidden=dim),
        }
        if config.over_k:
            nets["Q_over"] = QHead(q_dim, config.over_k, norm=config.q_norm, hidden=dim)
        if config.lambda_nce > 0:  # training only: the census never reads it
            nets["P"] = ProjectionHead(dim)
        return nn.ModuleDict(nets)


def sample_code(batch: int, k: int, z_dim: int, generator: torch.Generator,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw Gaussian ``z`` (B, z_dim) and a uniform categorical ``c`` (B,) in [0, k)."""
    z = torch.randn(batch, z_dim, generator=generator)
    c = torch.randint(k, (batch,), generator=generator)
    return z.to(device, non_blocking=True), c.to(device, non_blocking=True)


def critic_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Wasserstein critic loss without the penalty: E[D(G(z, c))] - E[D(x)]."""
    return d_fake.float().mean() - d_real.float().mean()


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss: -E[D(G(z, c))]."""
    return -d_fake.float().mean()


def info_loss(q_logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of Q's prediction of the code ``c`` (the negative MI lower bound, up
    to the constant entropy H(c))."""
    return F.cross_entropy(q_logits.float(), c)


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Gradient penalty of WGAN-GP: mean over the batch of (||grad D(x_hat)||_2 - 1)^2.

    Parameters
    ----------
    critic : callable
        Maps a batch (B, ...) to critic values (B,).
    real, fake : Tensor
        Real and generated batches of the same shape; gradients do not flow into them.
    alpha : Tensor
        Interpolation weights, shape (B, 1, ..., 1), uniform in [0, 1] in training:
        ``x_hat = alpha * real + (1 - alpha) * fake``.

    Notes
    -----
    Computed in float32 even under mixed precision: the penalty differentiates the critic's
    gradient norm, and bfloat16 gradients are too coarse for it. ``create_graph=True`` so
    the penalty itself can be back-propagated into the critic's weights.
    """
    x_hat = (alpha * real.detach().float() + (1 - alpha) * fake.detach().float())
    x_hat.requires_grad_(True)
    out = critic(x_hat).float()
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + 1e-12)
    return (norm - 1.0).pow(2).mean()


def init_output_bias(G: nn.Module, crops: np.ndarray) -> None:
    """Set G's last convolution bias so that ``tanh`` of it is the crops' mean colour."""
    mean = torch.from_numpy(crops.reshape(-1, 3).mean(axis=0) / 127.5 - 1.0).float()
    with torch.no_grad():
        G.to_rgb.bias.copy_(torch.atanh(mean.clamp(-0.98, 0.98)))


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"slidecensus": str(__version__), "torch": str(torch.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}


class _RealBatches:
    """Endless shuffled batches of real crops and their rotations, from a torch Generator."""

    def __init__(self, crops: torch.Tensor, batch: int, rotations: bool,
                 generator: torch.Generator) -> None:
        self.crops = crops  # uint8 (N, 3, 32, 32) on the training device
        self.batch = batch
        self.n_rot = 4 if rotations else 1
        self.n_aug = crops.shape[0] * self.n_rot
        self.gen = generator
        self.perm = torch.randperm(self.n_aug, generator=generator)
        self.pos = 0

    def state(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state(self, state: dict[str, Any]) -> None:
        if int(state["perm"].numel()) != self.n_aug:
            raise InvalidInputError("the crops differ in number from those the checkpoint "
                                    f"was trained on ({state['perm'].numel()} augmented "
                                    f"crops saved, {self.n_aug} given)")
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])

    def next(self) -> torch.Tensor:
        if self.n_aug < self.batch:  # tiny sets: draw with replacement
            idx = torch.randint(self.n_aug, (self.batch,), generator=self.gen)
        else:
            if self.pos + self.batch > self.n_aug:
                self.perm = torch.randperm(self.n_aug, generator=self.gen)
                self.pos = 0
            idx = self.perm[self.pos:self.pos + self.batch]
            self.pos += self.batch
        dev = self.crops.device
        x = self.crops[(idx // self.n_rot).to(dev)]
        if self.n_rot > 1:
            rot = (idx % self.n_rot).to(dev)
            for r in (1, 2, 3):
                m = rot == r
                x[m] = torch.rot90(x[m], r, dims=(2, 3))
        return to_model_input(x)


# --------------------------------------------------------------------------- training


class InfoGANTrainer:
    """Networks, optimisers and the three update steps of one training run.

    :func:`train_infogan` drives it; the steps are exposed so that each can be tested
    alone. One generator iteration is ``n_critic`` calls of :meth:`critic_step`, then
    :meth:`generator_step` and :meth:`q_step`.

    Parameters
    ----------
    config : TrainConfig
    device : torch.device
    generator : torch.Generator
        CPU generator from which every random draw (z, c, interpolation weights) comes.
    """

    def __init__(self, config: TrainConfig, device: torch.device,
                 generator: torch.Generator) -> None:
        self.config = config
        self.device = device
        self.gen = generator
        cuda = device.type == "cuda"
        self.nets = build_networks(config).to(device)
        self.channels_last = cuda and config.channels_last
        if self.channels_last:
            self.nets = self.nets.to(memory_format=torch.channels_last)
        self.nets.train()
        self.G, self.trunk = self.nets["G"], self.nets["D_trunk"]
        self.d_head, self.q_head = self.nets["D_head"], self.nets["Q_head"]
        self.q_over = self.nets["Q_over"] if "Q_over" in self.nets else None
        self.proj = self.nets["P"] if "P" in self.nets else None
        self.use_amp = use_bf16(device.type, config.amp, config.amp_cpu)
        self.augment_spec = AugmentSpec(scale=(1 - config.view_scale,
                                               1 + config.view_scale))
        self.colour = colour_branch(config, device)
        self.last_iic = torch.zeros((), device=device)
        self.last_nce = torch.zeros((), device=device)

        def adam(params: list[nn.Parameter], lr: float, betas: tuple[float, float]
                 ) -> torch.optim.Adam:
            return torch.optim.Adam(params, lr=lr, betas=tuple(betas))

        self.d_params = [*self.trunk.parameters(), *self.d_head.parameters()]
        self.opt_d = adam(self.d_params, config.lr, config.betas)
        self.opt_g = adam(list(self.G.parameters()), config.lr, config.betas)
        q_params = [*self.G.parameters(), *self.q_head.parameters()]
        if self.q_over is not None:
            q_params += list(self.q_over.parameters())
        if self.proj is not None:
            q_params += list(self.proj.parameters())
        if config.q_trains_trunk:
            q_params += list(self.trunk.parameters())
        self.opt_q = adam(q_params, config.lr_q or config.lr, config.betas_q or config.betas)

    # -- helpers
    def _amp(self) -> contextlib.AbstractContextManager:
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _set_grad(self, params: list[nn.Parameter], flag: bool) -> None:
        for p in params:
            p.requires_grad_(flag)

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        """D(x): critic values (B,)."""
        return self.d_head(self.trunk(x))

    def generate(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (z, c) and return (G(z, c), c); gradients flow into G."""
        k = self.config.k
        z, c = sample_code(batch, k, self.config.z_dim, self.gen, self.device)
        return self._fmt(self.G(z, F.one_hot(c, k).float())), c

    # -- the three steps
    def critic_step(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One critic update on a real batch; returns detached (L_D, GP, E[D(x)]-E[D(G)])."""
        cfg = self.config
        self._set_grad(self.d_params, True)
        real = self._fmt(real)
        bs = real.shape[0]
        alpha = torch.rand(bs, 1, 1, 1, generator=self.gen).to(self.device, non_blocking=True)
        with torch.no_grad(), self._amp():
            fake, _ = self.generate(bs)
        fake = self._fmt(fake.float())
        with self._amp():
            d_real = self.critic(real)
            d_fake = self.critic(fake)
        wd = critic_loss(d_real, d_fake)
        gp = gradient_penalty(self.critic, real, fake, alpha)  # float32, outside autocast
        loss = wd + cfg.lambda_gp * gp
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.detach(), gp.detach(), -wd.detach()

    def generator_step(self) -> torch.Tensor:
        """One G update of L_G = -E[D(G(z, c))] with the critic frozen; returns L_G."""
        self._set_grad(self.d_params, False)
        with self._amp():
            fake, _ = self.generate(self.config.batch_size)
            loss = generator_loss(self.critic(fake))
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        self._set_grad(self.d_params, True)
        return loss.detach()

    def q_step(self, real: torch.Tensor | None = None) -> torch.Tensor:
        """One update of L_Q = lambda2 * CE(Q(G(z, c)), c), plus ``lambda_iic`` times the
        consistency term on two augmented views of ``real`` when both are given, over G,
        Q's heads (and the trunk when ``q_trains_trunk``); returns L_Q (the consistency
        term's value is kept in ``last_iic``)."""
        cfg = self.config
        self._set_grad(list(self.d_head.parameters()), False)
        self._set_grad(list(self.trunk.parameters()), cfg.q_trains_trunk)
        with self._amp():
            fake, c = self.generate(cfg.batch_size)
            logits = self.q_head(q_input(self.trunk, fake, self.colour))
        loss_q = cfg.lambda_q * info_loss(logits, c)
        loss_iic = torch.zeros((), device=self.device)
        loss_nce = torch.zeros((), device=self.device)
        if real is not None and cfg.lambda_iic > 0:
            views = torch.cat([augment(real, self.gen, self.augment_spec),
                               augment(real, self.gen, self.augment_spec)])
            with self._amp():
                views = self._fmt(views)
                ht = self.trunk(views)
                h = q_input(self.trunk, views, self.colour, h=ht)
                heads = [self.q_head] + ([self.q_over] if self.q_over is not None else [])
                for head in heads:
                    p1, p2 = F.softmax(head(h).float(), dim=1).chunk(2)
                    loss_iic = loss_iic + iic_loss(p1, p2)
                if self.proj is not None:
                    loss_nce = nt_xent(*self.proj(ht).chunk(2), cfg.nce_temperature)
        loss = loss_q + cfg.lambda_iic * loss_iic + cfg.lambda_nce * loss_nce
        self.opt_q.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_q.step()
        self._set_grad(self.d_params, True)
        self.last_iic = loss_iic.detach()
        self.last_nce = loss_nce.detach()
        return loss_q.detach()

    # -- state
    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of every network's state dict."""
        return {name: {key: v.detach().cpu() for key, v in m.state_dict().items()}
                for name, m in self.nets.items()}

    def optimiser_state(self) -> dict[str, Any]:
        return {"opt_d": self.opt_d.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_q": self.opt_q.state_dict()}

    def load(self, weights: dict[str, Any], train_state: dict[str, Any]) -> None:
        for name, module in self.nets.items():
            module.load_state_dict(weights[name])
        self.opt_d.load_state_dict(train_state["opt_d"])
        self.opt_g.load_state_dict(train_state["opt_g"])
        self.opt_q.load_state_dict(train_state["opt_q"])


def train_infogan(
    crops: np.ndarray,
    config: TrainConfig,
    out: str | Path,
    *,
    device: str | torch.device | None = None,
    resume: bool = True,
    log_every: int = 50,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> Path:
    """Train G, D and Q on unlabelled 32 x 32 crops and write one checkpoint file.

    Parameters
    ----------
    crops : ndarray of uint8, shape (N, 32, 32, 3)
        Cell crops (RGB, nucleus centred, background white as in Hu et al.).
    config : TrainConfig
        Architecture, optimisation and schedule.
    out : str or Path
        Checkpoint path. Written atomically every ``config.checkpoint_every`` iterations
        and at the end.
    device : str, torch.device or None
        Training device; None picks CUDA when available, else CPU.
    resume : bool
        If ``out`` exists, continue from its saved iteration (same architecture and same
        number of crops required); if its iteration already reaches the schedule, return
        at once. With ``resume=False`` an existing file is overwritten.
    log_every : int
        Iterations between progress records (means of the losses since the last record).
    progress : callable or None
        Called with each progress record (``iteration``, ``total``, ``loss_d``, ``loss_g``,
        ``loss_q``, ``gp``, ``w_dist``, ``it_per_s``); None logs it with :mod:`logging`.

    Returns
    -------
    Path
        ``out``.

    References
    ----------
    .. [1] B. Hu et al., IEEE JBHI 23(3), 2019, section III-B (losses and schedule).
    """
    crops = validate_crops(crops)
    out = Path(out)
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    total = config.total_iterations(len(crops))
    per_epoch = config.iterations_per_epoch(len(crops))
    # the sample's fingerprint: two runs that should be the same can be checked to be
    sample_sha = hashlib.sha256(np.ascontiguousarray(crops).data).hexdigest()
    gen = torch.Generator().manual_seed(config.seed)
    trainer = InfoGANTrainer(config, dev, gen)
    if dev.type == "cpu" and config.amp_cpu:
        log.info("bf16 autocast on CPU: %s (%s)",
                 "on" if trainer.use_amp else "off, float32", cpu_bf16_reason())
    data_t = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().to(dev)
    batches = _RealBatches(data_t, config.batch_size, config.rotations, gen)
    iic_batches = (_RealBatches(data_t, config.iic_batch, config.rotations, gen)
                   if config.lambda_iic > 0 else None)
    if config.g_bias_mean:
        init_output_bias(trainer.G, crops)

    start_it, time_before, history = 0, 0.0, []
    if resume and out.exists():
        ckpt = load_checkpoint(out)
        saved = ckpt["config"]
        saved_cfg = TrainConfig.from_dict(saved)  # settings it predates take their defaults
        diff = [key for key in ARCH_KEYS
                if getattr(saved_cfg, key) != getattr(config, key)]
        if (float(saved.get("lambda_nce", 0.0)) > 0) != (config.lambda_nce > 0):
            diff.append("lambda_nce")
        if diff:
            raise CheckpointError(out, "cannot resume: architecture differs in "
                                  + ", ".join(f"{key} ({getattr(saved_cfg, key)} saved, "
                                              f"{getattr(config, key)} asked)" for key in diff))
        state = ckpt.get("train_state")
        if state is None:
            raise CheckpointError(out, "cannot resume: checkpoint has no training state")
        trainer.load(ckpt["weights"], state)
        gen.set_state(state["rng"])
        batches.load_state(state["data"])
        if iic_batches is not None:
            iic_batches.load_state(state["data_iic"])
        start_it = int(ckpt["summary"]["iteration"])
        time_before = float(ckpt["summary"]["time_s"])
        history = list(ckpt["summary"].get("history", []))
        if start_it >= total:
            return out

    acc = torch.zeros(7, device=dev)  # sums of loss_d, gp, w_dist, loss_g, loss_q, iic, nce
    n_acc = 0
    t_run = time.perf_counter()
    t_log, it_log = t_run, start_it
    refined: dict[str, Any] | None = None

    def snapshot(iteration: int) -> None:
        summary = {
            "iteration": iteration, "total_iterations": total,
            "iterations_per_epoch": per_epoch, "epochs_done": iteration / per_epoch,
            "n_crops": len(crops), "sample_sha256": sample_sha,
            "time_s": time_before + time.perf_counter() - t_run,
            "seed": config.seed, "device": str(dev), "versions": _versions(),
            "history": history, "refine": refined,
        }
        train_state = {**trainer.optimiser_state(), "rng": gen.get_state(),
                       "data": batches.state()}
        if iic_batches is not None:
            train_state["data_iic"] = iic_batches.state()
        save_checkpoint({"config": config.to_dict(), "weights": trainer.weights(),
                         "summary": summary, "train_state": train_state}, out)

    for it in range(start_it, total):
        for _ in range(config.n_critic):
            loss_d, gp, w_dist = trainer.critic_step(batches.next())
        loss_g = trainer.generator_step()
        loss_q = trainer.q_step(iic_batches.next() if iic_batches else None)
        acc += torch.stack([loss_d, gp, w_dist, loss_g, loss_q, trainer.last_iic,
                            trainer.last_nce])
        n_acc += 1
        done = it + 1
        if done % log_every == 0 or done == total:
            now = time.perf_counter()
            means = (acc / n_acc).tolist()
            rec = {"iteration": done, "total": total, "loss_d": means[0], "gp": means[1],
                   "w_dist": means[2], "loss_g": means[3], "loss_q": means[4],
                   "loss_iic": means[5], "loss_nce": means[6],
                   "it_per_s": (done - it_log) / max(now - t_log, 1e-9)}
            history.append(rec)
            (progress or _log_progress)(rec)
            acc.zero_()
            n_acc, t_log, it_log = 0, now, done
        if done % config.checkpoint_every == 0 and done != total:
            snapshot(done)
    if config.refine == "kmeans" and start_it < total:
        from .refine import refine_q_head

        t_ref = time.perf_counter()
        labels = refine_q_head(trainer.trunk, trainer.q_head, data_t, config.k, gen,
                               colour=trainer.colour,
                               steps=config.refine_steps, amp=trainer.use_amp,
                               pca=config.refine_pca,
                               colour_weight=config.refine_colour_weight,
                               restarts=config.refine_restarts)
        sizes = torch.bincount(labels.cpu(), minlength=config.k).tolist()
        refined = {"method": "kmeans", "pca": config.refine_pca,
                   "colour_weight": config.refine_colour_weight,
                   "restarts": config.refine_restarts, "cluster_sizes": sizes,
                   "time_s": time.perf_counter() - t_ref}
        log.info("Q refined on k-means of the trunk features: cluster sizes %s", sizes)
    snapshot(max(total, start_it))
    return out


def format_progress(rec: dict[str, float]) -> str:
    """One progress record as a log line (iterations, speed, the three losses)."""
    return (f"it {int(rec['iteration'])}/{int(rec['total'])}  {rec['it_per_s']:.2f} it/s  "
            f"L_D {rec['loss_d']:.3f} (GP {rec['gp']:.3f}, W {rec['w_dist']:.3f})  "
            f"L_G {rec['loss_g']:.3f}  L_Q {rec['loss_q']:.3f}"
            + (f"  L_IIC {rec['loss_iic']:.3f}" if rec.get("loss_iic") else "")
            + (f"  L_NCE {rec['loss_nce']:.3f}" if rec.get("loss_nce") else ""))


def _log_progress(rec: dict[str, float]) -> None:
    log.info("%s", format_progress(rec))
