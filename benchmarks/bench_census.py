"""Census throughput and scaling: the same synthetic cohort on 1 and on 2 worker processes.

Counts and maps cells without a model (segmentation is the cost being scaled), records wall
time, cells/s, tasks per slide, the mean segmentation-task duration (tasks should carry at
least 100 ms of work) and the peak RSS of each worker process.

Run: ``python -m benchmarks.bench_census [--size 4096] [--slides 2]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.harness import write_results


def _worker_peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_once(cohort: Path, out: Path, workers: int) -> dict:
    from distributed import Client, LocalCluster, get_task_stream

    from slidecensus.engine.census import run_cohort
    from slidecensus.engine.plan import CensusParams

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts
        t0 = time.perf_counter()
        with get_task_stream(client) as ts:
            table = run_cohort(cohort, out, client=client, params=CensusParams(),
                               slides_in_flight=2)
        wall = time.perf_counter() - t0
        peaks = list(client.run(_worker_peak_mb).values())
    seg = [t for t in ts.data if t["key"].startswith("segment_tile_task")]
    durations = [sum(s["stop"] - s["start"] for s in t["startstops"]
                     if s["action"] == "compute") for t in seg]
    n_cells = int(table.n_cells.sum())
    return {"workers": workers, "wall_s": wall, "cells": n_cells, "cells_per_s": n_cells / wall,
            "tasks": len(ts.data), "tasks_per_slide": len(ts.data) / len(table),
            "segment_tasks": len(seg),
            "segment_task_mean_s": sum(durations) / max(len(durations), 1),
            "segment_compute_s": sum(durations),
            "worker_peak_rss_mb": peaks}


def memory(sizes: list[int]) -> dict:
    """Worker peak RSS of a 2-worker census on one slide of each size (a mosaic of the real
    marrow images, pyramidal JPEG TIFF at 0.5 µm/px): flat means it does not grow."""
    from benchmarks.bench_read import DATA, MosaicSource
    from slidecensus.tiling import write_pyramid_tiff

    src = MosaicSource(sorted((DATA / "bone-marrow-he" / "images").glob("*.png")))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"mosaic_{n}.tiff"
            write_pyramid_tiff(path, src, (n, n), mpp=0.5)
            res = run_once(Path(tmp), Path(tmp) / f"out_{n}", 2)  # the folder holds one slide
            out[f"{n}x{n}"] = res
            path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--memory", default="", help="comma-separated slide sizes, e.g. 10000,20000")
    args = ap.parse_args()
    if args.memory:
        write_results("census_memory", memory([int(v) for v in args.memory.split(",")]))
        return
    from slidecensus.tiling.synth import synth_cohort

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = synth_cohort(tmp / "slides", n_slides=args.slides,
                              size=(args.size, args.size), seed=1)
        one = run_once(cohort, tmp / "w1", 1)
        two = run_once(cohort, tmp / "w2", 2)
    write_results("census", {"slide_px": args.size, "slides": args.slides, "one_worker": one,
                             "two_workers": two,
                             "speedup_2_vs_1": one["wall_s"] / two["wall_s"]})


if __name__ == "__main__":
    main()
