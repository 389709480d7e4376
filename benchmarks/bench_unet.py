"""The learned segmenter (``--segmenter unet``) against the threshold segmenter, side by side.

Run (one core for the speed figures; torch is held to one thread):

    OMP_NUM_THREADS=1 python -m benchmarks.bench_unet score [--model UNET.pt]
    python -m benchmarks.bench_unet ablation [--iterations 300] [--patches 600]
    OMP_NUM_THREADS=1 python -m benchmarks.bench_unet smears

``score``: for each segmenter, in one run,

- MoNuSeg training images: pixel Dice, AJI and detection F1 (IoU > 0.5), on the 15 with
  even index in sorted order (the shipped model's training images) and the 15 with odd
  index (unseen by it); the masks are only scored;
- bone marrow: detection F1 (Hungarian matching within 12 px) on the tuning patients
  0001/0002 (seen by the shipped model) and the held-out 0003/0004/0006;
- speed: ``segment_file`` (the work of ``slidecensus segment``: read, stain model,
  segmentation, Parquet) on the 8 marrow PNGs and the CMU-1 Aperio slide, best of 2, in
  megapixels per second on one core, and the unet / threshold ratio.

``smears``: both segmenters on the labelled blood cells (MGG smears): nuclei per image and
the share of centre cells found, by type (lobed nuclei cut into pieces show there).

``ablation``: U-Nets trained from the same 19 unlabelled images (as the shipped model)
with a shorter budget, one training change at a time: synthesis only, + importance
weights, + hard examples, hard examples without importance weights, + dark stroma kept
in the background, + AdaBN. Each is scored on the unseen MoNuSeg and marrow images, with
the model's integrated-hematoxylin filter and without it (``--only`` picks variants by a
part of their name). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_segment import DATA, TUNE_PREFIXES  # noqa: E402
from benchmarks.harness import best_of, write_results  # noqa: E402
from slidecensus.nuclei.scoring import (  # noqa: E402
    DetectionCounts,
    aggregated_jaccard_index,
    detection_counts,
    match_instances,
    pixel_dice,
)
from slidecensus.nuclei.segment import Segmenter, segment_file, segment_image  # noqa: E402

MONUSEG = sorted((DATA / "monuseg-train" / "images").glob("*.png"))
MARROW = sorted((DATA / "bone-marrow-he" / "images").glob("*.png"))
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def monuseg_scores(seg: Segmenter | None, paths: list[Path], params=None) -> dict:
    """Mean Dice and AJI, and pooled detection F1, of ``seg`` on MoNuSeg ``paths``."""
    dice, aji, det = [], [], DetectionCounts(0, 0, 0)
    for p in paths:
        truth = iio.imread(DATA / "monuseg-train" / "labels" / p.name)
        lab, _ = segment_image(iio.imread(p)[..., :3], mpp=0.25, segmenter=seg, params=params)
        dice.append(pixel_dice(truth, lab))
        aji.append(aggregated_jaccard_index(truth, lab))
        det += match_instances(truth, lab)
    return {"images": len(paths), "dice": float(np.mean(dice)), "aji": float(np.mean(aji)),
            "f1": det.f1}


def marrow_scores(seg: Segmenter | None, paths: list[Path], params=None) -> dict:
    """Pooled detection F1, precision and recall of ``seg`` on marrow ``paths``."""
    c = DetectionCounts(0, 0, 0)
    for p in paths:
        ann = np.loadtxt(DATA / "bone-marrow-he" / "annotations" / (p.stem + ".txt"),
                         skiprows=1)[:, :2]
        _, t = segment_image(iio.imread(p)[..., :3], mpp=0.25, segmenter=seg, params=params)
        c += detection_counts(t[["x_px", "y_px"]].to_numpy(), ann, 12.0)
    return {"images": len(paths), "f1": c.f1, "precision": c.precision, "recall": c.recall}


def _splits() -> dict[str, list[Path]]:
    return {
        "monuseg_seen": MONUSEG[::2], "monuseg_unseen": MONUSEG[1::2],
        "marrow_tune": [p for p in MARROW if p.stem.startswith(TUNE_PREFIXES)],
        "marrow_heldout": [p for p in MARROW if not p.stem.startswith(TUNE_PREFIXES)],
    }


def quality(seg: Segmenter, only_unseen: bool = False) -> dict:
    out = {}
    for name, paths in _splits().items():
        if only_unseen and name in ("monuseg_seen", "marrow_tune"):
            continue
        fn = monuseg_scores if name.startswith("monuseg") else marrow_scores
        out[name] = fn(seg, paths)
        print(seg.kind, name, out[name], flush=True)
    return out


def speed(seg: Segmenter, repeat: int = 2) -> dict:
    """Megapixels per second of ``segment_file`` on the marrow PNGs and the CMU slide."""
    tmp = Path(tempfile.mkdtemp())
    res = {}
    for name, paths, mpp in (("marrow_png", MARROW, 0.25), ("cmu_svs", [CMU], None)):
        secs = mp = 0.0
        for p in paths:
            if p.suffix == ".png":
                h, w = iio.imread(p).shape[:2]
            else:
                from slidecensus.tiling import open_slide

                with open_slide(p) as s:
                    h, w = s.shape
            t, _ = best_of(lambda p=p, mpp=mpp: segment_file(p, tmp / "cells.parquet", mpp=mpp,
                                                             segmenter=seg), repeat)
            secs += t
            mp += h * w / 1e6
        res[name] = {"megapixels": mp, "seconds": secs, "mp_per_s": mp / secs}
        print(seg.kind, name, res[name], flush=True)
    return res


def cmd_score(args: argparse.Namespace) -> dict:
    _threads()
    segs = {"threshold": Segmenter.resolve("threshold"),
            "unet": Segmenter.resolve("unet", args.model)}
    res = {"threads": int(os.environ["OMP_NUM_THREADS"]), "model": args.model or "shipped"}
    for name, seg in segs.items():
        res[name] = {"speed": speed(seg)}  # speed first, both on a fresh machine state
    for name, seg in segs.items():
        res[name]["quality"] = quality(seg)
    res["unet_over_threshold_speed"] = {
        k: res["unet"]["speed"][k]["mp_per_s"] / res["threshold"]["speed"][k]["mp_per_s"]
        for k in res["unet"]["speed"]}
    print(res["unet_over_threshold_speed"])
    return res


ABLATION = {
    "synthesis only": {"hard": False, "importance": False, "background": "liberal",
                       "adapt_bn": False},
    "+ importance weights": {"hard": False, "importance": True, "background": "liberal",
                             "adapt_bn": False},
    "+ importance weights + hard examples": {"hard": True, "importance": True,
                                             "background": "liberal", "adapt_bn": False},
    "hard examples, no importance weights (the recipe before 2026-12-06)": {
        "hard": True, "importance": False, "background": "liberal", "adapt_bn": False},
    "+ dark stroma kept in the background (shaped)": {
        "hard": True, "importance": False, "background": "shaped", "adapt_bn": False},
    "+ AdaBN (the shipped recipe)": {"hard": True, "importance": False,
                                     "background": "shaped", "adapt_bn": True},
}


def without_iod_filter(path: Path, out: Path) -> Path:
    """A copy of a U-Net file whose own integrated-hematoxylin filter is off."""
    from slidecensus.nuclei.unet import rewrite_unet_config

    return rewrite_unet_config(path, out, min_relative_iod_um2=0.0)


def cmd_ablation(args: argparse.Namespace) -> dict:
    """Each variant scored with the model's filter (``min_relative_iod_um2``) and without."""
    from slidecensus.nuclei.unettrain import SegmenterTraining, train_segmenter

    _threads()
    images = [str(p) for p in MONUSEG[::2]]
    images += [str(p) for p in MARROW if p.stem.startswith(TUNE_PREFIXES)]
    tmp = Path(tempfile.mkdtemp())
    res = {"iterations": args.iterations, "patches": args.patches, "seed": args.seed,
           "threads": int(os.environ["OMP_NUM_THREADS"]), "variants": {}}
    for i, (name, kw) in enumerate(ABLATION.items()):
        if args.only and not any(o in name for o in args.only):
            continue
        out = tmp / f"unet{i}.pt"
        t0 = time.perf_counter()
        train_segmenter(images, out, SegmenterTraining(
            n_patches=args.patches, iterations=args.iterations, seed=args.seed, **kw))
        row = {"train_s": time.perf_counter() - t0, **kw}
        row["with_iod_filter"] = quality(Segmenter.resolve("unet", out), only_unseen=True)
        bare = without_iod_filter(out, tmp / f"unet{i}-noiod.pt")
        row["without_iod_filter"] = quality(Segmenter.resolve("unet", bare), only_unseen=True)
        res["variants"][name] = row
        print(name, row, flush=True)
    return res


def cmd_smears(args: argparse.Namespace) -> dict:
    """Both segmenters on the labelled blood cells (one cell centred in each image, MGG):
    nuclei found per image and the share of images whose centre cell is found (a centroid
    within 4 µm of the centre), by cell type. A lobed nucleus (neutrophil, eosinophil,
    monocyte) cut into pieces shows as more than one nucleus per image."""
    import pandas as pd

    from benchmarks.bench_cellmodel import BLOOD, BLOOD_MPP

    _threads()
    labels = pd.read_csv(BLOOD / "labels.csv")
    res: dict = {"images": len(labels), "mpp": BLOOD_MPP}
    for kind in ("threshold", "unet"):
        seg = Segmenter.resolve(kind)
        rows = []
        for path, cell_type in zip(labels["path"], labels["cell_type"], strict=True):
            im = iio.imread(BLOOD / path)[..., :3]
            _, t = segment_image(im, mpp=BLOOD_MPP, segmenter=seg)
            cy, cx = im.shape[0] / 2, im.shape[1] / 2
            d = np.hypot(t["x_px"] - cx, t["y_px"] - cy).min() if len(t) else np.inf
            rows.append((cell_type, len(t), bool(d * BLOOD_MPP <= 4.0)))
        df = pd.DataFrame(rows, columns=["type", "nuclei", "centre_found"])
        by = df.groupby("type").agg(nuclei=("nuclei", "mean"),
                                    centre_found=("centre_found", "mean"))
        res[kind] = {"by_type": by.round(3).to_dict(orient="index"),
                     "nuclei_per_image": float(df["nuclei"].mean()),
                     "centre_found": float(df["centre_found"].mean())}
        print(kind, res[kind]["nuclei_per_image"], res[kind]["centre_found"])
        print(by.round(2).T.to_string(), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--model", default=None, help="a U-Net file (default: the shipped one)")
    s = sub.add_parser("ablation")
    s.add_argument("--iterations", type=int, default=300)
    s.add_argument("--patches", type=int, default=600)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--only", nargs="*", default=None,
                   help="variants whose name contains one of these")
    sub.add_parser("smears")
    args = ap.parse_args()
    res = {"score": cmd_score, "ablation": cmd_ablation, "smears": cmd_smears}[args.cmd](args)
    write_results(f"unet_{args.cmd}", res)


if __name__ == "__main__":
    main()
