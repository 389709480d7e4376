"""Cluster galleries: what each of Q's clusters looks like, to name it.

One PNG per run, one row per cluster: real crops sampled (seeded) from the census' crop
sample across all slides (Hu et al., Fig. 8) beside the generator's images for that
categorical code (Fig. 5), with the cluster's name and its share of the cohort's cells.
Beside it, a ``clusters.toml`` template is written when the user has none yet.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np

from ..engine.results import RunResults
from ..errors import InvalidInputError
from .clusters import CLUSTER_FILE, cluster_colors, cluster_label, template_text

log = logging.getLogger(__name__)

__all__ = ["crop_mosaic", "make_gallery", "sample_by_cluster"]


def sample_by_cluster(clusters: np.ndarray, k: int, n: int, seed: int = 0
                      ) -> list[np.ndarray]:
    """For each cluster, up to ``n`` indices into ``clusters`` drawn without replacement
    (seeded, so the gallery is the same on every run)."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(k):
        idx = np.flatnonzero(clusters == j)
        out.append(np.sort(rng.choice(idx, min(n, idx.size), replace=False)))
    return out


def crop_mosaic(crops: np.ndarray, columns: int, pad: int = 2, rows: int | None = None,
                background: int = 200) -> np.ndarray:
    """Crops (n, h, w, 3) tiled row by row, ``columns`` wide (at least ``rows``), on a grey
    grid so that crops with a white (masked) surround stay distinct."""
    n, h, w = crops.shape[:3] if len(crops) else (0, 32, 32)
    rows = max(rows or 0, -(-n // columns), 1)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), background,
                  np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h,
            pad + c * (w + pad): pad + c * (w + pad) + w] = crops[i]
    return out


def _generated(model_path: str, n: int, seed: int) -> list[np.ndarray] | None:
    """G's images per code: a list over clusters of (n, 32, 32, 3) uint8."""
    from ..engine.modelfiles import local_model
    from ..models import generation_grid, load_model

    model = load_model(local_model(model_path), device="cpu")
    grid = generation_grid(model, n_rows=n, seed=seed, pad=0)
    return [np.stack([grid[r * 32:(r + 1) * 32, j * 32:(j + 1) * 32] for r in range(n)])
            for j in range(model.k)]


def make_gallery(run: str | RunResults, *, model: str | None = None, per_cluster: int = 24,
                 generated: int = 8, columns: int = 12, seed: int = 0,
                 slides: Sequence[str] | None = None) -> str:
    """Write ``DIR/gallery.png`` (and a ``clusters.toml`` template if none); returns its path.

    Parameters
    ----------
    model : checkpoint for the generator's columns; default the run's own model when it is
        still where the run found it; without one the gallery shows real crops only.
    per_cluster : real crops per cluster (from the run's seeded crop sample).
    generated : generator images per cluster (0: real crops only).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = run if isinstance(run, RunResults) else RunResults(run)
    k = res.k
    if k == 0:
        raise InvalidInputError(f"{res.out.location} was run without a model: no clusters")
    crops, clusters = [], []
    for sid in res.ok_slides(slides)["slide_id"]:
        c, cl = res.crop_sample(sid)
        crops.append(c)
        clusters.append(cl)
    crops_all = np.concatenate(crops) if crops else np.zeros((0, 32, 32, 3), np.uint8)
    clusters_all = np.concatenate(clusters) if clusters else np.zeros(0, np.int64)
    picks = sample_by_cluster(clusters_all, k, per_cluster, seed)
    model = model or res.model_path()
    # a guided model has no generator: its rows are named by the model's types
    gen = (_generated(model, generated, seed) if model and generated > 0 and not res.guided
           else None)
    if gen is not None and len(gen) != k:
        raise InvalidInputError(f"model {model} has {len(gen)} codes but the run has {k} "
                                f"clusters")
    totals = res.cluster_totals()
    shares = totals / max(int(totals.sum()), 1)
    colors = cluster_colors(k, res.names)
    real_rows = max(1, -(-per_cluster // columns))
    gen_cols = max(1, -(-generated // real_rows))
    fig = Figure(figsize=(1.0 + 0.5 * columns + (0.5 * gen_cols + 0.3 if gen else 0),
                          0.35 + 0.55 * real_rows * k), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(k, 2 if gen else 1,
                            width_ratios=[columns, gen_cols + 0.5] if gen else None)
    for j in range(k):
        ax = fig.add_subplot(grid[j, 0])
        ax.imshow(crop_mosaic(crops_all[picks[j]], columns, rows=real_rows),
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_color(np.asarray(colors[j]) / 255)
            side.set_linewidth(3)
        name = f"{j}: {res.names[j]}" if j in res.names else cluster_label(j, res.names)
        ax.set_ylabel(f"{name}\n{totals[j]:,} cells\n({shares[j]:.1%})", rotation=0,
                      ha="right", va="center", fontsize=8)
        if not picks[j].size:
            ax.text(0.5, 0.5, "no cells in this cluster", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="0.3")
        if j == 0:
            ax.set_title("real crops (census sample)", fontsize=9)
        if gen:
            gx = fig.add_subplot(grid[j, 1])
            gx.imshow(crop_mosaic(gen[j], gen_cols, rows=real_rows), interpolation="nearest")
            gx.set_xticks([])
            gx.set_yticks([])
            if j == 0:
                gx.set_title("generator G(z, c)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    res.out.write_bytes("gallery.png", buf.getvalue())
    if not res.guided and not res.out.exists(CLUSTER_FILE):
        res.out.write_bytes(CLUSTER_FILE, template_text(k, shares.tolist()).encode())
        log.info("wrote a %s template: name the clusters there", CLUSTER_FILE)
    return res.out.path("gallery.png")
