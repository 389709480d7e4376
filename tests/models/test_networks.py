"""Shapes, value ranges and the no-batch-norm rule of the networks; losses and the
gradient penalty on critics whose gradients are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
