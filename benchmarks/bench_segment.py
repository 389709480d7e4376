"""Segmentation: slidecensus vs the HistomicsTK form of the paper's pipeline, side by side.

Run (one core, as reported in docs/benchmarks.md):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python -m benchmarks.bench_segment [--htk-images N] [--no-monuseg]

For every bone-marrow image it times (a) HistomicsTK 1.4: Reinhard -> Macenko -> colour
deconvolution -> threshold 120 -> fill holes -> multiscale LoG + max-clustering (Kofahi) ->
area open 200 -> compaction 3, and (b) the whole ``slidecensus.nuclei.segment.segment_file``
(PNG read, stain model, segmentation, Parquet write), and scores both by Hungarian matching
within 12 px (classes 1 and 3). Tuning split: patients 0001 and 0002 (4 images) were used to
choose parameters; 0003, 0004, 0006 are held out. MoNuSeg: pixel Dice, AJI and detection F1
(IoU > 0.5) of ``segment_image`` at 0.25 µm/px. HistomicsTK is optional (``pip install
--no-deps histomicstk large-image girder-slicer-cli-web cachetools shapely ctk-cli``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from benchmarks.harness import best_of, write_results  # noqa: E402
from slidecensus.nuclei.scoring import (  # noqa: E402
    DetectionCounts,
    aggregated_jaccard_index,
    detection_counts,
    match_instances,
    pixel_dice,
)
from slidecensus.nuclei.segment import segment_file, segment_image  # noqa: E402
from slidecensus.nuclei.stain import TARGET_LAB_MEAN, TARGET_LAB_STD  # noqa: E402

DATA = Path(os.environ.get("SLIDECENSUS_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))
TUNE_PREFIXES = ("BM_GRAZ_HE_0001", "BM_GRAZ_HE_0002")


def htk_pipeline(im: np.ndarray) -> np.ndarray:
    """The paper's pipeline from HistomicsTK calls; returns nucleus centroids (x, y)."""
    import histomicstk.preprocessing.color_deconvolution as cd
    import histomicstk.preprocessing.color_normalization as cn
    import histomicstk.segmentation.label as sl
    import histomicstk.segmentation.nuclear as nu

    norm = cn.reinhard(im, TARGET_LAB_MEAN, TARGET_LAB_STD)
    w = cd.rgb_separate_stains_macenko_pca(norm, 255)
    ref = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T
    hi = cd.find_stain_index(ref[:, 0], w)
    stains = cd.color_deconvolution(norm, w, 255).Stains
    h = stains[..., hi].astype(float)
    fg = ndi.binary_fill_holes(h < 120)
    lab = nu.detect_nuclei_kofahi(h, fg, min_radius=6, max_radius=20, min_nucleus_area=200,
                                  local_max_search_radius=10)
    lab = sl.compact(lab, compaction=3)
    idx = np.unique(lab)[1:]
    if len(idx) == 0:
        return np.zeros((0, 2))
    cy, cx = np.array(ndi.center_of_mass(lab > 0, lab, idx)).T
    return np.column_stack([cx, cy])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--htk-images", type=int, default=8, help="0 skips HistomicsTK")
    ap.add_argument("--no-monuseg", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import imageio.v3 as iio

    bm = DATA / "bone-marrow-he"
    paths = sorted((bm / "images").glob("*.png"))
    per_image, totals = [], {k: DetectionCounts(0, 0, 0)
                             for k in ("ours_tune", "ours_heldout", "htk_all", "ours_htk_subset")}
    t_ours = t_htk = mp_ours = mp_htk = 0.0
    tmp = Path(tempfile.mkdtemp())
    for i, p in enumerate(paths):
        ann = np.loadtxt(bm / "annotations" / (p.stem + ".txt"), skiprows=1)[:, :2]
        im = iio.imread(p)
        mp = im.shape[0] * im.shape[1] / 1e6
        t, table = best_of(lambda p=p: segment_file(p, tmp / "cells.parquet"), args.repeat)
        c = detection_counts(table[["x_px", "y_px"]].to_numpy(), ann, 12.0)
        split = "tune" if p.stem.startswith(TUNE_PREFIXES) else "heldout"
        totals[f"ours_{split}"] += c
        t_ours += t
        mp_ours += mp
        row = {"image": p.stem, "split": split, "ours_s": t, "ours_mp_per_s": mp / t,
               "ours_precision": c.precision, "ours_recall": c.recall, "ours_f1": c.f1}
        if i < args.htk_images:
            t0 = time.perf_counter()
            xy = htk_pipeline(im)
            th = time.perf_counter() - t0
            ch = detection_counts(xy, ann, 12.0)
            totals["htk_all"] += ch
            totals["ours_htk_subset"] += c
            t_htk += th
            mp_htk += mp
            row.update(htk_s=th, htk_mp_per_s=mp / th, htk_precision=ch.precision,
                       htk_recall=ch.recall, htk_f1=ch.f1)
        per_image.append(row)
        print(row, flush=True)
    allc = totals["ours_tune"] + totals["ours_heldout"]
    res = {
        "per_image": per_image,
        "ours_f1": {"tune": totals["ours_tune"].f1, "heldout": totals["ours_heldout"].f1,
                    "all": allc.f1, "precision_all": allc.precision, "recall_all": allc.recall},
        "ours_mp_per_s": mp_ours / t_ours,
    }
    if t_htk:
        res.update(htk_f1=totals["htk_all"].f1, htk_precision=totals["htk_all"].precision,
                   htk_recall=totals["htk_all"].recall, ours_f1_same_images=totals[
                       "ours_htk_subset"].f1, htk_mp_per_s=mp_htk / t_htk,
                   speed_ratio=(mp_ours / t_ours) / (mp_htk / t_htk))
    if not args.no_monuseg:
        ms = DATA / "monuseg-train"
        dice, aji, det = [], [], DetectionCounts(0, 0, 0)
        for p in sorted((ms / "images").glob("*.png")):
            truth = iio.imread(ms / "labels" / p.name)
            labels, _ = segment_image(iio.imread(p)[..., :3], mpp=0.25)
            dice.append(pixel_dice(truth, labels))
            aji.append(aggregated_jaccard_index(truth, labels))
            det += match_instances(truth, labels)
        res["monuseg"] = {"images": len(dice), "dice_mean": float(np.mean(dice)),
                          "aji_mean": float(np.mean(aji)), "f1_iou50": det.f1,
                          "precision": det.precision, "recall": det.recall}
    write_results("segment", res)


if __name__ == "__main__":
    main()
