"""Guided models through the engine and the CLI: label files, point matching, training on
labelled synthetic cells, the census' named types and the reports that use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from scipy.spatial import cKDTree

from slidecensus.cli import main
from slidecensus.engine.census import run_cohort
from slidecensus.engine.plan import CensusParams
from slidecensus.engine.train import (
    labelled_slide_crops,
    match_points,
    read_cell_labels,
    train_guided_from_cohort,
)
from slidecensus.errors import InvalidInputError
from slidecensus.models.guided import f1_scores
from slidecensus.nuclei.normalize import parse_stain_norm
from slidecensus.tiling.synth import synth_cohort

#: The synthetic types with enough cells on a 1024 x 1024 slide to learn from.
TYPES = ["lymphocyte", "myelocyte", "neutrophil", "normoblast"]


# ------------------------------------------------------------------ point matching


def _square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side], np.float32)


def test_points_match_the_nucleus_under_them_or_the_nearest_within_reach():
    cells = pd.DataFrame({
        "x_px": [15.0, 45.0], "y_px": [15.0, 15.0],
        "bbox_x0": [10, 40], "bbox_y0": [10, 10], "bbox_x1": [20, 50], "bbox_y1": [20, 20],
        # cell 0's outline is the lower-left half of its box (the triangle y >= x)
        "outline_px": [np.array([10, 10, 20, 20, 10, 20], np.float32), _square(40, 10, 10)],
    })
    pts = np.array([[12.0, 18.0],   # inside cell 0's outline -> under
                    [19.0, 11.0],   # in cell 0's box but outside its outline, 5.7 px away
                    [45.0, 15.0],   # cell 1's centre
                    [30.0, 15.0],   # between them, 15 px from each
                    [100.0, 100.0]])
    row, how, dist = match_points(pts, cells, max_dist_px=8.0)
    assert row.tolist() == [0, 0, 1, -1, -1]
    assert how.tolist() == ["under", "nearest", "under", "", ""]
    np.testing.assert_allclose(dist[:3], [np.hypot(3, 3), np.hypot(4, 4), 0.0])
    assert np.isnan(dist[3:]).all()
    # a point under a nucleus wins over a nearer centroid of another
    row, how, _ = match_points(np.array([[12.5, 19.0]]), cells.assign(
        x_px=[11.0, 14.0], y_px=[11.0, 19.0]), max_dist_px=8.0)
    assert row.tolist() == [0] and how.tolist() == ["under"]


def test_no_cells_means_no_match():
    row, how, _ = match_points(np.array([[1.0, 2.0]]), pd.DataFrame(), 5.0)
    assert row.tolist() == [-1] and how.tolist() == [""]


# ------------------------------------------------------------------ label files


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """One synthetic 1024 x 1024 slide (0.5 µm/px), its cohort CSV and its truth."""
    out = tmp_path_factory.mktemp("guided")
    csv = synth_cohort(out / "slides", n_slides=1, size=(1024, 1024), seed=5, mpp=0.5)
    cohort = pd.read_csv(csv)
    truth = pd.read_parquet(next((out / "slides").glob("*.cells.parquet")))
    return Path(csv), cohort, truth


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cells.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, words", [
    ("slide_id,x_px,y_px,label,colour\ns,1,2,lymphocyte,red\n", "unknown column(s) colour"),
    ("slide_id,x_px,label\ns,1,lymphocyte\n", "lacks column(s) y_px"),
    ("x_px,y_px,label\n1,2,lymphocyte\n", "path or slide_id"),
    ("slide_id,x_px,y_px,label\n{sid},1,two,lymphocyte\n", "line 2: y_px must be a number"),
    ("slide_id,x_px,y_px,label\n{sid},1,2,lymphocyte\n{sid},1,2,\n", "line 3: empty label"),
    ("slide_id,x_px,y_px,label\nnot_a_slide,1,2,lymphocyte\n", "not in the cohort: not_a_slide"),
    ("slide_id,x_px,y_px,label\n", "no labelled points"),
])
def test_bad_label_files_get_one_line_errors(slide, tmp_path, text, words):
    _, cohort, _ = slide
    p = _write(tmp_path, text.format(sid=cohort["slide_id"][0]))
    with pytest.raises(InvalidInputError) as err:
        read_cell_labels(p, cohort)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_label_file_by_path_resolves_relative_to_itself(slide, tmp_path):
    _, cohort, _ = slide
    rel = Path(cohort["path"][0]).resolve()
    p = _write(tmp_path, f"path,x_px,y_px,label\n{rel},10.5,20,lymphocyte\n")
    table = read_cell_labels(p, cohort)
    assert table[["slide_id", "x_px", "y_px", "label", "line"]].values.tolist() == [
        [cohort["slide_id"][0], 10.5, 20.0, "lymphocyte", 2]]


def test_points_outside_the_image_are_refused(slide):
    _, cohort, _ = slide
    with pytest.raises(InvalidInputError, match=r"\(1030, 5\) lies outside the image "
                                                r"\(1024 x 1024 px"):
        labelled_slide_crops(cohort["path"][0], None, CensusParams(tile_size=512),
                             np.array([[10.0, 10.0], [1030.0, 5.0]]))


def test_cli_refuses_labels_missing_from_the_guide(slide, tmp_path, capsys):
    csv, cohort, _ = slide
    p = _write(tmp_path, f"slide_id,x_px,y_px,label\n{cohort['slide_id'][0]},1,2,smudge\n"
                         f"{cohort['slide_id'][0]},3,4,lymphocyte\n")
    assert main(["train", str(csv), "--labels", str(p), "--out",
                 str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not in the guide" in err and "smudge" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("flag", [["--crop-size", "64"], ["--views", "4"]])
def test_cli_guided_only_options_need_labels(slide, tmp_path, capsys, flag):
    """The guided model's crop size and view count mean nothing to the InfoGAN: refused in
    one line, before any work."""
    csv, _, _ = slide
    assert main(["train", str(csv), "--out", str(tmp_path / "m.pt"), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --labels" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------ train, run, report


@pytest.fixture(scope="module")
def guided_run(slide, tmp_path_factory):
    """Train on the labelled half of the truth cells (plus two points in empty space),
    then run the census with the model; the other half is held out."""
    csv, cohort, truth = slide
    work = tmp_path_factory.mktemp("guided-run")
    rng = np.random.default_rng(0)
    cells = truth[truth["type"].astype(str).isin(TYPES)].reset_index(drop=True)
    labelled = rng.random(len(cells)) < 0.5
    sid = cohort["slide_id"][0]
    lab = pd.DataFrame({"slide_id": sid, "x_px": cells["x_px"][labelled],
                        "y_px": cells["y_px"][labelled],
                        "label": cells["type"].astype(str)[labelled]})
    # far from every nucleus: must be reported, not silently dropped
    tree = cKDTree(truth[["x_px", "y_px"]].to_numpy())
    empty = [(x, y) for x in range(20, 1000, 37) for y in range(20, 1000, 41)
             if tree.query([x, y])[0] > 40][:2]
    assert len(empty) == 2
    lab = pd.concat([lab, pd.DataFrame({"slide_id": sid, "x_px": [e[0] for e in empty],
                                        "y_px": [e[1] for e in empty],
                                        "label": "lymphocyte"})], ignore_index=True)
    lab.to_csv(work / "cells.csv", index=False)
    model = work / "guided.pt"
    # the synthetic slides' own style: no stain normalisation; one in-process worker
    params = CensusParams(tile_size=512, stain_norm=parse_stain_norm("none", None))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        path, report = train_guided_from_cohort(csv, work / "cells.csv", model, client=client,
                                                params=params,
                                                settings={"epochs": 8, "width": 16})
        out = work / "run"
        run_cohort(csv, out, model=path, client=client, params=params)
    return {"work": work, "model": model, "out": out, "cells": cells, "labelled": labelled,
            "empty": empty, "slide_id": sid, "report": report}


@pytest.mark.slow
def test_unmatched_points_are_reported(guided_run):
    rep = pd.read_csv(str(guided_run["model"]) + ".unmatched.csv")
    got = set(zip(rep["x_px"], rep["y_px"], strict=True))
    # the two points in empty space, and any truth cell the segmentation missed
    assert {(float(x), float(y)) for x, y in guided_run["empty"]} <= got
    assert rep["how"].str.contains("no nucleus within 5 µm").all()
    assert {"line", "slide_id", "label"} <= set(rep.columns)
    full = guided_run["report"]
    assert len(full) == int(guided_run["labelled"].sum()) + 2  # every point is accounted for
    assert (~full["matched"]).sum() == len(rep)
    assert set(full.loc[full["matched"], "how"]) <= {"under", "nearest"}


@pytest.mark.slow
def test_guided_census_names_held_out_cells(guided_run):
    out, sid = guided_run["out"], guided_run["slide_id"]
    cells = pd.read_parquet(out / "cells" / f"{sid}.parquet")
    names = sorted(TYPES)
    assert {"cell_type", "emb_x", "emb_y", *[f"p_{t}" for t in names]} <= set(cells.columns)
    np.testing.assert_allclose(cells[[f"p_{t}" for t in names]].sum(axis=1), 1, atol=1e-4)
    assert set(cells["cell_type"]) <= set(names)
    # the crop size follows the labelled slides (0.5 µm/px: 36 px in the 18 µm window), and
    # the census cuts the size the model stored
    import zarr

    from slidecensus.models import load_model

    size = load_model(guided_run["model"]).config.crop_size
    assert size == 32
    assert zarr.open(str(out / "crops.zarr"), mode="r")[sid].shape[1:] == (size, size, 3)
    # held-out truth cells: their nearest census cell within 4 px
    held = guided_run["cells"][~guided_run["labelled"]]
    d, j = cKDTree(cells[["x_px", "y_px"]].to_numpy()).query(held[["x_px", "y_px"]].to_numpy())
    ok = d < 4
    assert ok.mean() > 0.8
    y_true = np.searchsorted(names, held["type"].astype(str).to_numpy()[ok])
    y_pred = np.searchsorted(names, cells["cell_type"].to_numpy()[j[ok]])
    f1 = f1_scores(y_true, y_pred, len(names))
    assert np.nanmean(f1) >= 0.9, dict(zip(names, f1, strict=True))
    # the slide's proportions by name agree with the cells
    slides = pd.read_csv(out / "slides.csv")
    for t in names:
        expect = (cells["cell_type"] == t).mean()
        assert slides[f"p_{t}"][0] == pytest.approx(expect, abs=1e-6)
    assert slides[f"p_{names.index('lymphocyte')}"][0] == slides["p_lymphocyte"][0]


@pytest.mark.slow
def test_reports_take_type_names(guided_run, tmp_path, capsys):
    out = guided_run["out"]
    assert main(["heatmap", str(out), "--clusters", "neutrophil,lymphocyte",
                 "--min-cells", "1"]) == 0
    printed = capsys.readouterr().out
    assert guided_run["slide_id"] in printed
    assert main(["heatmap", str(out), "--clusters", "basophil"]) == 2
    assert "basophil" in capsys.readouterr().err
    assert main(["export", str(out)]) == 0
    geo = next((out / "qupath").glob("*.geojson")).read_text()
    assert '"neutrophil"' in geo or '"myelocyte"' in geo
    assert main(["gallery", str(out)]) == 0
    assert (out / "gallery.png").stat().st_size > 1000
    assert not (out / "clusters.toml").exists()  # the model names its types
    png = tmp_path / "map.png"
    assert main(["embedmap", str(out), "--out", str(png), "--n", "200", "--seed", "1"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["embedmap", str(out), "--slide", guided_run["slide_id"]]) == 0
    assert (out / f"embedmap-{guided_run['slide_id']}.png").is_file()


@pytest.mark.slow
def test_embedmap_refuses_an_unguided_run(tmp_path, capsys):
    (tmp_path / "slides.csv").write_text("slide_id,path,status,error,n_cells,p_0\n"
                                         "a,a.png,ok,,3,1.0\n")
    assert main(["embedmap", str(tmp_path)]) == 2
    assert "not classified with a guided model" in capsys.readouterr().err


def test_guided_crop_size_follows_the_slides_resolution():
    """64-px crops where the 18 µm window spans more than 48 of the slides' own pixels,
    32 where a larger crop would only interpolate; the median slide decides."""
    from slidecensus.engine.plan import guided_crop_size

    assert guided_crop_size([0.1]) == 64          # blood cells: 180 px in the window
    assert guided_crop_size([0.25, 0.26]) == 64   # 40x scans: 72 px
    assert guided_crop_size([0.5]) == 32          # 20x: 36 px
    assert guided_crop_size([0.5, 0.5, 0.25]) == 32
    assert guided_crop_size([0.3], window_um=12.0) == 32  # 40 px
    with pytest.raises(InvalidInputError, match="resolution"):
        guided_crop_size([float("nan")])


def test_the_census_cuts_the_size_the_model_stored():
    """A run's crops follow the model's stored crop spec: a guided model's size, and 32 px
    for InfoGAN models and guided ones saved before the size was stored."""
    from slidecensus.engine.plan import model_crop_spec
    from slidecensus.models import GuidedConfig, TrainConfig

    g = GuidedConfig(crop_size=64, crop_mode="field").to_dict()
    assert CensusParams().with_model_crops(model_crop_spec(g)).crop_size == 64
    assert CensusParams().with_model_crops(model_crop_spec(g)).crop_mode == "field"
    assert CensusParams().with_model_crops(model_crop_spec(TrainConfig().to_dict())
                                           ).crop_size == 32
    old = {k: v for k, v in g.items() if k != "crop_size"}
    assert CensusParams().with_model_crops(model_crop_spec(old)).crop_size == 32


@pytest.mark.slow
def test_the_census_cuts_a_guided_models_own_crop_size(slide, tmp_path):
    """A guided model trained on 48-px crops classifies a run: the census cuts 48 px for it
    (it once cut 32 px whatever the model stored, and every tile of the slide failed)."""
    import zarr

    from slidecensus.models.guided import GuidedConfig, train_guided

    csv, cohort, _ = slide
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (64, 48, 48, 3), dtype=np.uint8)
    names = np.array(TYPES)[np.arange(64) % len(TYPES)]
    path = tmp_path / "g48.pt"
    train_guided(crops, names, GuidedConfig(epochs=1, width=4, crop_size=48, views=1),
                 out=path)
    params = CensusParams(tile_size=512, stain_norm=parse_stain_norm("none", None))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        run_cohort(csv, tmp_path / "run", model=path, client=client, params=params)
    sid = cohort["slide_id"][0]
    cells = pd.read_parquet(tmp_path / "run" / "cells" / f"{sid}.parquet")
    assert len(cells) > 100 and set(cells["cell_type"]) <= set(TYPES)
    stored = zarr.open(str(tmp_path / "run" / "crops.zarr"), mode="r")[sid]
    assert stored.shape[1:] == (48, 48, 3)
