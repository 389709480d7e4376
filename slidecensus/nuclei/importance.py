"""Importance weights of synthetic patches: how real each one looks (Hou et al. §3.3).

A small discriminator learns to tell real patches of the target images from synthetic ones;
its probability ``p`` that a synthetic patch is real estimates the density ratio
``p / (1 - p)`` of real to synthetic at that patch. Weighting each synthetic patch's loss by
that ratio trains the segmenter as if on the real distribution. The ratio is clipped (a few
confident patches would otherwise carry the loss) and normalised to mean 1.

Each synthetic patch is scored by a discriminator that did not see it (two folds), so the
weights measure realism, not memorisation.

References
----------
.. [1] L. Hou et al., "Robust histopathology image analysis: to label or to synthesize?",
   CVPR 2019, §3.3.
.. [2] M. Sugiyama, T. Suzuki, T. Kanamori, "Density ratio estimation in machine learning",
   Cambridge University Press, 2012 (the probabilistic-classification estimator).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError

__all__ = ["density_ratio_weights", "importance_weights", "real_probability"]


def density_ratio_weights(p_real: np.ndarray, clip: float = 10.0) -> np.ndarray:
    """Weights ``p / (1 - p)`` clipped to ``[1/clip, clip]`` and normalised to mean 1.

    Parameters
    ----------
    p_real : ndarray of float, shape (n,)
        The discriminator's probability that each synthetic patch is real.
    clip : float
        Largest ratio kept (and the reciprocal smallest).
    """
    p = np.asarray(p_real, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)):
        raise InvalidInputError(f"expected a non-empty 1-D array of probabilities, got "
                                f"shape {p.shape}")
    if clip < 1:
        raise InvalidInputError(f"clip must be >= 1, got {clip}")
    p = np.clip(p, 1e-6, 1 - 1e-6)
    r = np.clip(p / (1 - p), 1.0 / clip, clip)
    return (r / r.mean()).astype(np.float32)


def _discriminator(width: int = 16):
    """A small CNN: three strided convolutions, global average pooling, one logit."""
    import torch

    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 1))


def _as_input(x: np.ndarray):
    import torch

    return torch.from_numpy((x.astype(np.float32) - 160.0) / 60.0).permute(0, 3, 1, 2)


def real_probability(real: np.ndarray, synth_train: np.ndarray, synth_score: np.ndarray,
                     iterations: int = 300, batch: int = 32, seed: int = 0) -> np.ndarray:
    """Train a discriminator on real vs ``synth_train`` patches; P(real) of ``synth_score``.

    All patches are uint8 (n, s, s, 3) of the same side.
    """
    import torch

    for name, a in (("real", real), ("synth_train", synth_train), ("synth_score", synth_score)):
        if a.ndim != 4 or a.shape[3] != 3 or len(a) == 0:
            raise InvalidInputError(f"expected {name} patches (n, s, s, 3), got {a.shape}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = _discriminator()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    xr, xs = _as_input(real), _as_input(synth_train)
    half = batch // 2
    lossf = torch.nn.functional.binary_cross_entropy_with_logits
    net.train()
    for _ in range(iterations):
        ir = torch.from_numpy(rng.integers(0, len(xr), half))
        is_ = torch.from_numpy(rng.integers(0, len(xs), half))
        xb = torch.cat([xr[ir], xs[is_]])
        k = int(rng.integers(4))
        xb = torch.rot90(xb, k, (2, 3)) if k else xb
        yb = torch.cat([torch.ones(half), torch.zeros(half)])
        loss = lossf(net(xb)[:, 0], yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    out = []
    with torch.inference_mode():
        xq = _as_input(synth_score)
        for i in range(0, len(xq), 128):
            out.append(torch.sigmoid(net(xq[i:i + 128])[:, 0]).numpy())
    return np.concatenate(out).astype(np.float64)


def importance_weights(real: np.ndarray, synth: np.ndarray, iterations: int = 300,
                       clip: float = 10.0, seed: int = 0) -> np.ndarray:
    """Importance weight of every synthetic patch (mean 1), each scored by a discriminator
    trained on the other half of the synthetic patches (two folds)."""
    n = len(synth)
    if n < 2:
        raise InvalidInputError(f"need at least 2 synthetic patches, got {n}")
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % 2 == 0
    p = np.empty(n)
    for f in (True, False):
        p[fold == f] = real_probability(real, synth[fold != f], synth[fold == f], iterations,
                                        seed=seed + int(f))
    return density_ratio_weights(p, clip)
