"""Synthetic H&E bone-marrow slides whose every cell is known.

A :class:`SlideSpec` fixes a slide: size, µm/px, seed, its own perturbed H&E stain, the mix
of cell types and optional regions (say a blast-rich hotspot) with their own mix. From it:

- :func:`render_region` draws any level-0 window, deterministically and independently of
  any other window (tiles join without seams), so a slide of any size streams tile by tile
  through :func:`~slidecensus.tiling.writer.write_pyramid_tiff`, locally or on Dask;
- :func:`truth_table` lists every cell (id, type, nucleus centroid and area) without
  rendering anything; :func:`render_labels` gives the nucleus instance mask of a window,
  labelled with the same ids, for segmentation scoring;
- :func:`write_slide` and :func:`synth_cohort` write slides, truth tables and a labelled
  ``normal``/``abnormal`` cohort CSV ready for ``slidecensus run``.

Rendering works in optical density, as light does: per-pixel hematoxylin and eosin amounts
(stroma, fat, cytoplasm, chromatin) are mixed through the slide's stain matrix and
``RGB = I0 * exp(-OD)`` (Beer-Lambert), so colour deconvolution and stain normalisation
behave as on real slides and have real work to do between slides.

References
----------
.. [1] A. C. Ruifrok, D. A. Johnston, "Quantification of histochemical staining by color
   deconvolution", Anal. Quant. Cytol. Histol. 23 (2001) 291-299.
.. [2] L. Hou et al., "Robust histopathology image analysis: to label or to synthesize?",
   CVPR 2019.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError
from . import _synth_cells as cm
from ._synth_cells import (
    ABNORMAL_MIX,
    CELL_TYPES,
    NORMAL_MIX,
    NUCLEATED_TYPES,
    TYPE_NAMES,
    Region,
    SlideSpec,
    StainSpec,
)
from .writer import write_pyramid_tiff

__all__ = [
    "ABNORMAL_MIX",
    "CELL_TYPES",
    "NORMAL_MIX",
    "NUCLEATED_TYPES",
    "Region",
    "SlideSpec",
    "StainSpec",
    "SynthSource",
    "cohort_specs",
    "load_cohort_specs",
    "render_labels",
    "render_region",
    "synth_cohort",
    "truth_table",
    "write_slide",
]

TRUTH_COLUMNS = ("cell_id", "type", "x_px", "y_px", "area_um2", "region", "nucleated")


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------

_SALT = {"stroma1": 21, "stroma2": 22, "stroma3": 23, "cleft": 24, "fine": 25,
         "coarse": 26, "gran": 27, "grain": 28, "cleft2": 29, "tissue": 30}
_KEY_SHIFT = 40
_DEPTH_OFFSET = 32.0
_DEPTH_Q = 256.0


def _check_window(spec: SlideSpec, x: int, y: int, w: int, h: int) -> None:
    if w < 1 or h < 1:
        raise InvalidInputError(f"region size must be positive, got w={w} h={h}")
    if x < 0 or y < 0 or x + w > spec.width or y + h > spec.height:
        raise InvalidInputError(f"region x={x} y={y} w={w} h={h} exceeds the slide "
                                f"{spec.width}x{spec.height} (w x h)")


def _window_cells(spec: SlideSpec, x: int, y: int, w: int, h: int) -> dict[str, Any]:
    """The cells whose body can touch the window, in their final state."""
    margin = cm.site_margin_px(spec)
    cells = cm.generate_sites(spec, x - margin, y - margin, x + w + margin, y + h + margin)
    reach = cells["body_r"] * (1.3) + 3
    keep = ((cells["x"] + reach > x) & (cells["x"] - reach < x + w)
            & (cells["y"] + reach > y) & (cells["y"] - reach < y + h))
    n = len(keep)
    return {k: (v[keep] if isinstance(v, np.ndarray) and len(v) == n else v)
            for k, v in cells.items()}


def _soft_px(spec: SlideSpec) -> float:
    """Half-width of the soft nuclear edge, in px (0.55 µm, at least one pixel)."""
    return max(1.0, 0.55 / spec.mpp)


def _scatter_winners(depth_fn, cells: dict[str, Any], sel: np.ndarray, cx: np.ndarray,
                     cy: np.ndarray, ext: np.ndarray, x: int, y: int, w: int, h: int,
                     soft: float) -> np.ndarray:
    """Per pixel, the deepest of the given shapes: int64 keys (depth << 40 | index + 1).

    Each cell's shape is evaluated on a small patch around it (cells batched by patch
    size), and pixels are resolved with an order-independent ``maximum``: whatever the
    batching or the window, a pixel gets the same winner and depth.
    """
    canvas = np.zeros(h * w, np.int64)
    if len(sel) == 0:
        return canvas
    order = np.argsort(ext[sel], kind="stable")
    sel = sel[order]
    pext = ext[sel]
    edges = [0]
    for lim in (6, 10, 15, 22, 32):
        edges.append(int(np.searchsorted(pext, lim, side="right")))
    edges.append(len(sel))
    chunk = 192
    for a, b in itertools.pairwise(edges):
        for c0 in range(a, b, chunk):
            sub = sel[c0:min(b, c0 + chunk)]
            if len(sub) == 0:
                continue
            half = math.ceil(float(ext[sub].max()) + soft) + 1
            p = 2 * half + 1
            ox = np.rint(cx[sub]).astype(np.int64) - half
            oy = np.rint(cy[sub]).astype(np.int64) - half
            ar = np.arange(p)
            gxi = ox[:, None, None] + ar[None, None, :]
            gyi = oy[:, None, None] + ar[None, :, None]
            depth = depth_fn(cells, sub, gxi.astype(np.float32), gyi.astype(np.float32))
            ok = (depth > -soft) & (gxi >= x) & (gxi < x + w) & (gyi >= y) & (gyi < y + h)
            if not ok.any():
                continue
            flat = ((gyi - y) * w + (gxi - x))
            flat = np.broadcast_to(flat, ok.shape)[ok]
            q = np.rint((depth[ok] + _DEPTH_OFFSET) * _DEPTH_Q).astype(np.int64)
            idx = np.broadcast_to(sub[:, None, None] + 1, ok.shape)[ok]
            np.maximum.at(canvas, flat, (q << _KEY_SHIFT) | idx)
    return canvas


def _decode(canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Winner index (-1 for none) and depth from :func:`_scatter_winners` keys."""
    idx = (canvas & ((1 << _KEY_SHIFT) - 1)) - 1
    depth = (canvas >> _KEY_SHIFT).astype(np.float32) / _DEPTH_Q - _DEPTH_OFFSET
    return idx, depth


def _nucleus_winners(spec: SlideSpec, cells: dict[str, Any], x: int, y: int, w: int,
                     h: int) -> tuple[np.ndarray, np.ndarray]:
    nuc = np.flatnonzero(cells["type"] != cm.RBC)
    canvas = _scatter_winners(cm.nucleus_depth, cells, nuc, cells["ncx"], cells["ncy"],
                              cells["next"], x, y, w, h, _soft_px(spec))
    return _decode(canvas)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def render_labels(spec: SlideSpec, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Nucleus instance mask of a level-0 window, labelled with truth ``cell_id``.

    Parameters
    ----------
    spec : the slide.
    x, y, w, h : window in level-0 pixels (column, row, width, height).

    Returns
    -------
    uint32 array (h, w): 0 is background, otherwise the ``cell_id`` of the nucleus that is
    on top at that pixel (where two nuclei touch, the pixel goes to the one it lies deeper
    in). A pixel is labelled where the nucleus covers more than half of it.
    """
    _check_window(spec, x, y, w, h)
    cells = _window_cells(spec, x, y, w, h)
    idx, depth = _nucleus_winners(spec, cells, x, y, w, h)
    lab = np.zeros(h * w, np.uint32)
    on = (idx >= 0) & (depth > 0)
    lab[on] = cells["id"][idx[on]].astype(np.uint32)
    return lab.reshape(h, w)


def _noise(spec: SlideSpec, name: str, x: int, y: int, w: int, h: int,
           scale_um: float) -> np.ndarray:
    return cm.value_noise(spec.seed, _SALT[name], x, y, w, h, scale_um / spec.mpp)


def render_region(spec: SlideSpec, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Render a level-0 window of the synthetic slide as RGB.

    The result depends only on ``spec`` and the pixels asked for: rendering a window
    equals cropping the rendering of any larger window, so tiles join without seams.

    Parameters
    ----------
    spec : the slide.
    x, y, w, h : window in level-0 pixels (column, row, width, height).

    Returns
    -------
    uint8 array (h, w, 3).
    """
    _check_window(spec, x, y, w, h)
    mpp = spec.mpp
    cells = _window_cells(spec, x, y, w, h)
    soft = _soft_px(spec)
    xs = np.arange(x, x + w, dtype=np.float32)[None, :]
    ys = np.arange(y, y + h, dtype=np.float32)[:, None]

    # --- stroma: pale pink, fibrillar, with clear clefts -------------------------------
    n1 = _noise(spec, "stroma1", x, y, w, h, 1.2)
    n2 = _noise(spec, "stroma2", x, y, w, h, 4.0)
    n3 = _noise(spec, "stroma3", x, y, w, h, 14.0)
    cl = _noise(spec, "cleft", x, y, w, h, 9.0) + 0.5 * _noise(spec, "cleft2", x, y, w, h,
                                                                 3.0)
    clear = _smoothstep((cl - 0.35) / 0.35)
    stroma = (1.0 + 0.25 * n1 + 0.25 * n2 + 0.2 * n3) * (1.0 - 0.85 * clear)
    e_map = 0.36 * stroma
    h_map = 0.08 * stroma

    # --- cell bodies (cytoplasm) ------------------------------------------------------
    # winners on the window plus a 1-px frame, so cell borders are found at its edges too
    all_cells = np.arange(len(cells["x"]))
    bext = cells["body_r"] * (1 + 0.18 + 0.07) + 1
    bidx, bdepth = _decode(_scatter_winners(cm.body_depth, cells, all_cells, cells["x"],
                                            cells["y"], bext, x - 1, y - 1, w + 2, h + 2,
                                            soft))
    bidx = bidx.reshape(h + 2, w + 2)
    border = np.zeros((h, w), bool)
    mid = bidx[1:-1, 1:-1]
    for sl in ((slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1)),
               (slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None))):
        border |= bidx[sl] != mid
    bidx = mid
    bdepth = bdepth.reshape(h + 2, w + 2)[1:-1, 1:-1]
    on = bidx >= 0
    if on.any():
        wt = cells["type"][bidx[on]]
        a = _smoothstep((bdepth[on] + soft) / (2 * soft))
        # a thin pale membrane line where a body ends, and granules inside
        gran = _noise(spec, "gran", x, y, w, h, 0.7)[on]
        g = 1.0 + cm.type_table("granular")[wt] * gran
        ce = cm.type_table("cyto_e")[wt] * g
        ch = cm.type_table("cyto_h")[wt] * g
        rbc = wt == cm.RBC
        if rbc.any():  # central pallor of red cells
            bi = bidx[on][rbc]
            yy, xx = np.nonzero(on)
            rr = np.hypot(xx[rbc] + x - cells["x"][bi], yy[rbc] + y - cells["y"][bi])
            ce[rbc] *= 1.0 - 0.45 * np.exp(-((rr / (0.55 * cells["body_r"][bi])) ** 2))
        # pale membranes: where a body ends, and where two bodies meet (retraction clefts)
        edge = np.maximum(np.exp(-(bdepth[on] / (0.5 / mpp)) ** 2) * 0.35,
                          0.75 * border[on] * (0.6 + 0.4 * clear[on]))
        e_map[on] = (e_map[on] * (1 - a) + a * ce) * (1 - edge)
        h_map[on] = (h_map[on] * (1 - a) + a * ch) * (1 - edge)

    # --- nuclei --------------------------------------------------------------------------
    nidx, ndepth = _nucleus_winners(spec, cells, x, y, w, h)
    nidx = nidx.reshape(h, w)
    ndepth = ndepth.reshape(h, w)
    on = nidx >= 0
    if on.any():
        win = nidx[on]
        wt = cells["type"][win]
        d = ndepth[on]
        a = _smoothstep((d + soft) / (2 * soft))
        fine = _noise(spec, "fine", x, y, w, h, 0.55)[on]
        coarse = _noise(spec, "coarse", x, y, w, h, 1.4)[on]
        tex = 1.0 + cm.type_table("fine")[wt] * fine + cm.type_table("coarse")[wt] * coarse
        rim = 1.0 + cm.type_table("rim")[wt] * np.exp(-np.maximum(d, 0) / (0.7 / mpp))
        hn = cm.type_table("chroma")[wt] * tex * rim
        en = cm.type_table("nuc_eosin")[wt] * (0.8 + 0.2 * tex)
        yy, xx = np.nonzero(on)
        px = (xx + x).astype(np.float32)
        py = (yy + y).astype(np.float32)
        for k in range(2):
            r = cells["nl_r"][win, k]
            has = r > 0
            if has.any():
                dd = np.hypot(px[has] - cells["nl_x"][win[has], k],
                              py[has] - cells["nl_y"][win[has], k])
                spot = _smoothstep((r[has] - dd + 0.7) / 1.4)
                hn[has] += 0.75 * spot
                en[has] += 0.45 * spot
        scale = cells["scale"][win]
        hn *= 0.92 + 0.08 * scale  # crowded (shrunk) nuclei are a little denser
        e_map[on] = e_map[on] * (1 - a) + a * en
        h_map[on] = h_map[on] * (1 - a) + a * hn

    # --- fat vacuoles: white, with thin pink septa between neighbours ------------------
    vac = cm.fat_vacuoles(spec, x, y, x + w, y + h)
    if len(vac["x"]):
        d1 = np.full((h, w), -1e3, np.float32)
        d2 = np.full((h, w), -1e3, np.float32)
        for i in range(len(vac["x"])):
            rr = vac["r"][i] * 1.3 + 2
            c0, c1 = max(x, int(vac["x"][i] - rr)), min(x + w, int(vac["x"][i] + rr) + 1)
            r0, r1 = max(y, int(vac["y"][i] - rr)), min(y + h, int(vac["y"][i] + rr) + 1)
            if c1 <= c0 or r1 <= r0:
                continue
            dx = np.arange(c0, c1, dtype=np.float64)[None, :] - vac["x"][i]
            dy = np.arange(r0, r1, dtype=np.float64)[:, None] - vac["y"][i]
            dv = cm.fat_depth(vac, i, dx, dy)
            s1 = d1[r0 - y:r1 - y, c0 - x:c1 - x]
            s2 = d2[r0 - y:r1 - y, c0 - x:c1 - x]
            np.maximum(s2, np.minimum(s1, dv), out=s2)
            np.maximum(s1, dv, out=s1)
        fa = _smoothstep((d1 + 1.5 * soft) / (3 * soft))
        septum = np.exp(-((d1 - np.maximum(d2, 0)) / (0.5 / mpp)) ** 2) * (d2 > -2 * soft)
        rim = np.exp(-(d1 / (0.6 / mpp)) ** 2)
        inner = 0.03 * (1 + 0.5 * n3 + 0.3 * n2)
        e_map = e_map * (1 - fa) + fa * inner + 0.45 * np.maximum(septum, rim)
        h_map = h_map * (1 - fa) + fa * 0.004 + 0.05 * np.maximum(septum, rim)

    # --- tissue vs glass ------------------------------------------------------------------
    if spec.tissue != "full":
        tv = _tissue_grid(spec, x, y, w, h)
        ta = _smoothstep(tv / 0.01)
        e_map *= ta
        h_map *= ta

    # --- Beer-Lambert through the slide's stain -------------------------------------------
    m = spec.stain.matrix()
    grain = (cm.hash_uniform(spec.seed, _SALT["grain"], xs.astype(np.int64),
                             ys.astype(np.int64)).astype(np.float32) - 0.5)
    resid = 0.02 + 0.012 * grain + 0.01 * n2
    od = np.stack([h_map, e_map, resid.astype(np.float32)], axis=-1) @ m
    bg = np.asarray(spec.stain.background, np.float32)
    rgb = bg * np.exp(-od) + 3.0 * grain[..., None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _tissue_grid(spec: SlideSpec, x: int, y: int, w: int, h: int) -> np.ndarray:
    """:func:`~._synth_cells.tissue_value` on the window's pixel grid."""
    u = (np.arange(x, x + w, dtype=np.float32) - spec.width / 2) / (0.48 * spec.width)
    v = (np.arange(y, y + h, dtype=np.float32) - spec.height / 2) / (0.48 * spec.height)
    scale = max(spec.height, spec.width) / 4.0
    nz = cm.value_noise(spec.seed, cm._SALT_TISSUE, x, y, w, h, scale)
    return 1.0 - (u[None, :] ** 2 + v[:, None] ** 2) + 0.12 * nz


class SynthSource:
    """A picklable :data:`~slidecensus.tiling.writer.RegionSource` over a :class:`SlideSpec`.

    It carries only the spec, so it is cheap to send to Dask workers.
    """

    def __init__(self, spec: SlideSpec) -> None:
        self.spec = spec

    def __call__(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return render_region(self.spec, x, y, w, h)


# ---------------------------------------------------------------------------------------
# Truth
# ---------------------------------------------------------------------------------------


def _empty_truth() -> pd.DataFrame:
    return pd.DataFrame({
        "cell_id": pd.Series([], dtype="int64"),
        "type": pd.Categorical([], categories=list(TYPE_NAMES)),
        "x_px": pd.Series([], dtype="float64"), "y_px": pd.Series([], dtype="float64"),
        "area_um2": pd.Series([], dtype="float64"), "region": pd.Series([], dtype="int16"),
        "nucleated": pd.Series([], dtype="bool"),
    })


def truth_table(spec: SlideSpec, *, include_anucleate: bool = False,
                strip_px: int = 1024) -> pd.DataFrame:
    """Every cell of the slide, as drawn: no pixel is rendered to build it.

    Parameters
    ----------
    spec : the slide.
    include_anucleate : also list the red cells (``nucleated`` False, area 0, centroid
        the disc centre); by default the table holds the nucleated cells only, which are
        what a nucleus census counts.
    strip_px : the slide is walked in horizontal strips of this height (memory bound).

    Returns
    -------
    DataFrame with ``cell_id`` (int64, the label in :func:`render_labels`), ``type``
    (categorical of :data:`~._synth_cells.TYPE_NAMES`), ``x_px``, ``y_px`` (nucleus
    centroid at level 0, column and row, in pixel-index units as ``regionprops`` reports
    them), ``area_um2`` (nucleus area as drawn, before any overlap with a neighbour),
    ``region`` (index into ``spec.regions``, -1 outside every region) and ``nucleated``.
    """
    if strip_px < 64:
        raise InvalidInputError(f"strip_px must be >= 64, got {strip_px}")
    margin = cm.site_margin_px(spec)
    parts = []
    for y0 in range(0, spec.height, strip_px):
        y1 = min(spec.height, y0 + strip_px)
        cells = cm.generate_sites(spec, -margin, y0 - margin, spec.width + margin,
                                  y1 + margin)
        core = (cells["y"] >= y0) & (cells["y"] < y1)
        n = len(core)
        cells = {k: (v[core] if isinstance(v, np.ndarray) and len(v) == n else v)
                 for k, v in cells.items()}
        if not include_anucleate:
            keep = cells["type"] != cm.RBC
            n = len(keep)
            cells = {k: (v[keep] if isinstance(v, np.ndarray) and len(v) == n else v)
                     for k, v in cells.items()}
        area, cx, cy = cm.nucleus_area_centroid(cells)
        rbc = cells["type"] == cm.RBC
        cx = np.where(rbc, cells["x"], cx)
        cy = np.where(rbc, cells["y"], cy)
        parts.append(pd.DataFrame({
            "cell_id": cells["id"].astype(np.int64),
            "type": pd.Categorical.from_codes(cells["type"].astype(np.int64),
                                              categories=list(TYPE_NAMES)),
            "x_px": cx, "y_px": cy, "area_um2": area * spec.mpp**2,
            "region": cells["region"].astype(np.int16), "nucleated": ~rbc,
        }))
    if not parts:
        return _empty_truth()
    out = pd.concat(parts, ignore_index=True)
    out = out.sort_values("cell_id", kind="stable").reset_index(drop=True)
    return out


# ---------------------------------------------------------------------------------------
# Files and cohorts
# ---------------------------------------------------------------------------------------


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    df.to_parquet(part, index=False)
    os.replace(part, path)


def _atomic_text(text: str, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def write_slide(spec: SlideSpec, out_dir: str | os.PathLike, *, client: Any | None = None,
                tile_size: int = 512, quality: int = 90) -> tuple[Path, Path]:
    """Write ``<out_dir>/<slide_id>.tiff`` and its truth ``<slide_id>.cells.parquet``.

    The slide is a pyramidal tiled TIFF (JPEG tiles, µm/px) streamed tile by tile, so
    memory stays flat at any size; with a Dask ``client`` tiles render on the workers.
    Both files are written aside and renamed, so a crash never leaves a file that looks
    complete.

    Returns
    -------
    (slide path, truth path)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiff = out / f"{spec.slide_id}.tiff"
    truth = out / f"{spec.slide_id}.cells.parquet"
    # not bare JSON: tifffile would take a JSON description for its "shaped" metadata
    desc = "slidecensus synthetic slide " + json.dumps(spec.to_dict())
    write_pyramid_tiff(tiff, SynthSource(spec), shape=spec.shape, mpp=spec.mpp,
                       tile_size=tile_size, quality=quality, description=desc,
                       client=client)
    _atomic_parquet(truth_table(spec), truth)
    return tiff, truth


def cohort_specs(n_slides: int, size: tuple[int, int], seed: int = 0, mpp: float = 0.5
                 ) -> list[SlideSpec]:
    """Specs of a labelled demo cohort: alternately ``normal`` and ``abnormal`` slides.

    Normal slides have 1-4% blasts and 25-45% fat; abnormal ones 20-40% blasts, less fat
    (a packed marrow) and an elliptical hotspot of 70% blasts (about a fifth of the slide
    wide) whose truth rows carry ``region == 0``. Each slide has its own stain.

    Parameters
    ----------
    n_slides : number of slides (>= 1).
    size : (height, width) of level 0 in pixels.
    seed : cohort seed; slide i's seed is derived from (seed, i).
    mpp : µm per pixel.
    """
    if n_slides < 1:
        raise InvalidInputError(f"n_slides must be >= 1, got {n_slides}")
    height, width = (int(v) for v in size)
    if seed < 0:
        raise InvalidInputError(f"seed must be non-negative, got {seed}")
    specs = []
    for i in range(n_slides):
        ss = np.random.SeedSequence([int(seed), i])
        slide_seed = int(ss.generate_state(1, dtype=np.uint32)[0])
        rng = np.random.default_rng(ss)
        abnormal = i % 2 == 1
        base = ABNORMAL_MIX if abnormal else NORMAL_MIX
        mix = {k: v * float(rng.uniform(0.8, 1.25)) for k, v in base.items()}
        rest = sum(v for k, v in mix.items() if k != "myeloblast")
        blasts = float(rng.uniform(0.20, 0.40) if abnormal else rng.uniform(0.01, 0.04))
        mix = {k: (blasts if k == "myeloblast" else v / rest * (1 - blasts))
               for k, v in mix.items()}
        regions: tuple[Region, ...] = ()
        if abnormal:
            rw, rh = 0.22 * width * rng.uniform(0.9, 1.2), 0.22 * height * rng.uniform(0.9,
                                                                                     1.2)
            rx = rng.uniform(0.25 * width, 0.75 * width - rw)
            ry = rng.uniform(0.25 * height, 0.75 * height - rh)
            hot = {k: (0.70 if k == "myeloblast" else v / (1 - blasts) * 0.30)
                   for k, v in mix.items()}
            regions = (Region(float(rx), float(ry), float(rw), float(rh), hot,
                              name="blast_hotspot"),)
        label = "abnormal" if abnormal else "normal"
        specs.append(SlideSpec(
            seed=slide_seed, height=height, width=width, mpp=mpp, mix=mix, regions=regions,
            stain=StainSpec.random(rng),
            fat_fraction=float(rng.uniform(0.08, 0.18) if abnormal else rng.uniform(0.25,
                                                                                    0.45)),
            label=label, slide_id=f"synth_{i:03d}_{label}",
        ))
    return specs


def synth_cohort(out: str | os.PathLike, n_slides: int, size: tuple[int, int] = (4096, 4096),
                 seed: int = 0, mpp: float = 0.5, client: Any | None = None) -> Path:
    """Write a labelled synthetic cohort; return the path of its ``cohort.csv``.

    ``out`` receives, per slide, ``<slide_id>.tiff`` and ``<slide_id>.cells.parquet`` (see
    :func:`write_slide` and :func:`truth_table`), then ``cohort.json`` (every slide's spec,
    enough to regenerate it) and ``cohort.csv`` with columns ``path, slide_id, label``
    (absolute paths), ready for ``slidecensus run``.

    Parameters
    ----------
    out : output folder (created).
    n_slides : number of slides; even indices are ``normal``, odd ones ``abnormal``.
    size : (height, width) of level 0 in pixels.
    seed : cohort seed (same seed, same cohort, pixel for pixel).
    mpp : µm per pixel of level 0.
    client : optional ``distributed.Client`` to render tiles on.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = cohort_specs(n_slides, size, seed=seed, mpp=mpp)
    rows = []
    for spec in specs:
        tiff, _ = write_slide(spec, out, client=client)
        rows.append({"path": str(tiff.resolve()), "slide_id": spec.slide_id,
                     "label": spec.label})
    _atomic_text(json.dumps([s.to_dict() for s in specs], indent=1) + "\n",
                 out / "cohort.json")
    csv = out / "cohort.csv"
    part = csv.with_name(csv.name + ".part")
    pd.DataFrame(rows, columns=["path", "slide_id", "label"]).to_csv(part, index=False)
    os.replace(part, csv)
    return csv


def load_cohort_specs(path: str | os.PathLike) -> list[SlideSpec]:
    """Read the specs that :func:`synth_cohort` wrote to ``cohort.json``."""
    return [SlideSpec.from_dict(d) for d in json.loads(Path(path).read_text())]

