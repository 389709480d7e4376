"""Where the bone-marrow detection errors are: counts by kind, and montages to look at.

Run:

    python -m benchmarks.seg_errors [--montage-dir docs/img]

Segments the 8 bone-marrow images with the shipped defaults, matches detections to the
annotated centres (Hungarian, 12 px, classes 1 and 3) and sorts the errors:

- missed annotations by class, and whether the missed point lies inside a segmented object
  (a merge or a mislocated centroid) or in no object at all (not segmented);
- false positives by distance to the nearest annotation (> 20 px: nothing annotated nearby);
- median area of false positives and of matched detections.

Writes ``benchmarks/results/seg_errors.json`` and two montages (seeded samples, 2x zoom, cyan
outlines of our objects, yellow dot = the point in question): false positives with no
annotation within 20 px, and missed class-1 annotations. The figures in docs/benchmarks.md
(issue 4, "where the remaining errors are") come from this script.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

from benchmarks.harness import write_results
from slidecensus.nuclei.scoring import match_points
from slidecensus.nuclei.segment import segment_image

DATA = Path(os.environ.get("SLIDECENSUS_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))
HALF = 40  # montage tiles are 80 x 80 px of the image


def _tile(rgb: np.ndarray, labels: np.ndarray, x: float, y: float) -> np.ndarray:
    """An 80 x 80 window centred on (x, y), object outlines in cyan, the point in yellow."""
    pad_rgb = np.pad(rgb, ((HALF, HALF), (HALF, HALF), (0, 0)), constant_values=255)
    pad_lab = np.pad(labels, HALF)
    xi, yi = int(round(x)), int(round(y))
    t = pad_rgb[yi : yi + 2 * HALF, xi : xi + 2 * HALF].copy()
    t[find_boundaries(pad_lab[yi : yi + 2 * HALF, xi : xi + 2 * HALF])] = (0, 255, 255)
    t[HALF - 2 : HALF + 2, HALF - 2 : HALF + 2] = (255, 230, 0)
    return t


def _montage(tiles: list[np.ndarray], cols: int = 8) -> np.ndarray:
    rows = [np.concatenate(tiles[i : i + cols], axis=1)
            for i in range(0, len(tiles) - len(tiles) % cols, cols)]
    return np.kron(np.concatenate(rows, axis=0), np.ones((2, 2, 1), np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--montage-dir", type=Path, default=None,
                    help="write seg-false-positives.png and seg-missed-class1.png here")
    ap.add_argument("--tiles", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import imageio.v3 as iio

    bm = DATA / "bone-marrow-he"
    rng = np.random.default_rng(args.seed)
    per_image, fp_tiles, miss_tiles = [], [], []
    tot = dict(matched=0, detected=0, annotated=0, fp_far=0, miss_class1=0, miss_class3=0,
               miss_in_object=0, annotated_class1=0, annotated_class3=0)
    fp_area, tp_area = [], []
    for p in sorted((bm / "images").glob("*.png")):
        rgb = iio.imread(p)[..., :3]
        ann = np.loadtxt(bm / "annotations" / f"{p.stem}.txt", skiprows=1)
        labels, table = segment_image(rgb)
        xy = table[["x_px", "y_px"]].to_numpy()
        md, ma = match_points(xy, ann[:, :2], 12.0)
        fp = np.setdiff1d(np.arange(len(xy)), md)
        fn = np.setdiff1d(np.arange(len(ann)), ma)
        dist, _ = cKDTree(ann[:, :2]).query(xy[fp]) if len(fp) else (np.zeros(0), None)
        far = fp[dist > 20]
        cls = ann[fn, 2].astype(int)
        yy = np.clip(ann[fn, 1].astype(int), 0, labels.shape[0] - 1)
        xx = np.clip(ann[fn, 0].astype(int), 0, labels.shape[1] - 1)
        in_obj = int((labels[yy, xx] > 0).sum())
        row = dict(image=p.stem, matched=len(md), detected=len(xy), annotated=len(ann),
                   fp=len(fp), fp_far=len(far), miss_class1=int((cls == 1).sum()),
                   miss_class3=int((cls == 3).sum()), miss_in_object=in_obj)
        per_image.append(row)
        print(row, flush=True)
        for k in ("matched", "detected", "annotated", "fp_far", "miss_class1", "miss_class3",
                  "miss_in_object"):
            tot[k] += row[k]
        tot["annotated_class1"] += int((ann[:, 2] == 1).sum())
        tot["annotated_class3"] += int((ann[:, 2] == 3).sum())
        fp_area.extend(table["area_um2"].to_numpy()[fp])
        tp_area.extend(table["area_um2"].to_numpy()[md])
        if args.montage_dir is not None:
            for i in far:
                fp_tiles.append(_tile(rgb, labels, *xy[i]))
            for j in fn[cls == 1]:
                miss_tiles.append(_tile(rgb, labels, *ann[j, :2]))
    tot["fp_median_area_um2"] = float(np.median(fp_area))
    tot["matched_median_area_um2"] = float(np.median(tp_area))
    tot["recall_class1"] = 1 - tot["miss_class1"] / tot["annotated_class1"]
    tot["recall_class3"] = 1 - tot["miss_class3"] / tot["annotated_class3"]
    write_results("seg_errors", {"per_image": per_image, "totals": tot})
    if args.montage_dir is not None:
        args.montage_dir.mkdir(parents=True, exist_ok=True)
        for name, tiles in (("seg-false-positives.png", fp_tiles),
                            ("seg-missed-class1.png", miss_tiles)):
            pick = rng.choice(len(tiles), size=min(args.tiles, len(tiles)), replace=False)
            iio.imwrite(args.montage_dir / name, _montage([tiles[i] for i in sorted(pick)]))


if __name__ == "__main__":
    main()
