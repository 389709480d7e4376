"""The refinement's clustering space: PCA whitening of each feature block before k-means."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from slidecensus.errors import InvalidInputError
from slidecensus.models import kmeans, preset_config
from slidecensus.models.metrics import purity
from slidecensus.models.refine import cluster_space, whiten


def _types_behind_a_nuisance(n_per: int = 150, seed: int = 0):
    """Three types apart along two quiet directions, and a loud direction (stain
    intensity, say) that varies as much within each type as anywhere: (x, truth)."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.arange(3).repeat_interleave(n_per)
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.9]])
    quiet = centres[truth] + 0.08 * torch.randn(len(truth), 2, generator=gen)
    loud = 6.0 * torch.randn(len(truth), 2, generator=gen)
    noise = 0.05 * torch.randn(len(truth), 6, generator=gen)
    return torch.cat([loud, quiet, noise], dim=1), truth


def test_whitening_finds_types_that_a_loud_nuisance_hides():
    x, truth = _types_behind_a_nuisance()
    plain = [purity(truth.numpy(), kmeans(cluster_space([x], 0), 3,
                                          torch.Generator().manual_seed(s))[0].numpy())
             for s in range(3)]
    white = [purity(truth.numpy(), kmeans(cluster_space([x], 4), 3,
                                          torch.Generator().manual_seed(s))[0].numpy())
             for s in range(3)]
    assert max(plain) < 0.75  # the loud directions decide the unwhitened clusters
    assert min(white) > 0.95


def test_whiten_gives_unit_rows_of_uncorrelated_unit_variance_components():
    x, _ = _types_behind_a_nuisance()
    z = whiten(x, 4, ridge=0.0)
    assert z.shape == (len(x), 4) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(x)))
    # before the rows are scaled, the components are white: check on a re-derivation
    c = x.double() - x.double().mean(0)
    w, v = torch.linalg.eigh(c.T @ c / (len(c) - 1))
    p = c @ v.flip(1)[:, :4] / w.flip(0)[:4].sqrt()
    torch.testing.assert_close(torch.cov(p.T), torch.eye(4, dtype=torch.float64),
                               atol=1e-8, rtol=0)
    torch.testing.assert_close(F.normalize(p, dim=1).abs().float(), z.abs(),
                               atol=1e-5, rtol=0)


def test_whitening_keeps_few_signal_directions_above_many_noise_directions():
    """Two types apart along one direction, and 40 noise directions: fully whitened, the
    noise gets the signal's weight; the ridge keeps the quiet noise down."""
    gen = torch.Generator().manual_seed(2)
    truth = torch.arange(2).repeat_interleave(200)
    signal = 3.0 * truth[:, None].float() + 0.3 * torch.randn(400, 1, generator=gen)
    noise = 0.02 * torch.randn(400, 40, generator=gen)
    x = torch.cat([signal, noise], dim=1)

    def score(z):
        return min(purity(truth.numpy(), kmeans(z, 2, torch.Generator().manual_seed(s))[0]
                          .numpy()) for s in range(3))

    assert score(whiten(x, 32, ridge=0.0)) < 0.8
    assert score(whiten(x, 32)) == 1.0


def test_whiten_is_deterministic_and_independent_of_row_order():
    x, _ = _types_behind_a_nuisance()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(whiten(x, 5), whiten(x, 5))
    torch.testing.assert_close(whiten(x[perm], 5), whiten(x, 5)[perm], atol=1e-5, rtol=0)


def test_cluster_space_weighs_blocks_equally_and_caps_components():
    x, _ = _types_behind_a_nuisance()
    small = x[:, 2:4]  # a 2-feature block cannot give 32 components
    z = cluster_space([x, 100 * small], 32)
    assert z.shape == (len(x), x.shape[1] + 2)
    torch.testing.assert_close(z[:, :x.shape[1]].norm(dim=1), torch.ones(len(x)))
    torch.testing.assert_close(z[:, x.shape[1]:].norm(dim=1), torch.ones(len(x)))
    flat = cluster_space([x, 100 * small], 0)  # the unwhitened space: centred unit blocks
    torch.testing.assert_close(flat[:, x.shape[1]:],
                               F.normalize(small - small.mean(0), dim=1))


def test_refine_pca_is_a_recorded_fast_setting():
    assert preset_config("fast").refine_pca > 0
    assert preset_config("paper").refine == "none"
    assert preset_config("fast", refine_pca=0).to_dict()["refine_pca"] == 0
    with pytest.raises(InvalidInputError, match="refine_pca"):
        preset_config("fast", refine_pca=-1)


class _ChannelMeans(torch.nn.Module):
    """A stand-in trunk whose features are the crop's mean per colour channel."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives refine_q_head a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_refine_q_head_clusters_in_the_whitened_space_it_is_given():
    """Crops whose red level is a loud nuisance and whose green and blue levels tell three
    types apart: the refinement's k-means finds the types only with ``pca`` > 0 (fails if
    ``refine_q_head`` drops its ``pca``)."""
    from slidecensus.models.networks import QHead
    from slidecensus.models.refine import refine_q_head

    gen = torch.Generator().manual_seed(0)
    truth = torch.arange(3).repeat_interleave(100)
    gb = torch.tensor([[100.0, 100.0], [120.0, 100.0], [110.0, 118.0]])[truth]
    gb = gb + 1.5 * torch.randn(300, 2, generator=gen)
    red = 128 + 60 * (torch.rand(300, generator=gen) * 2 - 1)
    level = torch.cat([red[:, None], gb], dim=1).round().clamp(0, 255).to(torch.uint8)
    crops = level[:, :, None, None].expand(300, 3, 32, 32).contiguous()

    def purity_with(pca: int) -> float:
        head = QHead(3, 3)
        labels = refine_q_head(_ChannelMeans(), head, crops, 3, torch.Generator()
                               .manual_seed(1), steps=0, pca=pca)
        return purity(truth.numpy(), labels.numpy())

    assert purity_with(0) < 0.75
    assert purity_with(3) > 0.95


def test_cluster_space_weighs_each_block_by_its_weight():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 10, generator=gen), torch.randn(200, 30, generator=gen)
    for pca in (0, 5):
        z = cluster_space([a, b], pca, [1.0, 2.0])
        n = z.shape[1] // 2 if pca else 10
        assert torch.allclose(z[:, :n].norm(dim=1), torch.ones(200), atol=1e-5)
        assert torch.allclose(z[:, n:].norm(dim=1), torch.full((200,), 2.0), atol=1e-5)
    with pytest.raises(ValueError):
        cluster_space([a, b], 5, [1.0])


class _HalfMeans(torch.nn.Module):
    """A stand-in trunk: the mean level of each channel over the crop's left half."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives refine_q_head a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :, :16].mean(dim=(2, 3))


class _RightMeans(torch.nn.Module):
    """A stand-in colour branch: the mean level of each channel over the right half."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unused", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :, 16:].float().mean(dim=(2, 3))


def test_refine_q_head_weighs_the_colour_block_as_asked():
    """The left half of each crop splits the cells one way, the right half another (two
    groupings that cross): the k-means follows the block given the larger weight (fails if
    ``refine_q_head`` drops ``colour_weight``)."""
    from slidecensus.models.networks import QHead
    from slidecensus.models.refine import refine_q_head

    gen = torch.Generator().manual_seed(0)
    left_type = torch.arange(2).repeat(150)             # 0 1 0 1 ...
    right_type = torch.arange(2).repeat_interleave(150)  # 0 ... 0 1 ... 1
    crops = torch.full((300, 3, 32, 32), 128, dtype=torch.float32)
    crops[:, :, :, :16] += (60.0 * left_type - 30)[:, None, None, None]
    crops[:, :, :, 16:] += (60.0 * right_type - 30)[:, None, None, None]
    crops += 8 * torch.randn(crops.shape, generator=gen)
    crops = crops.round().clamp(0, 255).to(torch.uint8)

    def labels_with(weight: float) -> torch.Tensor:
        return refine_q_head(_HalfMeans(), QHead(6, 2), crops, 2,
                             torch.Generator().manual_seed(1), colour=_RightMeans(),
                             steps=0, pca=3, colour_weight=weight)

    assert purity(right_type.numpy(), labels_with(4.0).numpy()) == 1.0
    assert purity(left_type.numpy(), labels_with(0.25).numpy()) == 1.0


def test_fast_preset_weighs_soft_colour_histograms_twice_the_trunk():
    cfg = preset_config("fast")
    assert cfg.colour_soft and cfg.colour_radii == (6.0, 14.0)
    assert cfg.refine_colour_weight == 2.0
    with pytest.raises(InvalidInputError):
        preset_config("fast", refine_colour_weight=0.0)
    with pytest.raises(InvalidInputError):
        preset_config("fast", colour_radii=(14.0, 6.0))


def test_more_restarts_never_end_at_a_worse_optimum():
    """k-means keeps the restart of least inertia: with more restarts from the same seed
    stream the inertia is never higher (the first restarts are the same draws)."""
    x, _ = _types_behind_a_nuisance()
    z = cluster_space([x], 6)

    def inertia(n_init: int) -> float:
        labels, centres = kmeans(z, 5, torch.Generator().manual_seed(3), n_init=n_init)
        return float(((z - centres[labels]) ** 2).sum())

    values = [inertia(n) for n in (1, 4, 16, 64)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(values))
    assert values[-1] < values[0]  # and here the restarts do find a better optimum
    assert preset_config("fast").refine_restarts == 128
    with pytest.raises(InvalidInputError):
        preset_config("fast", refine_restarts=0)


def test_refine_q_head_runs_the_restarts_it_is_given():
    """The refinement's labels are k-means with ``restarts`` restarts in its clustering
    space, from the generator it is given (fails if ``refine_q_head`` drops ``restarts``)."""
    from slidecensus.models.networks import QHead
    from slidecensus.models.refine import refine_q_head

    x, _ = _types_behind_a_nuisance()
    level = (128 + 12 * x[:, :3]).round().clamp(0, 255).to(torch.uint8)
    crops = level[:, :, None, None].expand(len(x), 3, 32, 32).contiguous()
    space = cluster_space([_ChannelMeans()(crops.float())], 3)
    got, want = {}, {}
    for restarts in (1, 64):
        got[restarts] = refine_q_head(_ChannelMeans(), QHead(3, 6), crops, 6,
                                      torch.Generator().manual_seed(5), steps=0, pca=3,
                                      restarts=restarts)
        want[restarts] = kmeans(space, 6, torch.Generator().manual_seed(5),
                                n_init=restarts)[0]
        assert torch.equal(got[restarts], want[restarts])
    assert not torch.equal(got[1], got[64])  # the case tells the two apart
