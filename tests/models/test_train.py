"""Training on CPU with tiny networks: Q learns c, determinism, checkpoints, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidecensus.errors import InvalidInputError
from slidecensus.models import (
    FORMAT_VERSION,
    CellModel,
    CheckpointError,
    TrainConfig,
    load_checkpoint,
    load_model,
    predict,
    train_infogan,
)
from slidecensus.models.train import InfoGANTrainer, build_networks


def _weights(path):
    return load_checkpoint(path)["weights"]


def _assert_same_weights(a, b):
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key}"


def test_q_step_learns_the_code():
    """L_Q starts at chance (log k) and falls clearly: Q recovers c from G(z, c)."""
    cfg = TrainConfig(k=3, z_dim=8, width=8, batch_size=32, lr=2e-3, seed=0)
    trainer = InfoGANTrainer(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    losses = [trainer.q_step().item() for _ in range(100)]
    assert np.mean(losses[:10]) == pytest.approx(np.log(3), abs=0.15)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert np.isfinite(losses).all()


def test_critic_step_separates_real_from_generated():
    """A few critic steps make E[D(x)] - E[D(G(z, c))] positive; GP stays finite."""
    cfg = TrainConfig(k=3, z_dim=8, width=8, batch_size=16, lr=2e-3, seed=0)
    trainer = InfoGANTrainer(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    real = torch.full((16, 3, 32, 32), 0.8)  # a flat light image, unlike G's output
    out = [trainer.critic_step(real) for _ in range(10)]
    assert all(torch.isfinite(torch.stack(o)).all() for o in out)
    assert out[-1][2].item() > 0
    # the generator step then raises E[D(G(z, c))], i.e. lowers L_G
    before = trainer.generator_step().item()
    after = min(trainer.generator_step().item() for _ in range(5))
    assert after < before


def test_short_run_logs_finite_losses(tiny_crops, tmp_path):
    cfg = TrainConfig(k=3, z_dim=8, width=8, batch_size=16, n_critic=2, iterations=6,
                      checkpoint_every=10**6)
    recs = []
    train_infogan(tiny_crops, cfg, tmp_path / "m.pt", log_every=3, progress=recs.append)
    assert [r["iteration"] for r in recs] == [3, 6]
    for r in recs:
        assert all(np.isfinite(v) for v in r.values())
        assert r["it_per_s"] > 0


def test_checkpoint_contents(tiny_crops, tiny_config, tmp_path):
    path = train_infogan(tiny_crops, tiny_config, tmp_path / "m.pt", log_every=2,
                         progress=lambda r: None)
    data = load_checkpoint(path)
    assert data["format_version"] == FORMAT_VERSION
    assert data["config"]["k"] == 3 and data["config"]["crop_size"] == 32
    assert data["config"]["normalisation"] == "x / 127.5 - 1"
    assert set(data["weights"]) == {"G", "D_trunk", "D_head", "Q_head"}
    s = data["summary"]
    assert s["iteration"] == 4 and s["seed"] == 0 and s["time_s"] > 0
    assert {"torch", "numpy", "slidecensus"} <= set(s["versions"])
    assert [h["iteration"] for h in s["history"]] == [2, 4]
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_same_seed_same_weights(tiny_crops, tiny_config, tmp_path):
    quiet = dict(log_every=100, progress=lambda r: None)
    a = train_infogan(tiny_crops, tiny_config, tmp_path / "a.pt", **quiet)
    b = train_infogan(tiny_crops, tiny_config, tmp_path / "b.pt", **quiet)
    _assert_same_weights(_weights(a), _weights(b))
    other = TrainConfig(**{**tiny_config.__dict__, "seed": 7})
    c = train_infogan(tiny_crops, other, tmp_path / "c.pt", **quiet)
    assert not torch.equal(_weights(a)["G"]["fc.weight"], _weights(c)["G"]["fc.weight"])


def test_resume_equals_uninterrupted(tiny_crops, tiny_config, tmp_path):
    quiet = dict(log_every=100, progress=lambda r: None)
    longer = TrainConfig(**{**tiny_config.__dict__, "iterations": 8})
    straight = train_infogan(tiny_crops, longer, tmp_path / "straight.pt", **quiet)
    part = train_infogan(tiny_crops, tiny_config, tmp_path / "part.pt", **quiet)
    assert load_checkpoint(part)["summary"]["iteration"] == 4
    resumed = train_infogan(tiny_crops, longer, part, **quiet)
    assert load_checkpoint(resumed)["summary"]["iteration"] == 8
    _assert_same_weights(_weights(straight), _weights(resumed))
    # a finished run returns at once and leaves the file alone
    before = resumed.stat().st_mtime_ns
    train_infogan(tiny_crops, longer, resumed, **quiet)
    assert resumed.stat().st_mtime_ns == before


def test_resume_refuses_other_architecture(tiny_crops, tiny_config, tmp_path):
    path = train_infogan(tiny_crops, tiny_config, tmp_path / "m.pt", log_every=100,
                         progress=lambda r: None)
    wider = TrainConfig(**{**tiny_config.__dict__, "width": 16, "iterations": 8})
    with pytest.raises(CheckpointError, match="width"):
        train_infogan(tiny_crops, wider, path)


def test_round_trip_gives_identical_predictions(tiny_crops, tmp_path):
    from slidecensus.models import save_checkpoint

    cfg = TrainConfig(k=4, z_dim=8, width=8)
    nets = build_networks(cfg).eval()
    weights = {n: m.state_dict() for n, m in nets.items()}
    path = save_checkpoint({"config": cfg.to_dict(), "weights": weights,
                            "summary": {"iteration": 0}, "train_state": None},
                           tmp_path / "m.pt")
    x = torch.from_numpy(tiny_crops[:20]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = torch.softmax(nets["Q_head"](nets["D_trunk"](x)), 1).numpy()
    model = CellModel.from_checkpoint(path, "cpu")
    clusters, probs = predict(model, tiny_crops[:20])
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(clusters, expected.argmax(1))


def test_incompatible_version_is_a_clear_error(tiny_crops, tiny_config, tmp_path):
    path = train_infogan(tiny_crops, tiny_config, tmp_path / "m.pt", log_every=100,
                         progress=lambda r: None)
    data = torch.load(path, weights_only=True)
    data["format_version"] = FORMAT_VERSION + 1
    torch.save(data, path)
    with pytest.raises(CheckpointError,
                       match=f"version {FORMAT_VERSION + 1} is incompatible.*"
                             f"reads version {FORMAT_VERSION}"):
        load_model(path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a slidecensus"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
    assert isinstance(CheckpointError("x", "y"), InvalidInputError)


def test_bad_crops_rejected(tiny_config, tmp_path):
    with pytest.raises(InvalidInputError, match=r"\(N, 32, 32, 3\)"):
        train_infogan(np.zeros((4, 28, 28, 3), np.uint8), tiny_config, tmp_path / "m.pt")
    with pytest.raises(InvalidInputError, match="uint8"):
        train_infogan(np.zeros((4, 32, 32, 3), np.float32), tiny_config, tmp_path / "m.pt")


def test_real_batches_cover_the_four_rotations():
    from slidecensus.models.train import _RealBatches

    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 0, :5] = 255  # a bright mark along the top-left edge
    data = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()
    batches = _RealBatches(data, batch=4, rotations=True,
                           generator=torch.Generator().manual_seed(0))
    x = batches.next()  # one epoch of the augmented set: each rotation exactly once
    assert x.shape == (4, 3, 32, 32) and x.min() == -1 and x.max() == 1
    base = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = {tuple(torch.rot90(base[0], r, dims=(1, 2)).flatten().tolist()) for r in range(4)}
    got = {tuple(t.flatten().tolist()) for t in x}
    assert got == expected


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.named_parameters())


@pytest.mark.parametrize("q_trains_trunk", [True, False])
def test_q_step_updates_g_and_q_but_not_the_critic_head(q_trains_trunk):
    """L_Q is minimised over G and Q (InfoGAN), and over the shared trunk only when asked;
    the G step moves G alone. Guards the parameter sets of the three optimisers."""
    cfg = TrainConfig(k=3, z_dim=8, width=8, batch_size=8, q_trains_trunk=q_trains_trunk)
    trainer = InfoGANTrainer(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    nets = {"G": trainer.G, "trunk": trainer.trunk, "D": trainer.d_head, "Q": trainer.q_head}
    before = {name: _snapshot(m) for name, m in nets.items()}
    trainer.q_step()
    moved = {name: _changed(before[name], m) for name, m in nets.items()}
    assert moved == {"G": True, "trunk": q_trains_trunk, "D": False, "Q": True}
    before = {name: _snapshot(m) for name, m in nets.items()}
    trainer.generator_step()
    moved = {name: _changed(before[name], m) for name, m in nets.items()}
    assert moved == {"G": True, "trunk": False, "D": False, "Q": False}
    assert all(p.requires_grad for p in trainer.d_params)  # the critic is unfrozen again


def test_checkpoint_records_the_fingerprint_of_its_training_sample(tmp_path):
    """Two models can be checked to come from the same crops: the summary holds the
    SHA-256 of the crop array, and another sample gives another fingerprint."""
    import hashlib

    import numpy as np

    from slidecensus.models import preset_config, train_infogan
    from slidecensus.models.checkpoint import load_checkpoint

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    cfg = preset_config("fast", k=2, iterations=1, refine_steps=1)
    shas = []
    for i, sample in enumerate((crops, crops[::-1].copy())):
        train_infogan(sample, cfg, tmp_path / f"m{i}.pt", log_every=100,
                      progress=lambda r: None)
        shas.append(load_checkpoint(tmp_path / f"m{i}.pt")["summary"]["sample_sha256"])
    assert shas[0] == hashlib.sha256(crops.tobytes()).hexdigest()
    assert shas[1] != shas[0]
