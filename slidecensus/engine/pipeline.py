"""The cohort census as a Dask graph, assembled from the pure per-tile functions.

Per slide: ``plan_slide`` (tissue mask, stain model once, tile grid) → one
``segment_tile_task`` per tile on CPU workers (tasks carry a path, a window and the stain
model, never pixels) → ``classify_task`` batching the crops of several tiles through Q on
a worker with the ``GPU`` resource when there is one → ``finish_slide`` writing the cell
table and returning the region counts. The client streams slides through the cluster with
a bounded number in flight, writes each slide's maps into ``census.zarr`` and commits the
slide in a manifest last, so a rerun skips complete slides and redoes the rest.

Failures: a slide that cannot be opened or planned fails alone with its reason. A tile that
raises is tried again once on a freshly opened file (a transient read error passes); a tile
still failing is recorded, and its slide fails with a message naming the tile and its
position, unless the run allows ``max_bad_tiles`` such tiles per slide, in which case the
slide is ``partial`` with ``tiles_done < tiles_planned``. Cells of unreadable tiles are never
silently missing from an ``ok`` slide.

Training (``train_from_cohort``): a seeded sample of tiles per slide is segmented, a
capped, seeded sample of their crops is gathered to one (GPU) worker, which trains the
InfoGAN and writes the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import traceback
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError, SlidecensusError, SlideReadError, TileError
from ..tiling import Tile, TissueMask, cached_slide, open_slide, plan_tiles, tissue_mask_rgb
from .cohort import read_cohort, safe_name
from .modelfiles import ModelRef, is_url, local_model, model_exists, pin_model
from .outputs import OutputDir, RunLock
from .segment import (
    CELL_COLUMNS,
    DEFAULT_MPP,
    SegmentParams,
    empty_cell_table,
    segment_tile_with_labels,
    shift_cells,
    stain_sample,
)
from .stain import StainModel, estimate_stain_model

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

#: Accepted ``tile_size`` (level-0 px of a tile's core). The upper bound keeps one tile's
#: segmentation within about 2 GB however many nuclei it holds (measured: a 4096-px tile
#: peaks at 1.6-1.9 GB above the worker's base, a 2048-px tile at 0.4-0.5 GB, with 1x to 10x
#: the usual nuclei; the peak follows the pixels, not the nuclei); below the lower bound the
#: halo (up to 96 px a side) would be read more often than the core.
TILE_SIZE_RANGE = (256, 4096)
#: Peak bytes of one tile task per pixel of its read window (conservative, from the same
#: measurements: 82-110 bytes/px on slides that are not binned).
TILE_BYTES_PER_PX = 120
#: Crops per forward pass of Q on a CPU worker. Activations dominate memory: at width 128,
#: a pass of 4096 crops takes about 4 GB, 256 crops about 0.3 GB, at the same speed on CPU.
CPU_PREDICT_BATCH = 256
#: Crops per forward pass on a CUDA device (GPU memory is the limit there).
GPU_PREDICT_BATCH = 4096
#: Times a failing tile is tried (the retry reopens the file) before it counts as bad.
TILE_ATTEMPTS = 2


@dataclass(frozen=True)
class CensusParams:
    """Everything that changes the census' numbers (hashed into the manifest)."""

    tile_size: int = 2048
    region_um: float = 256.0
    crop_size: int = 32
    masked_crops: bool = True
    min_tissue: float = 0.0
    gallery_crops: int = 256
    seed: int = 0
    segment: SegmentParams = field(default_factory=SegmentParams)
    outlines: bool = False  # keep each nucleus's outline polygon (cells' ``outline_px``)

    def __post_init__(self) -> None:
        lo, hi = TILE_SIZE_RANGE
        if not (isinstance(self.tile_size, int | np.integer) and lo <= self.tile_size <= hi):
            raise InvalidInputError(f"tile_size must be an integer from {lo} to {hi} px (one "
                                    f"tile's memory grows with its area), got "
                                    f"{self.tile_size!r}")
        if not (math.isfinite(self.region_um) and self.region_um > 0):
            raise InvalidInputError(f"region_um must be a positive number of µm, got "
                                    f"{self.region_um!r}")
        if not 8 <= self.crop_size <= 256:
            raise InvalidInputError(f"crop_size must be from 8 to 256 px, got {self.crop_size}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InvalidInputError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.gallery_crops < 0:
            raise InvalidInputError(f"gallery_crops must be >= 0, got {self.gallery_crops}")

    def tile_peak_bytes(self) -> int:
        """Conservative peak memory of one tile task (read window with a 128-px halo)."""
        return TILE_BYTES_PER_PX * (self.tile_size + 256) ** 2

    def digest(self) -> str:
        """Stable hash of the parameters."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SlidePlan:
    """What the client needs to schedule one slide: small, no pixels."""

    path: str
    mpp: float
    mpp_known: bool
    shape: tuple[int, int]
    tiles: tuple[Tile, ...]
    stain: StainModel
    tissue: TissueMask
    notes: tuple[str, ...] = ()  # warnings for slides.csv (conversions, no tissue)


# ------------------------------------------------------------------ worker tasks


def plan_slide(path: str, mpp: float | None, params: CensusParams) -> SlidePlan:
    """Open a slide on a worker, find tissue, estimate the stain model once, plan tiles.

    Raises SlideReadError for an image too small to hold one nucleus (a 1 x 1 px file is
    not a slide); the plan's ``notes`` say what was converted and whether tissue was found.
    """
    slide = cached_slide(path, mpp=mpp)
    slide_mpp = slide.mpp if slide.mpp is not None else DEFAULT_MPP
    nucleus_um = 2 * math.sqrt(params.segment.min_area_um2 / math.pi)
    h, w = slide.shape
    if min(h, w) * slide_mpp < nucleus_um:
        raise SlideReadError(path, f"image too small for a census: {w} x {h} px "
                                   f"({w * slide_mpp:.2g} x {h * slide_mpp:.2g} µm at "
                                   f"{slide_mpp} µm/px); the smallest nucleus counted is "
                                   f"{nucleus_um:.1f} µm across")
    thumb = slide.thumbnail(1024)
    mask = TissueMask(tissue_mask_rgb(thumb),
                      float(np.mean([slide.shape[0] / thumb.shape[0],
                                     slide.shape[1] / thumb.shape[1]])))
    # one stain model per slide, from the same sample segment_file uses
    stain = estimate_stain_model(stain_sample(slide, with_mask=False)[0])
    halo = params.segment.for_mpp(slide_mpp).halo_px
    tiles = plan_tiles(slide, tile_size=params.tile_size, halo=halo, level=0, mask=mask,
                       min_tissue=params.min_tissue)
    notes = list(slide.conversions)
    if not tiles:
        notes.append("no tissue found (no tile to segment)")
    return SlidePlan(path, slide_mpp, slide.mpp is not None, slide.shape, tuple(tiles), stain,
                     mask, tuple(notes))


def segment_tile_task(path: str, mpp: float | None, plan_mpp: float, tile: Tile,
                      stain: StainModel, params: CensusParams) -> tuple[pd.DataFrame, np.ndarray]:
    """Read one tile with its halo and segment it; returns (cells in level-0 px, crops)."""
    return _segment_tile_on(cached_slide(path, mpp=mpp), plan_mpp, tile, stain, params)


def _segment_tile_on(slide: Any, plan_mpp: float, tile: Tile, stain: StainModel,
                     params: CensusParams) -> tuple[pd.DataFrame, np.ndarray]:
    from .crops import extract_crops

    if tile.level != 0:  # coordinates below are level-0 offsets
        raise InvalidInputError("the census segments level 0 (tiles of coarser levels are "
                                "not supported yet)")
    rgb = slide.read_region(tile.level, tile.rx, tile.ry, tile.rw, tile.rh)
    labels, table = segment_tile_with_labels(rgb, stain, params.segment, tile.core_in_read,
                                             plan_mpp)
    crops = extract_crops(rgb, labels, table, size=params.crop_size,
                          masked=params.masked_crops)
    if params.outlines:
        from .outlines import nucleus_outlines, pack_outlines

        polys = nucleus_outlines(labels, table["cell_id"].to_numpy(),
                                 table[["x_px", "y_px"]].to_numpy())
        table["outline_px"] = pack_outlines(polys + (tile.rx, tile.ry))
    return shift_cells(table, tile.rx, tile.ry, plan_mpp), crops


@dataclass(frozen=True)
class TileFailure:
    """A tile that could not be read or segmented (after retrying): which and why."""

    index: int
    n_tiles: int
    x_px: int
    y_px: int
    x_um: float
    y_um: float
    reason: str

    def where(self) -> str:
        """``tile 5 at (128, 0) µm``: the core's top-left corner on the slide."""
        return f"tile {self.index} at ({self.x_um:.0f}, {self.y_um:.0f}) µm"

    def describe(self) -> str:
        return (f"tile {self.index} of {self.n_tiles} at ({self.x_um:.0f}, {self.y_um:.0f}) µm "
                f"(level-0 px {self.x_px}, {self.y_px}) unreadable: {self.reason}")


def segment_tile_guarded(path: str, mpp: float | None, plan_mpp: float, tile: Tile,
                         stain: StainModel, params: CensusParams, index: int, n_tiles: int
                         ) -> tuple[pd.DataFrame, np.ndarray] | TileFailure:
    """:func:`segment_tile_task`, tried :data:`TILE_ATTEMPTS` times (the retry on a freshly
    opened file, not the per-process cached one); a tile still failing comes back as a
    :class:`TileFailure` so its slide can report it (a worker lost mid-task is Dask's to
    retry, not this function's)."""
    reason = ""
    for attempt in range(TILE_ATTEMPTS):
        try:
            if attempt == 0:
                return segment_tile_task(path, mpp, plan_mpp, tile, stain, params)
            with open_slide(path, mpp=mpp) as fresh:
                return _segment_tile_on(fresh, plan_mpp, tile, stain, params)
        except Exception as exc:  # any error of one tile is that tile's, reported below
            reason = (exc.reason if isinstance(exc, SlideReadError)
                      else f"{type(exc).__name__}: {exc}")
            log.debug("%s: tile %d attempt %d failed: %s", path, index, attempt + 1, reason)
    reason = " ".join(reason.split())[:300]
    return TileFailure(index, n_tiles, tile.x, tile.y, tile.x * plan_mpp, tile.y * plan_mpp,
                       reason)


TileResult = tuple[pd.DataFrame, np.ndarray, np.ndarray]
"""A tile after classification: its cells (with ``cluster`` and ``p_j``), a seeded sample
of its crops for galleries, and those crops' row numbers in the tile's table."""


def classify_task(model_path: str | ModelRef | None, seed: tuple[int, ...], first_tile: int,
                  quota: int, *segmented: tuple[pd.DataFrame, np.ndarray] | TileFailure
                  ) -> list[TileResult | TileFailure]:
    """Push the crops of several tiles through Q in batches (model loaded once).

    The crops stop here: what goes on to the slide's reduction is each tile's table, with
    its clusters and probabilities, and at most ``quota`` sampled crops per tile (seeded by
    ``seed`` and the tile's index), so a slide of a million cells never gathers its crops on
    one worker. Failed tiles pass through unchanged. Batches are bounded
    (:data:`CPU_PREDICT_BATCH` on CPU), so a tile with ten times the usual nuclei costs time,
    not a worker's memory.
    """
    failed = {j: t for j, t in enumerate(segmented) if isinstance(t, TileFailure)}
    tiles = [t for t in segmented if not isinstance(t, TileFailure)]
    sizes = [len(c) for _, c in tiles]
    if model_path is None:
        clusters = np.full(sum(sizes), -1, np.int64)
        probs = np.zeros((sum(sizes), 0), np.float32)
    else:
        from ..models import load_model, predict

        _match_torch_threads()
        model = load_model(local_model(model_path))
        allc = (np.concatenate([c for _, c in tiles]) if sum(sizes)
                else np.zeros((0, 32, 32, 3), np.uint8))
        gpu = str(getattr(model, "device", "cpu")).startswith("cuda")
        clusters, probs = predict(model, allc, batch_size=GPU_PREDICT_BATCH if gpu
                                  else CPU_PREDICT_BATCH)
    out: list[TileResult | TileFailure] = []
    i = 0
    ok_index = [j for j in range(len(segmented)) if j not in failed]
    for j, (table, crops), n in zip(ok_index, tiles, sizes, strict=True):
        t = table.copy()
        t["cluster"] = clusters[i : i + n].astype(np.int64)
        for c in range(probs.shape[1]):
            t[f"p_{c}"] = probs[i : i + n, c].astype(np.float32)
        rng = np.random.default_rng([*seed, first_tile + j])
        rows = np.sort(rng.choice(n, min(quota, n), replace=False)) if n else np.zeros(0, int)
        out.append((t, crops[rows], rows.astype(np.int64)))
        i += n
    for j, failure in failed.items():
        out.insert(j, failure)
    return out


def _match_torch_threads() -> None:
    """On a Dask worker, let torch use as many threads as the worker has (not every core:
    CPU inference runs beside segmentation tasks, and oversubscribed OpenMP crawls)."""
    try:
        from distributed import get_worker

        n = get_worker().state.nthreads
    except (ImportError, ValueError):
        return
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(max(1, n))


def region_grid(shape: tuple[int, int], mpp: float, region_um: float) -> tuple[int, int, float]:
    """(rows, cols, region edge in level-0 px) of the census grid."""
    edge = region_um / mpp
    return max(1, math.ceil(shape[0] / edge)), max(1, math.ceil(shape[1] / edge)), edge


def region_counts(x_px: np.ndarray, y_px: np.ndarray, clusters: np.ndarray, k: int,
                  grid: tuple[int, int, float]) -> np.ndarray:
    """Counts per region and cluster, int64 (rows, cols, k); unclassified (-1) are dropped
    from the cluster counts (they still count in ``cells``)."""
    rows, cols, edge = grid
    iy = np.clip((np.asarray(y_px) // edge).astype(np.int64), 0, rows - 1)
    ix = np.clip((np.asarray(x_px) // edge).astype(np.int64), 0, cols - 1)
    c = np.asarray(clusters, np.int64)
    ok = c >= 0
    flat = (iy[ok] * cols + ix[ok]) * k + c[ok]
    return np.bincount(flat, minlength=rows * cols * k).reshape(rows, cols, k)


def finish_slide(slide_id: str, out: OutputDir, plan: SlidePlan, k: int,
                 results: list[TileResult | TileFailure], params: CensusParams,
                 max_bad_tiles: int = 0) -> dict:
    """Assemble one slide on a worker: write its cell table and crop sample, return its
    region maps (small arrays) for the client to commit.

    Raises TileError, before writing anything, when more than ``max_bad_tiles`` tiles
    failed; the message names the first failed tile and its reason.
    """
    bad = [t for t in results if isinstance(t, TileFailure)]
    if len(bad) > max_bad_tiles:
        more = f" (and {len(bad) - 1} more tiles)" if len(bad) > 1 else ""
        allowed = f"; {max_bad_tiles} allowed" if max_bad_tiles else ""
        raise TileError(plan.path, f"{bad[0].describe()}{more}{allowed}")
    tiles = [t for t in results if not isinstance(t, TileFailure)]
    parts = [t for t, _, _ in tiles if len(t)]
    cells = pd.concat(parts, ignore_index=True) if parts else empty_cell_table().assign(
        cluster=pd.Series([], dtype="int64"))
    cells["cell_id"] = np.arange(len(cells), dtype=np.int64)
    cells = cells.astype({**CELL_COLUMNS, "cluster": "int64"})
    for j in range(k):
        if f"p_{j}" not in cells:
            cells[f"p_{j}"] = np.float32(np.nan)
    cells.insert(0, "slide_id", slide_id)
    out.write_parquet(f"cells/{safe_name(slide_id)}.parquet", cells)
    offsets = np.cumsum([0] + [len(t) for t, _, _ in tiles])
    sample_ids = np.concatenate([rows + off for (_, _, rows), off in zip(tiles, offsets,
                                                                         strict=False)]
                                ) if tiles else np.zeros(0, np.int64)
    sample = (np.concatenate([c for _, c, _ in tiles]) if tiles
              else np.zeros((0, 32, 32, 3), np.uint8))
    write_crop_sample(out, slide_id, sample, sample_ids.astype(np.int64), cells, params)
    grid = region_grid(plan.shape, plan.mpp, params.region_um)
    counts = region_counts(cells["x_px"].to_numpy(), cells["y_px"].to_numpy(),
                           cells["cluster"].to_numpy(), k, grid)
    total = region_counts(cells["x_px"].to_numpy(), cells["y_px"].to_numpy(),
                          np.zeros(len(cells), np.int64), 1, grid)[..., 0]
    from ..tiling.grid import core_fractions

    rows, cols, edge = grid
    windows = [(int(c * edge), int(r * edge), int(math.ceil(edge)), int(math.ceil(edge)))
               for r in range(rows) for c in range(cols)]
    tissue = core_fractions(plan.tissue.mask, plan.tissue.downsample, windows, 1.0,
                            dilate=0).reshape(rows, cols)
    per_cluster = counts.sum(axis=(0, 1))
    return {"n_cells": len(cells), "n_classified": int(per_cluster.sum()),
            "per_cluster": per_cluster.tolist(), "counts": counts, "cells": total,
            "tissue": tissue.astype(np.float32), "region_px": edge,
            "bad_tiles": [asdict(t) for t in bad]}


# ------------------------------------------------------------------ outputs


def write_crop_sample(out: OutputDir, slide_id: str, crops: np.ndarray, cell_ids: np.ndarray,
                      cells: pd.DataFrame, params: CensusParams) -> None:
    """At most ``params.gallery_crops`` of the sampled crops (seeded) as a Zarr array
    ``crops.zarr/<slide_id>`` (n, 32, 32, 3) with ``cell_id`` and ``cluster`` attributes."""
    import zarr

    rng = np.random.default_rng([params.seed, zlib.crc32(slide_id.encode())])
    n = min(params.gallery_crops, len(crops))
    keep = np.sort(rng.choice(len(crops), n, replace=False)) if n else np.zeros(0, np.int64)
    sample, ids = crops[keep], cell_ids[keep]
    arr = zarr.create_array(out.url(f"crops.zarr/{safe_name(slide_id)}"), shape=sample.shape,
                            chunks=(max(n, 1), *sample.shape[1:]), dtype=np.uint8,
                            overwrite=True, zarr_format=3,
                            attributes={"slide_id": slide_id, "cell_id": ids.tolist(),
                                        "cluster": cells["cluster"].to_numpy()[ids].tolist()})
    if n:
        arr[:] = sample


def write_census_group(out: OutputDir, slide_id: str, res: dict, plan: SlidePlan, k: int,
                       region_um: float) -> None:
    """Write one slide's proportion maps as a Zarr v3 group of ``census.zarr``."""
    import xarray as xr

    rows, cols = res["cells"].shape
    y = (np.arange(rows) + 0.5) * region_um
    x = (np.arange(cols) + 0.5) * region_um
    counts = res["counts"]
    classified = counts.sum(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        prop = np.where(classified > 0, counts / np.maximum(classified, 1), np.nan)
    ds = xr.Dataset(
        {
            "counts": (("y", "x", "cluster"), counts.astype(np.int32)),
            "proportion": (("y", "x", "cluster"), prop.astype(np.float32)),
            "cells": (("y", "x"), res["cells"].astype(np.int32)),
            "tissue": (("y", "x"), res["tissue"]),
        },
        coords={"y": ("y", y, {"units": "µm"}), "x": ("x", x, {"units": "µm"}),
                "cluster": ("cluster", np.arange(k))},
        attrs={"slide_id": slide_id, "path": plan.path, "mpp": plan.mpp,
               "region_um": region_um, "shape_px": list(plan.shape)},
    )
    ds.to_zarr(out.url("census.zarr"), group=safe_name(slide_id), mode="w", zarr_format=3,
               consolidated=False)


# ------------------------------------------------------------------ the run


def _one_line(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        msg = exc
    elif isinstance(exc, SlidecensusError):
        msg = str(exc)
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return " ".join(msg.split())[:500]


def _model_digest(model: str | ModelRef | None) -> str:
    if model is None:
        return "none"
    h = hashlib.sha256()
    with open(local_model(model), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _model_k(model: str | ModelRef | None) -> int:
    """The model's k; loading it first refuses foreign or damaged checkpoints in one line."""
    if model is None:
        return 0
    from ..models import CheckpointError, load_model

    try:
        return int(load_model(local_model(model)).config.k)
    except CheckpointError as exc:  # one line for slides.csv and the terminal
        raise CheckpointError(exc.path, _one_line(exc.reason)) from None


def _has_gpu_worker(client: Any) -> bool:
    info = client.scheduler_info()["workers"]
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in info.values())


def _row_mpp(row: pd.Series) -> float | None:
    mpp = row.get("mpp")
    return None if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)) else float(mpp)


def _submit_plan(client: Any, row: pd.Series, params: CensusParams) -> Any:
    """Plan a slide ahead of its tiles, at high priority (a plan is small and unblocks a
    whole slide's tiles)."""
    return client.submit(plan_slide, row["path"], _row_mpp(row), params, pure=False,
                         priority=10,
                         key=f"plan_slide-{safe_name(row['slide_id'])}-{time.monotonic_ns()}")


def _schedule_slide(client: Any, row: pd.Series, plan: Any, out: OutputDir,
                    model: str | None, k: int, params: CensusParams, gpu: bool,
                    batch_tiles: int, max_bad_tiles: int = 0) -> Any:
    """Submit one slide's graph once its plan is known; returns (plan, result future,
    number of tiles)."""
    path, mpp = row["path"], _row_mpp(row)
    plan_v = plan.result()
    n = len(plan_v.tiles)
    stem = f"{safe_name(row['slide_id'])}-{time.monotonic_ns()}"
    tiles = [client.submit(segment_tile_guarded, path, mpp, plan_v.mpp, t, plan_v.stain,
                           params, i, n, key=f"segment_tile_task-{stem}-{i}")
             for i, t in enumerate(plan_v.tiles)]
    res_kw = {"resources": {"GPU": 1}} if gpu and model is not None else {}
    seed = (params.seed, zlib.crc32(str(row["slide_id"]).encode()))
    # twice the even share per tile, so sparse tiles rarely leave the sample short
    quota = -(-2 * params.gallery_crops // max(len(tiles), 1)) if params.gallery_crops else 0
    classes = []
    for i in range(0, len(tiles), batch_tiles):
        group = tiles[i : i + batch_tiles]
        classes.append(client.submit(classify_task, model, seed, i, quota, *group, pure=False,
                                     **res_kw))
    flat = client.submit(_flatten, *classes, pure=False)
    result = client.submit(finish_slide, row["slide_id"], out, plan_v, max(k, 1), flat,
                           params, max_bad_tiles, pure=False)
    return plan_v, result, n


def _flatten(*groups: list) -> list:
    return [x for g in groups for x in g]


def run_cohort(
    cohort: str | os.PathLike | pd.DataFrame,
    out: str | os.PathLike | OutputDir,
    *,
    model: str | os.PathLike | None = None,
    client: Any | None = None,
    cluster: str = "local",
    params: CensusParams | None = None,
    slides_in_flight: int = 2,
    batch_tiles: int = 8,
    max_bad_tiles: int = 0,
) -> pd.DataFrame:
    """Run the census over a cohort; returns the ``slides.csv`` table.

    Everything is checked before any work: a malformed cohort, a missing or foreign model
    checkpoint or a bad parameter raises InvalidInputError, and an output folder in use by
    another run raises OutputLockedError, with nothing written to ``out``.

    Parameters
    ----------
    cohort : CSV / folder / glob (see :func:`read_cohort`) or a table with ``slide_id, path``.
    out : output folder, a local path or an fsspec URL such as ``s3://bucket/run``
        (credentials from the environment): ``slides.csv``, ``census.zarr``,
        ``cells/<slide_id>.parquet``,
        ``manifest.json`` and ``slides/<slide_id>.json`` (the per-slide commit records).
        Held with ``out/.lock`` for the length of the run (see :class:`RunLock`).
    model : checkpoint of a trained model, a local path or an fsspec URL (fetched once per
        host, see :mod:`.modelfiles`); without it cells are counted, not classified.
    client : a ``distributed.Client``; else one is made from ``cluster``.
    slides_in_flight : slides whose graphs are on the cluster at once (bounded graph size).
    batch_tiles : tiles whose crops are classified together (1 to 64).
    max_bad_tiles : tiles per slide that may stay unreadable after a retry; such a slide is
        ``partial`` (its ``error`` names the tiles, ``tiles_done < tiles_planned``). With
        the default 0 a single unreadable tile fails the slide.
    """
    params = params or CensusParams()
    if slides_in_flight < 1:
        raise InvalidInputError(f"slides_in_flight must be >= 1, got {slides_in_flight}")
    if not 1 <= batch_tiles <= 64:
        raise InvalidInputError(f"batch_tiles must be from 1 to 64, got {batch_tiles}")
    if max_bad_tiles < 0:
        raise InvalidInputError(f"max_bad_tiles must be >= 0, got {max_bad_tiles}")
    table = cohort if isinstance(cohort, pd.DataFrame) else read_cohort(cohort)
    model = str(model) if model is not None else None
    if model is not None and not model_exists(model):
        raise InvalidInputError(f"model checkpoint {model} does not exist")
    # a URL is pinned to its current version here: every worker classifies with exactly
    # the checkpoint whose digest the run records, even if it is retrained meanwhile
    model = pin_model(model) if model is not None else None
    k = _model_k(model)  # loads it: a foreign or damaged checkpoint stops here
    out = out if isinstance(out, OutputDir) else OutputDir(out)
    out.makedirs()
    with RunLock(out):
        kw = {"model": model, "k": k, "params": params, "slides_in_flight": slides_in_flight,
              "batch_tiles": batch_tiles, "max_bad_tiles": max_bad_tiles,
              "cohort": str(cohort) if not isinstance(cohort, pd.DataFrame) else "<table>"}
        if client is not None:
            return _run_locked(table, out, client, **kw)
        from ..cluster import get_client

        with get_client(cluster) as c:
            return _run_locked(table, out, c, **kw)


def _run_locked(table: pd.DataFrame, out: OutputDir, client: Any, *,
                model: str | ModelRef | None,
                k: int, params: CensusParams, slides_in_flight: int, batch_tiles: int,
                max_bad_tiles: int, cohort: str) -> pd.DataFrame:
    """The run proper, with the output folder's lock held."""
    out.remove_stale_temporaries()
    import zarr

    zarr.open_group(out.url("crops.zarr"), mode="a", zarr_format=3)  # workers add arrays
    digest = {"params": params.digest(), "model": _model_digest(model),
              "schema": SCHEMA_VERSION}
    out.write_json("manifest.json", {
        "params": asdict(params), "digest": digest, "versions": _versions(),
        # absolute, so reports (gallery) find it from any working directory
        "model": (str(model) if is_url(model) else str(Path(model).resolve())) if model else None,
        "cohort": cohort, "max_bad_tiles": max_bad_tiles})
    _check_worker_memory(client, params)
    gpu = _has_gpu_worker(client)
    if model is not None:
        log.info("classifying on %s", "the GPU worker(s)" if gpu else
                 "CPU workers (no worker has a GPU resource)")
    records: dict[str, dict] = {}
    todo = []
    for _, row in table.iterrows():
        rec = _load_record(out, row["slide_id"])
        if rec and rec.get("status") == "ok" and rec.get("digest") == digest:
            records[row["slide_id"]] = rec
        else:
            todo.append(row)
    log.info("%d slides: %d complete, %d to do", len(table), len(records), len(todo))
    if getattr(client, "dashboard_link", None):
        log.info("Dask dashboard: %s", client.dashboard_link)
    total_cells = sum(int(r.get("n_cells", 0)) for r in records.values())
    for row, rec in _stream(client, todo, out, model, k, params, gpu, batch_tiles,
                            slides_in_flight, digest, max_bad_tiles):
        records[row["slide_id"]] = rec
        _write_record(out, row["slide_id"], rec)
        _write_slides_csv(out, table, records, k)
        total_cells += int(rec.get("n_cells", 0))
        detail = (f"{rec.get('tiles_done', 0)} tiles, {rec['n_cells']} cells"
                  if rec["status"] == "ok" else rec["error"])
        log.info("[%d/%d slides, %d cells] %s: %s (%s)", len(records), len(table),
                 total_cells, row["slide_id"], rec["status"], detail)
        if rec.get("warning"):
            log.warning("%s: %s", row["slide_id"], rec["warning"])
    return _write_slides_csv(out, table, records, k)


#: Memory a worker process needs besides its tile (interpreter, numpy, torch, Dask).
WORKER_BASE_BYTES = 512 << 20


def _check_worker_memory(client: Any, params: CensusParams) -> None:
    """Warn when workers' memory limits are below what one tile of ``tile_size`` needs
    (Dask would kill such a worker on a tile full of tissue)."""
    need = params.tile_peak_bytes() + WORKER_BASE_BYTES
    limits = [int(w.get("memory_limit") or 0)
              for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    small = [m for m in limits if 0 < m < need]
    if small:
        log.warning("tile_size %d needs about %.1f GB per worker (one tile plus the worker "
                    "itself), but %d of %d workers have a memory limit of %.1f GB: use a "
                    "smaller --tile-size or fewer, larger workers", params.tile_size,
                    need / 1e9, len(small), len(limits), min(small) / 1e9)


def _stream(client, todo, out, model, k, params, gpu, batch_tiles, in_flight, digest,
            max_bad_tiles=0) -> Iterator[tuple[pd.Series, dict]]:
    """Keep at most ``in_flight`` slides on the cluster; yield each as it completes."""
    from distributed import as_completed

    pending: dict[Any, tuple[pd.Series, Any, float, int]] = {}
    queue = list(todo)
    plans: dict[str, Any] = {}
    ac = as_completed()

    def submit_next() -> Iterator[tuple[pd.Series, dict]]:
        while queue and len(pending) < in_flight:
            row = queue.pop(0)
            t0 = time.perf_counter()
            for ahead in queue[:in_flight]:  # plan the next slides while this one runs
                if ahead["slide_id"] not in plans:
                    plans[ahead["slide_id"]] = _submit_plan(client, ahead, params)
            plan = plans.pop(row["slide_id"], None) or _submit_plan(client, row, params)
            try:
                plan, fut, n_tiles = _schedule_slide(client, row, plan, out, model, k, params,
                                                     gpu, batch_tiles, max_bad_tiles)
            except Exception as exc:  # a bad slide fails alone, at planning
                yield row, _failed(row, exc, digest, t0)
                continue
            pending[fut] = (row, plan, t0, n_tiles)
            ac.add(fut)

    yield from submit_next()
    while pending:
        fut = next(ac)
        row, plan, t0, n_tiles = pending.pop(fut)
        try:
            res = fut.result()
            write_census_group(out, row["slide_id"], res, plan, max(k, 1), params.region_um)
            props = (np.asarray(res["per_cluster"], float) / res["n_classified"]
                     if res["n_classified"] else np.full(max(k, 1), np.nan))
            bad = res.get("bad_tiles", [])
            rec = {"status": "partial" if bad else "ok", "error": _partial_error(bad, n_tiles),
                   "warning": "; ".join(plan.notes), "n_cells": res["n_cells"],
                   "n_classified": res["n_classified"], "tiles_planned": n_tiles,
                   "tiles_done": n_tiles - len(bad), "mpp": plan.mpp,
                   "mpp_known": plan.mpp_known,
                   "proportions": props.tolist() if k else [], "seconds":
                       time.perf_counter() - t0, "digest": digest}
            if bad:
                rec["bad_tiles"] = bad  # every one, with its reason (the CSV lists 10)
        except Exception as exc:
            rec = _failed(row, exc, digest, t0, n_tiles, plan.notes)
        fut.release()
        yield row, rec
        yield from submit_next()


def _partial_error(bad: list[dict], n_tiles: int, show: int = 10) -> str:
    """The one-line ``error`` of a partial slide: which tiles are missing, the first reason."""
    if not bad:
        return ""
    tiles = [TileFailure(**b) for b in bad]
    listed = ", ".join(t.where() for t in tiles[:show])
    more = f" and {len(tiles) - show} more" if len(tiles) > show else ""
    return _one_line(f"{len(tiles)} of {n_tiles} tiles unreadable, their cells are not "
                     f"counted: {listed}{more}; first reason: {tiles[0].reason}")


def _failed(row: pd.Series, exc: BaseException, digest: dict, t0: float, n_tiles: int = 0,
            notes: tuple[str, ...] = ()) -> dict:
    log.debug("slide %s failed:\n%s", row["slide_id"], "".join(
        traceback.format_exception(exc)))
    return {"status": "failed", "error": _one_line(exc), "warning": "; ".join(notes),
            "n_cells": 0, "tiles_planned": n_tiles, "tiles_done": 0,
            "seconds": time.perf_counter() - t0, "digest": digest}


def _record_path(slide_id: str) -> str:
    return f"slides/{safe_name(slide_id)}.json"


def _load_record(out: OutputDir, slide_id: str) -> dict | None:
    rec = out.read_json(_record_path(slide_id))
    return rec if isinstance(rec, dict) else None


def _write_record(out: OutputDir, slide_id: str, rec: dict) -> None:
    out.write_json(_record_path(slide_id), rec)


def _write_slides_csv(out: OutputDir, table: pd.DataFrame, records: dict[str, dict],
                      k: int) -> pd.DataFrame:
    rows = []
    for _, r in table.iterrows():
        rec = records.get(r["slide_id"])
        row = {"slide_id": r["slide_id"], "path": r["path"], "label": r.get("label", ""),
               "status": rec["status"] if rec else "pending",
               "error": rec.get("error", "") if rec else "",
               "warning": rec.get("warning", "") if rec else "",
               "n_cells": rec.get("n_cells", 0) if rec else 0}
        props = (rec or {}).get("proportions") or [np.nan] * k
        for j in range(k):
            row[f"p_{j}"] = props[j] if j < len(props) else np.nan
        if rec:
            row["tiles_planned"] = rec.get("tiles_planned", 0)
            row["tiles_done"] = rec.get("tiles_done", 0)
            row["seconds"] = round(rec.get("seconds", 0.0), 3)
        rows.append(row)
    df = pd.DataFrame(rows)
    out.write_csv("slides.csv", df)
    return df


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("slidecensus", "numpy", "scipy", "scikit-image", "dask", "distributed",
                "zarr", "tifffile", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------ training


def sample_slide_crops(path: str, mpp: float | None, params: CensusParams, n_tiles: int,
                       n_cells: int, seed: int) -> np.ndarray:
    """A seeded sample of one slide's crops: ``n_tiles`` random tiles, at most ``n_cells``
    crops from them (so a huge slide cannot dominate the training set)."""
    plan = plan_slide(path, mpp, params)
    rng = np.random.default_rng([seed, int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)])
    tiles = list(plan.tiles)
    if len(tiles) > n_tiles:
        tiles = [tiles[i] for i in sorted(rng.choice(len(tiles), n_tiles, replace=False))]
    crops = [segment_tile_task(path, mpp, plan.mpp, t, plan.stain, params)[1] for t in tiles]
    allc = np.concatenate(crops) if crops else np.zeros((0, 32, 32, 3), np.uint8)
    if len(allc) > n_cells:
        allc = allc[np.sort(rng.choice(len(allc), n_cells, replace=False))]
    return allc


#: Dask event topic on which the training worker reports progress to the client.
TRAIN_TOPIC = "slidecensus-train"


def _train_task(model_out: str, config: Any, *samples: np.ndarray) -> str:
    from ..models import format_progress, train_infogan
    from .modelfiles import cache_dir, publish_model

    parts = [s for s in samples if len(s)]
    crops = np.concatenate(parts) if parts else np.zeros((0, 32, 32, 3), np.uint8)
    if len(crops) < config.batch_size:
        raise InvalidInputError(f"only {len(crops)} cells found in the cohort; training needs "
                                f"at least one batch ({config.batch_size})")

    def progress(rec: dict[str, float]) -> None:
        # the worker's own log (pod logs on Kubernetes) and the client's terminal
        log.info("training %s", format_progress(rec))
        try:
            from distributed import get_worker

            get_worker().log_event(TRAIN_TOPIC, dict(rec))
        except ValueError:  # not running on a worker
            pass

    if not is_url(model_out):
        return str(train_infogan(crops, config, model_out, progress=progress))
    # object storage: train into this worker's cache (an interrupted run with the same
    # target and configuration resumes there when it lands on the same worker), then upload
    # the finished checkpoint in one PUT
    key = json.dumps([model_out, config.to_dict()], sort_keys=True, default=str)
    local = cache_dir() / f"train-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    local.parent.mkdir(parents=True, exist_ok=True)
    train_infogan(crops, config, local, progress=progress)
    publish_model(local, model_out)
    local.unlink()  # kept only while unfinished: a later retraining must start afresh
    return model_out


def _show_training(event: tuple[float, dict]) -> None:
    """Client side of :data:`TRAIN_TOPIC`: log each progress record as it arrives."""
    from ..models import format_progress

    log.info("training: %s", format_progress(event[1]))


def train_from_cohort(
    cohort: str | os.PathLike | pd.DataFrame,
    model_out: str | os.PathLike,
    *,
    config: Any | None = None,
    client: Any | None = None,
    cluster: str = "local",
    params: CensusParams | None = None,
    tiles_per_slide: int = 8,
    cells_per_slide: int = 2000,
    seed: int = 0,
) -> Path | str:
    """Gather a seeded sample of crops across the cohort and train the model on one worker
    (the GPU worker when the cluster has one). Slides that fail to open are skipped with a
    warning; training needs at least one batch of cells. ``model_out`` may be an fsspec URL
    (``s3://bucket/run/model.pt``): the worker uploads the finished checkpoint there."""
    from ..models import TrainConfig

    # outlines are not needed for the training sample
    params = replace(params or CensusParams(), outlines=False)
    config = config or TrainConfig(seed=seed)
    table = cohort if isinstance(cohort, pd.DataFrame) else read_cohort(cohort)
    if client is None:
        from ..cluster import get_client

        with get_client(cluster) as c:
            return train_from_cohort(table, model_out, config=config, client=c, params=params,
                                     tiles_per_slide=tiles_per_slide,
                                     cells_per_slide=cells_per_slide, seed=seed)
    samples = []
    for _, row in table.iterrows():
        samples.append(client.submit(sample_slide_crops, row["path"], None, params,
                                     tiles_per_slide, cells_per_slide, seed, pure=False))
    ok = []
    for (_, row), fut in zip(table.iterrows(), samples, strict=True):
        if fut.status == "error" or fut.exception(timeout=None) is not None:
            log.warning("%s: skipped for training: %s", row["slide_id"],
                        _one_line(fut.exception()))
        else:
            ok.append(fut)
    res_kw = {"resources": {"GPU": 1}} if _has_gpu_worker(client) else {}
    if is_url(model_out):
        target = str(model_out)
    else:
        Path(model_out).parent.mkdir(parents=True, exist_ok=True)
        target = str(Path(model_out).resolve())
    log.info("training on the crop samples of %d slides on %s", len(ok),
             "the GPU worker" if res_kw else "a CPU worker (no worker has a GPU resource)")
    client.subscribe_topic(TRAIN_TOPIC, _show_training)
    try:
        done = client.submit(_train_task, target, config, *ok, pure=False, **res_kw)
        result = done.result()
        return result if is_url(result) else Path(result)
    finally:
        client.unsubscribe_topic(TRAIN_TOPIC)
