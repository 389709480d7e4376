"""Shapes, value ranges and the no-batch-norm rule of the networks; losses and the
gradient penalty on critics whose gradients are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slidecensus.errors import InvalidInputError
from slidecensus.models.networks import CriticHead, CriticTrunk, Generator, QHead
from slidecensus.models.train import (
    TrainConfig,
    build_networks,
    critic_loss,
    generator_loss,
    gradient_penalty,
    info_loss,
)


@pytest.mark.parametrize("width", [8, 16])
def test_shapes_and_ranges(width):
    torch.manual_seed(0)
    k, zd, b = 5, 32, 4
    g, trunk = Generator(k, zd, width), CriticTrunk(width)
    d, q = CriticHead(width), QHead(width, k)
    img = g(torch.randn(b, zd), F.one_hot(torch.arange(b) % k, k).float())
    assert img.shape == (b, 3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1
    h = trunk(img)
    assert h.shape == (b, width)
    assert d(h).shape == (b,)
    assert q(h).shape == (b, k)
    maps = trunk.forward_features(img)
    assert [m.shape[-1] for m in maps] == [16, 8, 8, 8]
    assert trunk.table1_features(img).shape == (b, 4 * 16 * width)
    for t in (img, h, d(h), q(h)):
        assert torch.isfinite(t).all()


def test_critic_has_no_batchnorm_and_generator_has():
    nets = build_networks(TrainConfig(width=8))
    for name in ("D_trunk", "D_head", "Q_head"):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                       for m in nets[name].modules()), name
    assert any(isinstance(m, nn.BatchNorm2d) for m in nets["G"].modules())


def test_critic_is_per_sample():
    # without batch norm a sample's critic value does not depend on the rest of the batch
    trunk, head = CriticTrunk(8), CriticHead(8)
    x = torch.randn(6, 3, 32, 32)
    full = head(trunk(x))
    alone = torch.cat([head(trunk(x[i:i + 1])) for i in range(6)])
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-5)


def test_loss_signs():
    hi, lo = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, 1.0])
    # a critic that scores real above fake has a negative loss: E[D(fake)] - E[D(real)]
    assert critic_loss(d_real=hi, d_fake=lo).item() == pytest.approx(0.0 - 3.0)
    assert critic_loss(d_real=lo, d_fake=hi).item() == pytest.approx(3.0)
    assert generator_loss(hi).item() == pytest.approx(-3.0)
    # a confident, right Q has a small loss; uniform logits give log k
    c = torch.tensor([0, 2])
    assert info_loss(torch.zeros(2, 4), c).item() == pytest.approx(math.log(4))
    assert info_loss(torch.tensor([[9.0, 0, 0], [0, 0, 9.0]]), c).item() < 1e-3


def test_gradient_penalty_linear_critic():
    # D(x) = <w, x> has gradient w everywhere: GP = (||w|| - 1)^2 for any interpolate
    w = torch.full((3, 2, 2), 0.5, requires_grad=True)  # ||w|| = 0.5 * sqrt(12)
    real, fake = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    alpha = torch.rand(5, 1, 1, 1)
    gp = gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake, alpha)
    norm = 0.5 * math.sqrt(12)
    assert gp.item() == pytest.approx((norm - 1) ** 2, rel=1e-5)
    # the penalty back-propagates into the critic: dGP/dw = 2 (||w|| - 1) w / ||w||
    gp.backward()
    expected = 2 * (norm - 1) * 0.5 / norm
    torch.testing.assert_close(w.grad, torch.full((3, 2, 2), expected))


def test_gradient_penalty_uses_interpolates():
    # D(x) = ||x||^2 / 2 has gradient x: at x_hat = alpha*real + (1-alpha)*fake
    real = torch.full((2, 3, 2, 2), 2.0)
    fake = torch.zeros(2, 3, 2, 2)
    alpha = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    gp = gradient_penalty(lambda x: 0.5 * x.flatten(1).pow(2).sum(1), real, fake, alpha)
    norms = [1.0 * math.sqrt(12), 0.5 * math.sqrt(12)]  # x_hat = 1 and 0.5 everywhere
    assert gp.item() == pytest.approx(sum((n - 1) ** 2 for n in norms) / 2, rel=1e-5)
    # a 1-Lipschitz critic with unit gradient is not penalised
    unit = torch.zeros(3, 2, 2)
    unit[0, 0, 0] = 1.0
    gp0 = gradient_penalty(lambda x: (x * unit).flatten(1).sum(1), real, fake, alpha)
    assert gp0.item() == pytest.approx(0.0, abs=1e-6)


def test_config_validation():
    from slidecensus.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="k must be >= 2"):
        TrainConfig(k=1)
    with pytest.raises(InvalidInputError, match="crop_size must be 32"):
        TrainConfig(crop_size=64)
    cfg = TrainConfig(k=8, width=32, betas=(0.5, 0.9))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # epoch = one pass of the critic's real batches over N crops x 4 rotations
    assert cfg.iterations_per_epoch(60_000) == 750
    assert cfg.total_iterations(60_000) == 7_500
    assert TrainConfig(iterations=12).total_iterations(60_000) == 12


def test_colour_histogram_bins_match_an_independent_lab_conversion():
    """Each zone's histogram sums to 1, and a crop of one colour puts all of it in the bin
    of that colour's CIE Lab value (skimage's conversion, not ours)."""
    import numpy as np
    from skimage.color import rgb2lab

    from slidecensus.models.networks import (
        COLOUR_BINS,
        COLOUR_DIM,
        COLOUR_RANGES,
        ColourHistogram,
    )

    colours = np.array([[120, 60, 160], [230, 150, 170], [250, 250, 250], [40, 20, 90]],
                       np.uint8)
    x = torch.from_numpy(np.repeat(np.repeat(colours[:, None, None], 32, 1), 32, 2))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    h = ColourHistogram()(x)
    assert h.shape == (4, COLOUR_DIM)
    zones = (h ** 2).reshape(4, 2, -1).sum(-1)
    assert torch.allclose(zones, torch.ones(4, 2), atol=1e-5)
    lab = rgb2lab(colours[None])[0]
    for i, (L, a, b) in enumerate(lab):
        idx = 0
        for v, (lo, hi) in zip((L, a, b), COLOUR_RANGES, strict=True):
            idx = idx * COLOUR_BINS + int(np.clip((v - lo) * COLOUR_BINS // (hi - lo), 0,
                                                  COLOUR_BINS - 1))
        assert h[i, idx] == pytest.approx(1.0) and h[i, COLOUR_BINS ** 3 + idx] == 1.0


def test_colour_histogram_is_rotation_invariant_and_sees_the_ring_apart():
    from slidecensus.models.networks import COLOUR_BINS, ColourHistogram

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    ch = ColourHistogram()
    for k in (1, 2, 3):
        assert torch.equal(ch(torch.rot90(x, k, dims=(2, 3))), ch(x))
    assert torch.equal(ch(torch.flip(x, dims=(3,))), ch(x))
    # the same colours moved from the centre to the ring change the ring's histogram
    y = torch.ones(1, 3, 32, 32)
    y[:, :, 12:20, 12:20] = -0.5
    z = torch.ones(1, 3, 32, 32)
    z[:, :, 0:8, 12:20] = -0.5
    hy, hz = ch(y), ch(z)
    n = COLOUR_BINS ** 3
    assert not torch.equal(hy[:, :n], hz[:, :n]) and not torch.equal(hy[:, n:], hz[:, n:])


def test_q_with_colour_round_trips_through_the_checkpoint(tmp_path):
    import numpy as np

    from slidecensus.models import load_model, predict, preset_config, train_infogan

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    cfg = preset_config("fast", k=3, iterations=2, q_colour=True, refine_steps=3)
    train_infogan(crops, cfg, tmp_path / "m.pt", log_every=100, progress=lambda r: None)
    model = load_model(tmp_path / "m.pt")
    assert model.config.q_colour and model.colour is not None
    _, p1 = predict(model, crops)
    _, p2 = predict(model, crops[::-1].copy())
    assert np.array_equal(p1[::-1], p2)  # per-crop, independent of the batch's order
    # the colour branch is read: turning it off changes Q's probabilities
    model.colour, saved = None, model.colour
    try:
        with pytest.raises(RuntimeError):
            predict(model, crops)  # the head expects the histograms next to the features
    finally:
        model.colour = saved


def _one_colour_crops(colours):
    import numpy as np

    x = torch.from_numpy(np.repeat(np.repeat(np.asarray(colours, np.uint8)[:, None, None],
                                             32, 1), 32, 2))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def test_soft_colour_histogram_shares_a_colour_between_the_bins_around_it():
    """A crop of one colour puts trilinear weights (to the bin centres, from skimage's Lab
    of the colour as the 64-level table holds it) on the 8 bins around it, in each zone."""
    import numpy as np
    from skimage.color import rgb2lab

    from slidecensus.models.networks import COLOUR_BINS, COLOUR_RANGES, ColourHistogram

    colours = np.array([[120, 60, 160], [230, 150, 170], [200, 120, 190]], np.uint8)
    h = ColourHistogram(soft=True, radii=(6.0, 14.0))(_one_colour_crops(colours))
    quantised = (np.floor(colours / 255 * 64) + 0.5) / 64
    lab = rgb2lab(quantised[None])[0]
    n = COLOUR_BINS ** 3
    for i, (L, a, b) in enumerate(lab):
        want = np.ones((1, 1, 1))
        for v, (lo, hi) in zip((L, a, b), COLOUR_RANGES, strict=True):
            pos = float(np.clip((v - lo) * COLOUR_BINS / (hi - lo) - 0.5, 0, COLOUR_BINS - 1))
            w = np.maximum(0.0, 1 - np.abs(pos - np.arange(COLOUR_BINS)))
            want = want[..., None] * w
        want = want.reshape(-1)
        got = (h[i] ** 2).numpy()
        assert np.allclose(got[:n], want, atol=1e-3) and np.allclose(got[n:], want, atol=1e-3)
        assert (want > 0).sum() > 1  # the colours chosen do fall between bin centres


def test_soft_colour_histogram_moves_little_when_a_colour_crosses_a_bin_edge():
    """Two colours 2 levels apart on either side of a hard bin edge: the hard histograms
    share nothing, the soft ones almost everything."""
    import numpy as np

    from slidecensus.models.networks import ColourHistogram

    hard = ColourHistogram()
    base = np.array([150, 90, 170])
    for g in range(40, 140):  # find a green level where the hard bin changes
        pair = np.array([[*base[:1], g, base[2]], [*base[:1], g + 2, base[2]]], np.uint8)
        hh = hard(_one_colour_crops(pair)) ** 2
        if not torch.allclose(hh[0], hh[1]):
            break
    else:
        pytest.fail("no bin edge found")
    soft = ColourHistogram(soft=True)(_one_colour_crops(pair)) ** 2
    assert (hh[0] - hh[1]).abs().sum() == pytest.approx(4.0)  # two zones, all moved
    assert (soft[0] - soft[1]).abs().sum() < 0.5


def test_soft_colour_histogram_is_rotation_invariant_and_sums_to_one_per_zone():
    from slidecensus.models.networks import COLOUR_BINS, ColourHistogram

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    ch = ColourHistogram(soft=True, radii=(6.0, 14.0))
    h = ch(x)
    assert torch.allclose((h ** 2).reshape(3, 2, COLOUR_BINS ** 3).sum(-1), torch.ones(3, 2),
                          atol=1e-5)
    for k in (1, 2, 3):
        assert torch.allclose(ch(torch.rot90(x, k, dims=(2, 3))), h, atol=1e-6)
    assert torch.allclose(ch(torch.flip(x, dims=(3,))), h, atol=1e-6)
    with pytest.raises(InvalidInputError):
        ColourHistogram(radii=(14.0, 6.0))


def test_models_from_before_the_colour_settings_load_with_hard_bins(tmp_path):
    """A checkpoint whose config predates ``colour_soft``/``colour_radii`` reads its colour
    histograms as it was trained: hard bins over an 8 px disc."""
    import numpy as np

    from slidecensus.models import load_model, predict, preset_config, train_infogan
    from slidecensus.models.checkpoint import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    cfg = preset_config("fast", k=3, iterations=2, refine_steps=3)
    train_infogan(crops, cfg, tmp_path / "m.pt", log_every=100, progress=lambda r: None)
    new = load_model(tmp_path / "m.pt")
    assert new.colour.soft and new.config.colour_radii == (6.0, 14.0)
    ckpt = load_checkpoint(tmp_path / "m.pt")
    for key in ("colour_soft", "colour_radii", "refine_colour_weight"):
        del ckpt["config"][key]
    save_checkpoint(ckpt, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert not old.colour.soft and old.config.colour_radii == (8.0, 14.0)
    assert not np.array_equal(predict(old, crops)[1], predict(new, crops)[1])


def test_exact_soft_histograms_do_not_depend_on_the_order_of_the_pixels():
    """The exact path (CUDA's, where scatter-adds land in any order) sums the soft votes
    without rounding: pixels taken in another order (a rotation permutes them within each
    zone) give the same bits, and the values agree with the CPU's float32 sums."""
    from slidecensus.models.networks import ColourHistogram

    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    exact = ColourHistogram(soft=True, radii=(6.0, 14.0), exact=True)
    h = exact(x)
    assert h.dtype == torch.float32
    for k in (1, 2, 3):
        assert torch.equal(exact(torch.rot90(x, k, dims=(2, 3))), h)
    assert torch.equal(exact(torch.flip(x, dims=(2,))), h)
    fast = ColourHistogram(soft=True, radii=(6.0, 14.0), exact=False)
    assert torch.allclose(fast(x), h, atol=1e-6)


def test_training_reads_the_colour_histograms_its_config_asks_for():
    """Q's head is trained on the histograms the census will compute: the trainer's
    colour branch follows ``colour_soft`` and ``colour_radii`` like the loaded model's."""
    from slidecensus.models import preset_config
    from slidecensus.models.train import InfoGANTrainer

    for soft, radii in ((True, (6.0, 14.0)), (False, (8.0, 14.0))):
        cfg = preset_config("fast", k=3, colour_soft=soft, colour_radii=radii)
        tr = InfoGANTrainer(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert tr.colour.soft == soft
        assert tr.colour.norm[0] == float(((torch.arange(32) - 15.5)[:, None] ** 2
                                           + (torch.arange(32) - 15.5)[None] ** 2
                                           < radii[0] ** 2).sum())
