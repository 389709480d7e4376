"""Batched inference, D features, generation grid, per-process model cache."""

from __future__ import annotations

import numpy as np
import pytest

from slidecensus.errors import InvalidInputError
from slidecensus.models import (
    TrainConfig,
    d_features,
    generation_grid,
    load_model,
    predict,
    train_infogan,
    write_png,
)


@pytest.fixture(scope="module")
def model_path(tiny_crops, tmp_path_factory):
    cfg = TrainConfig(k=3, z_dim=8, width=8, batch_size=16, iterations=3)
    return train_infogan(tiny_crops, cfg, tmp_path_factory.mktemp("m") / "m.pt",
                         log_every=100, progress=lambda r: None)


def test_predict_shapes_and_streaming(model_path, tiny_crops):
    model = load_model(model_path, device="cpu")
    clusters, probs = predict(model, tiny_crops)
    assert clusters.shape == (200,) and clusters.dtype == np.int64
    assert probs.shape == (200, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(clusters, probs.argmax(1))
    assert clusters.min() >= 0 and clusters.max() < 3
    c2, p2 = predict(model, tiny_crops, batch_size=7)  # streamed in uneven batches
    np.testing.assert_array_equal(c2, clusters)
    np.testing.assert_allclose(p2, probs, rtol=1e-5, atol=1e-6)
    c0, p0 = predict(model, np.zeros((0, 32, 32, 3), np.uint8))
    assert c0.shape == (0,) and p0.shape == (0, 3)
    with pytest.raises(InvalidInputError, match="uint8"):
        predict(model, tiny_crops.astype(np.float32))


def test_model_loaded_once(model_path):
    assert load_model(model_path, "cpu") is load_model(str(model_path), "cpu")


def test_d_features(model_path, tiny_crops):
    model = load_model(model_path, "cpu")
    f = d_features(model, tiny_crops[:10])
    assert f.shape == (10, 4 * 16 * 8) and f.dtype == np.float32
    assert np.isfinite(f).all()
    np.testing.assert_allclose(d_features(model, tiny_crops[:10], batch_size=3), f,
                               rtol=1e-5, atol=1e-6)


def test_generation_grid(model_path, tmp_path):
    model = load_model(model_path, "cpu")
    grid = generation_grid(model, n_rows=4, seed=0, pad=2)
    assert grid.shape == (4 * 34 + 2, 3 * 34 + 2, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid, generation_grid(model, n_rows=4, seed=0, pad=2))
    assert (grid[:2] == 255).all()  # white padding
    png = write_png(tmp_path / "g.png", grid)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
