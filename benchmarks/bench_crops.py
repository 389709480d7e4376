"""Crop extraction speed, against segmentation and (optionally) an earlier revision.

Run (one core, as reported in docs/benchmarks.md):

    OMP_NUM_THREADS=1 python -m benchmarks.bench_crops [--compare-rev REV]

Times ``extract_crops`` (masked, the census's mode) on the 8 bone-marrow PNGs and on a
2144 x 2144 tile of CMU-1-Small-Region.svs (a census tile of 2048 px plus its halo), next to
the segmentation of the same pixels. With ``--compare-rev``, the ``crops.py`` of that git
revision runs in the same process on the same inputs, and its crops are compared with
today's byte for byte.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from benchmarks.harness import best_of, write_results  # noqa: E402
from slidecensus.nuclei.crops import extract_crops  # noqa: E402
from slidecensus.nuclei.segment import (  # noqa: E402
    segment_image,
    segment_tile_with_labels,
    stain_sample,
)
from slidecensus.nuclei.stain import estimate_stain_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SLIDECENSUS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _old_extract(rev: str):
    """``extract_crops`` as it was at git revision ``rev``."""
    src = subprocess.run(["git", "show", f"{rev}:slidecensus/engine/crops.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("from ..errors import", "from slidecensus.errors import")
    src = src.replace("from .stain import", "from slidecensus.nuclei.stain import")
    path = Path(tempfile.mkdtemp()) / "crops_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("crops_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["crops_old"] = mod
    spec.loader.exec_module(mod)
    return mod.extract_crops


def _inputs():
    import imageio.v3 as iio

    from slidecensus.tiling import open_slide

    for p in sorted((DATA / "bone-marrow-he" / "images").glob("*.png")):
        rgb = iio.imread(p)[..., :3]
        yield p.stem, rgb, (lambda rgb=rgb: segment_image(rgb))
    with open_slide(DATA / "slides" / "CMU-1-Small-Region.svs") as s:
        rgb = s.read_region(0, 0, 400, 2144, 2144)
        model = estimate_stain_model(stain_sample(s, with_mask=False)[0])
        yield "CMU-1 tile 2144", rgb, (lambda: segment_tile_with_labels(rgb, model, mpp=s.mpp))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare-rev", default=None, help="git revision to time side by side")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    old = _old_extract(args.compare_rev) if args.compare_rev else None
    rows = []
    for name, rgb, segment in _inputs():
        t_seg, (labels, table) = best_of(segment, args.repeat)
        t_new, crops = best_of(lambda a=(rgb, labels, table): extract_crops(*a), args.repeat)
        row = {"input": name, "cells": len(table), "segment_ms": 1000 * t_seg,
               "crops_ms": 1000 * t_new, "crops_per_s": len(table) / t_new}
        if old is not None:
            t_old, ref = best_of(lambda a=(rgb, labels, table): old(*a), args.repeat)
            row.update(old_crops_ms=1000 * t_old, speedup=t_old / t_new,
                       identical=bool(np.array_equal(ref, crops)))
        rows.append(row)
        print(row, flush=True)
    write_results("crops", {"compare_rev": args.compare_rev, "rows": rows})


if __name__ == "__main__":
    main()
