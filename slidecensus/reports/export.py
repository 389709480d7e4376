"""Cell exports a pathologist can open: QuPath GeoJSON of every classified cell.

QuPath imports a GeoJSON ``FeatureCollection`` whose features carry ``properties.objectType``
(``detection``), ``properties.classification`` (``name`` and ``color`` as [r, g, b]) and
``properties.measurements``; coordinates are level-0 pixels with the origin at the top-left
corner of the top-left pixel. Cells are written as points at the nucleus centroid (the
census keeps centroids, not outlines), named and coloured by cluster via ``clusters.toml``,
with the nucleus measurements and Q's probabilities attached. Files are streamed, so a slide
of a million cells never holds its whole document in memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine.cohort import safe_name
from ..engine.outputs import OutputDir
from ..engine.results import RunResults
from ..nuclei.geojson import GeoJSONWriter, write_geojson
from ..nuclei.outlines import outline_geometry
from .clusters import cluster_colors, cluster_label

log = logging.getLogger(__name__)

__all__ = ["GeoJSONWriter", "cell_features", "export_geojson", "write_geojson"]

#: Cell-table columns carried into QuPath as measurements (when present).
MEASUREMENTS = ("area_um2", "eccentricity", "solidity", "mean_hematoxylin", "mean_eosin")

_UNCLASSIFIED_COLOR = (120, 120, 120)


def cell_features(cells: pd.DataFrame, k: int, names: dict[int, str] | None = None
                  ) -> Iterator[dict]:
    """One GeoJSON Feature per cell, classified by its cluster (pure; streams).

    ``cells`` needs ``x_px, y_px`` (level-0 centroid, pixel-centre convention as
    ``regionprops`` reports it) and optionally ``cluster``, ``p_0..p_{k-1}``, ``cell_id``
    and the shape/stain features. A cell is a Point at its centroid, or its nucleus outline
    (a Polygon) when the table has ``outline_px`` (a census run with ``--outlines``).
    """
    names = names or {}
    colors = cluster_colors(k, names) if k else []
    cluster = (cells["cluster"].to_numpy(np.int64) if "cluster" in cells
               else np.full(len(cells), -1, np.int64))
    x = cells["x_px"].to_numpy(np.float64) + 0.5  # QuPath: pixel i spans [i, i + 1)
    y = cells["y_px"].to_numpy(np.float64) + 0.5
    meas_cols = [c for c in MEASUREMENTS if c in cells]
    prob_cols = [f"p_{j}" for j in range(k) if f"p_{j}" in cells]
    meas = cells[meas_cols + prob_cols].to_numpy(np.float64) if meas_cols or prob_cols else None
    ids = cells["cell_id"].to_numpy(np.int64) if "cell_id" in cells else np.arange(len(cells))
    labels = {j: cluster_label(j, names) for j in range(-1, k)}
    outlines = cells["outline_px"].to_numpy() if "outline_px" in cells else None
    for i in range(len(cells)):
        c = int(cluster[i])
        props: dict = {"objectType": "detection", "name": f"cell {ids[i]}"}
        if 0 <= c < k:
            props["classification"] = {"name": labels[c], "color": list(colors[c])}
        m = {"cluster": c}
        if meas is not None:
            row = meas[i]
            for name, v in zip(meas_cols + prob_cols, row, strict=True):
                if np.isfinite(v):
                    m[name] = round(float(v), 5)
        props["measurements"] = m
        if outlines is not None:
            geom = outline_geometry(np.asarray(outlines[i], np.float64).reshape(-1, 2),
                                    x[i] - 0.5, y[i] - 0.5)
        else:
            geom = {"type": "Point", "coordinates": [round(float(x[i]), 2),
                                                     round(float(y[i]), 2)]}
        yield {"type": "Feature", "geometry": geom, "properties": props}


def _commit(out: OutputDir, rel: str, local_file: Path) -> None:
    """Move a finished local file into the run folder atomically (rename or one PUT)."""
    if out.local:
        target = Path(out.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_file, target)
    else:
        out.fs.put_file(str(local_file), out.path(rel))


def export_geojson(run: str | RunResults, *, slides: Sequence[str] | None = None) -> list[str]:
    """Write ``DIR/qupath/<slide>.geojson`` for each completed slide; returns their paths.

    Each file is written aside and renamed into place, so a half-written export never
    looks complete.
    """
    res = run if isinstance(run, RunResults) else RunResults(run)
    written = []
    for sid in res.ok_slides(slides)["slide_id"]:
        rel = f"qupath/{safe_name(sid)}.geojson"
        cells = res.cells(sid)
        parent = Path(res.out.path("qupath")) if res.out.local else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".geojson.", suffix=".tmp", dir=parent)
        os.close(fd)
        try:
            n = write_geojson(cell_features(cells, res.k, res.names), tmp)
            _commit(res.out, rel, Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("%s: %d cells -> %s", sid, n, res.out.path(rel))
        written.append(res.out.path(rel))
    return written
