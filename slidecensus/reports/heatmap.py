"""Proportion heatmaps: where on each slide the chosen cell types (say blasts) are.

For each completed slide of a run, the proportion of the chosen clusters among the
classified cells of every census region, drawn over the slide's thumbnail with a colour
bar and a scale bar in µm; regions without tissue or with too few cells are left
transparent, because a proportion of 2 cells is noise. The same map is written as an
OME-Zarr image (NGFF 0.5, scale in µm) for napari and other viewers, and as QuPath
tiles (GeoJSON with a measurement per region), plus a cohort overview sheet and a
``summary.csv`` of each slide's overall, 90th-percentile and hottest-region proportion.

The science is in :func:`selected_proportion` and :func:`hotspot` (arrays in, arrays out);
the rest renders and writes.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..engine.cohort import safe_name
from ..engine.results import RunResults
from ..errors import InvalidInputError, SlidecensusError
from .clusters import cluster_label, parse_cluster_selection

log = logging.getLogger(__name__)

__all__ = [
    "HeatmapParams",
    "hotspot",
    "make_heatmaps",
    "nice_scale_length",
    "render_heatmap",
    "render_overview",
    "selected_proportion",
    "write_ome_zarr_map",
]

#: Colour map of every heatmap: perceptually uniform and readable with colour-vision
#: deficiencies (Nuñez et al. 2018), dark-to-light so hot regions stand out on H&E.
COLORMAP = "cividis"


@dataclass(frozen=True)
class HeatmapParams:
    """How maps are drawn: which regions are shown and the colour scale."""

    min_cells: int = 20
    """Regions with fewer classified cells are transparent (too few for a proportion)."""
    min_tissue: float = 0.05
    """Regions with a smaller tissue fraction are transparent."""
    vmax: float | None = None
    """Top of the colour scale; None: the cohort's 99th percentile, rounded up to 0.05,
    shared by every slide of the run so that their colours compare."""
    alpha: float = 0.6
    """Opacity of the map over the thumbnail (the tissue stays visible beneath)."""
    thumbnail_px: int = 1600

    def __post_init__(self) -> None:
        if self.min_cells < 1:
            raise InvalidInputError(f"min_cells must be >= 1, got {self.min_cells}")
        if not 0 <= self.min_tissue <= 1:
            raise InvalidInputError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.vmax is not None and not 0 < self.vmax <= 1:
            raise InvalidInputError(f"vmax must be in (0, 1], got {self.vmax}")


def selected_proportion(counts: np.ndarray, clusters: Sequence[int], *, min_cells: int = 20,
                        tissue: np.ndarray | None = None, min_tissue: float = 0.0
                        ) -> np.ndarray:
    """Per region, the fraction of classified cells that fall in ``clusters``.

    Parameters
    ----------
    counts : (rows, cols, k) integer counts per region and cluster.
    clusters : cluster ids whose cells are summed (e.g. both blast codes).
    min_cells : regions with fewer classified cells are NaN.
    tissue : optional (rows, cols) tissue fraction; regions below ``min_tissue`` are NaN.

    Returns
    -------
    (rows, cols) float64 in [0, 1], NaN where no proportion is shown.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise InvalidInputError(f"counts must be (rows, cols, k), got shape {counts.shape}")
    k = counts.shape[2]
    ids = np.asarray(list(clusters), np.int64)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= k:
        raise InvalidInputError(f"clusters {list(clusters)} outside 0..{k - 1}")
    total = counts.sum(axis=2).astype(np.float64)
    chosen = counts[..., ids].sum(axis=2).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        prop = chosen / total
    hide = total < min_cells
    if tissue is not None:
        hide |= np.asarray(tissue) < min_tissue
    prop[hide] = np.nan
    return prop


def hotspot(prop: np.ndarray, region_um: float) -> tuple[float, float, float]:
    """(proportion, x_um, y_um) of the hottest shown region (centre); NaNs when none."""
    if not np.isfinite(prop).any():
        return math.nan, math.nan, math.nan
    iy, ix = np.unravel_index(np.nanargmax(prop), prop.shape)
    return float(prop[iy, ix]), (ix + 0.5) * region_um, (iy + 0.5) * region_um


def nice_scale_length(span_um: float, fraction: float = 0.2) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^n µm) close to ``fraction`` of the span."""
    if span_um <= 0:
        raise InvalidInputError(f"span must be positive, got {span_um}")
    target = span_um * fraction
    exp = math.floor(math.log10(target))
    best = 10.0 ** exp
    for m in (1, 2, 5, 10):
        if m * 10.0 ** exp <= target:
            best = m * 10.0 ** exp
    return best


def _format_um(length_um: float) -> str:
    return f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"


def _draw_map(ax, prop: np.ndarray, region_um: float, extent_um: tuple[float, float],
              thumbnail: np.ndarray | None, vmax: float, alpha: float, scale_bar: bool):
    """Thumbnail at its true aspect, the map over it; returns the map's image artist."""
    import matplotlib as mpl

    width_um, height_um = extent_um
    if thumbnail is not None:
        ax.imshow(thumbnail, extent=(0, width_um, height_um, 0), interpolation="antialiased")
    else:
        ax.set_facecolor("#f4f2f6")
    rows, cols = prop.shape
    cmap = mpl.colormaps[COLORMAP].with_extremes(bad=(0, 0, 0, 0))
    im = ax.imshow(np.ma.masked_invalid(prop), extent=(0, cols * region_um, rows * region_um, 0),
                   cmap=cmap, vmin=0.0, vmax=vmax, alpha=alpha, interpolation="nearest")
    ax.set_xlim(0, width_um)
    ax.set_ylim(height_um, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if scale_bar:
        from matplotlib.font_manager import FontProperties
        from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

        length = nice_scale_length(width_um)
        bar = AnchoredSizeBar(ax.transData, length, _format_um(length), "lower left",
                              pad=0.4, borderpad=0.6, sep=4, frameon=True,
                              size_vertical=max(height_um, width_um) / 150,
                              fontproperties=FontProperties(size=9))
        bar.patch.set_alpha(0.8)
        ax.add_artist(bar)
    return im


def render_heatmap(prop: np.ndarray, region_um: float, extent_um: tuple[float, float], *,
                   thumbnail: np.ndarray | None, title: str, label: str, vmax: float = 1.0,
                   alpha: float = 0.7) -> bytes:
    """One slide's map over its thumbnail as PNG bytes (colour bar, scale bar, title).

    ``extent_um`` is the slide's (width, height) in µm; the thumbnail is drawn over exactly
    that extent, so it is never stretched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width_um, height_um = extent_um
    aspect = height_um / width_um
    fig_w = 7.5
    fig_h = min(max(fig_w * 0.8 * aspect + 0.9, 3.0), 14.0)
    fig = Figure(figsize=(fig_w, fig_h), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = _draw_map(ax, prop, region_um, extent_um, thumbnail, vmax, alpha, scale_bar=True)
    ax.set_title(title, fontsize=10)
    return _with_colorbar_png(fig, im, ax, label, shrink=0.85, pad=0.02)


def _with_colorbar_png(fig, im, axes, label: str, shrink: float, pad: float) -> bytes:
    """Add the labelled, opaque colour bar of ``im`` beside ``axes``; the figure as PNG."""
    cbar = fig.colorbar(im, ax=axes, shrink=shrink, pad=pad)
    cbar.set_label(label, fontsize=9)
    cbar.solids.set_alpha(1.0)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_overview(panels: Sequence[dict], *, label: str, vmax: float, alpha: float = 0.7,
                    columns: int | None = None) -> bytes:
    """All slides side by side on one sheet with one shared colour bar (PNG bytes).

    Each panel is a dict with ``prop``, ``region_um``, ``extent_um``, ``thumbnail`` and
    ``title``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    if n == 0:
        raise InvalidInputError("no slides to draw")
    cols = columns or min(n, max(1, math.ceil(math.sqrt(n * 1.5))))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols + 1.2, 2.7 * rows + 0.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax, panel in zip(axes.flat, panels, strict=False):
        im = _draw_map(ax, panel["prop"], panel["region_um"], panel["extent_um"],
                       panel["thumbnail"], vmax, alpha, scale_bar=True)
        ax.set_title(panel["title"], fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    return _with_colorbar_png(fig, im, axes, label, shrink=0.6, pad=0.01)


def write_ome_zarr_map(url: str, prop: np.ndarray, region_um: float, mpp: float, name: str
                       ) -> None:
    """The map as an OME-Zarr image (NGFF 0.5 on Zarr v3): one float32 level, y/x axes in
    micrometres, translated so that it overlays the slide opened at ``mpp`` in a viewer.

    NaN marks regions without a shown proportion (also the array's fill value).
    """
    import zarr

    translate = (region_um - mpp) / 2.0  # region centre in the slide's pixel-centre frame
    root = zarr.open_group(url, mode="w", zarr_format=3)
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                     {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [float(region_um), float(region_um)]},
                {"type": "translation", "translation": [translate, translate]}]}],
        }],
    }
    arr = root.create_array("0", shape=prop.shape, dtype=np.float32,
                            chunks=tuple(min(s, 1024) for s in prop.shape),
                            fill_value=np.float32(np.nan), dimension_names=("y", "x"))
    arr[:] = prop.astype(np.float32)


def regions_geojson(prop: np.ndarray, counts_total: np.ndarray, region_um: float, mpp: float,
                    measurement: str) -> dict:
    """Shown regions as QuPath tiles (level-0 px squares) with the proportion and the cell
    count as measurements, so QuPath's measurement maps colour them."""
    edge = region_um / mpp
    features = []
    rows, cols = prop.shape
    for iy in range(rows):
        for ix in range(cols):
            v = prop[iy, ix]
            if not np.isfinite(v):
                continue
            x0, y0, x1, y1 = ix * edge, iy * edge, (ix + 1) * edge, (iy + 1) * edge
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[
                    [x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": {"objectType": "tile", "measurements": {
                    measurement: round(float(v), 6), "cells": int(counts_total[iy, ix])}},
            })
    return {"type": "FeatureCollection", "features": features}


def _thumbnail(path: str, mpp: float | None, max_px: int) -> np.ndarray | None:
    from ..tiling import open_slide

    try:
        with open_slide(path, mpp=mpp) as slide:
            return slide.thumbnail(max_px)
    except (SlidecensusError, OSError) as exc:
        log.warning("no thumbnail for %s (%s); drawing the map alone", path, exc)
        return None


def make_heatmaps(run: str | RunResults, clusters: str | Sequence[int], *,
                  name: str | None = None, slides: Sequence[str] | None = None,
                  params: HeatmapParams | None = None) -> pd.DataFrame:
    """Draw and write the heatmaps of a run; returns the per-slide summary table.

    Writes ``DIR/heatmaps/<name>/``: ``<slide>.png``, ``<slide>.ome.zarr``,
    ``<slide>.regions.geojson``, ``overview.png`` and ``summary.csv`` (``slide_id, label,
    n_classified, proportion, p90_region, max_region, hotspot_x_um, hotspot_y_um,
    regions_shown``).

    Parameters
    ----------
    run : the census folder (or an opened :class:`RunResults`).
    clusters : ids (``"1,4"`` or a list) or names from ``clusters.toml``.
    name : what the map shows (``blast``); default: the clusters' names joined.
    slides : only these slide ids (default: every completed slide).
    """
    import json

    params = params or HeatmapParams()
    res = run if isinstance(run, RunResults) else RunResults(run)
    if res.k == 0:
        raise InvalidInputError(f"{res.out.location} was run without a model: there are no "
                                f"clusters to map (rerun with --model)")
    ids = (parse_cluster_selection(clusters, res.k, res.names) if isinstance(clusters, str)
           else parse_cluster_selection(",".join(map(str, clusters)), res.k, res.names))
    if name is None:
        name = "+".join(dict.fromkeys(cluster_label(j, res.names) for j in ids))
    folder = f"heatmaps/{safe_name(name)}"
    rows = res.ok_slides(slides)
    if rows.empty:
        raise InvalidInputError(f"no completed slides in {res.out.location}")
    label = f"{name} proportion per region"
    maps, summary = [], []
    for _, row in rows.iterrows():
        sid = row["slide_id"]
        ds = res.census(sid)
        counts = ds["counts"].to_numpy()
        prop = selected_proportion(counts, ids, min_cells=params.min_cells,
                                   tissue=ds["tissue"].to_numpy(), min_tissue=params.min_tissue)
        region_um = float(ds.attrs["region_um"])
        mpp = float(ds.attrs["mpp"])
        h_px, w_px = ds.attrs["shape_px"]
        total = counts.sum(axis=2)
        n_cls = int(total.sum())
        overall = float(counts[..., ids].sum() / n_cls) if n_cls else math.nan
        shown = prop[np.isfinite(prop)]
        value, hx, hy = hotspot(prop, region_um)
        summary.append({"slide_id": sid, "label": row.get("label", ""), "n_classified": n_cls,
                        "proportion": overall,
                        "p90_region": float(np.percentile(shown, 90)) if shown.size else math.nan,
                        "max_region": value, "hotspot_x_um": hx, "hotspot_y_um": hy,
                        "regions_shown": int(shown.size)})
        maps.append({"sid": sid, "prop": prop, "region_um": region_um, "mpp": mpp,
                     "extent_um": (w_px * mpp, h_px * mpp), "total": total,
                     "path": row["path"], "label": row.get("label", ""), "overall": overall,
                     "n": n_cls})
    vmax = params.vmax or _shared_vmax([m["prop"] for m in maps])
    panels = []
    for m in maps:
        sid, base = m["sid"], f"{folder}/{safe_name(m['sid'])}"
        thumb = _thumbnail(m["path"], m["mpp"], params.thumbnail_px)
        title = (f"{sid}{' (' + m['label'] + ')' if m['label'] else ''}: {name} "
                 f"{m['overall']:.1%} of {m['n']:,} classified cells")
        res.out.write_bytes(f"{base}.png", render_heatmap(
            m["prop"], m["region_um"], m["extent_um"], thumbnail=thumb, title=title,
            label=label, vmax=vmax, alpha=params.alpha))
        write_ome_zarr_map(res.out.url(f"{base}.ome.zarr"), m["prop"], m["region_um"],
                           m["mpp"], f"{sid}: {label}")
        geo = regions_geojson(m["prop"], m["total"], m["region_um"], m["mpp"],
                              f"{name} proportion")
        res.out.write_bytes(f"{base}.regions.geojson", json.dumps(geo).encode())
        small = thumb
        if thumb is not None and max(thumb.shape[:2]) > 400:
            step = math.ceil(max(thumb.shape[:2]) / 400)
            small = thumb[::step, ::step]
        panels.append({**m, "thumbnail": small, "title": f"{sid}\n{m['overall']:.1%}"
                       + (f" ({m['label']})" if m["label"] else "")})
    res.out.write_bytes(f"{folder}/overview.png",
                        render_overview(panels, label=label, vmax=vmax, alpha=params.alpha))
    table = pd.DataFrame(summary)
    res.out.write_csv(f"{folder}/summary.csv", table)
    res.out.write_json(f"{folder}/heatmap.json", {
        "clusters": ids, "name": name, "names": {str(j): cluster_label(j, res.names)
                                                 for j in ids},
        "vmax": vmax, "colormap": COLORMAP, "min_cells": params.min_cells,
        "min_tissue": params.min_tissue})
    log.info("heatmaps of %s for %d slides -> %s", name, len(maps), res.out.path(folder))
    return table


def _shared_vmax(props: Sequence[np.ndarray]) -> float:
    """The cohort's 99th percentile of shown regional proportions, rounded up to 0.05."""
    values = np.concatenate([p[np.isfinite(p)] for p in props]) if props else np.zeros(0)
    if values.size == 0:
        return 1.0
    top = float(np.percentile(values, 99))
    return float(min(1.0, max(0.05, math.ceil(top * 20 - 1e-9) / 20)))
