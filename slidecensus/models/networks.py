"""Residual networks of the cell model: generator G, critic trunk and heads D and Q.

The layout follows Hu et al. (2018), who take the residual WGAN-GP networks of
Gulrajani et al. (2017) and add InfoGAN's auxiliary network Q (Chen et al., 2016):

* **G** maps a one-hot categorical code ``c`` (``k`` values) concatenated with Gaussian
  noise ``z`` to a 32 x 32 RGB image in [-1, 1]: a linear layer to 4 x 4 x ``width``,
  three residual blocks with nearest-neighbour upsampling and batch normalisation
  (4 -> 8 -> 16 -> 32), then batch norm, ReLU, a 3 x 3 convolution and ``tanh``.
* **D trunk** maps an image to a feature vector: four residual blocks, the first two with
  mean-pool downsampling (32 -> 16 -> 8), the last two at 8 x 8, **no batch normalisation**
  (the gradient penalty is defined per sample, and batch norm couples the samples of a
  batch, Gulrajani et al., section 4), then ReLU and a global mean.
* **D head** is one linear unit: the Wasserstein critic value.
* **Q head** shares D's trunk and ends in ``k`` logits; a softmax turns them into
  Q(c | x), which is the cluster assignment of a real cell.

References
----------
.. [1] B. Hu, Y. Tang, E. I-C. Chang, Y. Fan, M. Lai, Y. Xu. "Unsupervised Learning for
   Cell-level Visual Representation in Histopathology Images with Generative Adversarial
   Networks." IEEE J. Biomed. Health Inform. 23(3), 2019. arXiv:1711.11317.
.. [2] I. Gulrajani, F. Ahmed, M. Arjovsky, V. Dumoulin, A. Courville. "Improved Training
   of Wasserstein GANs." NeurIPS 2017.
.. [3] X. Chen, Y. Duan, R. Houthooft, J. Schulman, I. Sutskever, P. Abbeel. "InfoGAN:
   Interpretable Representation Learning by Information Maximizing Generative
   Adversarial Nets." NeurIPS 2016.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..fastops import max_pool2

__all__ = [
    "ARCHS",
    "COLOUR_DIM",
    "CROP_SIZE",
    "ColourHistogram",
    "CompactGenerator",
    "CompactTrunk",
    "CriticHead",
    "CriticTrunk",
    "Generator",
    "ProjectionHead",
    "QHead",
    "build_generator",
    "build_trunk",
    "q_input",
    "q_input_dim",
]

#: Network families: ``resnet`` is the paper's (Gulrajani et al.'s residual networks),
#: ``compact`` the plain convolutional networks of the CPU (``fast``) preset.
ARCHS = ("resnet", "compact")

#: Side of the square cell crops every network here reads or draws (Hu et al., section III-A).
CROP_SIZE = 32


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Mean-pool downsampling by 2 (the critic's resampling in [2])."""
    return F.avg_pool2d(x, 2)


class _UpBlock(nn.Module):
    """Generator residual block: BN-ReLU-up-conv-BN-ReLU-conv, plus an up-conv1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(up)


class _DownBlock(nn.Module):
    """Critic residual block without normalisation, optionally mean-pooled by 2.

    ``first`` is the "optimised" input block of [2]: no activation before the first
    convolution (the input is an image), and the shortcut pools before its 1 x 1 conv.
    """

    def __init__(self, c_in: int, c_out: int, *, down: bool, first: bool = False) -> None:
        super().__init__()
        self.first = first
        self.down = down
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = _pool(h)
        s = x
        if self.shortcut is not None:
            s = self.shortcut(_pool(s)) if (self.first and self.down) else self.shortcut(s)
            if self.down and not self.first:
                s = _pool(s)
        return h + s


class Generator(nn.Module):
    """G(z, c): noise and a one-hot categorical code to a 32 x 32 RGB image in [-1, 1].

    Parameters
    ----------
    k : int
        Number of values of the categorical code (number of cell clusters).
    z_dim : int
        Dimensions of the Gaussian noise (32 in Hu et al.; 64 for large cohorts).
    width : int
        Channels of every residual block (128 in [2]; narrower is practical on CPU).
    """

    def __init__(self, k: int, z_dim: int, width: int) -> None:
        super().__init__()
        self.k, self.z_dim, self.width = int(k), int(z_dim), int(width)
        self.fc = nn.Linear(self.k + self.z_dim, 4 * 4 * self.width)
        self.blocks = nn.Sequential(*(_UpBlock(self.width, self.width) for _ in range(3)))
        self.bn = nn.BatchNorm2d(self.width)
        self.to_rgb = nn.Conv2d(self.width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, c_onehot: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [-1, 1] from ``z`` (B, z_dim) and ``c_onehot`` (B, k)."""
        h = self.fc(torch.cat([c_onehot, z], dim=1)).view(-1, self.width, 4, 4)
        h = F.relu(self.bn(self.blocks(h)))
        return torch.tanh(self.to_rgb(h))


class CriticTrunk(nn.Module):
    """Shared trunk of D and Q: four residual blocks, no batch norm, mean-pool downsampling.

    Parameters
    ----------
    width : int
        Channels of every residual block.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = int(width)
        w = self.width
        self.blocks = nn.ModuleList([
            _DownBlock(3, w, down=True, first=True),  # 32 -> 16
            _DownBlock(w, w, down=True),  # 16 -> 8
            _DownBlock(w, w, down=False),  # 8
            _DownBlock(w, w, down=False),  # 8
        ])

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output map of every residual block (the feature source of Hu et al., Table I)."""
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature vector (B, width): ReLU then global mean of the last block."""
        return F.relu(self.forward_features(x)[-1]).mean(dim=(2, 3))

    def table1_features(self, x: torch.Tensor) -> torch.Tensor:
        """Each block's map max-pooled to 4 x 4, flattened and concatenated (B, 4*16*width).

        This is the representation Hu et al. feed to a linear SVM (their Table I).
        """
        maps = self.forward_features(x)
        return torch.cat([F.adaptive_max_pool2d(m, 4).flatten(1) for m in maps], dim=1)


class CriticHead(nn.Module):
    """Critic value D(x) from the trunk's feature vector: one linear unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(int(width), 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Critic values, shape (B,)."""
        return self.fc(h).squeeze(1)


class ProjectionHead(nn.Module):
    """SimCLR's projection g(h): a hidden layer, ReLU, then ``out`` dimensions, on which
    the contrastive term is computed (the trunk's features below it keep more of what
    the views do not share; Chen et al. 2020). Used in training only."""

    def __init__(self, width: int, hidden: int = 128, out: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(int(width), hidden), nn.ReLU(),
                                 nn.Linear(hidden, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Projections, shape (B, out)."""
        return self.net(h)


class QHead(nn.Module):
    """Auxiliary head Q(c | x): a hidden layer then ``k`` logits (softmax gives Q(c | x)).

    ``width`` is the length of its input, ``hidden`` that of its hidden layer (default:
    ``width``).

    ``norm`` puts batch normalisation on the hidden layer (InfoGAN's own Q networks have
    it; allowed because the gradient penalty covers D's head, not Q's). It keeps Q's input
    scale fixed while the shared trunk's features grow under the critic's updates.
    """

    def __init__(self, width: int, k: int, norm: bool = False,
                 hidden: int | None = None) -> None:
        super().__init__()
        hid = int(width if hidden is None else hidden)
        self.hidden = nn.Linear(int(width), hid)
        self.norm = nn.BatchNorm1d(hid) if norm else None
        self.out = nn.Linear(hid, int(k))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, k)."""
        h = self.hidden(h)
        if self.norm is not None:
            return self.out(F.relu(self.norm(h)))
        return self.out(F.leaky_relu(h, 0.2))


class CompactTrunk(nn.Module):
    """Shared D/Q trunk of the ``fast`` preset: four 3 x 3 convolutions (``w, 2w, 4w, 4w``
    channels), each with group norm and ReLU, 2 x 2 max-pooled after the first three
    (32 -> 4), then a global mean.

    Group norm normalises each sample on its own, so the per-sample gradient penalty stays
    well defined (batch norm would couple the samples, Gulrajani et al., section 4). At
    width 16 a forward pass costs about 3.4 M multiply-adds per crop, about 1/60 of the
    paper's width-128 residual trunk, which is what lets Q classify at segmentation speed
    on a CPU.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = int(width)
        w = self.width
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                   for a, b in itertools.pairwise(chans))
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, max(1, b // 4)), b) for b in chans[1:])
        self.out_dim = 4 * w

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output map of every convolution block (after norm and ReLU, before pooling)."""
        out = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = F.relu(norm(conv(x)))
            out.append(x)
            if i < 3:
                x = max_pool2(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature vector (B, 4 * width): global mean of the last block."""
        return self.forward_features(x)[-1].mean(dim=(2, 3))

    def table1_features(self, x: torch.Tensor) -> torch.Tensor:
        """Each block's map max-pooled to 4 x 4, flattened and concatenated (Table I)."""
        maps = self.forward_features(x)
        return torch.cat([F.adaptive_max_pool2d(m, 4).flatten(1) for m in maps], dim=1)


class CompactGenerator(nn.Module):
    """G of the ``fast`` preset: a linear layer to 4 x 4 x ``4 width``, then three
    upsample-convolution stages (``2w, w, w`` channels, batch norm and ReLU), a 3 x 3
    convolution to RGB and ``tanh``."""

    def __init__(self, k: int, z_dim: int, width: int) -> None:
        super().__init__()
        self.k, self.z_dim, self.width = int(k), int(z_dim), int(width)
        w = self.width
        self.fc = nn.Linear(self.k + self.z_dim, 4 * 4 * 4 * w)
        self.bn0 = nn.BatchNorm2d(4 * w)
        chans = [4 * w, 2 * w, w, w]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                   for a, b in itertools.pairwise(chans))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in chans[1:])
        self.to_rgb = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, c_onehot: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [-1, 1] from ``z`` (B, z_dim) and ``c_onehot`` (B, k)."""
        h = self.fc(torch.cat([c_onehot, z], dim=1)).view(-1, 4 * self.width, 4, 4)
        h = F.relu(self.bn0(h))
        for conv, bn in zip(self.convs, self.bns, strict=True):
            h = F.relu(bn(conv(F.interpolate(h, scale_factor=2, mode="nearest"))))
        return torch.tanh(self.to_rgb(h))


def build_trunk(arch: str, width: int) -> CriticTrunk | CompactTrunk:
    """The shared D/Q trunk of network family ``arch`` (see :data:`ARCHS`)."""
    return CompactTrunk(width) if arch == "compact" else CriticTrunk(width)


def build_generator(arch: str, k: int, z_dim: int, width: int) -> Generator | CompactGenerator:
    """G of network family ``arch``."""
    return CompactGenerator(k, z_dim, width) if arch == "compact" else Generator(k, z_dim,
                                                                                 width)


def trunk_dim(arch: str, width: int) -> int:
    """Length of the trunk's feature vector (the input of D's and Q's heads)."""
    return 4 * int(width) if arch == "compact" else int(width)


def _srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) of sRGB values in [0, 1], channels on dim 1; float32."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bj...->bi...", m, lin)
    white = torch.tensor([0.950456, 1.0, 1.088754], dtype=rgb.dtype, device=rgb.device)
    t = xyz / white.view(1, 3, *([1] * (rgb.dim() - 2)))
    eps = (6 / 29) ** 3
    f = torch.where(t > eps, t.clamp_min(eps) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


#: Bins per L*, a*, b* axis and their ranges (L* 0-100; a* and b* cover stained cells:
#: H&E and Romanowsky stains are purple to pink, white background at a* = b* = 0).
COLOUR_BINS = 6
COLOUR_RANGES = ((0.0, 100.0), (-40.0, 60.0), (-60.0, 40.0))
#: Radii (crop pixels of a 32 px crop) of the inner disc and the outer edge of the ring.
COLOUR_RADII = (8.0, 14.0)
#: Length of :class:`ColourHistogram`'s output.
COLOUR_DIM = 2 * COLOUR_BINS ** 3
_LUT_LEVELS = 64
_FRAC_STEPS = 4096


class ColourHistogram(nn.Module):
    """Fixed colour statistics of a crop for Q: the square roots of its CIE L*a*b*
    histograms (6 x 6 x 6 bins) over an inner disc (the nucleus and what surrounds it) and
    a ring around it (the cytoplasm's edge), each summing to 1.

    Not learned and rotation-invariant. On the real blood cells k-means on these alone
    sorts the 8 types at purity 0.74, against 0.56 for the compact trunk's features, which
    see granules and tint poorly at 32 px (docs/benchmarks.md, cell model). No gradient
    flows through the hard binning; the trunk's branch of Q keeps L_Q's gradient into G.

    ``soft``: each pixel's vote is shared between the 8 bins around its colour (trilinear
    weights to the bin centres), so a colour near a bin edge does not jump between bins
    with a small stain shift. With the inner disc at 6 px instead of 8, k-means on these
    alone sorts the blood cells at 0.805 instead of 0.758, and the demo's drawn cells at
    0.825 instead of 0.660 (docs/benchmarks.md, cell model). ``radii`` are in pixels of a
    32 px crop.
    """

    def __init__(self, size: int = CROP_SIZE, soft: bool = False,
                 radii: tuple[float, float] = COLOUR_RADII, exact: bool | None = None
                 ) -> None:
        super().__init__()
        #: Soft votes summed exactly (float64 on a 2^-12 grid), so the order of the
        #: additions cannot change a bit: None means on CUDA, whose scatter-add is atomic
        #: and unordered (the CPU's adds each row in pixel order).
        self.exact = exact
        r0, r1 = (float(v) for v in radii)
        if not 0 < r0 < r1:
            raise InvalidInputError(f"colour radii must satisfy 0 < inner < outer, got {radii}")
        self.soft = bool(soft)
        c = (size - 1) / 2
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        r = torch.hypot(yy - c, xx - c) * (CROP_SIZE / size)
        zone = torch.full((size, size), -1, dtype=torch.int64)
        zone[r < r0] = 0
        zone[(r >= r0) & (r < r1)] = 1
        zone = zone.flatten()
        keep = torch.nonzero(zone >= 0).flatten()
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("offset", zone[keep] * COLOUR_BINS ** 3, persistent=False)
        counts = torch.bincount(zone[keep], minlength=2).float()
        self.register_buffer("norm", counts.repeat_interleave(COLOUR_BINS ** 3),
                             persistent=False)
        # colour bin of every RGB colour quantised to 64 levels per channel, so a forward
        # pass is a table lookup and a scatter, not a colour conversion per pixel
        lv = (torch.arange(_LUT_LEVELS, dtype=torch.float64) + 0.5) / _LUT_LEVELS
        grid = torch.stack(torch.meshgrid(lv, lv, lv, indexing="ij")).reshape(1, 3, -1)
        lab = _srgb_to_lab(grid)[0]
        lut = torch.zeros(lab.shape[1], dtype=torch.int64)
        frac = torch.zeros(3, lab.shape[1], dtype=torch.float32)
        for ch, (lo, hi) in enumerate(COLOUR_RANGES):
            pos = (lab[ch] - lo) * (COLOUR_BINS / (hi - lo))
            if soft:  # the lower of the two bin centres around the colour, and the weight
                pos = (pos - 0.5).clamp(0, COLOUR_BINS - 1)  # of the upper one
                b = pos.floor().long().clamp(0, COLOUR_BINS - 2)
                # weights on a grid of 2^-12: the products of three are then exact in
                # float64, so a histogram summed in float64 is the same in any order
                frac[ch] = (torch.round((pos - b) * _FRAC_STEPS) / _FRAC_STEPS).float()
            else:
                b = pos.floor().long().clamp(0, COLOUR_BINS - 1)
            lut = lut * COLOUR_BINS + b
        self.register_buffer("lut", lut, persistent=False)
        self.register_buffer("frac", frac if soft else torch.zeros(3, 0), persistent=False)
        self.out_dim = COLOUR_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, COLOUR_DIM) float32 from images (B, 3, size, size) in [-1, 1]."""
        n = COLOUR_BINS
        with torch.autocast(x.device.type, enabled=False), torch.no_grad():
            q = x.detach().float().flatten(2)[:, :, self.keep].add_(1).mul_(_LUT_LEVELS / 2)
            q = q.to(torch.int32).clamp_(0, _LUT_LEVELS - 1)  # truncation: floor, as q >= -1
            rgb = q[:, 0].mul(_LUT_LEVELS).add_(q[:, 1]).mul_(_LUT_LEVELS).add_(q[:, 2])
            idx = self.lut[rgb].add_(self.offset)
            # room past the last bin, so the soft votes can be scattered into shifted views
            hist = torch.zeros(x.shape[0], COLOUR_DIM + n * n + n + 1, device=x.device)
            if not self.soft:
                hist.scatter_add_(1, idx, torch.ones(idx.shape, device=x.device))
            else:  # each pixel's vote shared between the 8 bins around its colour
                exact = x.is_cuda if self.exact is None else self.exact
                frac = self.frac.double() if exact else self.frac
                hist = hist.to(frac.dtype)
                fa, fb, fc = frac[0][rgb], frac[1][rgb], frac[2][rgb]
                ga, gb, gc = 1 - fa, 1 - fb, 1 - fc
                for wa, da in ((ga, 0), (fa, n * n)):
                    for wb, db in ((gb, 0), (fb, n)):
                        wab = wa * wb
                        hist[:, da + db:].scatter_add_(1, idx, wab * gc)
                        hist[:, da + db + 1:].scatter_add_(1, idx, wab * fc)
            return (hist[:, :COLOUR_DIM].float() / self.norm).sqrt()


def q_input_dim(arch: str, width: int, colour: bool) -> int:
    """Length of Q's input: the trunk's features, plus the colour histograms when used."""
    return trunk_dim(arch, width) + (COLOUR_DIM if colour else 0)


def q_input(trunk: nn.Module, x: torch.Tensor, colour: ColourHistogram | None,
            h: torch.Tensor | None = None) -> torch.Tensor:
    """What Q's head reads for images ``x``: the shared trunk's features (``h`` when
    already computed), with the colour histograms appended when ``colour`` is given."""
    h = trunk(x) if h is None else h
    if colour is None:
        return h
    return torch.cat([h, colour(x).to(h.dtype)], dim=1)
