"""Benchmarks of the cell model (InfoGAN + WGAN-GP): speed, and clustering of real cells.

Measured, never asserted. Sub-commands::

    python benchmarks/bench_models.py speed  [--widths 32 64 128] [--threads 1]
    python benchmarks/bench_models.py blood  [--crop cell|nucleus] [--width 32]
                                             [--iterations 600] [--threads 1]
    python benchmarks/bench_models.py batch  [--width 128] [--batches 256 1024 4096]

``speed``: generator iterations per second (one iteration = 5 critic + 1 G + 1 Q steps at
batch 64) and inference cells per second, on whatever device is present.

``batch``: Q's inference rate and the peak memory of the process for each forward-pass
size, each in a fresh process (so each peak is its own), on CPU. This is the measurement
behind ``CPU_PREDICT_BATCH`` in ``slidecensus/engine/tasks.py``.

``blood``: the 1200 labelled peripheral blood cells of ../shared/data/blood-cells
(8 types, Acevedo et al. 2020). A small self-contained nucleus segmentation (MGG stain:
nuclei are the darkest class of a 3-class Otsu on the smoothed green channel; closing,
hole filling, opening; the component nearest the image centre) gives each image's central
nucleus, from which two kinds of crop are made:

* ``nucleus``: the nucleus bounding box, squared, scaled so its side is 32 px, outside the
  mask white (as Hu et al. do);
* ``cell``: a fixed 176 px window centred on the nucleus, scaled to 32 px (one scale for
  all images, so cell size and cytoplasm survive).

The model is trained on the crops without labels (k = 8); Q's clusters are scored with
purity, entropy and F-score, next to k-means on the raw 32 x 32 pixels of the same crops
(measured in the same run), and the critic's Table-I features are scored with a linear SVM
under 5-fold stratified cross-validation. The generation grid goes to
docs/img/generator-grid.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import best_of, peak_rss_mb, write_results  # noqa: E402

BLOOD = ROOT.parent / "shared" / "data" / "blood-cells"
# crops and checkpoints: outside the repository (override with SLIDECENSUS_BENCH_CACHE)
CACHE = Path(os.environ.get("SLIDECENSUS_BENCH_CACHE", "/tmp/slidecensus-bench"))
CELL_WINDOW_PX = 176


# ----------------------------------------------------------------- blood-cell crops


def central_nucleus(rgb: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the nucleus nearest the image centre (MGG-stained smear)."""
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology

    g = filters.gaussian(rgb[..., 1].astype(np.float64), 1.5, preserve_range=True)
    mask = g < filters.threshold_multiotsu(g, 3)[0]
    mask = ndi.binary_closing(mask, morphology.disk(4), border_value=0)
    mask = ndi.binary_fill_holes(mask)
    mask = ndi.binary_opening(mask, morphology.disk(2))
    lab = measure.label(mask)
    h, w = mask.shape
    best, best_d = 0, np.inf
    for region in measure.regionprops(lab):
        if region.area < 40:
            continue
        d = np.min(np.hypot(region.coords[:, 0] - h / 2, region.coords[:, 1] - w / 2))
        if d < best_d:
            best, best_d = region.label, d
    return (lab == best) if best else None


def _resize(img: np.ndarray, size: int = 32) -> np.ndarray:
    from skimage.transform import resize

    out = resize(img, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def nucleus_crop(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Square bounding box of the nucleus, outside the mask white, scaled to 32 x 32."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 3
    img = np.where(mask[..., None], rgb, 255).astype(np.uint8)
    return _resize(_window(img, cy, cx, side))


def cell_crop(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fixed 176 px window centred on the nucleus centroid, scaled to 32 x 32."""
    ys, xs = np.nonzero(mask)
    return _resize(_window(rgb, ys.mean(), xs.mean(), CELL_WINDOW_PX))


def _window(img: np.ndarray, cy: float, cx: float, side: int) -> np.ndarray:
    side = int(side)
    pad = side
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    y0, x0 = int(round(cy - side / 2)) + pad, int(round(cx - side / 2)) + pad
    return big[y0:y0 + side, x0:x0 + side]


def blood_crops(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(crops uint8 (N, 32, 32, 3), labels) for all blood-cell images; cached as .npz."""
    import pandas as pd
    from skimage import io

    cache = CACHE / f"blood-{kind}.npz"
    if cache.exists():
        d = np.load(cache)
        return d["crops"], d["labels"]
    table = pd.read_csv(BLOOD / "labels.csv")
    crops, labels, missed = [], [], 0
    for path, label in zip(table["path"], table["cell_type"], strict=True):
        rgb = io.imread(BLOOD / path)[..., :3]
        mask = central_nucleus(rgb)
        if mask is None:  # no nucleus found: centre of the image, nothing masked
            missed += 1
            mask = np.zeros(rgb.shape[:2], bool)
            mask[rgb.shape[0] // 2 - 20: rgb.shape[0] // 2 + 20,
                 rgb.shape[1] // 2 - 20: rgb.shape[1] // 2 + 20] = True
        crops.append(nucleus_crop(rgb, mask) if kind == "nucleus" else cell_crop(rgb, mask))
        labels.append(label)
    print(f"{kind} crops: {len(crops)} ({missed} without a nucleus found)")
    out, lab = np.stack(crops), np.array(labels)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, crops=out, labels=lab)
    return out, lab


# ----------------------------------------------------------------- measurements


def scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from slidecensus.models.metrics import entropy, f_score, purity

    return {"purity": purity(labels, clusters), "entropy": entropy(labels, clusters),
            "f_score": f_score(labels, clusters)}


def kmeans_raw(x: np.ndarray, labels: np.ndarray, k: int, seed: int = 0,
               scale: float = 1 / 255) -> dict:
    """k-means (10 restarts) on the flattened rows of ``x`` times ``scale``."""
    from sklearn.cluster import KMeans

    x = x.reshape(len(x), -1).astype(np.float32) * scale
    cl = KMeans(k, n_init=10, random_state=seed).fit_predict(x)
    return scores(labels, cl)


def svm_cv(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    clf = make_pipeline(StandardScaler(), LinearSVC(C=0.01, max_iter=5000))
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, features, labels, cv=cv).mean())


def cmd_speed(args: argparse.Namespace) -> dict:
    import torch

    from slidecensus.models import TrainConfig, load_model, predict, train_infogan

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2048, 32, 32, 3), dtype=np.uint8)
    out = CACHE / "speed"
    res: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu",
                 "threads": args.threads, "train": {}, "infer": {}}
    for w in args.widths:
        recs: list = []
        n = args.speed_iterations
        cfg = TrainConfig(k=5, width=w, iterations=n, checkpoint_every=10**9)
        ckpt = out / f"w{w}.pt"
        # first iteration(s) warm up; the rate is taken from the second half of the run
        train_infogan(crops, cfg, ckpt, resume=False, log_every=max(1, n // 2),
                      progress=recs.append)
        res["train"][f"width{w}"] = {"it_per_s": recs[-1]["it_per_s"], "iterations": n}
        model = load_model(ckpt)
        big = rng.integers(0, 256, (args.infer_n, 32, 32, 3), dtype=np.uint8)
        t, _ = best_of(lambda m=model, b=big: predict(m, b), repeat=2)
        res["infer"][f"width{w}"] = {"cells_per_s": args.infer_n / t, "n": args.infer_n}
        print(w, res["train"][f"width{w}"], res["infer"][f"width{w}"], flush=True)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _batch_child(width: int, batch: int, n: int, threads: int) -> dict:
    """In a fresh process: cells/s of ``predict`` at one batch size, and the peak RSS."""
    import torch

    from benchmarks.harness import vm_hwm_mb
    from slidecensus.models import (
        CellModel,
        CriticHead,
        CriticTrunk,
        Generator,
        QHead,
        TrainConfig,
        predict,
    )

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(k=5, width=width)
    mods = [m.eval().requires_grad_(False) for m in (
        Generator(cfg.k, cfg.z_dim, width), CriticTrunk(width), CriticHead(width),
        QHead(width, cfg.k))]
    model = CellModel(cfg, {}, *mods, device=torch.device("cpu"))
    crops = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    predict(model, crops[:64], batch_size=64)  # warm-up
    before = vm_hwm_mb()
    t, _ = best_of(lambda: predict(model, crops, batch_size=batch), repeat=2)
    return {"batch": batch, "cells_per_s": n / t, "peak_rss_mb": vm_hwm_mb(),
            "peak_before_mb": before}


def cmd_batch(args: argparse.Namespace) -> dict:
    import multiprocessing as mp

    rows = []
    for b in args.batches:
        with mp.get_context("spawn").Pool(1) as pool:
            rows.append(pool.apply(_batch_child, (args.width, b, args.n, args.threads)))
        print(rows[-1], flush=True)
    return {"width": args.width, "n": args.n, "threads": args.threads, "rows": rows}


def cmd_blood(args: argparse.Namespace) -> dict:
    import torch

    from slidecensus.models import (
        TrainConfig,
        d_features,
        generation_grid,
        load_model,
        predict,
        train_infogan,
        write_png,
    )

    torch.set_num_threads(args.threads)
    res: dict = {"crop": args.crop, "width": args.width, "k": args.k, "seed": args.seed}
    crops, labels = blood_crops(args.crop)
    res["n_crops"] = len(crops)
    res["kmeans_raw_pixels"] = kmeans_raw(crops, labels, args.k, args.seed)
    print("k-means raw pixels:", res["kmeans_raw_pixels"], flush=True)
    if args.baselines_only:
        return res
    cfg = TrainConfig(k=args.k, z_dim=32, width=args.width, iterations=args.iterations,
                      seed=args.seed, checkpoint_every=50)
    ckpt = CACHE / f"blood-{args.crop}-w{args.width}-k{args.k}-s{args.seed}.pt"
    t0 = time.perf_counter()
    if not args.eval_only:  # --eval-only scores the last checkpoint as it stands
        train_infogan(crops, cfg, ckpt, resume=True, log_every=25,
                      progress=lambda r: print({k: round(v, 4) for k, v in r.items()},
                                               flush=True))
    model = load_model(ckpt)
    res["train"] = {"iterations": model.summary["iteration"],
                    "epochs": model.summary["epochs_done"],
                    "time_s": model.summary["time_s"],
                    "wall_this_run_s": time.perf_counter() - t0,
                    "last_losses": model.summary["history"][-1]}
    clusters, _probs = predict(model, crops)
    res["infogan_q"] = scores(labels, clusters)
    res["cluster_sizes"] = np.bincount(clusters, minlength=args.k).tolist()
    print("InfoGAN Q:", res["infogan_q"], res["cluster_sizes"], flush=True)
    feats = d_features(model, crops)
    res["kmeans_d_features"] = kmeans_raw(feats, labels, args.k, args.seed, scale=1.0)
    print("k-means on D features:", res["kmeans_d_features"], flush=True)
    from slidecensus.models.metrics import contingency

    res["contingency_classes_x_clusters"] = {
        "classes": np.unique(labels).tolist(), "table": contingency(labels, clusters).tolist()}
    res["svm_5fold_d_features"] = svm_cv(feats, labels, args.seed)
    res["svm_5fold_raw_pixels"] = svm_cv(crops.reshape(len(crops), -1) / 255.0, labels,
                                         args.seed)
    print("SVM:", res["svm_5fold_d_features"], res["svm_5fold_raw_pixels"], flush=True)
    if args.grid:
        write_png(ROOT / "docs" / "img" / "generator-grid.png",
                  generation_grid(model, n_rows=8, seed=0))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--speed-iterations", type=int, default=6)
    s.add_argument("--infer-n", type=int, default=20000)
    s = sub.add_parser("batch")
    s.add_argument("--width", type=int, default=128)
    s.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    s.add_argument("--n", type=int, default=8192)
    s.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("blood")
    s.add_argument("--crop", choices=["cell", "nucleus"], default="cell")
    s.add_argument("--width", type=int, default=32)
    s.add_argument("--k", type=int, default=8)
    s.add_argument("--iterations", type=int, default=600)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--baselines-only", action="store_true")
    s.add_argument("--eval-only", action="store_true",
                   help="score the checkpoint as it stands (after an interrupted run)")
    s.add_argument("--grid", action="store_true", help="write docs/img/generator-grid.png")
    args = p.parse_args(argv)
    cmds = {"speed": cmd_speed, "batch": cmd_batch, "blood": cmd_blood}
    res = cmds[args.cmd](args)
    name = {"speed": "models_speed", "batch": "models_batch"}.get(
        args.cmd, f"models_blood_{getattr(args, 'crop', '')}")
    if not getattr(args, "baselines_only", False):
        write_results(name, res)


if __name__ == "__main__":
    main()
