"""Embedding maps: a guided run's cells on the guide map (Gräbel et al.).

Each cell of a run classified with a guided model has a position ``emb_x, emb_y`` on the
2-D guide map. :func:`make_embedmap` draws a seeded sample of them, coloured by their
predicted type, over the guide: each type's guide point (labelled) and each lineage's axis
from the centre outwards by maturity, for one slide or the whole cohort. Cells close to
their type's point were placed confidently; cells between two points lie between types.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from ..engine.cohort import safe_name
from ..engine.results import RunResults
from ..errors import InvalidInputError
from ..models.guided import Guide
from .clusters import cluster_colors

__all__ = ["make_embedmap", "sample_cells"]


def sample_cells(cells: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """At most ``n`` rows of ``cells`` drawn without replacement (seeded), in row order."""
    if n < 1:
        raise InvalidInputError(f"n must be >= 1, got {n}")
    if len(cells) <= n:
        return cells.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).choice(len(cells), n, replace=False))
    return cells.iloc[keep].reset_index(drop=True)


def make_embedmap(run: str | RunResults, *, slide: str | None = None, out: str | None = None,
                  n: int = 5000, seed: int = 0) -> str:
    """Write the embedding map PNG of one slide (``slide``) or of the cohort; returns where.

    ``out`` defaults to ``DIR/embedmap.png`` (``DIR/embedmap-<slide>.png`` for one slide).

    Raises
    ------
    InvalidInputError
        The run was not classified with a guided model, or the slide is unknown.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = run if isinstance(run, RunResults) else RunResults(run)
    cfg = res.manifest.get("model_config") or {}
    if not res.guided or not cfg.get("guide"):
        raise InvalidInputError(f"{res.out.location} was not classified with a guided model "
                                f"(train one with `slidecensus train --labels`): no guide map")
    guide = Guide.from_dict(cfg["guide"])
    types = res.types
    ids = res.ok_slides([slide] if slide else None)["slide_id"].tolist()
    cols = ["cluster", "emb_x", "emb_y"]
    parts = []
    for sid in ids:
        t = res.cells(sid)
        if len(t) and all(c in t for c in cols):
            parts.append(t[cols])
    cells = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    cells = cells[cells["cluster"] >= 0]
    sample = sample_cells(cells, n, seed) if len(cells) else cells
    colors = np.asarray(cluster_colors(len(types), res.names), float) / 255
    fig = Figure(figsize=(7.5, 6.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, name in enumerate(types):
        pick = sample["cluster"].to_numpy() == j
        if pick.any():
            ax.scatter(sample["emb_x"].to_numpy()[pick], sample["emb_y"].to_numpy()[pick],
                       s=4, color=colors[j], alpha=0.5, linewidths=0,
                       label=f"{name} ({int((cells['cluster'] == j).sum()):,})")
    for pts in guide.lineages().values():  # each lineage's axis, from the centre outwards
        xs = [0.0] + [p.x for p in pts]
        ys = [0.0] + [p.y for p in pts]
        ax.plot(xs, ys, color="0.45", lw=1, zorder=1)
    by = {name: j for j, name in enumerate(types)}
    for p in guide.points:
        c = colors[by[p.name]] if p.name in by else (0.3, 0.3, 0.3)
        ax.scatter([p.x], [p.y], s=90, marker="*", color=c, edgecolors="black",
                   linewidths=0.8, zorder=3)
        ax.annotate(p.name, (p.x, p.y), xytext=(4, 4), textcoords="offset points",
                    fontsize=8, zorder=4)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("guide map x")
    ax.set_ylabel("guide map y")
    where = f"slide {slide}" if slide else f"{len(ids)} slides"
    ax.set_title(f"Cells on the guide map: {len(sample):,} of {len(cells):,} ({where})",
                 fontsize=10)
    if len(sample):
        ax.legend(fontsize=7, markerscale=3, loc="best", framealpha=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    if out is None:
        rel = f"embedmap-{safe_name(slide)}.png" if slide else "embedmap.png"
        res.out.write_bytes(rel, buf.getvalue())
        return res.out.path(rel)
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(buf.getvalue())
    return str(out)

