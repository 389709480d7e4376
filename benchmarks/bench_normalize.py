"""Stain normalisation on the MoNuSeg training images (seven organs, several sites).

Measured, never asserted::

    python -m benchmarks.bench_normalize [--target TCGA-18-5592-01Z-00-DX1] [--iterations 1500]

(default target: the image of median tissue lightness)

1. Every other image normalised to the target through ``slidecensus normalize`` with each
   method (reinhard, macenko, neural with the input's lightness kept, moved half and three
   quarters of the way to the target's, and matched): Yuan & Suh's histogram metrics to
   the target before and after, and the grey-level SSIM to the input (means over images,
   from ``metrics.csv``).
2. Seconds to fit the neural normaliser; MP/s per core to apply each method (one thread,
   fit included, one image of 1000 x 1000 px, best of 3).
3. The effect on segmentation: Dice, AJI and detection F1 (IoU 0.5) of the threshold
   segmenter on all the images with each ``--stain-norm``, run as the pipeline runs it
   (the slide's normaliser fitted once, the segmenter's stain model on the normalised
   sample, the tile read through ``read_normalized``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import run_cli, write_results  # noqa: E402

MONUSEG = ROOT.parent / "shared" / "data" / "monuseg-train"
CACHE = Path(os.environ.get("SLIDECENSUS_BENCH_CACHE", "/tmp/slidecensus-bench")) / "normalize"
MPP = 0.25




def _metrics(folder: Path) -> dict:
    import pandas as pd

    t = pd.read_csv(folder / "metrics.csv")
    t = t[t["status"] == "ok"]
    cols = [c for c in t.columns if c.endswith(("_before", "_after")) or c == "ssim"]
    out = {c: float(t[c].mean()) for c in cols}
    out["ssim_min"] = float(t["ssim"].min())
    out["images"] = len(t)
    return out


def _segmentation(images: list[Path], specs: dict) -> dict:
    from imageio import v3 as iio

    from slidecensus.engine.plan import fit_slide_normalizer
    from slidecensus.nuclei.normalize import read_normalized
    from slidecensus.nuclei.scoring import (
        DetectionCounts,
        aggregated_jaccard_index,
        match_instances,
        pixel_dice,
    )
    from slidecensus.nuclei.segment import segment_image, stain_sample
    from slidecensus.nuclei.stain import estimate_stain_model
    from slidecensus.tiling import open_slide

    res = {}
    for name, spec in specs.items():
        dice, aji, det = [], [], DetectionCounts(0, 0, 0)
        fit = functools.partial(fit_slide_normalizer, spec)
        for p in images:
            truth = iio.imread(MONUSEG / "labels" / p.name)
            with open_slide(p, mpp=MPP) as slide:
                sample, _ = stain_sample(slide, with_mask=False)
                norm, seg_sample = fit(slide, sample, None)
                stain = replace(estimate_stain_model(seg_sample), norm=norm)
                h, w = slide.shape
                rgb, _ = read_normalized(slide, 0, 0, 0, w, h, stain)
            labels, _ = segment_image(rgb, mpp=MPP, stain_model=stain)
            dice.append(pixel_dice(truth, labels))
            aji.append(aggregated_jaccard_index(truth, labels))
            det += match_instances(truth, labels)
        res[name] = {"dice": float(np.mean(dice)), "aji": float(np.mean(aji)),
                     "f1_iou50": det.f1}
        print(name, res[name], flush=True)
    return res


def _speed(image: Path, target: Path, model: Path) -> dict:
    import torch
    from imageio import v3 as iio

    from slidecensus.nuclei.colorize import fit_neural
    from slidecensus.nuclei.normalize import fit_normalizer, stain_target

    torch.set_num_threads(1)
    img = iio.imread(image)[..., :3]
    tgt = stain_target(iio.imread(target)[..., :3])
    mp = img.shape[0] * img.shape[1] / 1e6
    out = {}
    runs = {"reinhard": lambda: fit_normalizer("reinhard", img, tgt)(img),
            "macenko": lambda: fit_normalizer("macenko", img, tgt)(img),
            "neural_bf16": lambda: fit_neural(model, img, amp=True)(img),  # default lightness
            "neural_fp32": lambda: fit_neural(model, img, amp=False)(img)}
    for name, fn in runs.items():
        fn()
        best = min(_timed(fn) for _ in range(3))
        out[name] = mp / best
    a = fit_neural(model, img, amp=True)(img)
    b = fit_neural(model, img, amp=False)(img)
    out["neural_bf16_vs_fp32_max_grey_levels"] = float(np.abs(np.round(a) - np.round(b)).max())
    out["neural_bf16_vs_fp32_mean_grey_levels"] = float(np.abs(a - b).mean())
    return out


def _median_lightness(images: list[Path]) -> Path:
    """The image whose mean tissue CIE L* is the median of the set."""
    from imageio import v3 as iio

    from slidecensus.nuclei.normalize import rgb_to_cielab
    from slidecensus.nuclei.stain import tissue_pixels

    lum = []
    for p in images:
        im = iio.imread(p)[..., :3]
        lum.append(float(rgb_to_cielab(im)[..., 0][tissue_pixels(im)].mean()))
    return images[int(np.argsort(lum)[len(lum) // 2])]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=None,
                    help="target image's stem (default: the image of median tissue "
                         "lightness, a representative reference)")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--no-segmentation", action="store_true")
    args = ap.parse_args()
    from slidecensus.nuclei.colorize import load_colorizer
    from slidecensus.nuclei.normalize import parse_stain_norm, stain_target

    images = sorted((MONUSEG / "images").glob("*.png"))
    target = (MONUSEG / "images" / f"{args.target}.png" if args.target
              else _median_lightness(images))
    inputs = [p for p in images if p != target]
    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / "neural.pt"
    model.unlink(missing_ok=True)
    res: dict = {"target": target.name, "inputs": len(inputs), "methods": {}}
    common = [*map(str, inputs), "--target", str(target), "--mpp", str(MPP)]
    it = ["--iterations", str(args.iterations)] if args.iterations else []
    runs = {"none": ["--method", "none"], "reinhard": ["--method", "reinhard"],
            "macenko": ["--method", "macenko"],
            "neural_lightness_keep": ["--method", "neural", "--save-model", str(model), *it,
                                      "--lightness", "keep"],
            "neural_lightness_0.5": ["--method", "neural", "--model", str(model),
                                     "--lightness", "0.5"],
            "neural_lightness_0.75": ["--method", "neural", "--model", str(model),
                                      "--lightness", "0.75"],
            "neural_match": ["--method", "neural", "--model", str(model),
                             "--lightness", "match"]}
    for name, extra in runs.items():
        folder = CACHE / name
        wall = run_cli("normalize", *common, *extra, "--out", str(folder))
        res["methods"][name] = {**_metrics(folder), "wall_s": wall}
        print(name, res["methods"][name], flush=True)
    summary = load_colorizer(model)["summary"]
    res["neural_train_s"] = summary["time_s"]
    res["neural_iterations"] = load_colorizer(model)["config"]["iterations"]
    res["apply_mp_per_s_one_core"] = _speed(inputs[0], target, model)
    print(res["apply_mp_per_s_one_core"], flush=True)
    if not args.no_segmentation:
        from imageio import v3 as iio

        tgt = stain_target(iio.imread(target)[..., :3], name=target.name)
        specs = {"default (reinhard, Hu et al. target)": parse_stain_norm("reinhard"),
                 "none": parse_stain_norm("none"),
                 "reinhard to target": parse_stain_norm("reinhard", tgt),
                 "macenko to target": parse_stain_norm("macenko", tgt),
                 "macenko (reference stains)": parse_stain_norm("macenko"),
                 "neural (lightness kept, as in the pipeline)":
                     parse_stain_norm(f"neural:{model}")}
        res["segmentation"] = _segmentation(images, specs)
    write_results("normalize", res)


if __name__ == "__main__":
    main()
