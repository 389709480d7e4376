"""The cohort census as a Dask graph: scheduling, streaming and committing slides.

Each slide's graph is :func:`~.plan.plan_slide` → :func:`~.tasks.segment_tile_guarded` per
tile → :func:`~.tasks.classify_task` per batch of tiles → :func:`~.tasks.finish_slide`. The
client (:func:`run_cohort`) streams slides through the cluster with a bounded number in
flight, writes each slide's maps into ``census.zarr`` and commits the slide in a manifest
last, so a rerun skips complete slides and redoes the rest.

Failures: a slide that cannot be opened or planned fails alone with its reason; a slide
with unreadable tiles fails or is ``partial`` as :mod:`.tasks` describes. Each slide's
status and reason go to ``slides.csv``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError, SlidecensusError
from ..nuclei.normalize import StainNorm, StainTarget
from .cohort import read_cohort, safe_name
from .modelfiles import ModelRef, is_url, local_model, model_exists, pin_model
from .outputs import OutputDir, RunLock
from .plan import COHORT_TARGET, CensusParams, SlidePlan, model_crop_spec, plan_slide
from .tasks import TileFailure, classify_task, finish_slide, segment_tile_guarded

__all__ = [
    "SCHEMA_VERSION",
    "WORKER_BASE_BYTES",
    "Progress",
    "run_cohort",
    "write_census_group",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Progress:
    """Where a long command stands, for a progress display: the engine reports through a
    ``progress`` callback and never prints.

    ``phase`` names the step (``census``, ``sample`` and ``train`` for
    :func:`~.train.train_from_cohort`, ``segment``); ``done`` of ``total`` ``unit`` are
    finished (slides done before a resumed run included) and ``cells`` counted so far.
    ``item`` and ``status`` name what just finished (empty on a phase's first report),
    ``detail`` is a line about it (training losses), and ``dashboard`` is the Dask
    dashboard's address, on a phase's first report.
    """

    phase: str
    done: int
    total: int
    unit: str = "slides"
    cells: int = 0
    item: str = ""
    status: str = ""
    detail: str = ""
    dashboard: str | None = None


#: A ``progress`` callback.
ProgressCallback = Callable[[Progress], None]


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
    from ..models.uncertainty import interval_from_moments

    e = res.get("expected", np.zeros(counts.shape))
    lo, hi = interval_from_moments(e, res.get("variance", np.zeros(counts.shape)), classified)
    ds = xr.Dataset(
        {
            "counts": (("y", "x", "cluster"), counts.astype(np.int32)),
            "proportion": (("y", "x", "cluster"), prop.astype(np.float32)),
            # expected counts (sums of Q's probabilities) and their 95 % intervals
            "expected": (("y", "x", "cluster"), e.astype(np.float32)),
            "expected_lo": (("y", "x", "cluster"), lo.astype(np.float32)),
            "expected_hi": (("y", "x", "cluster"), hi.astype(np.float32)),
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
    return int(_model_config(model).get("k", 0))


def _model_config(model: str | ModelRef | None) -> dict:
    """The model's training configuration (k, preset, crop mode ...), {} without a model;
    loading it refuses foreign or damaged checkpoints in one line."""
    if model is None:
        return {}
    from ..models import CheckpointError, load_model

    try:
        return load_model(local_model(model)).config.to_dict()
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
    progress: ProgressCallback | None = None,
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
    progress : called with a :class:`Progress` (phase ``census``) once the run knows what
        is left to do, and after each slide; else the dashboard's address is logged.
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
    model_config = _model_config(model)  # loads it: a foreign or damaged one stops here
    k = int(model_config.get("k", 0))
    if model_config:  # the census cuts the crops the model was trained on
        params = params.with_model_crops(model_crop_spec(model_config))
        lab = model_config.get("crop_lab_target")
        if lab and params.stain_norm.is_default:  # the crops in the cohort style it learned
            params = replace(params, stain_norm=StainNorm(
                "reinhard", target=StainTarget(lab_mean=tuple(lab[0]), lab_std=tuple(lab[1]),
                                               name=COHORT_TARGET)))
        trained = model_config.get("stain_norm", "reinhard")
        if trained != params.stain_norm.describe():
            log.warning("the model was trained on crops normalised with %s; this run "
                        "normalises with %s (give --stain-norm %s to match)", trained,
                        params.stain_norm.describe(), trained)
    out = out if isinstance(out, OutputDir) else OutputDir(out)
    out.makedirs()
    with RunLock(out):
        kw = {"model": model, "k": k, "params": params, "slides_in_flight": slides_in_flight,
              "batch_tiles": batch_tiles, "max_bad_tiles": max_bad_tiles,
              "cohort": str(cohort) if not isinstance(cohort, pd.DataFrame) else "<table>",
              "progress": progress}
        if client is not None:
            return _run_locked(table, out, client, **kw)
        from ..cluster import get_client

        with get_client(cluster) as c:
            return _run_locked(table, out, c, **kw)


def _run_locked(table: pd.DataFrame, out: OutputDir, client: Any, *,
                model: str | ModelRef | None,
                k: int, params: CensusParams, slides_in_flight: int, batch_tiles: int,
                max_bad_tiles: int, cohort: str,
                progress: ProgressCallback | None = None) -> pd.DataFrame:
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
        "cohort": cohort, "max_bad_tiles": max_bad_tiles,
        "model_config": _model_config(model) or None})
    _check_worker_memory(client, params)
    names = tuple(_model_config(model).get("classes") or ())  # a guided model's types
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
    dashboard = getattr(client, "dashboard_link", None)
    if dashboard and progress is None:
        log.info("Dask dashboard: %s", dashboard)
    total_cells = sum(int(r.get("n_cells", 0)) for r in records.values())
    if progress is not None:
        progress(Progress("census", len(records), len(table), cells=total_cells,
                          dashboard=dashboard))
    for row, rec in _stream(client, todo, out, model, k, params, gpu, batch_tiles,
                            slides_in_flight, digest, max_bad_tiles):
        records[row["slide_id"]] = rec
        _write_record(out, row["slide_id"], rec)
        _write_slides_csv(out, table, records, k, names)
        total_cells += int(rec.get("n_cells", 0))
        detail = (f"{rec.get('tiles_done', 0)} tiles, {rec['n_cells']} cells"
                  if rec["status"] == "ok" else rec["error"])
        log.info("[%d/%d slides, %d cells] %s: %s (%s)", len(records), len(table),
                 total_cells, row["slide_id"], rec["status"], detail)
        if rec.get("warning"):
            log.warning("%s: %s", row["slide_id"], rec["warning"])
        if progress is not None:
            progress(Progress("census", len(records), len(table), cells=total_cells,
                              item=str(row["slide_id"]), status=rec["status"]))
    return _write_slides_csv(out, table, records, k, names)


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
    ac = as_completed(loop=client.loop)  # this client's, not the default one

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
                   "proportions": props.tolist() if k else [],
                   **_slide_expected(res, k), "seconds":
                       time.perf_counter() - t0, "digest": digest}
            if bad:
                rec["bad_tiles"] = bad  # every one, with its reason (the CSV lists 10)
        except Exception as exc:
            rec = _failed(row, exc, digest, t0, n_tiles, plan.notes)
        fut.release()
        yield row, rec
        yield from submit_next()


def _slide_expected(res: dict, k: int) -> dict:
    """A slide's expected counts per cluster with their 95 % intervals (from the region
    sums), for its record and ``slides.csv``."""
    if not k or "expected" not in res:
        return {}
    from ..models.uncertainty import interval_from_moments

    e = np.asarray(res["expected"]).sum(axis=(0, 1))
    v = np.asarray(res["variance"]).sum(axis=(0, 1))
    lo, hi = interval_from_moments(e, v, res["n_classified"])
    return {"expected": e.tolist(), "expected_lo": lo.tolist(), "expected_hi": hi.tolist()}


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
                      k: int, names: tuple[str, ...] = ()) -> pd.DataFrame:
    """``slides.csv``: one row per slide; with a guided model's type ``names`` the
    proportions are also given as ``p_<type>`` (after ``p_0..p_{k-1}``)."""
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
        for j, name in enumerate(names):
            row[f"p_{name}"] = props[j] if j < len(props) else np.nan
        for key, name in (("expected", "e"), ("expected_lo", "lo"), ("expected_hi", "hi")):
            vals = (rec or {}).get(key) or []
            for j in range(k):
                row[f"{name}_{j}"] = round(vals[j], 3) if j < len(vals) else np.nan
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

