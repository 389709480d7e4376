"""Slide classification from proportions: CV quality, chance on shuffled labels, no leakage,
stratified seeded folds, model round trip, skipped slides reported, plot, CLI end to end."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from slidecensus.cli import main
from slidecensus.engine.census import write_census_group
from slidecensus.engine.outputs import OutputDir
from slidecensus.errors import InvalidInputError
from slidecensus.reports import classify
from slidecensus.reports.classify import (
    OKABE_ITO,
    SlideModel,
    apply_run,
    classification_scores,
    classify_run,
    cross_validate,
    fit_model,
    fold_assignment,
    load_model,
    pca_2d,
    pca_figure,
    read_labels,
    region_quantiles,
    save_model,
)

# Two marrow-like mixtures of five clusters: "abnormal" has the last cluster (blasts, say)
# expanded at the expense of the first two. Concentration 60 gives per-slide spread of a few
# percentage points, so the classes are separable but not trivially identical within.
NORMAL = np.array([0.35, 0.30, 0.20, 0.10, 0.05])
ABNORMAL = np.array([0.10, 0.15, 0.20, 0.15, 0.40])
CONCENTRATION = 60.0


def mixtures(rng: np.random.Generator, n_per_class: int, *, k: int = 5):
    """Dirichlet proportions of n slides per class, labels as strings, ids as strings."""
    normal, abnormal = NORMAL[:k] / NORMAL[:k].sum(), ABNORMAL[:k] / ABNORMAL[:k].sum()
    x = np.vstack([rng.dirichlet(CONCENTRATION * normal, n_per_class),
                   rng.dirichlet(CONCENTRATION * abnormal, n_per_class)])
    y = np.array(["normal"] * n_per_class + ["abnormal"] * n_per_class)
    return x, y


def write_run(folder, ids, props, *, status=None, error=None) -> None:
    """A handmade ``slides.csv`` with the columns the census writes."""
    folder.mkdir(parents=True, exist_ok=True)
    n, k = props.shape
    status = list(status) if status is not None else ["ok"] * n
    table = pd.DataFrame({"slide_id": ids, "path": [f"/data/{i}.svs" for i in ids],
                          "label": "", "status": status,
                          "error": list(error) if error is not None else [""] * n,
                          "n_cells": 1000})
    for j in range(k):
        table[f"p_{j}"] = props[:, j]
    table["tiles_planned"], table["tiles_done"], table["seconds"] = 4, 4, 1.5
    table.to_csv(folder / "slides.csv", index=False)


def write_labels(path, ids, labels) -> None:
    pd.DataFrame({"slide_id": ids, "label": labels}).to_csv(path, index=False)


def ids_for(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


# ------------------------------------------------------------------ quality


@pytest.mark.parametrize("method", ["kmeans", "svm"])
def test_separable_mixtures_reach_high_f1(method):
    x, y = mixtures(np.random.default_rng(7), 20)
    res = cross_validate(x, y, method, folds=4, seed=0)
    assert f1_score(y, res.predicted, average="macro") >= 0.9


@pytest.mark.parametrize("method", ["kmeans", "svm"])
def test_shuffled_labels_fall_to_chance(method):
    # With labels permuted at random they are independent of the features, so no classifier
    # can beat chance in expectation: for two balanced classes the expected out-of-fold
    # accuracy is at most 0.5 and macro F1 centres at or below 0.5. One 4-fold CV of 80
    # slides varies by about 0.08 in macro F1 (binomial sd sqrt(.25/80) = 0.056, widened
    # because the folds share training slides). The mean of 6 independent shuffles then has
    # sd <= 0.035, and 0.65 is more than 4 sd above chance (a false failure < 1e-4), while
    # the same features with their true labels score >= 0.9: the bound tells the two apart,
    # and a classifier that leaked test labels into its predictions would exceed it.
    x, y = mixtures(np.random.default_rng(11), 40)
    scores = []
    for s in range(6):
        shuffled = np.random.default_rng(1000 + s).permutation(y)
        res = cross_validate(x, shuffled, method, folds=4, seed=s)
        scores.append(f1_score(shuffled, res.predicted, average="macro"))
    assert np.mean(scores) <= 0.65, scores


def test_scores_match_hand_counts():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    s = classification_scores(y_true, y_pred)
    # a: tp 2, fp 0, fn 1; b: tp 1, fp 1, fn 1; c: tp 1, fp 1, fn 0
    assert s["per_class"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert s["per_class"]["b"]["precision"] == 0.5 and s["per_class"]["b"]["f1"] == 0.5
    assert s["per_class"]["c"]["recall"] == 1.0
    assert s["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert s["weighted"]["recall"] == pytest.approx(4 / 6)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["confusion"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------ folds, seeds, nesting


def test_folds_are_stratified_complete_and_seeded():
    y = np.array(["a"] * 13 + ["b"] * 9 + ["c"] * 6)
    fold = fold_assignment(y, folds=4, seed=3)
    assert set(fold.tolist()) == {0, 1, 2, 3}  # every slide in exactly one test fold
    table = pd.crosstab(pd.Series(y, name="label"), pd.Series(fold, name="fold"))
    for label, row in table.iterrows():
        assert row.sum() == (y == label).sum()
        assert row.max() - row.min() <= 1, f"class {label} unevenly spread: {row.tolist()}"
    assert np.array_equal(fold, fold_assignment(y, folds=4, seed=3))
    assert not np.array_equal(fold, fold_assignment(y, folds=4, seed=4))


@pytest.mark.parametrize("method", ["kmeans", "svm"])
def test_same_seed_gives_identical_classification_csv(tmp_path, method):
    x, y = mixtures(np.random.default_rng(5), 10)
    # overlap the classes a little so that the folds, hence the seed, matter
    x = 0.6 * x + 0.4 * np.random.default_rng(6).dirichlet(np.ones(5), len(x))
    ids = ids_for("s", len(y))
    write_labels(tmp_path / "labels.csv", ids, y)
    written = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_run(tmp_path / name, ids, x)
        classify_run(tmp_path / name, tmp_path / "labels.csv", method, seed=seed)
        written.append((tmp_path / name / "classification.csv").read_bytes())
    assert written[0] == written[1]
    assert written[0] != written[2]  # the folds follow the seed


def test_nested_c_selection_sees_only_training_folds(monkeypatch):
    x, y = mixtures(np.random.default_rng(3), 12)
    calls = []
    real = classify.select_svm_c

    def spy(features, labels, **kw):
        out = real(features, labels, **kw)
        calls.append(({tuple(r) for r in np.round(features, 12)}, out[0]))
        return out

    monkeypatch.setattr(classify, "select_svm_c", spy)
    res = cross_validate(x, y, "svm", folds=4, seed=9)
    assert len(calls) == 4
    rows = [tuple(r) for r in np.round(x, 12)]
    assert len(set(rows)) == len(rows)  # every slide recognisable by its features
    for f, (seen, c) in enumerate(calls):
        train = {rows[i] for i in np.flatnonzero(res.fold != f)}
        assert seen == train, f"fold {f}: C chosen on other slides than the training fold"
        assert res.fold_details[f]["C"] == c and c in classify.C_GRID

    # behaviour, not just bookkeeping: replacing fold 0's test slides by noise cannot
    # change what was chosen for fold 0
    noisy = x.copy()
    noisy[res.fold == 0] = np.random.default_rng(0).dirichlet(np.ones(5), (res.fold == 0).sum())
    again = cross_validate(noisy, y, "svm", folds=4, seed=9)
    assert np.array_equal(again.fold, res.fold)
    assert again.fold_details[0] == res.fold_details[0]


def test_kmeans_names_centres_by_majority_training_label():
    near_a, near_b = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    jitter = np.random.default_rng(0).normal(0, 0.01, (8, 2))
    x = np.vstack([np.tile(near_a, (4, 1)), np.tile(near_b, (4, 1))]) + jitter
    y = np.array(["x", "x", "x", "y", "y", "y", "y", "x"])
    model = fit_model(x, y, "kmeans", seed=0)
    assert model.predict(np.array([[0.85, 0.15], [0.2, 0.8]])).tolist() == ["x", "y"]
    # the labels only name the centres: relabelling the minority slides changes nothing
    y2 = np.array(["x", "x", "x", "x", "y", "y", "y", "y"])
    assert np.allclose(np.sort(fit_model(x, y2, "kmeans", seed=0).centres, axis=0),
                       np.sort(model.centres, axis=0))


@pytest.mark.parametrize(("folds", "method", "fail_at", "pass_at"),
                         [(4, "kmeans", 3, 4), (4, "svm", 3, 4), (2, "svm", 3, 4)])
def test_too_few_slides_per_class_says_how_many(folds, method, fail_at, pass_at):
    # 2-fold SVM: with 3 slides of a class, some training fold holds only 1 of them, which
    # leaves no inner cross-validation to choose C
    rng = np.random.default_rng(1)
    x, y = mixtures(rng, fail_at)
    with pytest.raises(InvalidInputError, match=f"at least {pass_at}"):
        cross_validate(x, y, method, folds=folds, seed=0)
    x, y = mixtures(rng, pass_at)
    assert len(cross_validate(x, y, method, folds=folds, seed=0).predicted) == len(y)
    with pytest.raises(InvalidInputError, match="at least 2 classes"):
        cross_validate(x, np.array(["one"] * len(y)), method, folds=folds)


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("n_classes", [2, 3])
def test_svm_model_round_trip_matches_sklearn(tmp_path, n_classes):
    rng = np.random.default_rng(4)
    x, y = mixtures(rng, 12)
    if n_classes == 3:
        x = np.vstack([x, rng.dirichlet(CONCENTRATION * np.full(5, 0.2), 12)])
        y = np.concatenate([y, ["other"] * 12])
    model = fit_model(x, y, "svm", seed=2, feature_names=[f"p_{j}" for j in range(5)])
    save_model(model, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text)["method"] == "svm"  # plain JSON, no pickle
    back = load_model(tmp_path / "m.json")
    new = rng.dirichlet(np.ones(5), 50)
    assert np.array_equal(back.predict(new), model.predict(new))
    assert back.c == model.c and back.feature_names == model.feature_names
    ref = make_pipeline(StandardScaler(), LinearSVC(C=model.c, loss="squared_hinge",
                                                    max_iter=20000)).fit(x, y)
    assert np.array_equal(model.predict(new), ref.predict(new))


def test_kmeans_model_round_trip(tmp_path):
    x, y = mixtures(np.random.default_rng(8), 10)
    model = fit_model(x, y, "kmeans", seed=1)
    save_model(model, tmp_path / "m.json")
    back = load_model(tmp_path / "m.json")
    new = np.random.default_rng(9).dirichlet(np.ones(5), 40)
    assert np.array_equal(back.centres, model.centres)
    assert np.array_equal(back.predict(new), model.predict(new))
    d2 = ((new[:, None] - model.centres[None]) ** 2).sum(-1)
    assert back.predict(new).tolist() == [model.centre_labels[i] for i in d2.argmin(1)]


def test_model_file_is_checked(tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InvalidInputError, match="not a slidecensus slide classifier"):
        load_model(tmp_path / "bad.json")
    with pytest.raises(InvalidInputError, match="not found"):
        load_model(tmp_path / "none.json")
    x, y = mixtures(np.random.default_rng(0), 6)
    d = fit_model(x, y, "svm").to_dict()
    d["coef"] = [[1.0, 2.0]]
    with pytest.raises(InvalidInputError, match="malformed"):
        SlideModel.from_dict(d)


# ------------------------------------------------------------------ tables and skipping


def test_labels_file_missing_columns_are_named(tmp_path):
    pd.DataFrame({"slide": ["a"], "label": ["x"]}).to_csv(tmp_path / "l1.csv", index=False)
    with pytest.raises(InvalidInputError, match="missing column 'slide_id'"):
        read_labels(tmp_path / "l1.csv")
    pd.DataFrame({"slide_id": ["a"], "diagnosis": ["x"]}).to_csv(tmp_path / "l2.csv",
                                                                index=False)
    with pytest.raises(InvalidInputError, match="missing column 'label'"):
        read_labels(tmp_path / "l2.csv")
    pd.DataFrame({"slide_id": ["a", "a"], "label": ["x", "y"]}).to_csv(tmp_path / "l3.csv",
                                                                      index=False)
    with pytest.raises(InvalidInputError, match="more than once"):
        read_labels(tmp_path / "l3.csv")


def test_unusable_slides_are_warned_and_skipped(tmp_path, caplog):
    x, y = mixtures(np.random.default_rng(2), 6)
    ids = ids_for("s", len(y))
    props = np.vstack([x, [[0.2] * 5], [[np.nan] * 5], [[0.2] * 5]])
    run_ids = [*ids, "failed1", "nanprops", "nolabel"]
    status = ["ok"] * len(y) + ["failed", "ok", "ok"]
    error = [""] * len(y) + ["SlideReadError: truncated", "", ""]
    write_run(tmp_path / "run", run_ids, props, status=status, error=error)
    write_labels(tmp_path / "labels.csv", [*ids, "failed1", "nanprops", "absent"],
                 [*y, "normal", "abnormal", "normal"])
    with caplog.at_level(logging.WARNING, logger="slidecensus.reports.classify"):
        report = classify_run(tmp_path / "run", tmp_path / "labels.csv", "kmeans")
    assert report["skipped"] == {"not_in_run": ["absent"], "unlabelled": ["nolabel"],
                                 "failed": ["failed1"], "no_proportions": ["nanprops"]}
    text = caplog.text
    for sid in ("absent", "nolabel", "failed1", "nanprops", "truncated"):
        assert sid in text
    out = pd.read_csv(tmp_path / "run" / "classification.csv", dtype=str)
    assert sorted(out.slide_id) == sorted(ids) and report["n_slides"] == len(ids)


def test_region_quantiles_by_hand():
    counts = np.zeros((1, 3, 2), int)
    counts[0, 0] = [5, 5]  # 10 cells: proportions 0.5, 0.5
    counts[0, 1] = [2, 18]  # 20 cells: 0.1, 0.9
    counts[0, 2] = [3, 0]  # 3 cells: below min_cells, left out
    assert region_quantiles(counts, q=50, min_cells=10) == pytest.approx([0.3, 0.7])
    assert region_quantiles(counts, q=100, min_cells=1) == pytest.approx([1.0, 0.9])
    assert np.isnan(region_quantiles(counts, q=50, min_cells=100)).all()
    with pytest.raises(InvalidInputError, match="rows, cols, k"):
        region_quantiles(counts[0])


# ------------------------------------------------------------------ plot


def test_pca_matches_svd_and_axes_say_the_variance():
    x, y = mixtures(np.random.default_rng(12), 8)
    coords, ratio = pca_2d(x)
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    assert np.allclose(np.abs(coords), np.abs(xc @ vt[:2].T))
    assert np.allclose(ratio, s[:2] ** 2 / (s**2).sum())
    ax = pca_figure(x, y).axes[0]
    assert ax.get_xlabel() == f"PC1 ({100 * ratio[0]:.1f}% of variance)"
    assert ax.get_ylabel() == f"PC2 ({100 * ratio[1]:.1f}% of variance)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["abnormal (n=8)", "normal (n=8)"]


def test_pca_png_is_a_valid_coloured_image(tmp_path):
    x, y = mixtures(np.random.default_rng(13), 8)
    ids = ids_for("s", len(y))
    write_run(tmp_path, ids, x)
    write_labels(tmp_path / "labels.csv", ids, y)
    classify_run(tmp_path, tmp_path / "labels.csv", "svm")
    data = (tmp_path / "classification-pca.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 200
    for hexcol in OKABE_ITO[:2]:  # one colour per label, drawn somewhere
        rgb = np.array([int(hexcol[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(img.astype(int) - rgb).sum(axis=2) < 30).sum() > 20, hexcol


# ------------------------------------------------------------------ command line


def test_cli_end_to_end_with_saved_model_applied_to_a_new_run(tmp_path, capsys):
    rng = np.random.default_rng(21)
    x, y = mixtures(rng, 10)
    ids = ids_for("0", len(y))  # ids like "0003" must stay strings
    write_run(tmp_path / "run", ids, x)
    write_labels(tmp_path / "labels.csv", ids, y)
    model = tmp_path / "model.json"
    assert main(["classify", str(tmp_path / "run"), "--labels", str(tmp_path / "labels.csv"),
                 "--method", "svm", "--seed", "3", "--save-model", str(model)]) == 0
    printed = capsys.readouterr().out
    for word in ("precision", "recall", "f1", "macro avg", "weighted avg", "abnormal"):
        assert word in printed
    csv = pd.read_csv(tmp_path / "run" / "classification.csv", dtype=str)
    assert list(csv.columns) == ["slide_id", "label", "predicted", "fold"]
    assert set(csv.slide_id) == set(ids) and set(csv.fold) == {"0", "1", "2", "3"}
    report = json.loads((tmp_path / "run" / "classification.json").read_text())
    assert (report["method"], report["seed"], report["folds"], report["n_slides"]) == (
        "svm", 3, 4, 20)
    assert set(report["per_class"]) == {"normal", "abnormal"}
    assert {"precision", "recall", "f1"} <= set(report["macro"]) & set(report["weighted"])
    assert all(d["C"] in classify.C_GRID for d in report["fold_details"])
    macro = f1_score(csv.label, csv.predicted, average="macro")
    assert report["macro"]["f1"] == pytest.approx(macro)

    # a new run of the same two mixtures, classified by the saved model
    x2, y2 = mixtures(rng, 8)
    ids2 = ids_for("new", len(y2))
    write_run(tmp_path / "run2", ids2, x2)
    assert main(["classify", str(tmp_path / "run2"), "--apply", str(model)]) == 0
    pred = pd.read_csv(tmp_path / "run2" / "predictions.csv", dtype=str,
                       keep_default_na=False)
    assert pred.slide_id.tolist() == sorted(ids2)
    order = np.argsort(ids2)
    assert np.array_equal(pred.predicted.to_numpy(), load_model(model).predict(x2[order]))
    assert (pred.predicted.to_numpy() == y2[order]).mean() >= 0.9
    # with labels, the applied model is also scored on the new run
    write_labels(tmp_path / "labels2.csv", ids2, y2)
    assert main(["classify", str(tmp_path / "run2"), "--apply", str(model), "--labels",
                 str(tmp_path / "labels2.csv")]) == 0
    rep = json.loads((tmp_path / "run2" / "predictions.json").read_text())
    pred = pd.read_csv(tmp_path / "run2" / "predictions.csv", dtype=str)
    assert rep["n_labelled"] == len(y2) and set(pred.label) == {"normal", "abnormal"}
    assert rep["macro"]["f1"] == pytest.approx(f1_score(pred.label, pred.predicted,
                                                        average="macro"))


def test_cli_regions_features_from_census_zarr(tmp_path, capsys):
    rng = np.random.default_rng(31)
    x, y = mixtures(rng, 6, k=3)
    ids = ids_for("s", len(y))
    out = OutputDir(tmp_path)
    totals = []
    for sid, p in zip(ids, x, strict=True):
        counts = np.stack([[rng.multinomial(40, p) for _ in range(3)] for _ in range(2)])
        res = {"counts": counts, "cells": counts.sum(axis=2),
               "tissue": np.ones((2, 3), np.float32)}
        plan = SimpleNamespace(path=f"/data/{sid}.svs", mpp=0.5, shape=(1024, 1536))
        write_census_group(out, sid, res, plan, 3, 256.0)
        totals.append(counts.sum(axis=(0, 1)) / counts.sum())
    # one more ok slide with proportions but no census group
    write_run(tmp_path, [*ids, "nogroup"], np.vstack([totals, [[0.3, 0.3, 0.4]]]))
    write_labels(tmp_path / "labels.csv", [*ids, "nogroup"], [*y, "normal"])
    assert main(["classify", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
                 "--method", "kmeans", "--features", "proportions+regions"]) == 0
    report = json.loads((tmp_path / "classification.json").read_text())
    assert report["feature_names"] == ["p_0", "p_1", "p_2", "q90_p_0", "q90_p_1", "q90_p_2"]
    assert report["skipped"]["no_regions"] == ["nogroup"] and report["n_slides"] == 12
    assert report["macro"]["f1"] >= 0.9
    # the model remembers its features: applying it needs the same census maps
    model = tmp_path / "m.json"
    classify_run(tmp_path, tmp_path / "labels.csv", "svm", features="proportions+regions",
                 save_model_to=model)
    rep = apply_run(tmp_path, model)
    assert rep["n_slides"] == 12 and rep["features"] == "proportions+regions"


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    x, y = mixtures(np.random.default_rng(0), 3)
    ids = ids_for("s", len(y))
    write_run(tmp_path, ids, x)
    write_labels(tmp_path / "labels.csv", ids, y)
    assert main(["classify", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
                 "--method", "svm"]) == 2
    err = capsys.readouterr().err
    assert "each class needs at least 4" in err and "'normal': 3" in err
    pd.DataFrame({"id": ids, "label": y}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["classify", str(tmp_path), "--labels", str(tmp_path / "bad.csv"),
                 "--method", "kmeans"]) == 2
    assert "missing column 'slide_id'" in capsys.readouterr().err
    assert main(["classify", str(tmp_path), "--method", "kmeans"]) == 2
    assert "--labels" in capsys.readouterr().err
    # a model fitted on 5 clusters cannot be applied to a run with 4
    x5, y5 = mixtures(np.random.default_rng(1), 6)
    save_model(fit_model(x5, y5, "kmeans", feature_names=[f"p_{j}" for j in range(5)]),
               tmp_path / "m5.json")
    write_run(tmp_path / "k4", ids, x[:, :4] / x[:, :4].sum(1, keepdims=True))
    assert main(["classify", str(tmp_path / "k4"), "--apply", str(tmp_path / "m5.json")]) == 2
    assert "fitted on features p_0, p_1, p_2, p_3, p_4" in capsys.readouterr().err
