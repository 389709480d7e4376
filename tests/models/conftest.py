"""Small CPU settings shared by the model tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidecensus.models import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread in the model tests (shared 2-core CI machines), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_crops() -> np.ndarray:
    """200 synthetic 32 x 32 uint8 crops: dark discs of two sizes on white."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    out = np.full((200, 32, 32, 3), 255, np.uint8)
    for i in range(200):
        r = 6 if i % 2 else 11
        disc = (yy - 16 + rng.integers(-2, 3)) ** 2 + (xx - 16 + rng.integers(-2, 3)) ** 2 < r * r
        out[i][disc] = rng.integers(40, 120, 3)
    return out


@pytest.fixture()
def tiny_config() -> TrainConfig:
    """A narrow network and a short schedule: fast on one CPU core."""
    return TrainConfig(k=3, z_dim=8, width=8, batch_size=16, iterations=4, checkpoint_every=2)
