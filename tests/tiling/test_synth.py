"""Synthetic marrow slides: determinism, truth against pixels, composition, files."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from slidecensus.errors import InvalidInputError
from slidecensus.tiling.synth import (
    NORMAL_MIX,
    NUCLEATED_TYPES,
    Region,
    SlideSpec,
    StainSpec,
    SynthSource,
    cohort_specs,
    load_cohort_specs,
    render_labels,
    render_region,
    synth_cohort,
    truth_table,
    write_slide,
)


@pytest.fixture(scope="module")
def spec() -> SlideSpec:
    """An abnormal slide of 1024 x 1024 with a blast hotspot."""
    return cohort_specs(2, (1024, 1024), seed=7)[1]


@pytest.fixture(scope="module")
def image(spec: SlideSpec) -> np.ndarray:
    return render_region(spec, 0, 0, spec.width, spec.height)


@pytest.fixture(scope="module")
def truth(spec: SlideSpec) -> pd.DataFrame:
    return truth_table(spec)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("cohort")
    csv = synth_cohort(out, n_slides=2, size=(640, 768), seed=3, mpp=0.5)
    return out, csv


# --- determinism and seams ----------------------------------------------------------------


def test_same_seed_same_pixels_and_truth(spec, image, truth):
    again = SlideSpec.from_dict(spec.to_dict())
    assert again == spec
    np.testing.assert_array_equal(render_region(again, 0, 0, 1024, 1024), image)
    pd.testing.assert_frame_equal(truth_table(again), truth)


def test_different_seed_differs(spec, image, truth):
    other = SlideSpec.from_dict({**spec.to_dict(), "seed": spec.seed + 1})
    assert not np.array_equal(render_region(other, 0, 0, 1024, 1024), image)
    t2 = truth_table(other)
    assert len(t2) != len(truth) or not np.allclose(t2.x_px.values, truth.x_px.values)


@pytest.mark.parametrize("window", [(0, 0, 100, 60), (300, 517, 333, 271), (1000, 1000, 24, 24),
                                    (511, 0, 2, 1024)])
def test_window_equals_crop_of_whole(spec, image, window):
    x, y, w, h = window
    np.testing.assert_array_equal(render_region(spec, x, y, w, h), image[y:y + h, x:x + w])


def test_truth_independent_of_strips(spec, truth):
    pd.testing.assert_frame_equal(truth_table(spec, strip_px=300), truth)


def test_source_pickles(spec):
    src = pickle.loads(pickle.dumps(SynthSource(spec)))
    np.testing.assert_array_equal(src(10, 20, 30, 40), render_region(spec, 10, 20, 30, 40))


# --- truth against pixels -------------------------------------------------------------------


def test_every_centroid_lies_on_hematoxylin(image, truth):
    """Each truth nucleus centroid is on hematoxylin-rich pixels of the rendered image.

    Hematoxylin comes from skimage's Ruifrok deconvolution of the RGB, not from the
    generator. Otsu's threshold of the tissue's hematoxylin splits dark nuclei from the
    rest; pale open-chromatin blasts sit near it, so every centroid must clear 0.7 of it
    (while most tissue pixels do not) and nearly all must clear it outright.
    """
    hema = rgb2hed(image)[..., 0]
    tissue = image.mean(-1) < 235
    otsu = threshold_otsu(hema[tissue])
    xi = np.rint(truth.x_px.to_numpy()).astype(int)
    yi = np.rint(truth.y_px.to_numpy()).astype(int)
    pad = np.pad(hema, 1, mode="edge")
    local = np.mean([pad[yi + 1 + dy, xi + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
                    axis=0)
    assert len(truth) > 500
    off = truth[local <= 0.7 * otsu]
    assert len(off) == 0, f"{len(off)} centroids off nuclei:\n{off.head()}"
    assert np.mean(local > otsu) > 0.97
    assert np.mean(hema[tissue] > 0.7 * otsu) < 0.45  # the test is not vacuous


def test_labels_match_truth(spec, truth):
    lab = render_labels(spec, 0, 0, spec.width, spec.height)
    assert lab.dtype == np.uint32
    ids = np.unique(lab[lab > 0])
    assert set(ids) == set(truth.cell_id)  # every labelled nucleus is a truth row, and back
    xi = np.rint(truth.x_px.to_numpy()).astype(int)
    yi = np.rint(truth.y_px.to_numpy()).astype(int)
    assert np.mean(lab[yi, xi] == truth.cell_id.to_numpy()) > 0.99
    counts = pd.Series(lab[lab > 0]).value_counts()
    drawn = counts.reindex(truth.cell_id).to_numpy() * spec.mpp**2
    ratio = drawn / truth.area_um2.to_numpy()
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)  # occlusion only lowers it
    sub = render_labels(spec, 200, 300, 150, 90)
    np.testing.assert_array_equal(sub, lab[300:390, 200:350])


def test_sizes_follow_cell_types(truth):
    area = truth.groupby("type", observed=True).area_um2.median()
    assert area["myeloblast"] > area["myelocyte"] > area["lymphocyte"] > area["normoblast"]
    assert area["megakaryocyte"] > 3 * area["myeloblast"]
    assert 25 < area["lymphocyte"] < 50  # ~6.5-7 µm nucleus


def test_counts_follow_the_mix():
    mix = {"myeloblast": 0.25, "myelocyte": 0.25, "neutrophil": 0.2, "monocyte": 0.1,
           "lymphocyte": 0.1, "normoblast": 0.1}
    spec = SlideSpec(seed=11, height=2048, width=2048, mix=mix, tissue="full")
    t = truth_table(spec)
    n = len(t)
    assert n > 4000
    frac = t.type.value_counts()
    for name, p in mix.items():
        tol = 4 * np.sqrt(n * p * (1 - p))  # 4 binomial standard deviations
        assert abs(frac[name] - n * p) < tol, (name, frac[name], n * p)
    assert frac.get("megakaryocyte", 0) == 0


def test_hotspot_has_more_blasts(spec, truth):
    assert len(spec.regions) == 1
    blast = truth.type == "myeloblast"
    inside = truth.region == 0
    assert inside.sum() > 50
    assert blast[inside].mean() > blast[~inside].mean() + 0.2
    x, y = truth.x_px.to_numpy(), truth.y_px.to_numpy()
    np.testing.assert_array_equal(spec.regions[0].contains(x, y), inside.to_numpy())


def test_anucleate_red_cells_listed_on_request(spec, truth):
    full = truth_table(spec, include_anucleate=True)
    red = full[~full.nucleated]
    assert len(red) > 0 and set(red.type) == {"red_cell"}
    assert (red.area_um2 == 0).all()
    pd.testing.assert_frame_equal(full[full.nucleated].reset_index(drop=True), truth)


def test_stains_differ_between_slides():
    a, b = cohort_specs(2, (512, 512), seed=1)
    assert a.stain != b.stain
    ma, mb = a.stain.matrix(), b.stain.matrix()
    assert np.allclose(np.linalg.norm(ma[2]), 1)
    assert not np.allclose(ma, mb)
    assert StainSpec().matrix().shape == (3, 3)


# --- validation -----------------------------------------------------------------------------


def test_validation():
    with pytest.raises(InvalidInputError, match="unknown cell types"):
        SlideSpec(seed=0, height=64, width=64, mix={"blast": 1.0})
    with pytest.raises(InvalidInputError, match="seed"):
        SlideSpec(seed=-1, height=64, width=64)
    with pytest.raises(InvalidInputError, match="shape"):
        Region(0, 0, 10, 10, NORMAL_MIX, shape="star")
    spec = SlideSpec(seed=0, height=64, width=64)
    with pytest.raises(InvalidInputError, match="exceeds"):
        render_region(spec, 32, 32, 64, 64)
    with pytest.raises(InvalidInputError, match="n_slides"):
        cohort_specs(0, (64, 64))


def test_tiny_and_empty_slides():
    spec = SlideSpec(seed=0, height=40, width=24, fat_fraction=0.0)
    assert render_region(spec, 0, 0, 24, 40).shape == (40, 24, 3)
    t = truth_table(spec)
    assert list(t.columns) == ["cell_id", "type", "x_px", "y_px", "area_um2", "region",
                               "nucleated"]
    assert set(NUCLEATED_TYPES) <= set(t.type.cat.categories)


# --- files ----------------------------------------------------------------------------------


def test_cohort_files(cohort):
    out, csv = cohort
    df = pd.read_csv(csv)
    assert list(df.columns) == ["path", "slide_id", "label"]
    assert list(df.label) == ["normal", "abnormal"]
    specs = load_cohort_specs(out / "cohort.json")
    assert [s.slide_id for s in specs] == list(df.slide_id)
    for spec, row in zip(specs, df.itertuples(), strict=True):
        t = pd.read_parquet(out / f"{row.slide_id}.cells.parquet")
        pd.testing.assert_frame_equal(t, truth_table(spec), check_categorical=False)
    assert not list(out.glob("*.part"))


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_cohort_slides_open_on_both_readers(cohort, backend):
    from slidecensus.tiling import open_slide

    out, csv = cohort
    df = pd.read_csv(csv)
    specs = load_cohort_specs(out / "cohort.json")
    for spec, path in zip(specs, df.path, strict=True):
        with open_slide(path, backend=backend) as slide:
            assert slide.mpp == pytest.approx(0.5, rel=1e-3)
            assert tuple(slide.shape[:2]) == (640, 768)
            assert len(slide.levels) >= 2
            got = slide.read_region(0, 100, 200, 300, 200).astype(float)
            want = render_region(spec, 100, 200, 300, 200).astype(float)
            assert np.abs(got - want).mean() < 6.0  # JPEG q90, chroma subsampled


def test_write_slide_streams_tile_by_tile(tmp_path):
    """A slide written through the streaming writer equals the in-memory rendering."""
    import tifffile

    spec = SlideSpec(seed=5, height=700, width=900, slide_id="s")
    tiff, truth = write_slide(spec, tmp_path, tile_size=256)
    with tifffile.TiffFile(tiff) as tf:
        level0 = tf.series[0].levels[0].asarray()
    want = render_region(spec, 0, 0, 900, 700)
    err = np.abs(level0.astype(float) - want.astype(float))
    assert err.mean() < 4.0
    # seams: errors at tile borders are no larger than inside tiles
    seam = np.zeros(err.shape[:2], bool)
    seam[:, 255:257] = seam[:, 511:513] = seam[255:257] = seam[511:513] = True
    assert err[seam].mean() < err[~seam].mean() + 1.5
    assert len(pd.read_parquet(truth)) == len(truth_table(spec))


def test_dask_client_writes_the_same_slide(tmp_path):
    """Tiles rendered on Dask workers give the same file content as local rendering."""
    import tifffile
    from distributed import Client, LocalCluster

    spec = SlideSpec(seed=2, height=600, width=700, slide_id="d")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        remote, _ = write_slide(spec, tmp_path / "dask", client=client, tile_size=256)
    local, _ = write_slide(spec, tmp_path / "local", tile_size=256)
    np.testing.assert_array_equal(tifffile.imread(remote), tifffile.imread(local))
