"""The relative hematoxylin filter (``min_relative_hematoxylin``), on and off, side by side.

Run:

    python -m benchmarks.bench_smear [--ratios 0 0.8 0.9 1.0]

For each ratio: on a seeded sample of 300 blood-cell images (MGG smears), how many images
still have a cell within 4 µm of the centre (the labelled leukocyte or platelet) and how
many other objects are found (red cells, platelets, lobes); detection F1 on the 8 bone-marrow
images (Hungarian matching within 12 px); Dice, AJI and F1 (IoU > 0.5) on the 30 MoNuSeg
training images. Figures: docs/segmentation.md, "Smears".
"""

from __future__ import annotations

import argparse

import imageio.v3 as iio
import numpy as np
import pandas as pd

from benchmarks.bench_segment import DATA
from benchmarks.bench_unet import MARROW, MONUSEG, marrow_scores, monuseg_scores
from benchmarks.harness import write_results
from slidecensus.nuclei.segment import SegmentParams, segment_image


def blood(params: SegmentParams, n: int = 300) -> dict:
    """Central cells kept and other objects found on ``n`` seeded blood-cell images."""
    labels = pd.read_csv(DATA / "blood-cells" / "labels.csv").sample(n, random_state=1)
    central = others = images = 0
    for path in labels["path"]:
        img = iio.imread(DATA / "blood-cells" / path)[..., :3]
        _, t = segment_image(img, mpp=0.1, params=params)
        if t.empty:
            continue
        d = np.hypot(t["x_px"] - img.shape[1] / 2, t["y_px"] - img.shape[0] / 2)
        central += int(d.min() < 40)
        others += len(t) - 1
        images += 1
    return {"images_with_a_cell": images, "central_cell_found": central, "other_objects": others}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.8])
    args = ap.parse_args()
    res = {}
    for r in args.ratios:
        params = SegmentParams(min_relative_hematoxylin=r)
        res[str(r)] = {"blood": blood(params),
                       "marrow": marrow_scores(None, MARROW, params),
                       "monuseg": monuseg_scores(None, MONUSEG, params)}
        print(r, res[str(r)], flush=True)
    write_results("smear_filter", res)


if __name__ == "__main__":
    main()
