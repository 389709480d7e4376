"""Nucleus outlines (star-convex polygons) and `segment`'s crop and outline outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as MplPath

from slidecensus.cli import main
from slidecensus.errors import InvalidInputError
from slidecensus.nuclei import segment as G
from slidecensus.nuclei.crops import extract_crops
from slidecensus.nuclei.outlines import nucleus_outlines, outline_features
from slidecensus.nuclei.scoring import match_points
from slidecensus.nuclei.stain import estimate_stain_model


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _ellipse(shape, cx, cy, a, b, theta):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    c, s = np.cos(theta), np.sin(theta)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def test_disk_outline_lies_on_its_edge_and_keeps_its_area():
    lab = np.zeros((100, 100), np.int32)
    yy, xx = np.mgrid[:100, :100]
    lab[(xx - 40) ** 2 + (yy - 50) ** 2 <= 12**2] = 7
    poly = nucleus_outlines(lab, np.array([7]), np.array([[40.0, 50.0]]))[0]
    assert np.isfinite(poly).all()  # a disk of radius 12 has boundary pixels in every sector
    # pixel-edge coordinates: the centre pixel's centre is (40.5, 50.5). The farthest pixel
    # of a sector is a boundary pixel of the digital disk (centre 11 to 12 px out), pushed
    # half a pixel further out: 11.5 to 12.5 px.
    r = np.hypot(poly[:, 0] - 40.5, poly[:, 1] - 50.5)
    assert r.min() >= 11.5 - 1e-9 and r.max() <= 12.5 + 1e-9
    assert _shoelace(poly) == pytest.approx((lab == 7).sum(), rel=0.04)


def test_rotated_ellipse_outline_covers_the_object():
    """A rotated ellipse (axes 20 and 9 px): the polygon and the pixels agree (IoU >= 0.9)."""
    shape = (120, 140)
    obj = _ellipse(shape, 70.3, 58.6, 20, 9, 0.6)
    lab = obj.astype(np.int32) * 3
    yy, xx = np.nonzero(obj)
    poly = nucleus_outlines(lab, np.array([3]), np.array([[xx.mean(), yy.mean()]]))[0]
    poly = poly[np.isfinite(poly[:, 0])]
    gy, gx = np.mgrid[: shape[0], : shape[1]]
    inside = MplPath(poly).contains_points(
        np.column_stack([gx.ravel() + 0.5, gy.ravel() + 0.5])).reshape(shape)
    iou = (inside & obj).sum() / (inside | obj).sum()
    assert iou >= 0.9
    assert _shoelace(poly) == pytest.approx(obj.sum(), rel=0.04)


def test_outlines_follow_the_ids_given_and_stay_in_the_image():
    lab = np.zeros((60, 80), np.int32)
    yy, xx = np.mgrid[:60, :80]
    lab[(xx - 20) ** 2 + (yy - 30) ** 2 <= 64] = 1
    lab[(xx - 40) ** 2 + (yy - 30) ** 2 <= 64] = 2  # touches nucleus 1
    lab[(xx - 76) ** 2 + (yy - 2) ** 2 <= 64] = 5  # cut by the top and right edges
    ids = np.array([5, 1])  # out of order, and 2 left out
    cen = np.array([[float(np.nonzero(lab == i)[1].mean()), float(np.nonzero(lab == i)[0].mean())]
                    for i in ids])
    polys = nucleus_outlines(lab, ids, cen)
    assert polys.shape == (2, 32, 2)
    p5, p1 = (p[np.isfinite(p[:, 0])] for p in polys)
    assert p1[:, 0].max() <= 29 and p1[:, 0].min() >= 11  # nucleus 1 only, not 2 beside it
    assert p5[:, 0].max() <= 80 and p5[:, 1].min() >= 0  # inside the image
    assert p5[:, 0].min() >= 67


def test_bad_outline_inputs_refused():
    lab = np.zeros((10, 10), np.int32)
    with pytest.raises(InvalidInputError, match="2 ids but 1 centroids"):
        nucleus_outlines(lab, np.array([1, 2]), np.array([[1.0, 1.0]]))
    with pytest.raises(InvalidInputError, match="n_rays"):
        nucleus_outlines(lab, np.array([1]), np.array([[1.0, 1.0]]), n_rays=2)
    assert nucleus_outlines(lab, np.zeros(0, int), np.zeros((0, 2))).shape == (0, 32, 2)


def test_outline_feature_falls_back_to_a_point():
    cells = pd.DataFrame({"cell_id": [0, 1], "x_px": [5.0, 9.0], "y_px": [6.0, 2.0],
                          "area_um2": [3.0, np.nan]})
    polys = np.full((2, 4, 2), np.nan)
    polys[0, :3] = [[1, 1], [4, 1], [4, 4]]
    f0, f1 = outline_features(cells, polys)
    ring = f0["geometry"]["coordinates"][0]
    assert f0["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 4
    assert f0["properties"]["measurements"] == {"area_um2": 3.0}
    assert f1["geometry"] == {"type": "Point", "coordinates": [9.5, 2.5]}
    assert f1["properties"]["measurements"] == {}  # NaN is not written


def _reference(slide_path, mpp=None):
    """Whole-image segmentation with the stain model `segment_file` uses (its sample)."""
    from slidecensus.tiling import open_slide

    with open_slide(slide_path, mpp=mpp) as slide:
        sample, _ = G.stain_sample(slide, with_mask=False)
        h, w = slide.shape
        rgb = slide.read_region(0, 0, 0, w, h)
        model = estimate_stain_model(sample)
        return rgb, G.segment_image(rgb, mpp=slide.mpp or mpp, stain_model=model)


def test_segment_file_writes_aligned_crops_and_outlines(marrow_pngs, tmp_path):
    """One image: row i of the crops is cell i's crop, masked as the paper does; every
    outline holds its own centroid."""
    png = marrow_pngs[0]
    table = G.segment_file(png, tmp_path / "c.parquet", crops=tmp_path / "c.npy",
                           geojson=tmp_path / "c.geojson")
    crops = np.load(tmp_path / "c.npy")
    assert crops.shape == (len(table), 32, 32, 3) and len(table) > 300
    rgb, (labels, ref) = _reference(png)
    cols = [c for c in table.columns if c != "cell_id"]  # ids are renumbered 0..n-1
    pd.testing.assert_frame_equal(table[cols], ref[cols].astype(table[cols].dtypes.to_dict()),
                                  check_exact=False)
    np.testing.assert_array_equal(crops, extract_crops(rgb, labels, ref, masked=True))
    doc = json.loads((tmp_path / "c.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(table)
    held = 0
    for f, (x, y) in zip(doc["features"], table[["x_px", "y_px"]].to_numpy(), strict=True):
        assert f["properties"]["objectType"] == "detection"
        ring = np.array(f["geometry"]["coordinates"][0])
        held += MplPath(ring).contains_point((x + 0.5, y + 0.5))
    assert held >= 0.99 * len(table)
    assert not list(tmp_path.glob(".*.tmp"))


def test_tiled_slide_crops_and_outlines_match_the_whole_image(cmu_svs, tmp_path):
    """A real SVS as 512 px tiles: crops (bounding-box mode) and outlines equal those of the
    whole image for the same nuclei, so tile offsets reach both outputs."""
    table = G.segment_file(cmu_svs, None, tile_size=512, crops=tmp_path / "c.zarr",
                           crop_masked=False, geojson=tmp_path / "c.geojson")
    import zarr

    crops = zarr.open_array(str(tmp_path / "c.zarr"), mode="r")
    assert crops.shape == (len(table), 32, 32, 3)
    assert crops.attrs["crop"] == "box"
    rgb, (labels, whole) = _reference(cmu_svs)
    ref = extract_crops(rgb, labels, whole, masked=False)
    ti, wi = match_points(table[["x_px", "y_px"]].to_numpy(),
                          whole[["x_px", "y_px"]].to_numpy(), 1.0)
    assert len(ti) >= 0.99 * len(table)
    same = (crops[:][ti] == ref[wi]).all(axis=(1, 2, 3))
    assert same.mean() >= 0.98
    ref_polys = nucleus_outlines(labels, whole["cell_id"].to_numpy(),
                                 whole[["x_px", "y_px"]].to_numpy())
    feats = json.loads((tmp_path / "c.geojson").read_text())["features"]
    close = 0
    for i, j in zip(ti, wi, strict=True):
        ring = np.array(feats[i]["geometry"]["coordinates"][0][:-1])
        want = ref_polys[j][np.isfinite(ref_polys[j, :, 0])]
        close += ring.shape == want.shape and np.abs(ring - want).max() < 0.01
    assert close >= 0.98 * len(ti)


def test_failed_segment_leaves_no_partial_outputs(marrow_pngs, tmp_path, monkeypatch):
    """A tile that fails half-way through a slide: neither the table, the crops nor the
    outlines appear, and no temporary file is left behind. Output paths that are folders,
    or crops that are neither .zarr nor .npy, are refused before any work."""
    calls = []
    real = G.segment_tile_with_labels

    def third_tile_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk gone")
        return real(*a, **kw)

    monkeypatch.setattr(G, "segment_tile_with_labels", third_tile_fails)
    with pytest.raises(RuntimeError, match="disk gone"):
        G.segment_file(marrow_pngs[0], tmp_path / "t.parquet", tile_size=512,
                       crops=tmp_path / "c.zarr", geojson=tmp_path / "c.geojson")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(G, "segment_tile_with_labels", real)
    (tmp_path / "cells.parquet").mkdir()
    with pytest.raises(InvalidInputError, match="is a folder"):
        G.segment_file(marrow_pngs[0], tmp_path / "cells.parquet", crops=tmp_path / "c.zarr")
    with pytest.raises(InvalidInputError, match=r"\.zarr or \.npy"):
        G.segment_file(marrow_pngs[0], tmp_path / "t.parquet", crops=tmp_path / "c.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.parquet"]


def test_segment_command_writes_crops_and_outlines(marrow_pngs, tmp_path, capsys):
    out, crops, geo = tmp_path / "c.parquet", tmp_path / "c.npy", tmp_path / "c.geojson"
    assert main(["segment", str(marrow_pngs[1]), "--out", str(out), "--crops", str(crops),
                 "--crop-mode", "box", "--geojson", str(geo)]) == 0
    n = len(pd.read_parquet(out))
    assert np.load(crops).shape == (n, 32, 32, 3)
    assert len(json.loads(geo.read_text())["features"]) == n
    text = capsys.readouterr().out
    assert f"{n} crops (box)" in text and f"{n} outlines" in text


def test_zarr_crops_stream_in_whole_chunks_and_replace_an_earlier_store(marrow_pngs, tmp_path,
                                                                        monkeypatch):
    """Tiles of crops are buffered into whole Zarr chunks (100 here, so several flushes and
    a remainder): the store equals the in-memory .npy of the same run. Writing again over
    the store replaces it whole and leaves nothing else behind."""
    monkeypatch.setattr(G._CropSink, "CHUNK", 100)
    import zarr

    ref = G.segment_file(marrow_pngs[2], None, tile_size=512, crops=tmp_path / "r.npy",
                         crop_masked=False)
    G.segment_file(marrow_pngs[2], None, tile_size=512, crops=tmp_path / "c.zarr")
    table = G.segment_file(marrow_pngs[2], None, tile_size=512, crops=tmp_path / "c.zarr",
                           crop_masked=False)
    arr = zarr.open_array(str(tmp_path / "c.zarr"), mode="r")
    assert len(table) == len(ref) > 300 and arr.chunks[0] == 100
    assert arr.attrs["crop"] == "box"
    np.testing.assert_array_equal(arr[:], np.load(tmp_path / "r.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "r.npy"]
