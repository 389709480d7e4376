"""The cohort census on real Dask worker processes, against synthetic slides with truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from slidecensus.engine.census import run_cohort
from slidecensus.engine.plan import CensusParams
from slidecensus.tiling.synth import synth_cohort

from ..conftest import free_port
from ..workers import kill_worker_when_segmenting

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two synthetic slides (normal, abnormal) of 1280 x 1152 plus one corrupt file."""
    out = tmp_path_factory.mktemp("cohort")
    csv = synth_cohort(out / "slides", n_slides=2, size=(1152, 1280), seed=11, mpp=0.5)
    bad = out / "slides" / "broken slide.svs"
    bad.write_bytes(b"II*\x00" + os.urandom(5000))
    table = pd.read_csv(csv)
    table = pd.concat([table, pd.DataFrame([{"path": str(bad), "slide_id": "broken",
                                             "label": "normal"}])], ignore_index=True)
    table.to_csv(out / "cohort.csv", index=False)
    return out / "cohort.csv"


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, cohort) -> Path:
    """A briefly trained k=3 model (its clusters need not mean anything for these tests)."""
    from slidecensus.models import TrainConfig, train_infogan

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    train_infogan(crops, TrainConfig(k=3, width=16, iterations=4, batch_size=32, seed=0),
                  path)
    return path


PARAMS = CensusParams(tile_size=512, region_um=128.0)


def _match(truth: np.ndarray, found: np.ndarray, radius: float) -> int:
    """One-to-one matches within ``radius`` (Hungarian on the candidate pairs)."""
    if not len(truth) or not len(found):
        return 0
    d = np.linalg.norm(truth[:, None, :] - found[None, :, :], axis=2)
    cost = np.where(d <= radius, d, 1e6)
    r, c = linear_sum_assignment(cost)
    return int((cost[r, c] <= radius).sum())


@pytest.fixture(scope="module")
def counted(cohort, client, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("census")
    table = run_cohort(cohort, out, client=client, params=PARAMS)
    return out, table


def test_good_slides_ok_and_bad_slide_fails_alone(counted):
    out, table = counted
    status = dict(zip(table.slide_id, table.status, strict=True))
    assert status == {"synth_000_normal": "ok", "synth_001_abnormal": "ok", "broken": "failed"}
    err = table.set_index("slide_id").loc["broken", "error"]
    assert "broken slide.svs" in err and "\n" not in err
    on_disk = pd.read_csv(out / "slides.csv")
    assert on_disk.slide_id.tolist() == table.slide_id.tolist()
    assert {"slide_id", "path", "status", "error", "n_cells"} <= set(on_disk.columns)


def test_cells_found_where_truth_has_them(counted, cohort):
    """Tiled census on workers: cells in level-0 coordinates match the truth centroids."""
    out, table = counted
    slides = Path(cohort).parent / "slides"
    for sid in ("synth_000_normal", "synth_001_abnormal"):
        cells = pd.read_parquet(out / "cells" / f"{sid}.parquet")
        truth = pd.read_parquet(slides / f"{sid}.cells.parquet")
        n = int(table.set_index("slide_id").loc[sid, "n_cells"])
        assert len(cells) == n and cells.cell_id.is_unique
        m = _match(truth[["x_px", "y_px"]].to_numpy(), cells[["x_px", "y_px"]].to_numpy(), 6.0)
        # detection on synthetic marrow: most truth cells found, few spurious ones
        assert m / len(truth) > 0.8, (m, len(truth))
        assert m / len(cells) > 0.8, (m, len(cells))
        # no duplicates across tile seams: no two cells closer than 2 px
        pairs = cKDTree(cells[["x_px", "y_px"]].to_numpy()).query_pairs(2.0)
        assert not pairs


def test_census_zarr_maps_add_up(counted):
    out, table = counted
    root = zarr.open_group(out / "census.zarr", mode="r")
    for sid in ("synth_000_normal", "synth_001_abnormal"):
        g = root[sid]
        cells = np.asarray(g["cells"][:])
        assert cells.sum() == table.set_index("slide_id").loc[sid, "n_cells"]
        # 1280 x 1152 px at 0.5 µm/px on a 128 µm grid: 5 x 5 regions, coordinates in µm
        assert cells.shape == (5, 5)
        np.testing.assert_allclose(np.asarray(g["x"][:]), (np.arange(5) + 0.5) * 128.0)
        tissue = np.asarray(g["tissue"][:])
        assert ((tissue >= 0) & (tissue <= 1)).all() and tissue.max() > 0.5
    assert "broken" not in root


def test_tile_size_does_not_change_the_census(counted, cohort, client, tmp_path):
    """The same slides cut into 512- or 384-px tiles give the same cells (seam-free)."""
    out, _ = counted
    other = run_cohort(cohort, tmp_path, client=client,
                       params=CensusParams(tile_size=384, region_um=128.0))
    for sid in ("synth_000_normal", "synth_001_abnormal"):
        a = pd.read_parquet(out / "cells" / f"{sid}.parquet")
        b = pd.read_parquet(tmp_path / "cells" / f"{sid}.parquet")
        m = _match(a[["x_px", "y_px"]].to_numpy(), b[["x_px", "y_px"]].to_numpy(), 2.0)
        assert m >= 0.99 * max(len(a), len(b))
    assert other.status.tolist() == ["ok", "ok", "failed"]


def test_rerun_resumes_and_parameter_change_recomputes(counted, cohort, client, tmp_path):
    out = tmp_path / "copy"  # work on a copy: other tests compare against `counted`
    shutil.copytree(counted[0], out)
    table = counted[1]
    rec = out / "slides" / "synth_000_normal.json"
    cells = out / "cells" / "synth_000_normal.parquet"
    before = (rec.stat().st_mtime_ns, cells.stat().st_mtime_ns)
    again = run_cohort(cohort, out, client=client, params=PARAMS)
    assert (rec.stat().st_mtime_ns, cells.stat().st_mtime_ns) == before  # skipped
    pd.testing.assert_frame_equal(again.drop(columns=["seconds"]),
                                  table.drop(columns=["seconds"]))
    # a different region size changes the maps: the slide is recomputed
    run_cohort(cohort, out, client=client, params=CensusParams(tile_size=512,
                                                               region_um=64.0))
    assert rec.stat().st_mtime_ns != before[0]
    assert json.loads(rec.read_text())["digest"]["params"] == CensusParams(
        tile_size=512, region_um=64.0).digest()


def test_classified_census_proportions(cohort, client, tiny_model, tmp_path):
    table = run_cohort(cohort, tmp_path, client=client, model=tiny_model, params=PARAMS)
    ok = table[table.status == "ok"]
    props = ok[["p_0", "p_1", "p_2"]].to_numpy()
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-9)
    cells = pd.read_parquet(tmp_path / "cells" / "synth_001_abnormal.parquet")
    assert cells.cluster.between(0, 2).all()
    np.testing.assert_allclose(cells[["p_0", "p_1", "p_2"]].sum(axis=1), 1.0, atol=1e-4)
    # the slide proportions are the cluster counts of its cells
    counts = np.bincount(cells.cluster, minlength=3) / len(cells)
    np.testing.assert_allclose(ok.set_index("slide_id").loc["synth_001_abnormal",
                                                            ["p_0", "p_1", "p_2"]].to_numpy(
        dtype=float), counts, atol=1e-9)
    g = zarr.open_group(tmp_path / "census.zarr", mode="r")["synth_001_abnormal"]
    assert np.asarray(g["counts"][:]).sum() == len(cells)
    # gallery sample: seeded crops whose attributes point back at their cells
    sample = zarr.open_group(tmp_path / "crops.zarr", mode="r")["synth_001_abnormal"]
    # at most 256 crops, drawn from per-tile quotas (2x the even share per tile)
    assert sample.shape[1:] == (32, 32, 3) and min(128, len(cells)) <= sample.shape[0] <= 256
    ids = np.asarray(sample.attrs["cell_id"])
    by_id = cells.set_index("cell_id")
    np.testing.assert_array_equal(sample.attrs["cluster"], by_id.loc[ids, "cluster"].to_numpy())
    crops = np.asarray(sample[:])
    assert (crops < 200).any(axis=(1, 2, 3)).all()  # every crop holds a stained nucleus


def test_inference_runs_only_on_the_gpu_worker(cohort, tiny_model, tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1, one started
    with ``--resources GPU=1``: classification tasks run there and nowhere else."""
    from distributed import Client, get_task_stream

    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    exe = shutil.which("dask") or sys.executable
    base = [exe] if exe.endswith("dask") else [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen([*base, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(1.5)
        for extra in ([], ["--resources", "GPU=1"]):
            procs.append(subprocess.Popen(
                [*base, "worker", addr, "--nthreads", "1", "--host", "127.0.0.1",
                 "--no-dashboard", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(addr, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            gpu = [a for a, w in client.scheduler_info()["workers"].items()
                   if w.get("resources", {}).get("GPU")]
            assert len(gpu) == 1
            with get_task_stream(client) as ts:
                table = run_cohort(cohort, tmp_path, client=client, model=tiny_model,
                                   params=PARAMS)
            assert table.status.tolist() == ["ok", "ok", "failed"]
            ran = {}
            for t in ts.data:
                ran.setdefault(t["key"].split("-")[0], set()).add(t["worker"])
            assert ran["classify_task"] == set(gpu)
            assert ran["segment_tile_task"]  # segmentation ran (anywhere)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_killed_client_resumes_to_the_same_outputs(tmp_path):
    """`slidecensus run` killed (SIGKILL, with its local cluster) after its first slide is
    committed; the rerun finishes the cohort without recomputing that slide, and every
    output equals an uninterrupted run's."""
    import signal

    csv = synth_cohort(tmp_path / "slides", n_slides=4, size=(768, 896), seed=5, mpp=0.5)
    cmd = [sys.executable, "-m", "slidecensus", "run", str(csv), "--no-classify",
           "--cluster", "local:1", "--slides-in-flight", "1", "--tile-size", "512"]
    # the interrupted run
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([*cmd, "--out", str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "slides").glob("*.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done = {p.name: p.stat().st_mtime_ns for p in (out / "slides").glob("*.json")}
    assert 1 <= len(done) < 4
    subprocess.run([*cmd, "--out", str(out)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for name, mtime in done.items():  # committed slides were not recomputed
        assert (out / "slides" / name).stat().st_mtime_ns == mtime
    # the uninterrupted run
    ref = tmp_path / "reference"
    subprocess.run([*cmd, "--out", str(ref)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a = pd.read_csv(out / "slides.csv").drop(columns=["seconds"])
    b = pd.read_csv(ref / "slides.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(a, b)
    assert (a.status == "ok").all()
    for sid in a.slide_id:
        pd.testing.assert_frame_equal(pd.read_parquet(out / "cells" / f"{sid}.parquet"),
                                      pd.read_parquet(ref / "cells" / f"{sid}.parquet"))
        ga = zarr.open_group(out / "census.zarr", mode="r")[sid]
        gb = zarr.open_group(ref / "census.zarr", mode="r")[sid]
        for var in ("counts", "cells", "tissue"):
            np.testing.assert_array_equal(ga[var][:], gb[var][:])
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


def test_killed_worker_costs_nothing(cohort, tmp_path, counted):
    """SIGKILL of one of two worker processes mid-run: Dask recomputes what it held and the
    census equals the undisturbed one (no state lives only in a worker)."""

    from distributed import Client, LocalCluster

    ref_out, ref = counted
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        t, killed = kill_worker_when_segmenting(client, pids[0], delay_s=0.3)
        table = run_cohort(cohort, tmp_path, client=client, params=PARAMS)
        t.join(5)
    assert killed.is_set(), "no worker was killed: the test did not exercise a loss"
    pd.testing.assert_frame_equal(table.drop(columns=["seconds"]),
                                  ref.drop(columns=["seconds"]))
    for sid in ("synth_000_normal", "synth_001_abnormal"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cells" / f"{sid}.parquet"),
                                      pd.read_parquet(ref_out / "cells" / f"{sid}.parquet"))


def test_outputs_on_object_storage(cohort, s3_server, counted):
    """The census written to s3:// (a loopback S3 server): same tables and maps as on disk,
    and a rerun resumes from the records kept there."""
    from distributed import Client, LocalCluster

    ref_out, ref = counted
    url = "s3://census-bucket/run1"
    # workers are started after the S3 environment is set, so they inherit it
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        table = run_cohort(cohort, url, client=client, params=PARAMS)
        again = run_cohort(cohort, url, client=client, params=PARAMS)
    pd.testing.assert_frame_equal(table.drop(columns=["seconds"]),
                                  ref.drop(columns=["seconds"]))
    pd.testing.assert_frame_equal(again.drop(columns=["seconds"]),
                                  table.drop(columns=["seconds"]))
    ok = table.status == "ok"  # complete slides' records are reused (failed ones retried)
    assert again.seconds[ok].tolist() == table.seconds[ok].tolist()
    fs = s3_server
    with fs.open("census-bucket/run1/slides.csv") as fh:
        assert pd.read_csv(fh).status.tolist() == ["ok", "ok", "failed"]
    with fs.open("census-bucket/run1/cells/synth_001_abnormal.parquet") as fh:
        pd.testing.assert_frame_equal(
            pd.read_parquet(fh),
            pd.read_parquet(ref_out / "cells" / "synth_001_abnormal.parquet"))
    g = zarr.open_group(url + "/census.zarr", mode="r")["synth_001_abnormal"]
    ref_g = zarr.open_group(ref_out / "census.zarr", mode="r")["synth_001_abnormal"]
    np.testing.assert_array_equal(g["cells"][:], ref_g["cells"][:])


@pytest.mark.shared
def test_real_aperio_slide_gives_cells_and_a_map(cmu_svs, client, tmp_path):
    table = run_cohort(pd.DataFrame([{"slide_id": "CMU-1-Small-Region", "path": str(cmu_svs),
                                      "label": ""}]), tmp_path, client=client,
                       params=CensusParams(tile_size=1024))
    row = table.iloc[0]
    assert row.status == "ok", row.error
    cells = pd.read_parquet(tmp_path / "cells" / "CMU-1-Small-Region.parquet")
    assert len(cells) == row.n_cells > 1000  # a skin section full of nuclei
    assert cells.x_px.between(0, 2220).all() and cells.y_px.between(0, 2967).all()
    np.testing.assert_allclose(cells.x_um, cells.x_px * 0.499)
    g = zarr.open_group(tmp_path / "census.zarr", mode="r")["CMU-1-Small-Region"]
    # 2220 x 2967 px at 0.499 µm/px = 1108 x 1481 µm on a 256 µm grid: 6 rows x 5 columns
    assert g["cells"].shape == (6, 5) and int(np.asarray(g["cells"][:]).sum()) == len(cells)
    tissue = np.asarray(g["tissue"][:])
    assert 0.2 < tissue.mean() < 0.7  # the section covers part of the glass


def test_census_and_segment_command_find_the_same_nuclei(counted, cohort):
    """`slidecensus segment` and `slidecensus run` estimate the stain model from the same
    sample and cut the same tiles: identical cells on the same slide."""
    from slidecensus.nuclei.segment import segment_file

    out, _ = counted
    path = pd.read_csv(cohort).set_index("slide_id").loc["synth_001_abnormal", "path"]
    alone = segment_file(path, tile_size=PARAMS.tile_size)
    census = pd.read_parquet(out / "cells" / "synth_001_abnormal.parquet")
    assert len(alone) == len(census)
    np.testing.assert_allclose(np.sort(alone.x_px.to_numpy()),
                               np.sort(census.x_px.to_numpy()))
    np.testing.assert_allclose(np.sort(alone.area_um2.to_numpy()),
                               np.sort(census.area_um2.to_numpy()))


def test_training_on_a_worker_reports_progress_to_the_client(cohort, client, tmp_path, caplog):
    """Training runs on a worker; its progress must still reach the user's terminal."""
    import logging

    from slidecensus.engine.train import train_from_cohort
    from slidecensus.models import TrainConfig

    config = TrainConfig(k=2, width=8, z_dim=8, iterations=4, batch_size=16, seed=0)
    with caplog.at_level(logging.INFO, logger="slidecensus"):
        path = train_from_cohort(cohort, tmp_path / "m.pt", config=config, client=client,
                                 tiles_per_slide=1, cells_per_slide=64)
        import time

        deadline = time.time() + 10  # events travel asynchronously from the scheduler
        while "training: it 4/4" not in caplog.text and time.time() < deadline:
            time.sleep(0.1)
    assert path.is_file()
    assert "training: it 4/4" in caplog.text and "L_Q" in caplog.text


def test_cohort_style_crops_are_pooled_recorded_and_adopted(cohort, client, tmp_path):
    """``--stain-target cohort``: training pools its slides' tissue lαβ statistics into the
    crops' Reinhard target and records it; a census with that model and default flags
    normalises its crops to it (manifest). The default trains on the slides' own colours."""
    from dataclasses import replace

    from slidecensus.engine.cohort import read_cohort
    from slidecensus.engine.train import train_from_cohort
    from slidecensus.errors import SlidecensusError
    from slidecensus.models import TrainConfig, load_model
    from slidecensus.nuclei.normalize import StainNorm
    from slidecensus.nuclei.segment import stain_sample
    from slidecensus.nuclei.stain import rgb_to_lab, tissue_pixels
    from slidecensus.tiling import open_slide

    config = TrainConfig(k=2, width=8, z_dim=8, iterations=2, batch_size=16, seed=0)
    plain = train_from_cohort(cohort, tmp_path / "plain.pt", config=config, client=client,
                              tiles_per_slide=1, cells_per_slide=64, params=PARAMS)
    assert load_model(plain).config.crop_lab_target is None
    assert load_model(plain).config.stain_norm == "reinhard"
    path = train_from_cohort(cohort, tmp_path / "m.pt", config=config, client=client,
                             tiles_per_slide=1, cells_per_slide=64,
                             params=replace(PARAMS, stain_norm=StainNorm(cohort=True)))
    cfg = load_model(path).config
    assert cfg.stain_norm == "reinhard (target cohort)"
    means, stds = [], []
    for p in read_cohort(cohort)["path"]:
        try:
            with open_slide(p) as slide:
                px = stain_sample(slide, with_mask=False)[0].reshape(-1, 3)
        except SlidecensusError:  # the cohort's bad slide is left out of the pool too
            continue
        lab = rgb_to_lab(px[tissue_pixels(px)]).astype(np.float64)
        means.append(lab.mean(axis=0))
        stds.append(lab.std(axis=0))
    np.testing.assert_allclose(cfg.crop_lab_target[0], np.mean(means, axis=0), atol=2e-3)
    np.testing.assert_allclose(cfg.crop_lab_target[1], np.mean(stds, axis=0), rtol=2e-2)
    run_cohort(cohort, tmp_path / "run", client=client, model=path, params=PARAMS)
    norm = json.loads((tmp_path / "run" / "manifest.json").read_text())["params"]["stain_norm"]
    assert norm["method"] == "reinhard" and norm["target"]["name"] == "cohort"
    np.testing.assert_allclose(norm["target"]["lab_mean"], cfg.crop_lab_target[0])


def test_census_outlines_reach_qupath(cohort, client, tiny_model, tmp_path):
    """`run --outlines`: every cell keeps its nucleus polygon in level-0 pixels (holding its
    centroid, with the table's area), the census itself is unchanged, and `export` writes
    classified polygons."""
    from matplotlib.path import Path as MplPath

    from slidecensus.reports.export import export_geojson

    with_outlines = CensusParams(tile_size=512, region_um=128.0, outlines=True)
    run_cohort(cohort, tmp_path / "a", client=client, model=tiny_model, params=with_outlines)
    run_cohort(cohort, tmp_path / "b", client=client, model=tiny_model, params=PARAMS)
    name = "synth_001_abnormal.parquet"
    a = pd.read_parquet(tmp_path / "a" / "cells" / name)
    b = pd.read_parquet(tmp_path / "b" / "cells" / name)
    pd.testing.assert_frame_equal(a.drop(columns="outline_px"), b)
    held, area_ratio = 0, []
    for (x, y, area_um2), flat in zip(a[["x_px", "y_px", "area_um2"]].to_numpy(),
                                      a["outline_px"], strict=True):
        ring = np.asarray(flat, np.float64).reshape(-1, 2)
        held += len(ring) >= 3 and MplPath(ring).contains_point((x + 0.5, y + 0.5))
        px, py = ring[:, 0], ring[:, 1]
        area_px = 0.5 * abs(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1)))
        area_ratio.append(area_px * 0.5**2 / area_um2)  # the synthetic slides are 0.5 µm/px
    assert held >= 0.99 * len(a) and len(a) > 100
    assert 0.95 <= np.median(area_ratio) <= 1.05
    export_geojson(str(tmp_path / "a"))
    feats = json.loads((tmp_path / "a" / "qupath" / "synth_001_abnormal.geojson").read_text()
                       )["features"]
    assert len(feats) == len(a)
    assert sum(f["geometry"]["type"] == "Polygon" for f in feats) >= 0.99 * len(a)
    assert all("classification" in f["properties"] for f in feats)


def test_model_trained_into_and_read_from_object_storage(cohort, s3_server, tmp_path,
                                                         monkeypatch):
    """Kubernetes has no shared disk: the model is trained on a worker and uploaded to s3://,
    the census reads it from there, and the clusters equal those of a run with a local copy
    of the same checkpoint."""
    from distributed import Client, LocalCluster

    from slidecensus.engine.results import RunResults
    from slidecensus.engine.train import train_from_cohort
    from slidecensus.models import TrainConfig

    monkeypatch.setenv("SLIDECENSUS_CACHE", str(tmp_path / "cache"))  # workers inherit it
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a path would appear here as ./s3:
    model_url = "s3://census-bucket/models/m.pt"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        got = train_from_cohort(cohort, model_url, client=client, params=PARAMS,
                                config=TrainConfig(k=3, width=16, iterations=4, batch_size=32,
                                                   seed=0))
        assert got == model_url
        assert s3_server.exists("census-bucket/models/m.pt")
        s3_server.get_file("census-bucket/models/m.pt", str(tmp_path / "copy.pt"))
        remote = run_cohort(cohort, "s3://census-bucket/run2", client=client,
                            model=model_url, params=PARAMS)
        local = run_cohort(cohort, tmp_path / "local", client=client,
                           model=tmp_path / "copy.pt", params=PARAMS)
    assert not (tmp_path / "s3:").exists()
    # the worker's training file is gone once uploaded: a later retraining starts afresh
    assert not list((tmp_path / "cache" / "models").glob("train-*.pt"))
    ok = remote.status == "ok"
    assert ok.sum() == 2
    pd.testing.assert_frame_equal(remote.loc[ok, ["slide_id", "n_cells", "p_0", "p_1", "p_2"]],
                                  local.loc[ok, ["slide_id", "n_cells", "p_0", "p_1", "p_2"]])
    with s3_server.open("census-bucket/run2/cells/synth_001_abnormal.parquet") as fh:
        cells = pd.read_parquet(fh)
    ref = pd.read_parquet(tmp_path / "local" / "cells" / "synth_001_abnormal.parquet")
    np.testing.assert_array_equal(cells.cluster, ref.cluster)
    assert cells.cluster.between(0, 2).all()
    res = RunResults("s3://census-bucket/run2")
    assert res.manifest["model"] == model_url and res.model_path() == model_url


def test_local_model_follows_a_retrained_object(s3_server, tmp_path, monkeypatch):
    """A checkpoint at a URL is fetched by version (ETag): a retrained object at the same URL
    (same size) is fetched again, while a run's pinned version keeps its own copy and is
    never silently swapped for the new object."""
    import shutil

    from slidecensus.engine.modelfiles import local_model, model_exists, pin_model, publish_model
    from slidecensus.errors import InvalidInputError

    monkeypatch.setenv("SLIDECENSUS_CACHE", str(tmp_path / "cache"))
    url = "s3://census-bucket/m/model.pt"
    assert not model_exists(url)
    with pytest.raises(InvalidInputError, match="does not exist"):
        local_model(url)
    (tmp_path / "a.pt").write_bytes(b"first!")
    publish_model(tmp_path / "a.pt", url)
    pinned = pin_model(url)
    first = local_model(pinned)
    assert Path(first).read_bytes() == b"first!" and local_model(url) == first
    (tmp_path / "b.pt").write_bytes(b"second")  # the same size: only the version differs
    publish_model(tmp_path / "b.pt", url)
    second = local_model(url)
    assert second != first and Path(second).read_bytes() == b"second"
    assert local_model(pinned) == first  # the run's version, from the cache
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(InvalidInputError, match="changed during the run"):
        local_model(pinned)  # that version is gone from the store: refused, not swapped
    assert local_model(tmp_path / "a.pt") == str(tmp_path / "a.pt")  # local paths pass through
