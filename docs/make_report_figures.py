"""Draw the pictures of docs/reports.md: a synthetic cohort's blast maps and a real marrow run.

1. Synthetic: 4 slides (normal/abnormal, each abnormal one with a planted blast hotspot),
   every cell classified by its true type (so the map layer is shown alone), reduced and
   written by the census' own functions, then ``make_heatmaps``.
2. Real: the 8 bone-marrow images of ../shared/data, a small model trained on CPU, the
   census, the gallery and a heatmap.

Usage: ``python docs/make_report_figures.py [--work DIR]`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def truth_classified(truth: pd.DataFrame, mpp: float) -> pd.DataFrame:
    """A cell table whose cluster is the true type: 0 normoblast, 1 other, 2 myeloblast."""
    from slidecensus.nuclei.segment import CELL_COLUMNS

    n = len(truth)
    cells = pd.DataFrame({c: np.zeros(n, dtype=t) for c, t in CELL_COLUMNS.items()})
    cells["x_px"], cells["y_px"] = truth["x_px"].to_numpy(), truth["y_px"].to_numpy()
    cells["x_um"], cells["y_um"] = cells["x_px"] * mpp, cells["y_px"] * mpp
    cells["area_um2"] = truth["area_um2"].to_numpy()
    kind = truth["type"].astype(str).to_numpy()
    cluster = np.where(kind == "myeloblast", 2, np.where(kind == "normoblast", 0, 1))
    cells["cluster"] = cluster.astype(np.int64)
    for j in range(3):
        cells[f"p_{j}"] = (cluster == j).astype(np.float32)
    return cells


def synthetic(work: Path) -> None:
    from slidecensus.engine.census import write_census_group
    from slidecensus.engine.outputs import OutputDir
    from slidecensus.engine.plan import CensusParams, plan_slide
    from slidecensus.engine.tasks import finish_slide
    from slidecensus.reports.heatmap import HeatmapParams, make_heatmaps
    from slidecensus.tiling.synth import synth_cohort

    csv = synth_cohort(work / "slides", n_slides=4, size=(3072, 4096), seed=2, mpp=0.5)
    out = OutputDir(work / "run")
    out.makedirs()
    params = CensusParams(region_um=64)
    rows = []
    for _, r in pd.read_csv(csv).iterrows():
        truth = pd.read_parquet(work / "slides" / f"{r.slide_id}.cells.parquet")
        plan = plan_slide(r.path, None, params)
        cells = truth_classified(truth, plan.mpp)
        res = finish_slide(r.slide_id, out, plan, 3, [(cells, np.zeros((0, 32, 32, 3), np.uint8),
                                                      np.zeros(0, np.int64))], params)
        write_census_group(out, r.slide_id, res, plan, 3, params.region_um)
        p = np.bincount(cells["cluster"], minlength=3) / len(cells)
        rows.append({"slide_id": r.slide_id, "path": r.path, "label": r.label,
                     "status": "ok", "error": "", "n_cells": len(cells),
                     **{f"p_{j}": p[j] for j in range(3)}})
    out.write_csv("slides.csv", pd.DataFrame(rows))
    (work / "run" / "clusters.toml").write_text('[clusters]\n0 = "normoblast"\n'
                                                '2 = "myeloblast"\n')
    make_heatmaps(work / "run", "myeloblast", name="blast", params=HeatmapParams(min_cells=10))
    folder = work / "run" / "heatmaps" / "blast"
    shutil.copy(folder / "synth_001_abnormal.png", HERE / "img" / "report-heatmap-synthetic.png")
    shutil.copy(folder / "overview.png", HERE / "img" / "report-overview-synthetic.png")


def marrow(work: Path) -> None:
    from slidecensus.cluster import get_client
    from slidecensus.engine.census import run_cohort
    from slidecensus.engine.plan import CensusParams
    from slidecensus.engine.train import train_from_cohort
    from slidecensus.models import TrainConfig
    from slidecensus.reports.gallery import make_gallery
    from slidecensus.reports.heatmap import HeatmapParams, make_heatmaps

    images = SHARED / "bone-marrow-he" / "images"
    model = work / "marrow.pt"
    with get_client("local", dashboard=False) as client:
        if not model.exists():
            train_from_cohort(str(images), model, client=client, seed=0,
                              config=TrainConfig(k=5, width=16, iterations=150, seed=0,
                                                                checkpoint_every=50))
        run_cohort(str(images), work / "marrow-run", model=model, client=client,
                   params=CensusParams(region_um=50))
    make_gallery(work / "marrow-run", per_cluster=24)
    shutil.copy(work / "marrow-run" / "gallery.png", HERE / "img" / "report-gallery-marrow.png")
    # cluster 4 of this seeded model holds the large nuclei with open chromatin
    make_heatmaps(work / "marrow-run", "4", name="large-nuclei",
                  params=HeatmapParams(min_cells=8))
    shutil.copy(work / "marrow-run" / "heatmaps" / "large-nuclei" / "BM_GRAZ_HE_0006_01.png",
                HERE / "img" / "report-heatmap-marrow.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("report-figures"))
    ap.add_argument("--only", choices=("synthetic", "marrow"), default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "synthetic"):
        synthetic(args.work / "synthetic")
    if args.only in (None, "marrow"):
        marrow(args.work)


if __name__ == "__main__":
    main()
