"""Guided embeddings (Gräbel et al.): guide files, losses, growing embeddings, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slidecensus.errors import InvalidInputError
from slidecensus.models import load_model, predict
from slidecensus.models.guided import (
    GuidedConfig,
    GuidedModel,
    active_dims,
    check_labels,
    default_guide,
    distance_loss,
    f1_scores,
    guide2d_loss,
    load_guide,
    predict_guided,
    stratified_split,
    train_guided,
)
from slidecensus.weightsfile import CheckpointError

# ------------------------------------------------------------------ losses, by hand


def test_guide2d_loss_hand_computed():
    emb = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    # row 0: |1| + |2| = 3, rest norm sqrt(9 + 16) = 5; row 1: |−1| + |1| = 2, rest 0
    # mean L1 (3 + 2) / 2 = 2.5, mean rest norm (5 + 0) / 2 = 2.5
    assert guide2d_loss(emb, target).item() == pytest.approx(5.0)
    # two dimensions only: no rest term
    assert guide2d_loss(emb[:, :2], target).item() == pytest.approx(2.5)
    # the rest term weighted: 2.5 + 0.1 * 2.5
    assert guide2d_loss(emb, target, rest_weight=0.1).item() == pytest.approx(2.75)


def test_guide2d_loss_gradient_is_finite_at_zero_rest():
    emb = torch.zeros(3, 5, requires_grad=True)
    guide2d_loss(emb, torch.ones(3, 2)).backward()
    assert torch.isfinite(emb.grad).all()


def test_distance_loss_hand_computed():
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    guide = torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    # embedding distances: (0,1) 5, (0,2) 1, (1,2) sqrt(9 + 9) = 4.2426
    # guide distances:     (0,1) 3, (0,2) 0, (1,2) 3
    expect = (abs(5 - 3) + abs(1 - 0) + abs(math.sqrt(18) - 3)) / 3
    assert distance_loss(emb, guide).item() == pytest.approx(expect, rel=1e-5)


def test_distance_loss_zero_when_embedding_is_the_guide():
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    assert distance_loss(g.clone(), g).item() == pytest.approx(0.0, abs=1e-6)
    emb = g.clone().requires_grad_(True)
    distance_loss(emb, g).backward()  # coinciding points: finite gradient
    assert torch.isfinite(emb.grad).all()


def test_growing_embedding_length_per_epoch():
    assert [active_dims(e, 6) for e in range(9)] == [2, 2, 2, 3, 4, 5, 6, 6, 6]
    assert [active_dims(e, 2) for e in range(4)] == [2, 2, 2, 2]
    with pytest.raises(InvalidInputError):
        active_dims(0, 1)


def test_f1_scores_hand_computed():
    yt = np.array([0, 0, 1, 1, 2])
    yp = np.array([0, 1, 1, 1, 0])
    # class 0: tp 1, 2 true, 2 predicted -> 0.5; class 1: tp 2, 2 true, 3 pred -> 0.8;
    # class 2: tp 0 -> 0
    np.testing.assert_allclose(f1_scores(yt, yp, 3), [0.5, 0.8, 0.0])


def test_stratified_split_holds_out_each_class():
    y = np.array([0] * 10 + [1] * 5 + [2] * 2)
    tr, va = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert [int((y[va] == c).sum()) for c in range(3)] == [2, 1, 1]


# ------------------------------------------------------------------ guides


def test_default_guide_places_the_blood_and_marrow_types():
    g = default_guide()
    blood = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
             "neutrophil", "platelet"]
    marrow = ["myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "band",
              "segmented_neutrophil", "proerythroblast", "normoblast", "plasma_cell",
              "megakaryocyte"]
    check_labels(blood + marrow, g)  # does not raise
    xy = dict(zip(g.names, g.xy.tolist(), strict=True))
    assert xy["myeloblast"] == [0.0, 0.0]
    # maturity grows outwards along the granulocytic axis
    radii = [math.hypot(*xy[n]) for n in ("myeloblast", "promyelocyte", "myelocyte",
                                           "metamyelocyte", "band", "segmented_neutrophil")]
    assert radii == sorted(radii) and len(set(radii)) == len(radii)
    # the blood types are distinct points
    assert len({tuple(xy[n]) for n in blood}) == len(blood)
    lin = g.lineages()
    assert [p.name for p in lin["erythroid"]] == ["proerythroblast", "erythroblast",
                                                   "normoblast"]


def test_guide_file_roundtrip_and_errors(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('[types.a]\nx = 1\ny = 2\nlineage = "l"\nmaturity = 3\n'
                 '[types.b]\nx = -1.5\ny = 0\n')
    g = load_guide(p)
    assert g.names == ("a", "b")
    np.testing.assert_allclose(g.xy, [[1, 2], [-1.5, 0]])
    assert g.points[0].lineage == "l" and g.points[0].maturity == 3
    assert math.isnan(g.points[1].maturity)
    assert g.from_dict(g.to_dict()) == g
    for text, words in [("[types.a]\nx = 1\n", "lacks y"),
                        ("[types.a]\nx = 1\ny = 2\ncolour = 3\n", "unknown key"),
                        ("[types.a]\nx = 'left'\ny = 2\n", "numbers"),
                        ("[types.3]\nx = 1\ny = 2\n", "must not be a number"),
                        ("x = [", "not valid TOML"), ("title = 'x'\n", "[types.NAME]")]:
        p.write_text(text)
        with pytest.raises(InvalidInputError, match=words.replace("[", r"\[")) as err:
            load_guide(p)
        assert "\n" not in str(err.value)


def test_labels_missing_from_the_guide_are_listed_in_one_line():
    with pytest.raises(InvalidInputError) as err:
        check_labels(["lymphocyte", "smudge", "artefact", "smudge"], default_guide())
    msg = str(err.value)
    assert "artefact, smudge" in msg and "lymphocyte" not in msg and "\n" not in msg


# ------------------------------------------------------------------ training


def _cfg(**kw) -> GuidedConfig:
    """A configuration for the 32-px synthetic crops below (the default crop is 64 px)."""
    return GuidedConfig(crop_size=32, **kw)


def _discs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic crops of three kinds: small dark disc, large pale disc, ring."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    crops = np.full((n, 32, 32, 3), 245, np.uint8)
    names = np.array(["lymphocyte", "monocyte", "neutrophil"])[np.arange(n) % 3]
    for i in range(n):
        cx, cy = 16 + rng.normal(0, 1.5, 2)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        kind = i % 3
        if kind == 0:
            m = r2 < rng.uniform(4.5, 6) ** 2
        elif kind == 1:
            m = r2 < rng.uniform(10, 12) ** 2
        else:
            m = (r2 < rng.uniform(9, 11) ** 2) & (r2 > rng.uniform(5, 6.5) ** 2)
        crops[i][m] = rng.integers(60, 140, 3) if kind != 1 else rng.integers(150, 190, 3)
    noise = rng.normal(0, 6, crops.shape)
    return np.clip(crops + noise, 0, 255).astype(np.uint8), names


def test_guided_model_learns_synthetic_types_and_round_trips(tmp_path):
    crops, names = _discs(240, 0)
    test_crops, test_names = _discs(90, 1)
    cfg = _cfg(epochs=6, width=8, n_max=4, batch_size=32, seed=0)
    path = tmp_path / "g.pt"
    model = train_guided(crops, names, cfg, out=path)
    assert model.classes == ("lymphocyte", "monocyte", "neutrophil")
    assert len(model.summary["history"]) == 6
    assert [h["dims"] for h in model.summary["history"]] == [2, 2, 2, 3, 4, 4]
    cls, probs, emb = predict_guided(model, test_crops)
    f1 = f1_scores(np.searchsorted(model.classes, test_names), cls, 3)
    assert np.nanmean(f1) >= 0.9, f1
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    # the embedding lies near each type's guide point more than near the others'
    gxy = model.guide.xy
    d = np.linalg.norm(emb[:, None, :] - gxy[None], axis=2)
    assert np.mean(d.argmin(1) == np.searchsorted(model.classes, test_names)) >= 0.8
    # the checkpoint: weights-only, dispatched by load_model, same predictions
    loaded = load_model(path)
    assert isinstance(loaded, GuidedModel)
    c2, p2 = predict(loaded, test_crops)
    np.testing.assert_array_equal(c2, cls)
    np.testing.assert_allclose(p2, probs, atol=1e-5)
    assert loaded.config.to_dict()["kind"] == "guided"
    assert load_model(path).config.k == 3


def test_cross_entropy_baseline_trains(tmp_path):
    crops, names = _discs(120, 2)
    model = train_guided(crops, names, _cfg(loss="ce", epochs=2, width=8,
                                                    heads=("softmax", "knn1")))
    _, probs, _ = predict_guided(model, crops[:10])
    assert probs.shape == (10, 3) and model.summary["head"] in ("softmax", "knn1")


def test_cross_entropy_term_next_to_the_guided_losses(tmp_path):
    """w_ce > 0 adds the classification layer to a guided model (saved and reloaded with
    it), keeps the map growing and anchored, and makes the softmax a candidate head."""
    crops, names = _discs(120, 5)
    cfg = _cfg(epochs=8, width=8, n_max=4, batch_size=32, w_ce=1.0,
                       heads=("softmax",))
    path = tmp_path / "g.pt"
    model = train_guided(crops, names, cfg, out=path)
    assert model.net.logits is not None and model.summary["head"] == "softmax"
    assert [h["dims"] for h in model.summary["history"]] == [2, 2, 2, 3, 4, 4, 4, 4]
    cls, probs, _ = predict_guided(model, crops[:60])
    _, p2 = predict(load_model(path), crops[:60])
    np.testing.assert_allclose(p2, probs, atol=1e-5)
    # the layer was trained by the term: its softmax names the cells
    assert np.mean(np.array(model.classes)[cls] == names[:60]) >= 0.9
    # without the term a guided model has no layer to take a softmax from
    plain = train_guided(crops, names, _cfg(epochs=1, width=4, w_ce=0.0,
                                                    heads=("softmax", "knn1")))
    assert plain.net.logits is None and plain.summary["head"] == "knn1"
    with pytest.raises(InvalidInputError, match="w_ce"):
        GuidedConfig(w_ce=-1.0)


def test_guided_checkpoint_is_not_an_infogan_one(tmp_path):
    from slidecensus.models import load_checkpoint

    crops, names = _discs(60, 3)
    path = tmp_path / "g.pt"
    train_guided(crops, names, _cfg(epochs=1, width=4), out=path)
    with pytest.raises(CheckpointError, match="slidecensus.guided"):
        load_checkpoint(path)  # the InfoGAN reader refuses it by format
    data = torch.load(path, weights_only=True)
    assert data["format"] == "slidecensus.guided"


def test_training_refuses_bad_inputs():
    crops, names = _discs(30, 4)
    with pytest.raises(InvalidInputError, match="not in the guide"):
        train_guided(crops, np.where(names == "monocyte", "smudge", names),
                     _cfg(epochs=1, width=4))
    with pytest.raises(InvalidInputError, match="two cell types"):
        train_guided(crops, ["lymphocyte"] * 30, _cfg(epochs=1, width=4))
    with pytest.raises(InvalidInputError, match="labels for"):
        train_guided(crops, names[:5], _cfg(epochs=1, width=4))
    with pytest.raises(InvalidInputError, match="loss"):
        GuidedConfig(loss="triplet")


def test_crop_size_is_the_models_and_the_census_cuts_it(tmp_path):
    """A guided model trained on 64-px crops keeps that size in its checkpoint, refuses
    crops of another size, and makes the census cut 64-px crops (the InfoGAN stays 32)."""
    from slidecensus.engine.plan import CensusParams
    from slidecensus.models import TrainConfig

    crops, names = _discs(60, 3)
    big = crops.repeat(2, axis=1).repeat(2, axis=2)
    path = tmp_path / "g64.pt"
    with pytest.raises(InvalidInputError, match="crop_size"):
        train_guided(crops, names, GuidedConfig(epochs=1, width=8, crop_size=64))
    model = train_guided(big, names, GuidedConfig(epochs=1, width=8, crop_size=64), out=path)
    loaded = load_model(path)
    assert loaded.config.crop_size == 64
    assert predict_guided(loaded, big[:5])[1].shape == (5, 3)
    with pytest.raises(InvalidInputError, match="crop_size"):
        predict_guided(loaded, crops[:5])
    assert predict_guided(model, big[:0])[1].shape == (0, 3)  # no cells, any tile
    params = CensusParams().with_model_crops(loaded.config.crop_spec())
    assert params.crop_size == 64 and params.crop_mode == loaded.config.crop_mode
    assert CensusParams().with_model_crops(TrainConfig().crop_spec()).crop_size == 32
    with pytest.raises(InvalidInputError, match="crop_size"):
        GuidedConfig(crop_size=8)
    # a checkpoint written before the size was stored holds 32-px crops
    old = {k: v for k, v in loaded.config.to_dict().items() if k != "crop_size"}
    assert GuidedConfig.from_dict(old).crop_size == 32
    # ... and its test-time averaging as a flag
    legacy = {k: v for k, v in old.items() if k != "views"}
    assert GuidedConfig.from_dict({**legacy, "tta": False}).views == 1
    assert GuidedConfig.from_dict({**legacy, "tta": True}).views == 8
    with pytest.raises(InvalidInputError, match="views"):
        GuidedConfig(views=3)


def test_test_time_averaging_makes_the_embedding_orientation_free():
    """With 8 views a crop and its rotations and mirror images get the same embedding (the
    mean over the same 8 views); one view does not, so the test can tell them apart."""
    crops, names = _discs(60, 4)
    model = train_guided(crops, names, _cfg(epochs=1, width=8, views=8))
    turned = [np.rot90(crops[:12], q, axes=(1, 2)) for q in (1, 2, 3)] + [crops[:12, :, ::-1]]
    _, p0, e0 = predict_guided(model, crops[:12])
    for t in turned:
        _, p, e = predict_guided(model, np.ascontiguousarray(t))
        np.testing.assert_allclose(e, e0, atol=1e-4)
        np.testing.assert_allclose(p, p0, atol=1e-4)
    one = GuidedModel(GuidedConfig.from_dict({**model.config.to_dict(), "views": 1}),
                      model.summary, model.net, model.head, model.dims, model.device)
    e1 = predict_guided(one, crops[:12])[2]
    e1r = predict_guided(one, np.ascontiguousarray(turned[0]))[2]
    assert np.abs(e1 - e1r).max() > 1e-3


def test_stem_stages_take_larger_crops_and_round_trip(tmp_path):
    """``stem`` pools a 64-px crop down to the 32-px layers; the stage count is kept in the
    checkpoint, so the loaded network has the same shape and predictions."""
    crops, names = _discs(60, 5)
    big = crops.repeat(2, axis=1).repeat(2, axis=2)
    path = tmp_path / "stem.pt"
    model = train_guided(big, names, GuidedConfig(epochs=1, width=8, crop_size=64, stem=1),
                         out=path)
    loaded = load_model(path)
    assert loaded.config.stem == 1
    np.testing.assert_allclose(predict_guided(loaded, big[:6])[1],
                               predict_guided(model, big[:6])[1], atol=1e-5)
    with pytest.raises(InvalidInputError, match="stem"):
        GuidedConfig(stem=3)
