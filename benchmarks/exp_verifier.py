"""Experiment: can a supervised object verifier lift bone-marrow F1 above 0.88?

Run (about 6 min on 2 cores):

    python -m benchmarks.exp_verifier [--threshold 150] [--epochs 20]

The detection errors left by ``segment_image`` look like annotation convention (see
``benchmarks/seg_errors.py``). This measures the most that learning that convention from the
annotations could buy, as an upper bound and not as a shipped method: candidates from a more
permissive threshold (150 instead of 135, recall 0.953) are cut to 48 x 48 windows of the
hematoxylin and eosin concentrations plus the object's mask at the working resolution; a
small CNN (4 conv layers, about 65k weights, flips and quarter turns) learns "this candidate
matches an annotation" leave-one-patient-out (5 patients, train on 4, score the fifth); the
candidates scoring below a cut are dropped. The cut is swept over all images after the fact,
so the best row is an oracle; F1 is counted as in bench_segment.

Results go to ``benchmarks/results/exp_verifier.json``; figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np

from benchmarks.harness import write_results
from slidecensus.nuclei.scoring import match_points
from slidecensus.nuclei.segment import SegmentParams, _bin_rgb, segment_image
from slidecensus.nuclei.stain import estimate_stain_model, stain_concentrations

DATA = Path(os.environ.get("SLIDECENSUS_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))
R = 24  # half window at the working resolution (24 µm field at 0.5 µm/px)


def candidates(threshold: float) -> dict[str, dict]:
    """Per image: candidate windows (n, 3, 2R, 2R), matched flags, annotation count."""
    import imageio.v3 as iio

    bm = DATA / "bone-marrow-he"
    params = dataclasses.replace(SegmentParams(), hematoxylin_threshold=threshold)
    out = {}
    for p in sorted((bm / "images").glob("*.png")):
        rgb = iio.imread(p)[..., :3]
        ann = np.loadtxt(bm / "annotations" / f"{p.stem}.txt", skiprows=1)
        model = estimate_stain_model(rgb)
        labels, table = segment_image(rgb, params=params, stain_model=model)
        f = params.for_mpp(None).bin
        h, e = stain_concentrations(_bin_rgb(rgb, f), model)
        lab = labels[::f, ::f]
        xy = table[["x_px", "y_px"]].to_numpy()
        md, _ = match_points(xy, ann[:, :2], 12.0)
        y = np.zeros(len(xy), bool)
        y[md] = True
        hp, ep, lp = (np.pad(a, R, mode=m) for a, m in
                      ((h, "reflect"), (e, "reflect"), (lab, "constant")))
        win = np.zeros((len(xy), 3, 2 * R, 2 * R), np.float32)
        for i, (cx, cy) in enumerate(np.rint(xy / f).astype(int) + R):
            sl = (slice(cy - R, cy + R), slice(cx - R, cx + R))
            win[i, 0], win[i, 1] = hp[sl], ep[sl]
            win[i, 2] = lp[sl] == table["cell_id"].iloc[i]
        out[p.stem] = {"x": win, "y": y, "annotated": len(ann)}
        print(p.stem, len(xy), int(y.sum()), len(ann), flush=True)
    return out


def _net():
    import torch.nn as nn

    def block(i, o, pool=True):
        layers = [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64, False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(64, 1))


def leave_one_patient_out(data: dict[str, dict], epochs: int, seed: int) -> dict[str, np.ndarray]:
    """Scores of every candidate from a model that never saw its patient."""
    import torch
    import torch.nn.functional as F

    patient = {n: n.split("_")[3] for n in data}
    scores = {}
    for held in sorted(set(patient.values())):
        train = [n for n in data if patient[n] != held]
        x = torch.tensor(np.concatenate([data[n]["x"] for n in train]))
        y = torch.tensor(np.concatenate([data[n]["y"] for n in train])).float()
        torch.manual_seed(seed)
        gen = np.random.default_rng(seed)
        net = _net()
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs):
            net.train()
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                b = perm[i : i + 64]
                xb = torch.rot90(x[b], int(gen.integers(4)), (2, 3))
                if gen.random() < 0.5:
                    xb = xb.flip(3)
                loss = F.binary_cross_entropy_with_logits(net(xb).squeeze(1), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            for n in data:
                if patient[n] == held:
                    xt = torch.tensor(data[n]["x"])
                    s = sum(torch.sigmoid(net(torch.rot90(xt, k, (2, 3)))).squeeze(1)
                            for k in range(4)) / 4
                    scores[n] = s.numpy()
        print("patient", held, "scored", flush=True)
    return scores


def _f1(m: float, d: float, a: float) -> float:
    p, r = (m / d if d else 0.0), m / a
    return 2 * p * r / (p + r) if p + r else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=150.0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data = candidates(args.threshold)
    scores = leave_one_patient_out(data, args.epochs, args.seed)
    rows = []
    for cut in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        tot, per = np.zeros(3), {}
        for n, d in data.items():
            keep = scores[n] >= cut
            c = np.array([(d["y"] & keep).sum(), keep.sum(), d["annotated"]], float)
            tot += c
            per[n] = _f1(*c)
        rows.append({"cut": cut, "f1": _f1(*tot), "precision": tot[0] / tot[1],
                     "recall": tot[0] / tot[2], "per_image": per})
        print(f"cut {cut:.1f}: F1 {rows[-1]['f1']:.4f} P {rows[-1]['precision']:.3f} "
              f"R {rows[-1]['recall']:.3f}", flush=True)
    write_results("exp_verifier", {"threshold": args.threshold, "epochs": args.epochs,
                                   "seed": args.seed, "cuts": rows})


if __name__ == "__main__":
    main()
