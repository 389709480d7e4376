"""Augmentations of cell crops, and the invariant-information loss that uses them.

A cell's type does not change when the slide is rotated, mirrored, scanned slightly
larger or smaller, or stained a little differently, so the ``fast`` preset shows the
networks each real crop under such changes:

* :func:`augment` draws one random view of every crop of a batch: a rotation by any
  angle, a mirror flip, a scale change and a shift of a pixel or two (one affine
  resampling, white outside the crop as on a slide's background), a per-channel gain and
  offset (stain jitter) and Gaussian pixel noise.
* :func:`iic_loss` is the objective of Invariant Information Clustering (Ji et al., 2019):
  minus the mutual information between the cluster distributions that Q gives two views
  of the same crops. Maximising it asks for the same cluster on both views (consistency)
  while keeping the clusters balanced (the marginal entropy term), which is what keeps
  every cell from falling into one cluster.

All randomness comes from the ``torch.Generator`` passed in, so training stays
reproducible and resumable.

References
----------
.. [1] X. Ji, J. F. Henriques, A. Vedaldi. "Invariant Information Clustering for
   Unsupervised Image Classification and Segmentation." ICCV 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentSpec", "augment", "iic_loss", "nt_xent", "rot90_views"]


@dataclass(frozen=True)
class AugmentSpec:
    """Strength of each random change drawn by :func:`augment`.

    Attributes
    ----------
    scale : (float, float)
        Range of the zoom factor (1 = unchanged); uniform.
    shift : float
        Largest shift, as a fraction of the crop's half-width (0.06 is about 1 px at 32).
    stain : float
        Standard deviation of the per-channel gain (around 1) and offset (around 0), in
        units of the [-1, 1] input range.
    noise : float
        Standard deviation of the added Gaussian pixel noise.
    """

    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.06
    stain: float = 0.1
    noise: float = 0.05


def augment(x: torch.Tensor, generator: torch.Generator,
            spec: AugmentSpec = AugmentSpec()) -> torch.Tensor:
    """One random view of each crop of ``x`` (float (B, 3, H, W) in [-1, 1]).

    Pixels that come from outside the crop are white (1.0), the colour of a slide's
    background. Returns a new float32 tensor in [-1, 1] on ``x``'s device.
    """
    b = x.shape[0]
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dev)

    angle = rand(b) * (2 * math.pi)
    lo, hi = spec.scale
    zoom = lo + (hi - lo) * rand(b)
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
    shift = (rand(b, 2) * 2 - 1) * spec.shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample x - 1 with zero padding, so outside the crop comes back as white (1)
    y = F.grid_sample(x.float() - 1, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=False) + 1
    gain = 1 + spec.stain * randn(b, 3, 1, 1)
    offset = spec.stain * randn(b, 3, 1, 1)
    y = y * gain + offset
    if spec.noise > 0:
        y = y + spec.noise * randn(*y.shape)
    return y.clamp_(-1, 1)


def rot90_views(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate each crop of ``x`` (B, C, H, W) by ``rot`` (B,) quarter turns (0-3)."""
    x = x.clone()
    for r in (1, 2, 3):
        m = rot == r
        if m.any():
            x[m] = torch.rot90(x[m], r, dims=(2, 3))
    return x


def iic_loss(p1: torch.Tensor, p2: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Minus the mutual information I(z1; z2) of two cluster assignments (Ji et al.).

    Parameters
    ----------
    p1, p2 : Tensor, shape (B, k)
        Q's softmax outputs on two views of the same B crops (row i of each is crop i).

    Returns
    -------
    Tensor
        A scalar; its minimum is ``-log k``, reached when both views agree and the k
        clusters are equally used.
    """
    p1, p2 = p1.float(), p2.float()
    joint = p1.t() @ p2  # (k, k): sum over the batch of the outer products
    joint = (joint + joint.t()) / 2  # symmetric: the two views are interchangeable
    joint = (joint / joint.sum()).clamp_min(eps)
    pi = joint.sum(dim=1, keepdim=True)
    pj = joint.sum(dim=0, keepdim=True)
    return -(joint * (joint.log() - pi.log() - pj.log())).sum()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """The normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020).

    Each of the 2B embeddings must pick out the other view of its own crop among the
    other 2B - 1, by cosine similarity over ``temperature``.

    Parameters
    ----------
    z1, z2 : Tensor, shape (B, d)
        Projections of two views of the same B crops (row i of each is crop i).

    Returns
    -------
    Tensor
        A scalar, the mean over the 2B embeddings; ``log(2B - 1)`` when all are equal.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    b = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)
