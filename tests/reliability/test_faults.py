"""Faults: concurrent runs on one folder, a crash while a slide is written, a worker killed
mid-run, a tile with many times the usual nuclei on a memory-limited worker."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from slidecensus.cli import main
from slidecensus.engine.census import run_cohort
from slidecensus.engine.outputs import LOCK_NAME, OutputDir, RunLock
from slidecensus.engine.plan import CensusParams
from slidecensus.errors import InvalidInputError, OutputLockedError
from slidecensus.tiling import write_pyramid_tiff

from ..workers import kill_worker_when_segmenting
from .conftest import tiny_model_file
from .corpus import PARAMS, Corpus, dense_nuclei


def _cohort(corpus: Corpus, ids: list[str], where: Path) -> Path:
    table = pd.DataFrame({"slide_id": ids, "path": [str(corpus.paths[i]) for i in ids],
                          "label": ""})
    csv = where / "cohort.csv"
    table.to_csv(csv, index=False)
    return csv


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def _run_cmd(csv: Path, out: Path, *extra: str, cluster: str = "local:1") -> list[str]:
    return [sys.executable, "-m", "slidecensus", "run", str(csv), "--out", str(out),
            "--no-classify", "--cluster", cluster, "--tile-size", str(PARAMS.tile_size),
            *extra]


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize("kw, what", [
    ({"tile_size": 0}, "tile_size must be an integer from 256 to 4096"),
    ({"tile_size": 128}, "tile_size must be an integer from 256 to 4096"),
    ({"tile_size": 4097}, "got 4097"),
    ({"tile_size": 100_000}, "got 100000"),
    ({"tile_size": 1024.0}, "got 1024.0"),
    ({"region_um": 0.0}, "region_um must be a positive"),
    ({"region_um": float("nan")}, "region_um"),
    ({"min_tissue": 1.5}, "min_tissue must be in"),
    ({"gallery_crops": -1}, "gallery_crops"),
    ({"crop_size": 4}, "crop_size"),
])
def test_census_params_are_validated(kw, what):
    with pytest.raises(InvalidInputError, match=what):
        CensusParams(**kw)


def test_census_params_bounds_are_inclusive():
    assert CensusParams(tile_size=256).tile_size == 256
    assert CensusParams(tile_size=4096).tile_peak_bytes() < 3 << 30  # about 2.5 GB


@pytest.mark.parametrize("kw, what", [({"batch_tiles": 0}, "batch_tiles"),
                                      ({"batch_tiles": 65}, "batch_tiles"),
                                      ({"slides_in_flight": 0}, "slides_in_flight"),
                                      ({"max_bad_tiles": -1}, "max_bad_tiles")])
def test_run_options_are_validated_before_any_work(corpus, tmp_path, kw, what):
    with pytest.raises(InvalidInputError, match=what):
        run_cohort(corpus.csv, tmp_path / "out", cluster="local:1", **kw)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the output lock


def test_a_run_on_a_folder_in_use_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    csv = _cohort(corpus, ["good"], tmp_path)
    with RunLock(OutputDir(out)):
        held = json.loads((out / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(OutputLockedError,
                           match=rf"in use by another slidecensus run \(pid {os.getpid()} on "
                                 rf"{socket.gethostname()}, started .*delete .*{LOCK_NAME}"):
            run_cohort(csv, out, cluster="local:1")
        assert main(["run", str(csv), "--out", str(out), "--no-classify"]) == 2
        assert "in use by another slidecensus run" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else written
    assert not (out / LOCK_NAME).exists()  # released on exit


def test_lock_of_another_host_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example",
                                             "started": time.time(), "started_at": "earlier",
                                             "token": "x"}))
    with pytest.raises(OutputLockedError, match="on elsewhere.example"):
        run_cohort(_cohort(corpus, ["missing"], tmp_path), out, cluster="local:1")


@pytest.mark.parametrize("holder", ["dead pid", "reused pid"])
def test_stale_lock_is_taken_over_and_released(corpus, client, tmp_path, caplog, holder):
    """A lock left by a process that is gone (or whose pid now belongs to a process started
    after the lock was taken) does not block the next run."""
    out = tmp_path / "out"
    out.mkdir()
    if holder == "dead pid":
        pid, started = _dead_pid(), time.time() - 5
    else:  # this very process, but "locked" long before it started
        import psutil

        pid, started = os.getpid(), psutil.Process().create_time() - 3600
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                             "started": started, "started_at": "before",
                                             "token": "stale"}))
    with caplog.at_level(logging.WARNING, logger="slidecensus"):
        table = run_cohort(_cohort(corpus, ["missing"], tmp_path), out, client=client)
    assert table.status.tolist() == ["failed"]
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_commands_started_together_on_one_folder(corpus, tmp_path):
    """Two `slidecensus run` processes started at once on the same DIR: exactly one runs
    (exit 1: its one slide is missing), the other is refused (exit 2) with the lock
    message, and the winner's table is whole."""
    csv = _cohort(corpus, ["missing"], tmp_path)
    out = tmp_path / "out"
    procs = [subprocess.Popen(_run_cmd(csv, out), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(240), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [1, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another slidecensus run" in refused
    assert pd.read_csv(out / "slides.csv").status.tolist() == ["failed"]
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------ crash mid-write


def _complete(out: Path, sid: str, n_cells: int) -> bool:
    """A slide's outputs are whole: its cell table and its census group agree with its
    record's cell count."""
    cells = pd.read_parquet(out / "cells" / f"{sid}.parquet")
    group = zarr.open_group(out / "census.zarr", mode="r")[sid]
    return len(cells) == n_cells == int(np.asarray(group["cells"][:]).sum())


@pytest.mark.slow
def test_crash_while_a_slide_is_written_never_marks_it_complete(corpus, client, tmp_path):
    """SIGKILL of `slidecensus run` (the process that writes the maps and commit records,
    here connected to a running scheduler) while a slide's census group is being written,
    before its commit record: no slide is marked complete without whole outputs, the killed
    run's lock is stale and taken over, and the rerun completes the half-written slide
    without recomputing the slides committed before the crash."""
    ids = ["unicode_path", "good"]  # the same pixels: the first is checked against the other
    csv = _cohort(corpus, ids, tmp_path)
    address = client.scheduler.address
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen(_run_cmd(csv, out, "--slides-in-flight", "1",
                                         cluster=address),
                                start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        caught, deadline = None, time.monotonic() + 240
        while caught is None and proc.poll() is None and time.monotonic() < deadline:
            for sid in ids:
                if (out / "census.zarr" / sid).is_dir() and not (
                        out / "slides" / f"{sid}.json").exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    caught = sid
                    break
            time.sleep(0.001)
        proc.wait(30)
        if caught is not None and not (out / "slides" / f"{caught}.json").exists():
            break
    else:
        pytest.fail("never caught a slide between its census group and its commit record")
    assert (out / LOCK_NAME).exists()  # the killed run could not release it
    committed = {}
    for sid in ids:
        rec_path = out / "slides" / f"{sid}.json"
        if rec_path.exists():
            rec = json.loads(rec_path.read_text())
            assert rec["status"] == "ok" and _complete(out, sid, rec["n_cells"])
            committed[sid] = rec_path.stat().st_mtime_ns
    assert caught not in committed
    rerun = subprocess.run(_run_cmd(csv, out, cluster=address), timeout=300,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for sid, mtime in committed.items():  # not recomputed
        assert (out / "slides" / f"{sid}.json").stat().st_mtime_ns == mtime
    table = pd.read_csv(out / "slides.csv")
    assert table.status.tolist() == ["ok"] * len(ids)
    for sid, n in zip(table.slide_id, table.n_cells, strict=True):
        assert _complete(out, sid, int(n))
    # the half-written slide ends equal to its twin (the same pixels under another name)
    twin = "good" if caught == "unicode_path" else None
    if twin:
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / "cells" / f"{caught}.parquet").drop(columns="slide_id"),
            pd.read_parquet(out / "cells" / f"{twin}.parquet").drop(columns="slide_id"))
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------ worker loss


@pytest.mark.slow
def test_killed_worker_gives_the_same_proportions(corpus, tiny_model, tmp_path,
                                                  scheduler_and_two_workers):
    """Against a real `dask scheduler` with two `dask worker` processes on 127.0.0.1: the
    classified census with one worker SIGKILLed mid-run equals the undisturbed census, per
    slide proportion by proportion and cell by cell."""
    from distributed import Client

    csv = _cohort(corpus, ["good", "wide"], tmp_path)
    with Client(scheduler_and_two_workers, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        ref = run_cohort(csv, tmp_path / "undisturbed", client=client, model=tiny_model,
                         params=PARAMS)
        pids = list(client.run(os.getpid).values())
        t, killed = kill_worker_when_segmenting(client, pids[0])
        table = run_cohort(csv, tmp_path / "disturbed", client=client, model=tiny_model,
                           params=PARAMS)
        t.join(10)
        client.wait_for_workers(2, timeout=60)
        after = set(client.run(os.getpid).values())
    assert killed.is_set() and pids[0] not in after, "no worker was lost"
    assert table.status.tolist() == ["ok", "ok"]
    props = [f"p_{j}" for j in range(3)]
    assert not ref[props].isna().any().any()
    np.testing.assert_array_equal(table[props].to_numpy(), ref[props].to_numpy())
    np.testing.assert_array_equal(table.n_cells, ref.n_cells)
    for sid in ("good", "wide"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "disturbed" / "cells" / f"{sid}.parquet"),
            pd.read_parquet(tmp_path / "undisturbed" / "cells" / f"{sid}.parquet"))


# ------------------------------------------------------------------ memory


def _vm_hwm_bytes() -> int:
    """This process' peak resident memory since it was exec'd (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no VmHWM in /proc/self/status")


@pytest.mark.slow
def test_tile_packed_with_nuclei_does_not_kill_a_memory_limited_worker(corpus, tmp_path,
                                                                       caplog):
    """One 768-px tile holding several times the good slide's nuclei per mm², classified
    by a width-32 model on a single worker limited to 1 GiB: the slide completes and the
    worker is never restarted. (Unbounded, a 4096-crop forward pass alone takes about
    1.1 GB at width 32, and the nanny kills the worker.)"""
    from distributed import Client, LocalCluster

    from slidecensus.nuclei.segment import segment_file

    side = 768
    dense = tmp_path / "dense.tiff"
    write_pyramid_tiff(dense, dense_nuclei((side, side)), mpp=0.5, tile_size=256)
    model = tiny_model_file(tmp_path / "w32.pt", width=32)
    params = CensusParams(tile_size=side)
    one = pd.DataFrame([{"slide_id": "dense", "path": str(dense), "label": ""}])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="1GiB") as cluster, \
            Client(cluster) as client:
        before = client.run(os.getpid)
        with caplog.at_level(logging.WARNING, logger="slidecensus"):
            table = run_cohort(one, tmp_path / "out", client=client, model=model,
                               params=params)
            # the same cluster is too small for 4096-px tiles: the run says so up front
            run_cohort(one.assign(path=str(tmp_path / "absent.tiff")), tmp_path / "out2",
                       client=client, params=CensusParams(tile_size=4096))
        after = client.run(os.getpid)
        # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a worker spawned by a large
        # pytest process would report the parent's peak as its own
        peak = client.run(_vm_hwm_bytes)
    row = table.iloc[0]
    assert row.status == "ok", row.error
    assert before == after, "the worker was restarted"
    assert max(peak.values()) < 1 << 30
    good = len(segment_file(corpus.good, tile_size=512))
    assert row.tiles_planned == 1
    per_mm2 = row.n_cells / (side * 0.5 / 1000) ** 2
    good_per_mm2 = good / (1024 * 0.25 / 1000) ** 2
    assert per_mm2 > 5 * good_per_mm2, (row.n_cells, good)
    print(f"\ndense tile: {row.n_cells} cells ({per_mm2 / good_per_mm2:.1f}x the good "
          f"slide's density), worker peak {max(peak.values()) / 2**20:.0f} MiB of 1024")
    warned = [r.getMessage() for r in caplog.records if "tile_size 4096" in r.getMessage()]
    assert warned and "GB per worker" in warned[0] and "1.1 GB" in warned[0], warned
