"""The README demo: a synthetic normal/abnormal marrow cohort, a model, the census, checked.

Runs on a fresh machine with no slides: everything it reads it generates first. The model
is trained with the default preset (``auto``: ``fast`` on a CPU), then every slide's blast
fraction is printed next to the synthetic truth. The synthetic slides know each cell's
type, so the demo names the clusters by matching the census' nuclei to the drawn cells
(:func:`match_truth`, :func:`name_clusters`) and writes those names to ``clusters.toml``,
the gallery and a blast heatmap.

Each synthetic slide is stained a little differently, as slides from one lab are, so the
demo trains as a multi-slide cohort should: ``--stain-target cohort``, the crops mapped to
the cohort's pooled style (recorded in the model and adopted by the census). Without it
one abnormal slide's blasts took a cluster of their own and read 0.000 against a truth of
0.226 (docs/benchmarks.md, "Synthetic truth: the demo").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Clusters of the demo model: more than the 7 drawn nucleated types, so that a type with
#: two looks (or a rare one) can take a cluster of its own; names then merge clusters.
DEMO_K = 8

#: µm per pixel of the demo's synthetic slides.
DEMO_MPP = 0.5

#: A census nucleus is matched to the drawn cell whose nucleus centroid is nearest, if
#: within this distance (µm); a nucleus further from every drawn one stays unmatched.
MATCH_UM = 3.0


def match_truth(cells_xy: np.ndarray, truth_xy: np.ndarray, truth_types: np.ndarray,
                max_dist_px: float) -> np.ndarray:
    """Each cell's truth type: that of the nearest truth centroid within ``max_dist_px``,
    else ``""``. Arrays of (x, y) in the same pixels; one truth cell may match several
    census cells (a split nucleus), which is what a census of that slide would count."""
    from scipy.spatial import cKDTree

    cells_xy = np.asarray(cells_xy, np.float64).reshape(-1, 2)
    out = np.full(len(cells_xy), "", dtype=object)
    if len(cells_xy) == 0 or len(truth_xy) == 0:
        return out
    dist, idx = cKDTree(np.asarray(truth_xy, np.float64)).query(cells_xy)
    ok = dist <= max_dist_px
    out[ok] = np.asarray(truth_types, dtype=object)[idx[ok]]
    return out


def name_clusters(clusters: np.ndarray, types: np.ndarray, k: int) -> dict[int, str]:
    """Each cluster's majority truth type among its matched cells (``""`` are ignored);
    clusters with no matched cell are left out. Several clusters may share a type."""
    clusters, types = np.asarray(clusters), np.asarray(types, dtype=object)
    names = {}
    for j in range(k):
        t = types[(clusters == j) & (types != "")]
        if len(t):
            vals, counts = np.unique(t.astype(str), return_counts=True)
            names[j] = str(vals[np.argmax(counts)])
    return names


def run_demo(out: str | Path, cluster: str = "local", seed: int = 0, n_slides: int = 4,
             size: int = 2048, preset: str = "auto", k: int = DEMO_K,
             **settings: object) -> int:
    """Synthesise ``n_slides`` slides, train a model with ``preset`` (any training
    setting overridden by keyword, e.g. ``iterations=2`` in tests), run the census, name
    the clusters from the truth and report blast fractions, gallery and heatmap."""
    from .cluster import get_client
    from .engine.census import run_cohort
    from .engine.plan import CensusParams
    from .engine.train import train_from_cohort
    from .nuclei.normalize import parse_stain_norm
    from .tiling.synth import synth_cohort

    out = Path(out)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    with get_client(cluster) as client:
        cohort = synth_cohort(out / "slides", n_slides=n_slides, size=(size, size), seed=seed,
                              mpp=DEMO_MPP, client=client)
        say(f"synthetic cohort: {cohort}")
        model = out / "model.pt"
        if not model.exists():
            params = CensusParams(stain_norm=parse_stain_norm("reinhard", cohort=True))
            train_from_cohort(cohort, model, client=client, seed=seed, preset=preset,
                              settings={"k": k, **settings}, tiles_per_slide=4,
                              cells_per_slide=1500, params=params)
        say(f"model: {model}")
        table = run_cohort(cohort, out / "census", model=model, client=client)
    say(f"census: {out / 'census'}")
    return _report(out, table, k, say)


def _report(out: Path, table: pd.DataFrame, k: int, say) -> int:
    """Name clusters from the truth, print blast fractions and purity, draw the reports."""
    from .models.metrics import purity

    census = out / "census"
    per_slide, all_cl, all_ty = [], [], []
    for sid in table["slide_id"]:
        truth = pd.read_parquet(out / "slides" / f"{sid}.cells.parquet")
        cells = pd.read_parquet(census / "cells" / f"{sid}.parquet")
        types = match_truth(cells[["x_px", "y_px"]].to_numpy(),
                            truth[["x_px", "y_px"]].to_numpy(), truth["type"].astype(str)
                            .to_numpy(), MATCH_UM / DEMO_MPP)
        per_slide.append((sid, truth, cells, types))
        all_cl.append(cells["cluster"].to_numpy())
        all_ty.append(types)
    clusters, types = np.concatenate(all_cl), np.concatenate(all_ty)
    names = name_clusters(clusters, types, k)
    matched = types != ""
    blast = [j for j, n in names.items() if n == "myeloblast"]
    rows = []
    for sid, truth, cells, _ in per_slide:
        n = len(cells)
        est = float(np.isin(cells["cluster"], blast).mean()) if n else float("nan")
        true = float((truth["type"] == "myeloblast").mean()) if len(truth) else float("nan")
        rows.append({"slide_id": sid, "cells": n, "truth_cells": len(truth),
                     "blasts": est, "truth_blasts": true, "error": est - true})
    report = pd.DataFrame(rows)
    pur = purity(types[matched], clusters[matched]) if matched.any() else float("nan")
    (census / "clusters.toml").write_text(
        "# cluster names from the synthetic truth (slidecensus demo)\n[clusters]\n"
        + "".join(f'{j} = "{n}"\n' for j, n in sorted(names.items())))
    print(report.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nclusters named from the truth: "
          + ", ".join(f"{j}={n}" for j, n in sorted(names.items())))
    print(f"purity of the clusters against the drawn cell types: {pur:.3f} "
          f"({int(matched.sum())} of {len(types)} nuclei matched to a drawn cell)")
    print(f"largest blast-fraction error: {np.nanmax(np.abs(report['error'])):.3f}")
    report.to_csv(census / "demo_truth.csv", index=False)
    outputs = []
    try:
        from .reports.gallery import make_gallery

        outputs.append(("gallery", make_gallery(str(census))))
    except Exception as exc:  # a report that fails must not hide the census' result
        log.warning("gallery not drawn: %s", exc)
    if blast:
        try:
            from .reports.heatmap import make_heatmaps

            make_heatmaps(str(census), blast, name="blast")
            outputs.append(("blast heatmaps", str(census / "heatmaps" / "blast" /
                                                  "overview.png")))
        except Exception as exc:
            log.warning("blast heatmap not drawn: %s", exc)
    for what, path in outputs:
        say(f"{what}: {path}")
    return 0 if (table["status"] == "ok").all() else 1
