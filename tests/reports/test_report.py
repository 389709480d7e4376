"""Reports from a census folder: heatmaps, cluster names, QuPath GeoJSON, galleries.

The heatmap tests need clusters that mean something. The CPU test model's clusters do not,
so the "oracle" run below classifies each synthetic cell by its true type and goes through
the census' own reduction and writers (``finish_slide``, ``write_census_group``): the
heatmap layer is what is under test, not the classifier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pytest

from slidecensus.cli import main
from slidecensus.engine.census import write_census_group
from slidecensus.engine.outputs import OutputDir
from slidecensus.engine.plan import CensusParams, plan_slide
from slidecensus.engine.tasks import finish_slide
from slidecensus.errors import InvalidInputError
from slidecensus.nuclei.segment import CELL_COLUMNS, empty_cell_table
from slidecensus.reports.clusters import (
    OKABE_ITO,
    cluster_colors,
    parse_cluster_selection,
    read_cluster_names,
    template_text,
)
from slidecensus.reports.export import cell_features, export_geojson
from slidecensus.reports.gallery import crop_mosaic, make_gallery, sample_by_cluster
from slidecensus.reports.heatmap import (
    HeatmapParams,
    hotspot,
    make_heatmaps,
    nice_scale_length,
    selected_proportion,
)
from slidecensus.tiling.synth import cohort_specs, synth_cohort

REGION_UM = 32.0
#: oracle clusters: 0 erythroid, 1 other, 2 blast (named in clusters.toml)
BLAST, ERYTHROID = 2, 0


def _oracle_cells(truth: pd.DataFrame) -> pd.DataFrame:
    """A cell table whose cluster is the cell's true type (what a perfect Q would give)."""
    n = len(truth)
    cells = empty_cell_table().reindex(range(n))
    for col, dtype in CELL_COLUMNS.items():
        cells[col] = np.zeros(n, dtype=dtype)
    cells["x_px"], cells["y_px"] = truth["x_px"].to_numpy(), truth["y_px"].to_numpy()
    cells["x_um"], cells["y_um"] = cells["x_px"] * 0.5, cells["y_px"] * 0.5
    cells["area_um2"] = truth["area_um2"].to_numpy()
    kind = truth["type"].astype(str).to_numpy()
    cluster = np.where(kind == "myeloblast", BLAST, np.where(kind == "normoblast", ERYTHROID, 1))
    cells["cluster"] = cluster.astype(np.int64)
    for j in range(3):
        cells[f"p_{j}"] = (cluster == j).astype(np.float32)
    return cells


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    """A census folder of two synthetic slides (normal, abnormal with a blast hotspot),
    classified by truth, reduced and written by the pipeline's own functions."""
    root = tmp_path_factory.mktemp("oracle")
    size = (1536, 2048)  # (height, width): not square, and the hotspot is off the diagonal,
    # so a map transposed anywhere puts it in the wrong place
    csv = synth_cohort(root / "slides", n_slides=2, size=size, seed=2, mpp=0.5)
    cohort = pd.read_csv(csv)
    out = OutputDir(root / "run")
    out.makedirs()
    params = CensusParams(region_um=REGION_UM)
    rows = []
    for _, r in cohort.iterrows():
        truth = pd.read_parquet(root / "slides" / f"{r.slide_id}.cells.parquet")
        plan = plan_slide(r.path, None, params)
        cells = _oracle_cells(truth)
        res = finish_slide(r.slide_id, out, plan, 3,
                           [(cells, np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))],
                           params)
        write_census_group(out, r.slide_id, res, plan, 3, REGION_UM)
        p = np.bincount(cells["cluster"], minlength=3) / len(cells)
        rows.append({"slide_id": r.slide_id, "path": r.path, "label": r.label, "status": "ok",
                     "error": "", "n_cells": len(cells), "p_0": p[0], "p_1": p[1],
                     "p_2": p[2]})
    rows.append({"slide_id": "bad", "path": "/nowhere.svs", "label": "normal",
                 "status": "failed", "error": "no such file", "n_cells": 0})
    out.write_csv("slides.csv", pd.DataFrame(rows))
    (root / "run" / "clusters.toml").write_text(
        '[clusters]\n0 = "normoblast"\n2 = "myeloblast"\n', encoding="utf-8")
    spec = cohort_specs(2, size, seed=2, mpp=0.5)[1]
    return root / "run", root / "slides", spec


# ------------------------------------------------------------------ pure functions


def test_selected_proportion_sums_chosen_clusters_and_hides_thin_regions():
    counts = np.zeros((2, 3, 4), np.int64)
    counts[0, 0] = [10, 20, 5, 5]    # 40 cells, clusters 1 + 3 -> 25/40
    counts[0, 1] = [1, 1, 0, 0]      # 2 cells: below min_cells
    counts[1, 2] = [0, 0, 30, 0]     # 30 cells, none chosen -> 0
    tissue = np.ones((2, 3))
    tissue[1, 2] = 0.01              # but no tissue there
    prop = selected_proportion(counts, [1, 3], min_cells=5)
    assert prop[0, 0] == pytest.approx(25 / 40)
    assert np.isnan(prop[0, 1]) and np.isnan(prop[1, 0])
    assert prop[1, 2] == 0.0
    hidden = selected_proportion(counts, [1, 3], min_cells=5, tissue=tissue, min_tissue=0.05)
    assert np.isnan(hidden[1, 2]) and hidden[0, 0] == pytest.approx(25 / 40)
    with pytest.raises(InvalidInputError, match="outside 0..3"):
        selected_proportion(counts, [4])


def test_hotspot_reports_the_centre_of_the_hottest_region_in_um():
    prop = np.full((3, 4), np.nan)
    prop[0, 0], prop[2, 1] = 0.2, 0.9
    value, x_um, y_um = hotspot(prop, 100.0)
    assert (value, x_um, y_um) == (0.9, 150.0, 250.0)
    assert all(math.isnan(v) for v in hotspot(np.full((2, 2), np.nan), 100.0))


@pytest.mark.parametrize(("span", "expected"), [(1000, 200), (4400, 500), (130, 20),
                                                 (52000, 10000)])
def test_scale_bar_length_is_round_and_near_a_fifth_of_the_width(span, expected):
    assert nice_scale_length(span) == expected


def test_cluster_names_select_every_id_they_name(tmp_path):
    path = tmp_path / "clusters.toml"
    path.write_text('[clusters]\n1 = "myeloblast"\n4 = "Myeloblast "\n0 = "lymphocyte"\n')
    names = read_cluster_names(path)
    assert names == {1: "myeloblast", 4: "Myeloblast", 0: "lymphocyte"}
    assert parse_cluster_selection("myeloblast", 5, names) == [1, 4]
    assert parse_cluster_selection("3, lymphocyte", 5, names) == [0, 3]
    colors = cluster_colors(5, names)
    assert colors[1] == colors[4] and len({colors[0], colors[1], colors[2]}) == 3
    assert set(colors) <= set(OKABE_ITO)
    with pytest.raises(InvalidInputError, match="no cluster is named 'blast'"):
        parse_cluster_selection("blast", 5, names)
    with pytest.raises(InvalidInputError, match="clusters 0..4"):
        parse_cluster_selection("5", 5, names)


@pytest.mark.parametrize(("text", "message"), [
    ('[clusters]\nx = "a"\n', "not an integer"),
    ('[clusters]\n1 = ""\n', "non-empty name"),
    ('[clusters]\n1 = 3\n', "non-empty name"),
    ("[clusters\n", "not valid TOML"),
])
def test_a_malformed_cluster_file_is_an_error_naming_the_entry(tmp_path, text, message):
    path = tmp_path / "clusters.toml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        read_cluster_names(path)


def test_the_cluster_template_parses_to_no_names(tmp_path):
    path = tmp_path / "clusters.toml"
    path.write_text(template_text(5, [0.1, 0.2, 0.3, 0.2, 0.2]))
    assert read_cluster_names(path) == {}
    assert "# 4 = \"\"" in path.read_text()


def test_gallery_sampling_is_seeded_and_stays_inside_each_cluster():
    clusters = np.repeat([0, 1, 2], [5, 50, 0])
    a = sample_by_cluster(clusters, 3, 10, seed=1)
    b = sample_by_cluster(clusters, 3, 10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert [len(x) for x in a] == [5, 10, 0]
    assert (clusters[a[1]] == 1).all() and len(set(a[1])) == 10
    mosaic = crop_mosaic(np.zeros((5, 32, 32, 3), np.uint8), columns=4, pad=2)
    assert mosaic.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    assert (mosaic[2:34, 2:34] == 0).all() and (mosaic[36:68, 36:68] == 200).all()


# ------------------------------------------------------------------ heatmaps on a run


def test_blast_hotspots_lie_inside_the_planted_region(oracle_run):
    run, slides, spec = oracle_run
    table = make_heatmaps(run, "myeloblast", name="blast", params=HeatmapParams(min_cells=5))
    region = spec.regions[0]
    row = table.set_index("slide_id").loc[spec.slide_id]
    hx, hy = row["hotspot_x_um"] / spec.mpp, row["hotspot_y_um"] / spec.mpp
    assert region.contains(np.array([hx]), np.array([hy]))[0]
    # the viewer array, read back, is the truth's blast fraction per 32 µm region, counted
    # here from the truth table: a transposed, shifted or rescaled map fails
    import zarr

    group = zarr.open_group(str(run / "heatmaps" / "blast" / f"{spec.slide_id}.ome.zarr"),
                            mode="r")
    arr = np.asarray(group["0"][:])
    ms = group.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [REGION_UM] * 2
    rows, cols = math.ceil(spec.height * spec.mpp / REGION_UM), math.ceil(
        spec.width * spec.mpp / REGION_UM)
    assert arr.shape == (rows, cols)
    truth = pd.read_parquet(slides / f"{spec.slide_id}.cells.parquet")
    iy = (truth["y_px"].to_numpy() * spec.mpp // REGION_UM).astype(int)
    ix = (truth["x_px"].to_numpy() * spec.mpp // REGION_UM).astype(int)
    n, blasts = np.zeros(arr.shape), np.zeros(arr.shape)
    np.add.at(n, (iy, ix), 1)
    np.add.at(blasts, (iy, ix), (truth["type"] == "myeloblast").to_numpy())
    shown = np.isfinite(arr)
    assert (n[shown] >= 5).all() and shown.sum() >= 0.8 * (n >= 5).sum()
    np.testing.assert_allclose(arr[shown], blasts[shown] / n[shown], atol=1e-6)
    # and the planted hotspot stands out: regions centred inside it are far hotter
    gy, gx = np.mgrid[0:rows, 0:cols]
    inside = region.contains((gx.ravel() + 0.5) * REGION_UM / spec.mpp,
                             (gy.ravel() + 0.5) * REGION_UM / spec.mpp).reshape(arr.shape)
    assert (inside & shown).sum() >= 10
    assert np.mean(arr[inside & shown]) > np.mean(arr[~inside & shown]) + 0.2


def test_heatmap_summary_matches_the_slides_true_blast_fraction(oracle_run):
    run, slides, _ = oracle_run
    table = make_heatmaps(run, "2", name="blast2", params=HeatmapParams(min_cells=5))
    assert set(table["slide_id"]) == {"synth_000_normal", "synth_001_abnormal"}  # not "bad"
    for _, row in table.iterrows():
        truth = pd.read_parquet(slides / f"{row.slide_id}.cells.parquet")
        assert row["n_classified"] == len(truth)
        assert row["proportion"] == pytest.approx((truth["type"] == "myeloblast").mean())
    by = table.set_index("slide_id")["proportion"]
    assert by["synth_001_abnormal"] > 5 * by["synth_000_normal"]


def test_heatmap_pictures_are_written_unstretched(oracle_run):
    run, _, spec = oracle_run
    make_heatmaps(run, "myeloblast", name="blast", params=HeatmapParams(min_cells=5))
    folder = run / "heatmaps" / "blast"
    for name in (f"{spec.slide_id}.png", "overview.png"):
        img = imagecodecs.png_decode((folder / name).read_bytes())
        assert img.ndim == 3 and min(img.shape[:2]) > 300
        assert img[..., :3].std() > 10  # a picture, not a blank canvas
    meta = json.loads((folder / "heatmap.json").read_text())
    assert meta["clusters"] == [2] and meta["names"] == {"2": "myeloblast"}
    geo = json.loads((folder / f"{spec.slide_id}.regions.geojson").read_text())
    squares = [f["geometry"]["coordinates"][0] for f in geo["features"]]
    edge = REGION_UM / spec.mpp
    assert squares and all(abs(s[1][0] - s[0][0] - edge) < 1e-6 for s in squares)
    assert all("blast proportion" in f["properties"]["measurements"] for f in geo["features"])


def test_heatmap_cli_prints_the_summary_and_refuses_unknown_clusters(oracle_run, capsys):
    run, _, _ = oracle_run
    assert main(["heatmap", str(run), "--clusters", "myeloblast", "--min-cells", "5",
                 "--slides", "synth_001_abnormal"]) == 0
    out = capsys.readouterr().out
    assert "synth_001_abnormal" in out and "synth_000_normal" not in out
    assert main(["heatmap", str(run), "--clusters", "blast"]) == 2
    assert "no cluster is named 'blast'" in capsys.readouterr().err
    assert main(["heatmap", str(run), "--clusters", "1", "--slides", "bad"]) == 2


# ------------------------------------------------------------------ QuPath export


def test_geojson_has_every_cell_in_the_structure_qupath_reads(oracle_run):
    run, slides, spec = oracle_run
    paths = export_geojson(run)
    assert len(paths) == 2
    doc = json.loads((run / "qupath" / f"{spec.slide_id}.geojson").read_text())
    truth = pd.read_parquet(slides / f"{spec.slide_id}.cells.parquet")
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(truth)
    names = {}
    for f in doc["features"][:500]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Point"
        assert len(f["geometry"]["coordinates"]) == 2
        props = f["properties"]
        assert props["objectType"] == "detection"
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        names[props["measurements"]["cluster"]] = cls["name"]
    assert names[BLAST] == "myeloblast" and names[1] == "cluster 1"
    xy = np.array([f["geometry"]["coordinates"] for f in doc["features"]])
    assert np.allclose(xy, truth[["x_px", "y_px"]].to_numpy() + 0.5, atol=0.01)
    assert not list((run / "qupath").glob("*.tmp"))


def test_unclassified_cells_export_without_a_classification():
    cells = pd.DataFrame({"x_px": [1.0, 2.0], "y_px": [3.0, 4.0], "cluster": [-1, 0],
                          "area_um2": [20.0, np.nan]})
    feats = list(cell_features(cells, 1))
    assert "classification" not in feats[0]["properties"]
    assert feats[1]["properties"]["classification"]["name"] == "cluster 0"
    assert "area_um2" not in feats[1]["properties"]["measurements"]  # NaN is left out


# ------------------------------------------------------------------ galleries on a real run


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A real census (tiny CPU model, k = 3) of one small synthetic slide."""
    from distributed import Client, LocalCluster

    from slidecensus.engine.census import run_cohort
    from slidecensus.models import TrainConfig, train_infogan

    root = tmp_path_factory.mktemp("modelrun")
    csv = synth_cohort(root / "slides", n_slides=1, size=(1024, 1152), seed=2, mpp=0.5)
    rng = np.random.default_rng(0)
    model = root / "tiny.pt"
    train_infogan(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                  TrainConfig(k=3, width=8, z_dim=8, iterations=2, batch_size=16, seed=0), model)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        table = run_cohort(csv, root / "run", model=model, client=client)
    assert (table["status"] == "ok").all()
    return root / "run", model


def test_gallery_shows_real_and_generated_crops_and_writes_a_naming_template(model_run):
    run, model = model_run
    assert main(["gallery", str(run), "--model", str(model), "--per-cluster", "12"]) == 0
    with_gen = imagecodecs.png_decode((run / "gallery.png").read_bytes())
    template = (run / "clusters.toml").read_text()
    assert read_cluster_names(run / "clusters.toml") == {}
    assert all(f"# {j} = " in template for j in range(3))
    path = make_gallery(str(run), generated=0, per_cluster=12)
    real_only = imagecodecs.png_decode(Path(path).read_bytes())
    assert with_gen.shape[1] > real_only.shape[1]  # the generator column is there
    assert with_gen.shape[0] > 200 and with_gen[..., :3].std() > 10


def test_reports_read_and_write_a_run_on_object_storage(oracle_run, s3_server, tmp_path):
    """A run kept on S3 (a real S3-compatible server on loopback): heatmaps and the QuPath
    export read it there and write beside it, with the same numbers as on disk."""
    run, _, spec = oracle_run
    fs = s3_server
    fs.put(str(run), "census-bucket/run", recursive=True)
    url = "s3://census-bucket/run"
    remote = make_heatmaps(url, "myeloblast", name="blast", params=HeatmapParams(min_cells=5))
    local = make_heatmaps(run, "myeloblast", name="blast", params=HeatmapParams(min_cells=5))
    pd.testing.assert_frame_equal(remote, local)
    assert fs.exists(f"census-bucket/run/heatmaps/blast/{spec.slide_id}.png")
    assert fs.exists(f"census-bucket/run/heatmaps/blast/{spec.slide_id}.ome.zarr/zarr.json")
    export_geojson(url, slides=[spec.slide_id])
    doc = json.loads(fs.cat_file(f"census-bucket/run/qupath/{spec.slide_id}.geojson"))
    assert len(doc["features"]) == len(pd.read_parquet(run / "cells" /
                                                       f"{spec.slide_id}.parquet"))
