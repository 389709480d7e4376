"""Benchmarks of the cell model as a user meets it: through the CLI, on real and drawn cells.

Measured, never asserted. Sub-commands::

    python -m benchmarks.bench_cellmodel blood  [--k 8] [--preset auto]
    python -m benchmarks.bench_cellmodel speed  [--n 8192]
    python -m benchmarks.bench_cellmodel crops [--out CROPS.npz]
    python -m benchmarks.bench_cellmodel demo-crops [--out CROPS.npz]
    python -m benchmarks.bench_cellmodel ablation --data CROPS.npz [--iterations 600]

``blood``: the 1200 labelled blood cells of ../shared/data/blood-cells as a cohort of 1200
"slides" (µm/px 0.1, from the red cells' 7.5 µm), through ``slidecensus train --k 8`` with
default settings and ``slidecensus run --model``, timed, then ``run --no-classify`` for the
classified/unclassified time ratio. Each image's most central census cell gives its cluster;
purity, entropy and F-score are scored against the labels, next to raw-pixel k-means on the
same cells' window crops (cut by the census' own crop function) in the same run.

``speed``: Q's inference rate, one thread (cells/s per core), fp32 and bf16, for the fast
and paper networks; training iterations/s on every core, fp32 and bf16.

``crops``: the blood cells' census crops (every nucleus the segmenter finds, ``window``
and ``field`` modes, each image's label, and its most central nucleus) as an ``.npz``.

``ablation``: the fast preset with one change at a time on a labelled crop set (``.npz``
with ``field`` or ``crops``, ``labels`` and optionally ``window`` and a ``central`` mask
of the crops to score), purity and minutes for each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import run_cli, write_results  # noqa: E402

BLOOD = ROOT.parent / "shared" / "data" / "blood-cells"
CACHE = Path(os.environ.get("SLIDECENSUS_BENCH_CACHE", "/tmp/slidecensus-bench"))
#: µm per pixel of the blood-cell images: red cells (7.5 µm) span about 75 px.
BLOOD_MPP = 0.1




def _scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from slidecensus.models.metrics import entropy, f_score, purity

    return {"purity": purity(labels, clusters), "entropy": entropy(labels, clusters),
            "f_score": f_score(labels, clusters)}


def cmd_blood(args: argparse.Namespace) -> dict:
    import pandas as pd
    from skimage import io
    from sklearn.cluster import KMeans

    from slidecensus.models import load_model
    from slidecensus.nuclei.crops import extract_window_crops

    work = CACHE / "blood-cli"
    work.mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(BLOOD / "labels.csv")
    cohort = pd.DataFrame({"path": [str(BLOOD / p) for p in labels["path"]],
                           "slide_id": [Path(p).stem for p in labels["path"]],
                           "mpp": BLOOD_MPP})
    cohort.to_csv(work / "cohort.csv", index=False)
    model, run, plain = work / "model.pt", work / "run", work / "run-plain"
    res: dict = {"k": args.k, "preset": args.preset, "mpp": BLOOD_MPP}
    import shutil

    for p in (model,):
        p.unlink(missing_ok=True)
    for d in (run, plain):  # a finished run would resume: start both afresh
        shutil.rmtree(d, ignore_errors=True)
    norm = ("--stain-norm", args.stain_norm)
    res["stain_norm"] = args.stain_norm
    res["seed"] = args.seed
    target = ("--stain-target", args.stain_target) if args.stain_target else ()
    res["stain_target"] = args.stain_target
    res["train_s"] = run_cli("train", str(work / "cohort.csv"), "--out", str(model), "--k",
                          str(args.k), "--preset", args.preset, "--seed", str(args.seed),
                          *norm, *target)
    res["run_s"] = run_cli("run", str(work / "cohort.csv"), "--out", str(run), "--model",
                        str(model), *norm)
    res["run_no_classify_s"] = run_cli("run", str(work / "cohort.csv"), "--out", str(plain),
                                    "--no-classify", *norm)
    res["classified_over_unclassified"] = res["run_s"] / res["run_no_classify_s"]
    cfg = load_model(model).config
    res["model"] = {"preset": cfg.preset, "iterations": cfg.iterations, "width": cfg.width,
                    "crop_mode": cfg.crop_mode, "crop_window_um": cfg.crop_window_um}
    clusters, crops, y, missing = [], [], [], 0
    for sid, path, lab in zip(cohort["slide_id"], cohort["path"], labels["cell_type"],
                              strict=True):
        cells = pd.read_parquet(run / "cells" / f"{sid}.parquet")
        if cells.empty:
            missing += 1
            continue
        img = io.imread(path)[..., :3]
        h, w = img.shape[:2]
        i = int(np.argmin(np.hypot(cells["x_px"] - w / 2, cells["y_px"] - h / 2)))
        clusters.append(int(cells["cluster"].iloc[i]))
        crops.append(extract_window_crops(img, cells[["x_px", "y_px"]].to_numpy()[i:i + 1],
                                          cfg.crop_window_um / BLOOD_MPP)[0])
        y.append(lab)
    y, clusters = np.array(y), np.array(clusters)
    res["images_without_a_cell"] = missing
    res["q"] = _scores(y, clusters)
    x = np.stack(crops).reshape(len(crops), -1).astype(np.float32) / 255
    res["kmeans_raw_pixels"] = _scores(y, KMeans(args.k, n_init=10, random_state=0)
                                       .fit_predict(x))
    from slidecensus.models.metrics import contingency

    res["contingency"] = {"classes": np.unique(y).tolist(),
                          "table": contingency(y, clusters).tolist()}
    print(json.dumps({key: v for key, v in res.items() if key != "contingency"}, indent=1))
    return res


def cmd_speed(args: argparse.Namespace) -> dict:
    import torch

    from slidecensus.models import CellModel, predict, preset_config
    from slidecensus.models.train import (
        InfoGANTrainer,
        _RealBatches,
        build_networks,
        colour_branch,
    )

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    res: dict = {"infer_cells_per_s_one_thread": {}, "train_it_per_s_all_cores": {}}
    real_path = Path(args.crops)
    if real_path.exists():  # real census crops (the colour histograms' cost depends on
        real = np.load(real_path)["field"]  # how many bins a crop's pixels fall in)
        res["crops"] = f"{real_path.name}, tiled to {args.n}"
        crops = np.concatenate([real] * -(-args.n // len(real)))[:args.n]
    else:
        res["crops"] = "uniform random pixels (run `bench_cellmodel crops` for real ones)"
    from slidecensus.hardware import BF16_ENV, cpu_bf16_reason

    res["cpu_bf16"] = cpu_bf16_reason()
    res["cpu"] = _cpu_model()
    rows = [("fast", False, {}), ("fast", True, {}),
            ("fast", True, {"colour_soft": False, "colour_radii": (8.0, 14.0)}),
            ("paper", False, {}), ("paper", True, {})]
    for preset, amp, change in rows:
        # bf16 rows run bf16 even where it is emulated (the default then is fp32)
        os.environ[BF16_ENV] = "1" if amp else "0"
        cfg = preset_config(preset, amp_cpu=amp, **change)
        tag = f"{preset}_{'bf16' if amp else 'fp32'}" + ("_hard_colour" if change else "")
        nets = build_networks(cfg)
        mods = [nets[n].eval().requires_grad_(False) for n in ("G", "D_trunk", "D_head",
                                                                "Q_head")]
        model = CellModel(cfg, {}, *mods, device=torch.device("cpu"),
                          colour=colour_branch(cfg))
        torch.set_num_threads(1)
        n = args.n if preset == "fast" else max(256, args.n // 32)
        predict(model, crops[:256], batch_size=256)
        times = []  # the best of 3 (timeit's rule: the least disturbed run on a shared CPU)
        for _ in range(3):
            t = time.perf_counter()
            predict(model, crops[:n], batch_size=256)
            times.append(time.perf_counter() - t)
        rate = n / min(times)
        res["infer_cells_per_s_one_thread"][tag] = rate
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        gen = torch.Generator().manual_seed(0)
        tr = InfoGANTrainer(cfg, torch.device("cpu"), gen)
        data = torch.from_numpy(crops[:2048]).permute(0, 3, 1, 2).contiguous()
        b = _RealBatches(data, cfg.batch_size, True, gen)
        bi = _RealBatches(data, cfg.iic_batch, True, gen)
        steps = 20 if preset == "fast" else 1

        def one(tr=tr, b=b, bi=bi, cfg=cfg):
            for _ in range(cfg.n_critic):
                tr.critic_step(b.next())
            tr.generator_step()
            tr.q_step(bi.next() if cfg.lambda_iic > 0 else None)

        one()
        t = time.perf_counter()
        for _ in range(steps):
            one()
        res["train_it_per_s_all_cores"][tag] = (
            steps / (time.perf_counter() - t))
        print(preset, amp, rate, res["train_it_per_s_all_cores"], flush=True)
    res["threads_all_cores"] = len(os.sched_getaffinity(0))
    os.environ.pop(BF16_ENV, None)
    return res


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def cmd_crops(args: argparse.Namespace) -> dict:
    """Census crops of the blood cells for ``ablation``: every nucleus the segmenter finds
    in each image (as the census cuts them, in each crop mode), the image's label, and
    which nucleus is the image's most central one (the one that is scored)."""
    import pandas as pd
    from skimage import io

    from slidecensus.nuclei.crops import CROP_MODES, crops_for
    from slidecensus.nuclei.segment import segment_image

    labels = pd.read_csv(BLOOD / "labels.csv")
    modes = [m for m in CROP_MODES if m in ("window", "field")]
    parts: dict[str, list] = {m: [] for m in modes}
    y, central = [], []
    for path, lab in zip(labels["path"], labels["cell_type"], strict=True):
        img = io.imread(BLOOD / path)[..., :3]
        lab_img, table = segment_image(img, mpp=BLOOD_MPP)
        if table.empty:
            continue
        for m in modes:
            parts[m].append(crops_for(img, lab_img, table, m, BLOOD_MPP))
        h, w = img.shape[:2]
        c = int(np.argmin(np.hypot(table["x_px"] - w / 2, table["y_px"] - h / 2)))
        y += [lab] * len(table)
        central += [i == c for i in range(len(table))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{m: np.concatenate(v) for m, v in parts.items()},
             labels=np.array(y), central=np.array(central))
    return {"out": str(out), "nuclei": len(y), "images_scored": int(np.sum(central))}


def cmd_demo_crops(args: argparse.Namespace) -> dict:
    """Census crops of the demo's synthetic cohort (same seed, slides and µm/px as
    ``slidecensus demo``), each labelled with the drawn type of the nearest drawn nucleus
    (``""`` when none is within the demo's matching distance), for ``ablation`` and for
    offline comparisons of the cell model on cells whose types are known.

    ``--stain-target cohort`` cuts the crops from each slide Reinhard-normalised to the
    cohort's pooled style, as ``slidecensus demo`` (which trains that way) does."""
    import pandas as pd

    from slidecensus.demo import DEMO_MPP, MATCH_UM, match_truth
    from slidecensus.engine.plan import (
        cohort_stain_target,
        fit_slide_normalizer,
        slide_lab_stats,
    )
    from slidecensus.nuclei.crops import crops_for
    from slidecensus.nuclei.normalize import StainNorm, _rgb8
    from slidecensus.nuclei.segment import segment_image, stain_sample
    from slidecensus.tiling import open_slide
    from slidecensus.tiling.synth import synth_cohort

    cohort = pd.read_csv(synth_cohort(CACHE / "demo-slides", n_slides=4, size=(2048, 2048),
                                      seed=0, mpp=DEMO_MPP))
    target = (cohort_stain_target([slide_lab_stats(p, None) for p in cohort["path"]])
              if args.stain_target == "cohort" else None)
    parts, y, slide = [], [], []
    for path, sid in zip(cohort["path"], cohort["slide_id"], strict=True):
        with open_slide(path) as s:
            img = np.asarray(s.read_region(0, 0, 0, *s.levels[0].shape[1::-1]))[..., :3]
            crop_src = img
            if target is not None:  # the census' crops under the cohort's style, fitted
                norm, _ = fit_slide_normalizer(  # as the census fits each slide
                    StainNorm("reinhard", target=target), s, stain_sample(s, with_mask=False)[0])
                crop_src = _rgb8(norm(img))
        lab_img, table = segment_image(img, mpp=DEMO_MPP)
        truth = pd.read_parquet(Path(path).with_name(f"{sid}.cells.parquet"))
        parts.append(crops_for(crop_src, lab_img, table, "field", DEMO_MPP))
        y.append(match_truth(table[["x_px", "y_px"]].to_numpy(),
                             truth[["x_px", "y_px"]].to_numpy(),
                             truth["type"].astype(str).to_numpy(), MATCH_UM / DEMO_MPP))
        slide += [sid] * len(table)
    out = Path(args.out or CACHE / ("demo-census-crops"
                                    + ("-cohort" if target is not None else "") + ".npz"))
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = np.concatenate(y).astype(str)
    np.savez(out, field=np.concatenate(parts), labels=labels, slide=np.array(slide))
    return {"out": str(out), "nuclei": len(labels), "matched": int((labels != "").sum())}


def cmd_ablation(args: argparse.Namespace) -> dict:
    """Train on every crop of the set; score the crops marked ``central`` (all labelled
    ones when the set has no such mask)."""
    import torch

    from slidecensus.models import load_model, predict, preset_config, train_infogan

    d = np.load(args.data)
    labels = d["labels"]
    scored = (labels != "") & (d["central"] if "central" in d else True)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    variants = {
        "fast preset": {},
        "window crops (other nuclei white) instead of field": {"crops": "window"},
        "no colour histograms in Q": {"q_colour": False},
        "no IIC term (lambda_iic 0)": {"lambda_iic": 0.0, "over_k": 0, "lambda_nce": 0.0},
        "contrastive term (lambda_nce 1)": {"lambda_nce": 1.0},
        "no contrastive term (lambda_nce 0)": {"lambda_nce": 0.0},
        "no k-means refinement": {"refine": "none"},
        "k-means on unwhitened features (refine_pca 0)": {"refine_pca": 0},
        "hard colour bins over an 8 px disc, equal weights (the preset before)": {
            "colour_soft": False, "colour_radii": (8.0, 14.0), "refine_colour_weight": 1.0},
        "colour block weighted 1, not 2, in the k-means": {"refine_colour_weight": 1.0},
        "hard colour bins (soft off)": {"colour_soft": False},
        "8 k-means restarts, not 128": {"refine_restarts": 8},
        "no over-clustering head": {"over_k": 0},
        "no Q batch norm": {"q_norm": False},
        "no G bias at the data mean": {"g_bias_mean": False},
        "fp32 (no bf16 autocast)": {"amp_cpu": False},
        "paper's Adam for Q (lr 1e-4, betas 0.5/0.9)": {"lr_q": None, "betas_q": None,
                                                         "lr": 1e-4},
    }
    if args.only:
        variants = {key: v for key, v in variants.items() if key in args.only}
    rows = []
    for name, change in variants.items():
        change = dict(change)
        key = change.pop("crops", "field" if "field" in d else "crops")
        crops = d[key] if key in d else d["crops"]
        cfg = preset_config("fast", k=args.k, iterations=args.iterations, seed=args.seed,
                            **{k_: v for k_, v in change.items() if v is not None})
        if "lr_q" in change:  # None means "the paper's lr for Q too"
            import dataclasses

            cfg = dataclasses.replace(cfg, lr_q=None, betas_q=None)
        out = CACHE / "ablation.pt"
        t = time.perf_counter()
        train_infogan(crops, cfg, out, resume=False, log_every=10**6, progress=lambda r: None)
        minutes = (time.perf_counter() - t) / 60
        clusters, _ = predict(load_model(out), crops[scored])
        from slidecensus.models.metrics import purity

        rows.append({"change": name, "crops": key, "purity": purity(labels[scored], clusters),
                     "minutes": minutes})
        print(rows[-1], flush=True)
    return {"data": args.data, "k": args.k, "iterations": args.iterations, "seed": args.seed,
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("blood")
    s.add_argument("--k", type=int, default=8)
    s.add_argument("--preset", default="auto")
    s.add_argument("--stain-norm", default="reinhard",
                   help="passed to train and run (crops are cut from the normalised tiles)")
    s.add_argument("--seed", type=int, default=0, help="train's --seed (sample and networks)")
    s.add_argument("--stain-target", default=None,
                   help="train's --stain-target (e.g. cohort; run adopts the model's style)")
    s = sub.add_parser("speed")
    s.add_argument("--n", type=int, default=8192)
    s.add_argument("--crops", default=str(CACHE / "blood-census-crops.npz"),
                   help="real crops to time Q on (random pixels when the file is missing)")
    s = sub.add_parser("crops")
    s.add_argument("--out", default=str(CACHE / "blood-census-crops.npz"))
    s = sub.add_parser("demo-crops")
    s.add_argument("--out", default=None,
                   help="default: demo-census-crops[-cohort].npz in the cache")
    s.add_argument("--stain-target", default=None, choices=["cohort"],
                   help="crops in the cohort's pooled style, as slidecensus demo cuts them")
    s = sub.add_parser("ablation")
    s.add_argument("--data", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    s.add_argument("--k", type=int, default=8)
    s.add_argument("--iterations", type=int, default=600)
    s.add_argument("--only", nargs="*", default=None)
    args = p.parse_args(argv)
    res = {"blood": cmd_blood, "speed": cmd_speed, "crops": cmd_crops,
           "demo-crops": cmd_demo_crops,
           "ablation": cmd_ablation}[args.cmd](args)
    seed = getattr(args, "seed", 0) if args.cmd == "blood" else 0
    tag = "_cohort" if getattr(args, "stain_target", None) == "cohort" else ""
    write_results(f"cellmodel_{args.cmd}" + (f"_seed{seed}" if seed else "") + tag, res)


if __name__ == "__main__":
    main()
