"""Guided embeddings (Gräbel et al.) on the labelled blood cells: 5-fold CV, measured.

    python -m benchmarks.bench_guided crops            # cache the census' crops in /tmp
    python -m benchmarks.bench_guided cv [--epochs 40] [--methods guided,ce]
    python -m benchmarks.bench_guided stability        # Procrustes distance of two seeds
    python -m benchmarks.bench_guided speed            # census-time cells/s, one thread

The 1200 images of ../shared/data/blood-cells are slides at 0.1 µm/px, each labelled at its
centre point (w/2, h/2), as ``bench_cellmodel.py blood`` treats them. ``crops`` runs the
census' own planning, segmentation, point matching and crop cutting
(:func:`slidecensus.engine.train.labelled_slide_crops`, the code behind ``slidecensus
train --labels``) on every image, without Dask, and caches the matched crops; ``cv`` then
trains :func:`slidecensus.models.train_guided` on 4/5 of them (its own stratified
validation split inside) and scores the held-out fifth, for each method. Unmatched images
(no nucleus within 5 µm of the centre) count as errors in the "all images" scores.
Torch runs with one thread. Results: docs/benchmarks.md, "Guided embeddings".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import write_results  # noqa: E402

BLOOD = ROOT.parent / "shared" / "data" / "blood-cells"
CACHE = Path(os.environ.get("SLIDECENSUS_BENCH_CACHE", "/tmp/slidecensus-bench"))
BLOOD_MPP = 0.1
CROPS = CACHE / "guided-crops.npz"


def _crops_file(mode: str | None, size: int = 32) -> Path:
    """The crop cache of ``mode`` (None: the guided model's default crop mode) at ``size``
    px."""
    name = CROPS.stem + (f"-{mode}" if mode else "") + (f"-{size}px" if size != 32 else "")
    return CACHE / f"{name}.npz"


def cmd_crops(args: argparse.Namespace) -> dict:
    import pandas as pd
    from PIL import Image

    from slidecensus.engine.plan import CensusParams
    from slidecensus.engine.train import labelled_slide_crops
    from slidecensus.models import GuidedConfig

    labels = pd.read_csv(BLOOD / "labels.csv")
    spec = GuidedConfig().crop_spec()
    if args.crop_mode:
        spec = {**spec, "mode": args.crop_mode}
    params = replace(CensusParams().with_model_crops(spec), crop_size=args.crop_size)
    crops = np.full((len(labels), args.crop_size, args.crop_size, 3), 255, np.uint8)
    matched = np.zeros(len(labels), bool)
    how = []
    t0 = time.perf_counter()
    for i, rel in enumerate(labels["path"]):
        path = str(BLOOD / rel)
        with Image.open(path) as im:
            w, h = im.size
        res = labelled_slide_crops(path, BLOOD_MPP, params, np.array([[w / 2, h / 2]]))
        how.append(str(res["how"][0]))
        if res["row"][0] >= 0:
            crops[i] = res["crops"][0]
            matched[i] = True
        if i % 100 == 0:
            print(f"{i}/{len(labels)} {time.perf_counter() - t0:.0f} s", flush=True)
    out = _crops_file(args.crop_mode, args.crop_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, crops=crops, matched=matched,
                        labels=labels["cell_type"].to_numpy(str), how=np.array(how))
    res = {"images": len(labels), "matched": int(matched.sum()),
           "under": how.count("under"), "nearest": how.count("nearest"),
           "seconds": time.perf_counter() - t0}
    print(json.dumps(res))
    return res


def _folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified fold number of each sample."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _load(mode: str | None = None, size: int = 32):
    d = np.load(_crops_file(mode, size))
    return d["crops"], d["matched"], d["labels"]


def _scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    from slidecensus.models.guided import f1_scores

    ti = np.searchsorted(classes, y_true)
    pi = np.array([classes.index(p) if p in classes else -1 for p in y_pred])
    f = f1_scores(ti, pi, len(classes))
    return {"macro_f1": float(np.nanmean(f)), "accuracy": float(np.mean(ti == pi)),
            "per_type_f1": {c: round(float(v), 3) for c, v in zip(classes, f, strict=True)}}


def cmd_cv(args: argparse.Namespace) -> dict:
    import torch

    from slidecensus.models import GuidedConfig, predict_guided, train_guided

    torch.set_num_threads(1)
    crops, matched, labels = _load(args.crop_mode, args.crop_size)
    classes = sorted(set(labels.tolist()))
    fold = _folds(labels, 5, 0)
    out: dict = {"images": len(labels), "matched": int(matched.sum()), "epochs": args.epochs,
                 "methods": {}}
    for method in args.methods.split(","):
        loss, amp = method.split("-")[0], not method.endswith("-fp32")
        pred = np.array([""] * len(labels), dtype=object)
        views_too = [int(v) for v in args.views_too.split(",")] if args.views_too else []
        if args.one_view_too and 1 not in views_too:
            views_too.insert(0, 1)
        predv = {nv: pred.copy() for nv in views_too}
        emb = np.full((len(labels), 2), np.nan)
        info = []
        t0 = time.perf_counter()
        for f in range(args.folds):
            tr = np.flatnonzero((fold != f) & matched)
            te = np.flatnonzero((fold == f) & matched)
            mode = {"crop_mode": args.crop_mode} if args.crop_mode else {}
            cfg = GuidedConfig(loss=loss, epochs=args.epochs, seed=f, amp_cpu=amp, **mode,
                               width=args.width, views=1 if args.no_tta else 8,
                               crop_size=args.crop_size, stem=args.stem,
                               w_rest=args.w_rest, w_dist=args.w_dist,
                               **({} if args.w_ce is None else {"w_ce": args.w_ce}),
                               **({"heads": tuple(args.heads.split(","))} if args.heads
                                  else {}))
            m = train_guided(crops[tr], labels[tr], cfg)
            cls, _, e2 = predict_guided(m, crops[te])
            pred[te] = np.array(m.classes)[cls]
            emb[te] = e2
            held = _scores(labels[te], pred[te], classes)["macro_f1"]
            info.append({"fold": f, "head": m.summary["head"], "best_epoch":
                         m.summary["best_epoch"], "val_macro_f1": round(
                             m.summary["val_macro_f1"], 3), "train_s": round(
                             m.summary["time_s"], 1), "held_out_macro_f1": round(held, 3)})
            for nv in views_too:  # the same network, nv views: what views=nv would train
                cls_v = _n_views_predict(m, crops[tr], labels[tr], crops[te], nv)
                predv[nv][te] = np.array(m.classes)[cls_v]
                info[-1][f"held_out_macro_f1_{nv}_views"] = round(
                    _scores(labels[te], predv[nv][te], classes)["macro_f1"], 3)
            print(method, info[-1], flush=True)
        done = np.array([p != "" for p in pred])
        run = fold < args.folds  # the images of the folds run
        res = {"matched_only": _scores(labels[done], pred[done], classes),
               "all_images": _scores(labels[run], np.where(done, pred, "unmatched")[run],
                                     classes),
               "folds": info, "minutes": round((time.perf_counter() - t0) / 60, 1)}
        for nv in views_too:
            dv = predv[nv] != ""
            res[f"matched_only_{nv}_views"] = _scores(labels[dv], predv[nv][dv], classes)
        if loss == "guided":
            res["intra_class_variance"] = _intra(emb[done], labels[done], classes)
        out["methods"][method] = res
        print(method, json.dumps({k: v for k, v in res.items() if k != "folds"}), flush=True)
    return out


def _n_views_predict(model, crops: np.ndarray, labels: np.ndarray, test: np.ndarray,
                     views: int) -> np.ndarray:
    """Classes of ``test`` with ``views`` averaged views, the chosen head refit on the
    training cells' embeddings made the same way (train_guided refits it on all of them,
    as here), so one trained network scores every view count."""
    import torch

    from slidecensus.models.guided import _embed, _fit_head, _head_proba

    y = torch.from_numpy(np.searchsorted(np.array(model.classes), labels))
    amp = model.config.amp_cpu
    head = _fit_head(model.summary["head"], _embed(model.net, crops, model.dims, amp,
                                                   views=views), y, model.k,
                     model.config.seed)
    e = _embed(model.net, test, model.dims, amp, views=views)
    with torch.no_grad():
        return _head_proba(head, e, model.k, model.net).argmax(1).numpy()


def _intra(emb: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Mean squared distance of held-out 2-D embeddings to their class mean, per type and
    averaged, and the same relative to the mean squared distance between class means."""
    per = {c: float(np.mean(np.sum((emb[y == c] - emb[y == c].mean(0)) ** 2, 1)))
           for c in classes}
    means = np.stack([emb[y == c].mean(0) for c in classes])
    between = float(np.mean(np.sum((means - means.mean(0)) ** 2, 1)))
    mean = float(np.mean(list(per.values())))
    return {"mean": round(mean, 3), "between_class_means": round(between, 3),
            "ratio": round(mean / between, 3), "per_type": {k: round(v, 3) for k, v in
                                                             per.items()}}


def procrustes_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Procrustes disparity of two (n, 2) point sets: both centred and scaled to unit norm,
    ``b`` optimally rotated (and reflected) onto ``a``; 0 = same shape, 1 = unrelated."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    s = np.linalg.svd(a.T @ b, compute_uv=False)
    return float(1 - s.sum() ** 2)


def cmd_stability(args: argparse.Namespace) -> dict:
    import torch

    from slidecensus.models import GuidedConfig, predict_guided, train_guided

    torch.set_num_threads(1)
    crops, matched, labels = _load(args.crop_mode, args.crop_size)
    fold = _folds(labels, 5, 0)
    tr = np.flatnonzero((fold != 0) & matched)
    te = np.flatnonzero((fold == 0) & matched)
    embs, preds = [], []
    for seed in (1, 2):
        m = train_guided(crops[tr], labels[tr], GuidedConfig(epochs=args.epochs, seed=seed))
        cls, _, e2 = predict_guided(m, crops[te])
        embs.append(e2.astype(np.float64))
        preds.append(cls)
    raw = float(np.mean(np.linalg.norm(embs[0] - embs[1], axis=1)))
    res = {"test_cells": len(te), "procrustes_disparity": round(procrustes_distance(*embs), 4),
           "mean_point_distance_guide_units": round(raw, 3),
           "agreement_of_classes": round(float(np.mean(preds[0] == preds[1])), 3)}
    print(json.dumps(res))
    return res


def cmd_probe(args: argparse.Namespace) -> dict:
    """For the cell-model issue: an encoder of the guided network's shape trained without
    labels (NT-Xent on two augmented views, temperature 0.2, batch 2 x 64), then k-means
    (k = 8) purity of its unit-length features on the matched cells; does a finer crop of
    the same window help unsupervised clustering as it helps the guided model?"""
    import torch
    import torch.nn.functional as F
    from sklearn.cluster import KMeans

    from slidecensus.models.augment import AugmentSpec, augment
    from slidecensus.models.guided import CL, GuidedNet, _autocast, _to_input
    from slidecensus.models.metrics import purity

    torch.set_num_threads(1)
    crops, matched, labels = _load(args.crop_mode, args.crop_size)
    torch.manual_seed(args.seed)
    net = GuidedNet(64, 32).to(memory_format=CL)
    proj = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 64))
    opt = torch.optim.AdamW([*net.parameters(), *proj.parameters()], lr=2e-3,
                            weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    n = 64
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    for step in range(args.steps):
        x = _to_input(crops[rng.choice(len(crops), n, replace=False)])
        v = torch.cat([augment(x, gen, AugmentSpec()), augment(x, gen, AugmentSpec())])
        with _autocast(True):
            z = proj(net(v.contiguous(memory_format=CL)))
        z = F.normalize(z.float(), dim=1)
        sim = (z @ z.T / 0.2).fill_diagonal_(-1e9)
        loss = F.cross_entropy(sim, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(step, round(loss.item(), 3), flush=True)
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.no_grad(), _autocast(True):
        f = torch.cat([net(_to_input(crops[i:i + 256])).float()
                       for i in range(0, len(crops), 256)])
    f = F.normalize(f, dim=1).numpy()[matched]
    y = labels[matched]
    pur = [purity(y, KMeans(8, n_init=10, random_state=ks).fit_predict(f))
           for ks in range(3)]
    res = {"crop_size": args.crop_size, "steps": args.steps, "seed": args.seed,
           "kmeans_purity": [round(p, 3) for p in pur], "mean": round(float(np.mean(pur)), 3),
           "train_s": round(train_s, 1)}
    print(json.dumps(res), flush=True)
    return res


def cmd_dsvm(args: argparse.Namespace) -> dict:
    """The issue's third baseline: the InfoGAN (``fast`` preset, k = 8) trained without
    labels on the matched 32-px crops, its critic's Table-I features, and a linear SVM
    scored on the same 5 stratified folds as ``cv`` (macro and per-type F1)."""
    import torch
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from slidecensus.models import d_features, load_model, preset_config, train_infogan

    torch.set_num_threads(args.threads)
    crops, matched, labels = _load(args.crop_mode, 32)
    idx = np.flatnonzero(matched)
    cfg = preset_config("fast", k=8, seed=args.seed)
    ckpt = CACHE / f"guided-dsvm-s{args.seed}.pt"
    t0 = time.perf_counter()
    train_infogan(crops[idx], cfg, ckpt, resume=False)
    train_s = time.perf_counter() - t0
    feats = d_features(load_model(ckpt), crops[idx])
    y = labels[idx]
    classes = sorted(set(labels.tolist()))
    fold = _folds(labels, 5, 0)[idx]
    pred = np.array([""] * len(y), dtype=object)
    t1 = time.perf_counter()
    for f in range(5):
        clf = make_pipeline(StandardScaler(), LinearSVC(C=args.c, max_iter=5000))
        clf.fit(feats[fold != f], y[fold != f])
        pred[fold == f] = clf.predict(feats[fold == f])
    res = {"matched_only": _scores(y, pred, classes), "features": int(feats.shape[1]),
           "preset": "fast", "iterations": cfg.iterations, "train_s": round(train_s, 1),
           "svm_s": round(time.perf_counter() - t1, 1), "C": args.c}
    print(json.dumps(res), flush=True)
    return res


def cmd_speed(args: argparse.Namespace) -> dict:
    """Census-time classification rate of a guided model, cells/s on one thread: the
    network's forward pass in NCHW and channels-last, fp32 and bf16, and
    :func:`predict_guided` end to end (8-view averaging on and off), per crop size."""
    import torch

    from slidecensus.models import GuidedConfig, predict_guided, train_guided
    from slidecensus.models.guided import GuidedNet, _autocast

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    res: dict = {"threads": 1, "cells": args.cells, "torch": torch.__version__, "rows": []}

    def rate(fn, n: int) -> float:
        fn()  # warm-up (oneDNN picks its kernels)
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return n / best

    for size in args.sizes:
        x = torch.from_numpy(rng.uniform(-1, 1, (512, 3, size, size)).astype(np.float32))
        net = GuidedNet(8, 32, 8).eval()
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            n, xx = net.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            for amp in (False, True):
                def fwd(n=n, xx=xx, amp=amp):
                    with torch.no_grad(), _autocast(amp):
                        n(xx)
                res["rows"].append({"size": size, "what": "forward", "layout": layout,
                                    "dtype": "bf16" if amp else "fp32",
                                    "cells_per_s": round(rate(fwd, len(x)))})
                print(res["rows"][-1], flush=True)
        crops = rng.integers(0, 256, (256, size, size, 3), dtype=np.uint8)
        names = np.array(["lymphocyte", "monocyte"])[np.arange(256) % 2]
        model = train_guided(crops, names, GuidedConfig(epochs=1, crop_size=size,
                                                        min_steps_per_epoch=1))
        test = rng.integers(0, 256, (args.cells, size, size, 3), dtype=np.uint8)
        for views in (8, 4, 1):
            object.__setattr__(model.config, "views", views)
            r = rate(lambda m=model, t=test: predict_guided(m, t), len(test))
            res["rows"].append({"size": size, "what": "predict_guided",
                                "views": views,
                                "cells_per_s": round(r)})
            print(res["rows"][-1], flush=True)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    crop_help = "crop mode of the cached crops (default: the guided model's)"
    size_help = "crop size in px of the cached crops (the same 18 µm window)"
    s = sub.add_parser("crops")
    s.add_argument("--crop-mode", default=None, help=crop_help)
    s.add_argument("--crop-size", type=int, default=32, help=size_help)
    s = sub.add_parser("cv")
    s.add_argument("--crop-mode", default=None, help=crop_help)
    s.add_argument("--crop-size", type=int, default=32, help=size_help)
    s.add_argument("--stem", type=int, default=0,
                   help="input stages (conv + 2 x 2 pooling) before the 32-px layers")
    s.add_argument("--epochs", type=int, default=40)
    s.add_argument("--width", type=int, default=32)
    s.add_argument("--folds", type=int, default=5, help="folds run (of 5)")
    s.add_argument("--no-tta", action="store_true", help="no 8-view test-time averaging")
    s.add_argument("--views-too", default="",
                   help="also score each fold's network with these view counts, e.g. 2,4")
    s.add_argument("--one-view-too", action="store_true",
                   help="the same as --views-too 1 (added to any other counts)")
    s.add_argument("--w-rest", type=float, default=1.0,
                   help="weight of L_guide2D's norm of the dimensions beyond two")
    s.add_argument("--w-dist", type=float, default=1.0, help="weight of the distance loss")
    s.add_argument("--w-ce", type=float, default=None,
                   help="weight of the cross-entropy term next to the guided losses "
                        "(0: Gräbel et al.'s losses alone; default: GuidedConfig's)")
    s.add_argument("--heads", default=None,
                   help="candidate heads, e.g. knn5,mlp,softmax (default: GuidedConfig's)")
    s.add_argument("--tag", default="", help="suffix of the results file")
    s.add_argument("--methods", default="guided,ce",
                   help="guided, ce, guided-fp32, ce-fp32 (comma-separated)")
    s = sub.add_parser("stability")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--crop-mode", default=None, help=crop_help)
    s.add_argument("--crop-size", type=int, default=32, help=size_help)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    s.add_argument("--cells", type=int, default=2048)
    s.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("probe", help="unsupervised encoder + k-means purity (cell-model issue)")
    s.add_argument("--crop-mode", default=None, help=crop_help)
    s.add_argument("--crop-size", type=int, default=32, help=size_help)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tag", default="", help="suffix of the results file")
    s = sub.add_parser("dsvm", help="InfoGAN critic features + linear SVM, same folds")
    s.add_argument("--crop-mode", default=None, help=crop_help)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--c", type=float, default=0.01, help="the SVM's C")
    s.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    res = {"crops": cmd_crops, "cv": cmd_cv, "stability": cmd_stability,
           "speed": cmd_speed, "probe": cmd_probe, "dsvm": cmd_dsvm}[args.cmd](args)
    write_results(f"guided_{args.cmd}{getattr(args, 'tag', '')}", res)


if __name__ == "__main__":
    main()
