"""Benchmark: synthetic slide generation rate and peak memory.

Writes one synthetic slide (default 20000 x 20000 px at 0.5 µm/px) through the streaming
pyramid writer in this process, with no Dask client (one core), and reports megapixels
per second of level 0, the truth-table time and the peak resident memory. Results go to
``benchmarks/results/synth.json``; copy them into ``docs/benchmarks.md``.

Run: ``python -m benchmarks.bench_synth [--size 20000] [--out /tmp/bench-synth]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.harness import peak_rss_mb, write_results
from slidecensus.tiling.synth import SynthSource, cohort_specs, render_region, truth_table
from slidecensus.tiling.writer import write_pyramid_tiff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=20000, help="edge of the square slide, px")
    p.add_argument("--out", type=Path, default=None, help="scratch folder (removed)")
    args = p.parse_args()
    spec = cohort_specs(2, (args.size, args.size), seed=0)[1]  # abnormal: dense, hotspot
    tmp = Path(args.out or tempfile.mkdtemp(prefix="bench-synth-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        for i in range(8):  # one tile-sized render, warm, for the per-tile figure
            c = spec.width // 2 - 2048
            render_region(spec, c + 512 * i, spec.height // 2, 512, 512)
        tile_s = (time.perf_counter() - t0) / 8

        t0, c0 = time.perf_counter(), time.process_time()
        path = write_pyramid_tiff(tmp / "bench.tiff", SynthSource(spec), shape=spec.shape,
                                  mpp=spec.mpp)
        write_s = time.perf_counter() - t0
        write_cpu_s = time.process_time() - c0
        size_mb = path.stat().st_size / 1e6

        t0 = time.perf_counter()
        truth = truth_table(spec)
        truth_s = time.perf_counter() - t0
        mp = spec.height * spec.width / 1e6
        write_results("synth", {
            "size_px": [spec.height, spec.width],
            "mpp": spec.mpp,
            "megapixels": mp,
            "cells": len(truth),
            "render_512_tile_s": tile_s,
            "render_mp_per_s": 0.262144 / tile_s,
            "write_s": write_s,
            "write_mp_per_s_wall": mp / write_s,
            "write_cpu_s": write_cpu_s,
            "write_mp_per_s_per_core": mp / write_cpu_s,  # CPU time: robust to busy hosts
            "truth_table_s": truth_s,
            "truth_cells_per_s": len(truth) / truth_s,
            "file_mb": size_mb,
            "peak_rss_mb": peak_rss_mb(),
            "cores_used": 1,
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
