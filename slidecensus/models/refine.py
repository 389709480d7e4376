"""Sorting real cells with Q after training: k-means on the trunk's features, distilled
into Q's head.

InfoGAN's L_Q and the consistency term shape the shared trunk's features well before
Q's own argmax settles: a head that learns a cluster late, or leaves one empty, lags the
features it reads (measured in docs/benchmarks.md, cell model). The refinement step takes
the trained trunk as it is, clusters its features of the real crops with k-means (k-means++
seeding, several restarts, the lowest inertia kept), then trains Q's head alone with
cross-entropy to predict those clusters from augmented views. The trunk, D and G are not
changed; Q still classifies every cell of the census on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WHITEN_RIDGE", "cluster_space", "kmeans", "whiten"]


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, n_init: int = 8,
           n_iter: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, the best of ``n_init`` restarts.

    Parameters
    ----------
    x : Tensor (n, d), float32
    k : number of clusters (<= n)
    generator : CPU torch.Generator for the seeding

    Returns
    -------
    labels : Tensor (n,) int64
    centres : Tensor (k, d)
    """
    x = x.float()
    n = x.shape[0]
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        idx = [int(torch.randint(n, (1,), generator=generator))]
        d2 = ((x - x[idx[0]]) ** 2).sum(1)
        for _ in range(1, k):
            probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / n)
            j = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            idx.append(j)
            d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
        centres = x[idx].clone()
        for _ in range(n_iter):
            labels = torch.cdist(x, centres).argmin(1)
            new = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).float()
            empty = counts == 0
            new = new / counts.clamp_min(1)[:, None]
            new[empty] = centres[empty]
            if torch.allclose(new, centres):
                centres = new
                break
            centres = new
        labels = torch.cdist(x, centres).argmin(1)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = (labels, centres), inertia
    return best


#: Ridge of :func:`whiten`, as a fraction of the first component's variance.
WHITEN_RIDGE = 0.003


def whiten(x: torch.Tensor, n: int, ridge: float = WHITEN_RIDGE) -> torch.Tensor:
    """The first ``n`` principal components of ``x`` (rows are samples), each divided by
    ``sqrt(variance + ridge * the first component's variance)``, then each row scaled to
    unit length; float32.

    PCA whitening before k-means (Coates & Ng, 2012) gives the directions that tell cells
    apart the same weight as the few that carry most of the variance (stain intensity,
    how much background the window holds). The ridge keeps directions of almost no
    variance (pure noise where the types differ in only a few) from being blown up to the
    same weight: four drawn types sorted at purity 0.77 fully whitened, 1.0 with it, while
    the blood cells keep most of the gain (docs/benchmarks.md). Exact and deterministic:
    an eigendecomposition of the covariance in float64, each component's sign fixed by its
    largest loading.
    """
    z = x.double()
    z = z - z.mean(0)
    n = max(1, min(int(n), z.shape[1], z.shape[0]))
    w, v = torch.linalg.eigh(z.T @ z / max(len(z) - 1, 1))
    w, v = w.flip(0)[:n].clamp_min(0), v.flip(1)[:, :n]
    sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    v = v * torch.where(sign == 0, 1.0, sign)
    scale = (w + ridge * float(w[0])).clamp_min(1e-12).sqrt()
    return F.normalize(z @ v / scale, dim=1).float()


def cluster_space(blocks: list[torch.Tensor], pca: int = 0,
                  weights: list[float] | None = None) -> torch.Tensor:
    """What k-means clusters: each feature block (trunk features, colour histograms)
    centred and scaled to unit length, or with ``pca`` > 0 whitened to its first ``pca``
    principal components (:func:`whiten`), times its weight (default 1 each), and the
    blocks side by side.

    Blood cells, three models: purity 0.757 with unit-length blocks, 0.781 with each
    block whitened to 32 components (docs/benchmarks.md, cell model).
    """
    weights = [1.0] * len(blocks) if weights is None else [float(w) for w in weights]
    if len(weights) != len(blocks):
        raise ValueError(f"{len(weights)} weights for {len(blocks)} feature blocks")
    if pca > 0:
        return torch.cat([w * whiten(b, pca) for b, w in zip(blocks, weights, strict=True)],
                         dim=1)
    return torch.cat([w * F.normalize(b - b.mean(0), dim=1)
                      for b, w in zip(blocks, weights, strict=True)], dim=1)


def trunk_features(trunk: nn.Module, crops: torch.Tensor, batch: int = 1024,
                   amp: bool = False) -> torch.Tensor:
    """Trunk features (n, d) float32 of uint8 NCHW ``crops`` (no gradients)."""
    from .train import to_model_input

    dev = next(trunk.parameters()).device
    out = []
    ctx = (torch.autocast(dev.type, dtype=torch.bfloat16) if amp
           else torch.autocast(dev.type, enabled=False))
    with torch.no_grad(), ctx:
        for i in range(0, crops.shape[0], batch):
            out.append(trunk(to_model_input(crops[i:i + batch].to(dev))).float())
    return torch.cat(out)


def refine_q_head(trunk: nn.Module, q_head: nn.Module, crops: torch.Tensor, k: int,
                  generator: torch.Generator, *, colour: nn.Module | None = None,
                  steps: int = 300, batch: int = 256, lr: float = 1e-3,
                  amp: bool = False, pca: int = 0, colour_weight: float = 1.0,
                  restarts: int = 8) -> torch.Tensor:
    """Cluster the trunk's features of ``crops`` (uint8 NCHW) with k-means and train
    ``q_head`` alone to predict the clusters; returns the k-means labels (n,).

    Features are centred and scaled to unit length first (cosine k-means): measured
    against per-dimension standardisation, which blows up near-constant features. With
    ``colour`` (a :class:`~.networks.ColourHistogram`), Q's head also reads the crops'
    colour histograms, and k-means clusters both blocks, each centred and scaled to unit
    length (what the trunk sees of shape, what the histograms see of stain and granules),
    the colour block times ``colour_weight``. With ``pca`` > 0 each block is first
    whitened to that many principal components (:func:`cluster_space`); Q's head still
    reads the raw features. ``restarts`` is k-means' ``n_init``.
    """
    feats = trunk_features(trunk, crops, amp=amp)
    blocks = [feats.cpu()]
    if colour is not None:
        col = colour_features(colour, crops)
        blocks.append(col.cpu())
        feats = torch.cat([feats, col], dim=1)
    weights = [1.0, colour_weight][:len(blocks)]
    labels, _ = kmeans(cluster_space(blocks, pca, weights), k, generator, n_init=restarts)
    labels = labels.to(feats.device)
    opt = torch.optim.Adam(q_head.parameters(), lr=lr)
    was_training = q_head.training
    q_head.train()
    n = feats.shape[0]
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),), generator=generator).to(feats.device)
        loss = F.cross_entropy(q_head(feats[idx]).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    q_head.train(was_training)
    return labels


def colour_features(colour: nn.Module, crops: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Colour histograms (n, d) float32 of uint8 NCHW ``crops``."""
    from .train import to_model_input

    dev = next(iter(colour.buffers())).device
    with torch.no_grad():
        return torch.cat([colour(to_model_input(crops[i:i + batch].to(dev)))
                          for i in range(0, crops.shape[0], batch)])
