"""The census' worker tasks, built from the pure per-tile functions of :mod:`slidecensus.nuclei`.

Per slide, after :func:`~.plan.plan_slide`: one :func:`segment_tile_task` per tile on CPU
workers (tasks carry a path, a window and the stain model, never pixels) →
:func:`classify_task` batching the crops of several tiles through Q on a worker with the
``GPU`` resource when there is one → :func:`finish_slide` writing the cell table and the
crop sample and returning the region counts.

Failures: a tile that raises is tried again once on a freshly opened file (a transient read
error passes); a tile still failing comes back as a :class:`TileFailure`, and its slide
fails with a message naming the tile and its position, unless the run allows
``max_bad_tiles`` such tiles per slide, in which case the slide is ``partial`` with
``tiles_done < tiles_planned``. Cells of unreadable tiles are never silently missing from an
``ok`` slide.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError, SlideReadError, TileError
from ..nuclei.segment import CELL_COLUMNS, empty_cell_table, segment_tile_with_labels, shift_cells
from ..nuclei.stain import StainModel
from ..tiling import Tile, cached_slide, open_slide
from .cohort import safe_name
from .modelfiles import ModelRef, local_model
from .outputs import OutputDir
from .plan import CensusParams, SlidePlan

__all__ = [
    "CPU_PREDICT_BATCH",
    "GPU_PREDICT_BATCH",
    "TILE_ATTEMPTS",
    "TileFailure",
    "TileResult",
    "classify_task",
    "finish_slide",
    "region_counts",
    "region_grid",
    "segment_tile_guarded",
    "segment_tile_task",
    "write_crop_sample",
]

log = logging.getLogger(__name__)

#: Crops per forward pass of Q on a CPU worker. Activations dominate memory: at width 128,
#: a pass of 4096 crops takes about 4 GB, 256 crops about 0.3 GB, at the same speed on CPU.
CPU_PREDICT_BATCH = 256
#: Crops per forward pass on a CUDA device (GPU memory is the limit there).
GPU_PREDICT_BATCH = 4096
#: Times a failing tile is tried (the retry reopens the file) before it counts as bad.
TILE_ATTEMPTS = 2


def segment_tile_task(path: str, mpp: float | None, plan_mpp: float, tile: Tile,
                      stain: StainModel, params: CensusParams) -> tuple[pd.DataFrame, np.ndarray]:
    """Read one tile with its halo and segment it; returns (cells in level-0 px, crops)."""
    return _segment_tile_on(cached_slide(path, mpp=mpp), plan_mpp, tile, stain, params)


def _segment_tile_on(slide: Any, plan_mpp: float, tile: Tile, stain: StainModel,
                     params: CensusParams) -> tuple[pd.DataFrame, np.ndarray]:
    from ..nuclei.crops import crops_for
    from ..nuclei.normalize import read_normalized

    if tile.level != 0:  # coordinates below are level-0 offsets
        raise InvalidInputError("the census segments level 0 (tiles of coarser levels are "
                                "not supported yet)")
    rgb, crop_rgb = read_normalized(slide, tile.level, tile.rx, tile.ry, tile.rw, tile.rh,
                                    stain)
    labels, table = segment_tile_with_labels(rgb, stain, params.segment, tile.core_in_read,
                                             plan_mpp, segmenter=params.segmenter)
    crops = crops_for(crop_rgb, labels, table, params.crops_mode(), plan_mpp,
                      params.crop_window_um, params.crop_size)
    if params.outlines:
        from ..nuclei.outlines import nucleus_outlines, pack_outlines

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

    With a guided model (Gräbel et al.) each cell also gets its type's name
    (``cell_type``), ``p_<type>`` and its guide-map position ``emb_x, emb_y``.

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
    classes: tuple[str, ...] = ()
    emb = np.zeros((sum(sizes), 2), np.float32)
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
        with torch_malloc():
            if getattr(model, "guided", False):  # named types and guide-map positions
                from ..models import predict_guided

                clusters, probs, emb = predict_guided(model, allc,
                                                      batch_size=CPU_PREDICT_BATCH)
                classes = model.classes
            else:
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
        if classes:  # a guided model: the type's name, its probabilities, the map position
            t["cell_type"] = np.asarray(classes, dtype=object)[clusters[i : i + n]].astype(str)
            for c, name in enumerate(classes):
                t[f"p_{name}"] = probs[i : i + n, c].astype(np.float32)
            t["emb_x"] = emb[i : i + n, 0]
            t["emb_y"] = emb[i : i + n, 1]
        rng = np.random.default_rng([*seed, first_tile + j])
        rows = np.sort(rng.choice(n, min(quota, n), replace=False)) if n else np.zeros(0, int)
        out.append((t, crops[rows], rows.astype(np.int64)))
        i += n
    for j, failure in failed.items():
        out.insert(j, failure)
    return out


#: glibc mallopt parameter numbers and the mmap threshold torch work gets (the largest
#: glibc accepts on 64-bit) instead of the fixed 128 KiB a worker starts with.
_M_MMAP_THRESHOLD = -3
_TORCH_MMAP_THRESHOLD = 32 << 20
_DEFAULT_MMAP_THRESHOLD = 128 << 10


@contextlib.contextmanager
def torch_malloc() -> Iterator[None]:
    """Let torch reuse freed memory inside a Dask worker, for the length of the block.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which also pins glibc's
    mmap threshold at 128 KiB: every activation tensor above it is mapped and unmapped on
    each step, and page faults dominate. Measured on 2 cores: a fast-preset training
    iteration took 1.16 s in a worker against 0.32 s in a plain process, and 0.33 s with
    this (``docs/benchmarks.md``). The threshold is put back afterwards, so segmentation
    tasks keep returning memory to the system as Dask intends.
    """
    libc = _libc() if "MALLOC_TRIM_THRESHOLD_" in os.environ else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _TORCH_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl without mallopt): nothing to tune
        return None


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


def region_expected(cells: pd.DataFrame, k: int, grid: tuple[int, int, float]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Expected count (sum of Q's probabilities) and Poisson-binomial variance of each
    cluster per region, float64 (rows, cols, k) each; cells without probabilities (not
    classified) add nothing."""
    rows, cols, edge = grid
    if k == 0 or len(cells) == 0 or "p_0" not in cells:
        z = np.zeros((rows, cols, max(k, 0)))
        return z, z.copy()
    p = cells[[f"p_{j}" for j in range(k)]].to_numpy(np.float64)
    p = np.where(np.isfinite(p), p, 0.0)
    iy = np.clip((cells["y_px"].to_numpy() // edge).astype(np.int64), 0, rows - 1)
    ix = np.clip((cells["x_px"].to_numpy() // edge).astype(np.int64), 0, cols - 1)
    flat = iy * cols + ix
    e = np.zeros((rows * cols, k))
    v = np.zeros((rows * cols, k))
    np.add.at(e, flat, p)
    np.add.at(v, flat, p * (1.0 - p))
    return e.reshape(rows, cols, k), v.reshape(rows, cols, k)


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
              else np.zeros((0, params.crop_size, params.crop_size, 3), np.uint8))
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
    expected, variance = region_expected(cells, k, grid)
    return {"n_cells": len(cells), "n_classified": int(per_cluster.sum()),
            "per_cluster": per_cluster.tolist(), "counts": counts, "cells": total,
            "expected": expected, "variance": variance,
            "tissue": tissue.astype(np.float32), "region_px": edge,
            "bad_tiles": [asdict(t) for t in bad]}


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

