"""The fast preset: presets by device, augmentations, the IIC term, k-means, and recovery of
drawn cell types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidecensus.errors import InvalidInputError
from slidecensus.models import (
    AugmentSpec,
    augment,
    iic_loss,
    kmeans,
    load_model,
    predict,
    preset_config,
    resolve_preset,
    train_infogan,
)
from slidecensus.models.metrics import purity


def _disc(yy, xx, cy, cx, r):
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def typed_cell_crops(n_per_type: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four drawn cell types as 32 x 32 window crops, and their labels.

    0: small dark round nucleus, thin pink rim (lymphocyte-like); 1: large pale nucleus in
    wide blue cytoplasm (blast-like); 2: three small dark lobes in granular pink cytoplasm
    (neutrophil-like); 3: a tiny purple speck, no cytoplasm (platelet-like). Position,
    size, colour and noise vary within each type.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32].astype(np.float64)
    crops, labels = [], []
    for t in range(4):
        for _ in range(n_per_type):
            img = np.full((32, 32, 3), 245.0) + rng.normal(0, 3, (32, 32, 3))
            cy, cx = 16 + rng.uniform(-1.5, 1.5, 2)
            s = rng.uniform(0.9, 1.1)
            if t == 0:
                img[_disc(yy, xx, cy, cx, 7 * s)] = (225, 170, 190)
                img[_disc(yy, xx, cy, cx, 5.5 * s)] = (70, 40, 110)
            elif t == 1:
                img[_disc(yy, xx, cy, cx, 13 * s)] = (150, 160, 210)
                img[_disc(yy, xx, cy, cx, 9 * s)] = (160, 120, 185)
            elif t == 2:
                cyto = _disc(yy, xx, cy, cx, 11 * s)
                img[cyto] = (230, 180, 190)
                img[cyto & (rng.random((32, 32)) < 0.25)] = (200, 120, 150)
                a0 = rng.uniform(0, 2 * np.pi)
                for j in range(3):
                    a = a0 + j * 2.1
                    img[_disc(yy, xx, cy + 4.5 * np.sin(a), cx + 4.5 * np.cos(a),
                              2.8 * s)] = (60, 30, 100)
            else:
                img[_disc(yy, xx, cy, cx, 3 * s)] = (120, 70, 150)
            img += rng.normal(0, 6, 3)  # stain variation of the whole crop
            crops.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(t)
    return np.stack(crops), np.array(labels)


def test_auto_preset_is_chosen_by_device():
    assert resolve_preset("auto", cuda=True)[0] == "paper"
    assert resolve_preset("auto", cuda=False)[0] == "fast"
    assert "no CUDA" in resolve_preset("auto", cuda=False)[1]
    assert resolve_preset("paper", cuda=False)[0] == "paper"  # asked for, not overridden
    with pytest.raises(InvalidInputError, match="preset"):
        resolve_preset("quick", cuda=False)


def test_presets_differ_where_the_issue_says():
    paper, fast = preset_config("paper"), preset_config("fast", k=8)
    assert (paper.width, paper.epochs, paper.iterations, paper.k) == (128, 10.0, None, 5)
    assert paper.lambda_iic == 0 and paper.crop_mode == "nucleus" and paper.arch == "resnet"
    assert fast.k == 8 and fast.arch == "compact" and fast.lambda_iic > 0
    assert fast.crop_mode == "field" and fast.iterations is not None and fast.q_colour
    assert preset_config("auto", cuda=True).preset == "paper"
    with pytest.raises(InvalidInputError, match="unknown training settings"):
        preset_config("fast", colour="red")


def test_preset_is_recorded_in_the_checkpoint(tmp_path):
    crops, _ = typed_cell_crops(20)
    cfg = preset_config("fast", k=4, iterations=2, refine="none")
    train_infogan(crops, cfg, tmp_path / "m.pt", log_every=100, progress=lambda r: None)
    model = load_model(tmp_path / "m.pt")
    assert model.config.preset == "fast" and model.config.crop_mode == "field"
    assert model.config.lambda_iic == cfg.lambda_iic


def test_augment_keeps_white_outside_and_changes_the_crop():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(8, 3, 32, 32)  # a white crop stays white under any geometric change
    spec = AugmentSpec(stain=0.0, noise=0.0)
    y = augment(x, gen, spec)
    assert torch.allclose(y, x, atol=1e-5)
    z = torch.zeros(8, 3, 32, 32)
    z[:, :, 8:16, 8:24] = -1.0  # an off-centre dark bar: rotations move it
    v1, v2 = augment(z, gen), augment(z, gen)
    assert v1.shape == z.shape and v1.min() >= -1 and v1.max() <= 1
    assert not torch.allclose(v1, v2)


def test_view_scale_sets_the_zoom_of_the_views_and_keeps_sizes():
    """``view_scale`` bounds the views' zoom: at 0 a centred disc keeps its area under any
    rotation, at 0.3 its area changes by up to (1.3)^2; bad values are refused."""
    from slidecensus.models.train import InfoGANTrainer

    gen = torch.Generator().manual_seed(0)
    for vs in (0.0, 0.05):
        cfg = preset_config("fast", k=4, view_scale=vs)
        trainer = InfoGANTrainer(cfg, torch.device("cpu"), gen)
        assert trainer.augment_spec.scale == pytest.approx((1 - vs, 1 + vs))
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = torch.ones(64, 3, 32, 32)
    disc[:, :, ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 36] = -1.0

    def areas(scale):
        spec = AugmentSpec(scale=scale, shift=0.0, stain=0.0, noise=0.0)
        return (augment(disc, gen, spec)[:, 0] < 0).sum((1, 2)).float() / (disc[0, 0] < 0).sum()

    assert torch.all((areas((1.0, 1.0)) - 1).abs() < 0.1)
    wide = areas((0.7, 1.3))
    assert float(wide.max() - wide.min()) > 0.5
    with pytest.raises(InvalidInputError, match="view_scale"):
        preset_config("fast", view_scale=1.5)


def test_iic_loss_rewards_agreeing_balanced_clusters():
    k = 4
    onehot = torch.eye(k).repeat(25, 1)  # 100 crops, balanced
    assert iic_loss(onehot, onehot).item() == pytest.approx(-np.log(k), abs=1e-4)
    uniform = torch.full((100, k), 1 / k)
    assert iic_loss(uniform, uniform).item() == pytest.approx(0.0, abs=1e-5)
    one_cluster = torch.zeros(100, k)
    one_cluster[:, 0] = 1
    assert iic_loss(one_cluster, one_cluster).item() == pytest.approx(0.0, abs=1e-5)
    shuffled = onehot[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    assert iic_loss(onehot, shuffled).item() > iic_loss(onehot, onehot).item() + 1.0


def test_nt_xent_matches_hand_computed_cases():
    from slidecensus.models.augment import nt_xent

    # two crops, orthogonal embeddings, both views equal: each embedding sees its pair at
    # cos 1 and two others at cos 0, so the loss is -log(e^(1/T) / (e^(1/T) + 2))
    e = torch.eye(2)
    t = 0.5
    want = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 2))
    assert nt_xent(e, e, t).item() == pytest.approx(want, rel=1e-5)
    # all embeddings equal: the pair is one of 2B - 1 equally likely choices
    same = torch.ones(5, 3)
    assert nt_xent(same, same, 0.2).item() == pytest.approx(np.log(9), rel=1e-5)
    # swapping the second view's rows breaks the pairs: the loss grows
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert nt_xent(z, z.roll(1, 0)).item() > nt_xent(z, z).item() + 1.0
    # scale does not matter (cosine similarity)
    assert nt_xent(3 * z, z).item() == pytest.approx(nt_xent(z, z).item(), rel=1e-5)


def test_contrastive_term_trains_a_projection_and_records_its_loss(tmp_path):
    """With lambda_nce > 0 the checkpoint holds the projection head and the history the
    term's value; the census model loads without it; a resume with the term switched off
    is refused."""
    from slidecensus.models.checkpoint import CheckpointError, load_checkpoint

    crops, _ = typed_cell_crops(20, seed=1)
    cfg = preset_config("fast", k=4, iterations=6, seed=0, lambda_nce=1.0,
                        checkpoint_every=3, refine="none")
    out = tmp_path / "m.pt"
    records = []
    train_infogan(crops, cfg, out, log_every=3, progress=records.append)
    ckpt = load_checkpoint(out)
    assert "P" in ckpt["weights"]
    assert all(r["loss_nce"] > 0 for r in records)
    clusters, _ = predict(load_model(out), crops)
    assert clusters.shape == (len(crops),)
    off = preset_config("fast", k=4, iterations=12, seed=0, lambda_nce=0.0, refine="none")
    with pytest.raises(CheckpointError, match="lambda_nce"):
        train_infogan(crops, off, out, resume=True, log_every=100, progress=lambda r: None)
    with pytest.raises(InvalidInputError, match="lambda_nce"):
        preset_config("fast", lambda_nce=1.0, lambda_iic=0.0)


def test_kmeans_finds_separated_groups():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(50)
    x = centres[truth] + 0.5 * torch.randn(150, 2, generator=gen)
    labels, found = kmeans(x, 3, gen)
    assert purity(truth.numpy(), labels.numpy()) == 1.0
    assert torch.cdist(found, centres).min(dim=0).values.max() < 0.5


@pytest.mark.slow
def test_fast_preset_recovers_drawn_cell_types(tmp_path):
    """The fast preset (shortened to 80 iterations: purity 0.985-1.0 over seeds 0-2, bf16
    and fp32) sorts four drawn cell types with purity >= 0.9."""
    crops, labels = typed_cell_crops(100, seed=0)
    cfg = preset_config("fast", k=4, iterations=80, seed=0)
    train_infogan(crops, cfg, tmp_path / "m.pt", log_every=1000, progress=lambda r: None)
    clusters, probs = predict(load_model(tmp_path / "m.pt"), crops)
    assert purity(labels, clusters) >= 0.9
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
