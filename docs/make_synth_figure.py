"""Make ``docs/img/synthetic-vs-real.png``: synthetic marrow beside a real H&E marrow image.

The synthetic panels are rendered by :func:`slidecensus.tiling.synth.render_region` (a
normal slide, and the blast hotspot of an abnormal one); the real panel is a crop of a
bone-marrow image of Kainz et al. (MICCAI 2015) read from ``../shared/data`` beside the
project, never copied into the repository. Without that folder the real panel is left out.

Run from the project root: ``python docs/make_synth_figure.py``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from skimage import io

from slidecensus.tiling.synth import cohort_specs, render_region

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "bone-marrow-he" / "images" / "BM_GRAZ_HE_0001_01.png"
OUT = ROOT / "docs" / "img" / "synthetic-vs-real.png"
CROP = 400


def main() -> Path:
    normal, abnormal = cohort_specs(2, (4096, 4096), seed=0)
    panels = [(render_region(normal, 1800, 1700, CROP, CROP),
               "synthetic, normal slide\n(0.5 µm/px)")]
    hot = abnormal.regions[0]
    cx, cy = int(hot.x + hot.w / 2 - CROP / 2), int(hot.y + hot.h / 2 - CROP / 2)
    panels.append((render_region(abnormal, cx, cy, CROP, CROP),
                   "synthetic, abnormal slide:\nblast hotspot (70% blasts)"))
    if REAL.exists():
        real = io.imread(REAL)[..., :3]
        panels.append((real[400:400 + CROP, 300:300 + CROP],
                       "real H&E bone marrow\n(Kainz et al. 2015, BM_GRAZ_HE_0001_01)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8), dpi=90,
                             layout="constrained")
    for ax, (img, title) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(main())
