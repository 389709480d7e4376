"""Training the cell model on a cohort: a seeded crop sample gathered to one worker.

:func:`train_from_cohort`: a seeded sample of tiles per slide is segmented
(:func:`sample_slide_crops`), a capped, seeded sample of their crops is gathered to one
(GPU) worker, which trains the InfoGAN and writes the checkpoint, reporting its progress to
the client on :data:`TRAIN_TOPIC`.

:func:`train_guided_from_cohort`: labelled points (:func:`read_cell_labels`) are matched to
the nuclei the census segments near them (:func:`labelled_slide_crops`, :func:`match_points`)
and the matched crops train a guided embedding (Gräbel et al.) on one worker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError
from ..nuclei.normalize import StainNorm
from .census import Progress, ProgressCallback, _has_gpu_worker, _one_line, _row_mpp
from .cohort import read_cohort
from .modelfiles import is_url
from .plan import (
    CensusParams,
    cohort_stain_target,
    guided_crop_size,
    plan_slide,
    slide_lab_stats,
    slide_mpp,
)
from .tasks import segment_tile_task

__all__ = [
    "LABEL_FILE_COLUMNS",
    "MATCH_UM",
    "TRAIN_TOPIC",
    "gather_labelled_crops",
    "labelled_slide_crops",
    "match_points",
    "read_cell_labels",
    "sample_slide_crops",
    "train_from_cohort",
    "train_guided_from_cohort",
]

log = logging.getLogger(__name__)


def sample_slide_crops(path: str, mpp: float | None, params: CensusParams, n_tiles: int,
                       n_cells: int, seed: int, budget_px: float | None = None) -> np.ndarray:
    """A seeded sample of one slide's crops: ``n_tiles`` random tiles, at most ``n_cells``
    crops from them (so a huge slide cannot dominate the training set).

    ``budget_px`` bounds the pixels segmented: the tiles are cut to those that fit in it,
    and when not even one tile fits, the slide gives one tile with probability
    budget / tile area (seeded), so a cohort of many large slides still segments about
    its budget in all, from a random subset of its slides.
    """
    plan = plan_slide(path, mpp, params)
    rng = np.random.default_rng([seed, int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)])
    tiles = list(plan.tiles)
    if budget_px is not None and tiles:
        area = float(np.mean([t.rw * t.rh for t in tiles]))
        fit = int(budget_px // area)
        n_tiles = min(n_tiles, fit) if fit >= 1 else int(rng.random() < budget_px / area)
    if len(tiles) > n_tiles:
        tiles = [tiles[i] for i in sorted(rng.choice(len(tiles), n_tiles, replace=False))]
    crops = [segment_tile_task(path, mpp, plan.mpp, t, plan.stain, params)[1] for t in tiles]
    allc = np.concatenate(crops) if crops else np.zeros((0, 32, 32, 3), np.uint8)
    if len(allc) > n_cells:
        allc = allc[np.sort(rng.choice(len(allc), n_cells, replace=False))]
    return allc


#: Caps of the training sample, whatever the cohort's size: tiles of the default size
#: segmented for it (as a pixel budget: small images count by their area), slides opened
#: for it, and crops gathered (60 000 is the sample of Hu et al.).
MAX_TRAIN_TILES = 64
MAX_TRAIN_SLIDES = 1024
MAX_TRAIN_CELLS = 60000


def _cap_sample(table: pd.DataFrame, tiles_per_slide: int, cells_per_slide: int,
                max_tiles: int, max_cells: int, seed: int, tile_size: int
                ) -> tuple[pd.DataFrame, int, int]:
    """The slides, tiles per slide and crops per slide of a capped training sample."""
    n = len(table)
    if n == 0:
        return table, tiles_per_slide, cells_per_slide
    if n > MAX_TRAIN_SLIDES:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(n, MAX_TRAIN_SLIDES, replace=False))
        log.info("training sample: %d of %d slides (seeded)", MAX_TRAIN_SLIDES, n)
        table, n = table.iloc[keep], MAX_TRAIN_SLIDES
    tiles = max(1, min(tiles_per_slide, max_tiles // n))
    cells = max(1, min(cells_per_slide, -(-max_cells // min(n, max_tiles))))
    log.info("training sample capped at %d tiles and %d crops per slide, about %d tiles of "
             "%d px in all (%d slides; at most %d crops)", tiles, cells, max_tiles,
             tile_size, n, max_cells)
    return table, tiles, cells


#: Dask event topic on which the training worker reports progress to the client.
TRAIN_TOPIC = "slidecensus-train"


def _training_threads() -> int:
    """Torch threads for training on a CPU worker: every core this process may use. The
    training task runs alone (the sample is gathered first), so the cores the other
    workers' segmentation used are free; measured 1.6x faster on 2 cores than 1 thread."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _train_task(model_out: str, config: Any, *samples: np.ndarray,
                max_cells: int | None = None) -> str:
    import torch

    from .tasks import torch_malloc

    if not torch.cuda.is_available():
        before = torch.get_num_threads()
        torch.set_num_threads(_training_threads())
        try:
            with torch_malloc():
                return _train_task_on(model_out, config, *samples, max_cells=max_cells)
        finally:
            torch.set_num_threads(before)
    with torch_malloc():
        return _train_task_on(model_out, config, *samples, max_cells=max_cells)


def _train_task_on(model_out: str, config: Any, *samples: np.ndarray,
                   max_cells: int | None = None) -> str:
    from ..models import format_progress, train_infogan
    from .modelfiles import cache_dir, publish_model

    parts = [s for s in samples if len(s)]
    crops = np.concatenate(parts) if parts else np.zeros((0, 32, 32, 3), np.uint8)
    if max_cells is not None and len(crops) > max_cells:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(crops), max_cells,
                                                                 replace=False))
        log.info("training sample: %d of %d crops (seeded cap)", max_cells, len(crops))
        crops = crops[keep]
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


def _show_training(event: tuple[float, dict], progress: ProgressCallback | None = None
                   ) -> None:
    """Client side of :data:`TRAIN_TOPIC`: each progress record as it arrives, logged or
    given to ``progress`` (phase ``train``)."""
    from ..models import format_progress

    rec = event[1]
    if progress is None:
        log.info("training: %s", format_progress(rec))
    else:
        progress(Progress("train", int(rec["iteration"]), int(rec["total"]),
                          unit="iterations", detail=format_progress(rec)))


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
    preset: str = "auto",
    settings: dict[str, Any] | None = None,
    max_cells: int = MAX_TRAIN_CELLS,
    max_tiles: int = MAX_TRAIN_TILES,
    progress: ProgressCallback | None = None,
) -> Path | str:
    """Gather a seeded sample of crops across the cohort and train the model on one worker
    (the GPU worker when the cluster has one). Slides that fail to open are skipped with a
    warning; training needs at least one batch of cells. ``model_out`` may be an fsspec URL
    (``s3://bucket/run/model.pt``): the worker uploads the finished checkpoint there.

    Without ``config`` the configuration is ``preset``'s (``auto``: ``paper`` when the
    training worker has a GPU, ``fast`` otherwise; logged) with ``seed`` and any field
    of ``settings`` (``{"k": 8, "iterations": 300}``) overridden. The
    sample is capped whatever the cohort's size, so that gathering it and a ``fast``
    training stay within minutes: at most ``max_tiles`` tiles (slides are sampled, seeded,
    when there are more slides than that) and ``max_cells`` crops in all (logged). The
    crops are cut the way the configuration says (``crop_mode``), as the census will.

    ``progress`` gets a :class:`~.census.Progress` as each slide's sample is in (phase
    ``sample``) and as the training goes (phase ``train``, in iterations), instead of
    log lines.
    """
    from ..models import preset_config, resolve_preset

    # outlines are not needed for the training sample
    params = replace(params or CensusParams(), outlines=False)
    table = cohort if isinstance(cohort, pd.DataFrame) else read_cohort(cohort)
    if client is None:
        from ..cluster import get_client

        with get_client(cluster) as c:
            return train_from_cohort(table, model_out, config=config, client=c, params=params,
                                     tiles_per_slide=tiles_per_slide,
                                     cells_per_slide=cells_per_slide, seed=seed,
                                     preset=preset, settings=settings, max_cells=max_cells,
                                     max_tiles=max_tiles,
                                     progress=progress)
    gpu = _has_gpu_worker(client)
    if config is None:
        name, why = resolve_preset(preset, gpu)
        config = preset_config(name, **{"seed": seed, **(settings or {})})
        log.info("training preset %s (%s)", name, why)
    else:
        log.info("training with the configuration given (preset %s)", config.preset)
    params = params.with_model_crops(config.crop_spec())
    table, tiles_per_slide, cells_per_slide = _cap_sample(table, tiles_per_slide,
                                                          cells_per_slide, max_tiles,
                                                          max_cells, seed, params.tile_size)
    if params.stain_norm.cohort:
        params, config = _cohort_style(client, table, params, config)
    config = replace(config, stain_norm=params.stain_norm.describe())
    budget = max_tiles * (params.tile_size + 256) ** 2 / max(len(table), 1)  # px per slide
    samples = []
    for _, row in table.iterrows():
        samples.append(client.submit(sample_slide_crops, row["path"], _row_mpp(row), params,
                                     tiles_per_slide, cells_per_slide, seed, budget,
                                     pure=False))
    ok, cells = [], 0
    if progress is not None:
        progress(Progress("sample", 0, len(samples),
                          dashboard=getattr(client, "dashboard_link", None)))
    for i, ((_, row), fut) in enumerate(zip(table.iterrows(), samples, strict=True)):
        if fut.status == "error" or fut.exception(timeout=None) is not None:
            log.warning("%s: skipped for training: %s", row["slide_id"],
                        _one_line(fut.exception()))
            status = "skipped"
        else:
            ok.append(fut)
            status = "ok"
            if progress is not None:  # the sample's size, counted where it lies
                cells += int(client.submit(len, fut, pure=False).result())
        if progress is not None:
            progress(Progress("sample", i + 1, len(samples), cells=cells,
                              item=str(row["slide_id"]), status=status))
    res_kw = {"resources": {"GPU": 1}} if gpu else {}
    if is_url(model_out):
        target = str(model_out)
    else:
        Path(model_out).parent.mkdir(parents=True, exist_ok=True)
        target = str(Path(model_out).resolve())
    log.info("training on the crop samples of %d slides on %s", len(ok),
             "the GPU worker" if res_kw else "a CPU worker (no worker has a GPU resource)")
    client.subscribe_topic(TRAIN_TOPIC, functools.partial(_show_training,
                                                          progress=progress))
    try:
        done = client.submit(_train_task, target, config, *ok, max_cells=max_cells,
                             pure=False, **res_kw)
        result = done.result()
        return result if is_url(result) else Path(result)
    finally:
        client.unsubscribe_topic(TRAIN_TOPIC)


def _cohort_style(client: Any, table: pd.DataFrame, params: CensusParams, config: Any
                  ) -> tuple[CensusParams, Any]:
    """``--stain-target cohort``: crops Reinhard-normalised to the style of the training
    slides (their pooled lαβ statistics), recorded in the model so the census cuts its crops
    the same way. Slides that fail to open are left out (they are skipped for training
    too)."""
    futs = [client.submit(slide_lab_stats, row["path"], _row_mpp(row), pure=False)
            for _, row in table.iterrows()]
    stats = [f.result() for f in futs if f.exception(timeout=None) is None]
    if not stats:
        return params, config
    target = cohort_stain_target(stats)
    log.info("crops normalised to the cohort's style (Reinhard; lαβ mean %s, std %s, from "
             "%d slides)", ", ".join(f"{v:.3f}" for v in target.lab_mean),
             ", ".join(f"{v:.3f}" for v in target.lab_std), len(stats))
    return (replace(params, stain_norm=StainNorm("reinhard", target=target)),
            replace(config, crop_lab_target=(target.lab_mean, target.lab_std)))


# ------------------------------------------------------------------ guided (labelled) training

#: Columns a cell-label file may have: where (``path`` or ``slide_id``), the point, the label.
LABEL_FILE_COLUMNS = ("path", "slide_id", "x_px", "y_px", "label")
#: A point labels the nucleus under it, or else the nearest nucleus centroid within this.
MATCH_UM = 5.0
#: Tiles within this of a labelled point are segmented (a nucleus under the point may
#: belong to a neighbouring tile's core).
_REACH_UM = 20.0


def read_cell_labels(path: str | os.PathLike, cohort: pd.DataFrame) -> pd.DataFrame:
    """A cell-label file (QuPath-style points: ``path`` or ``slide_id``, ``x_px``, ``y_px``,
    ``label``) as a table ``line, slide_id, x_px, y_px, label``, checked against the cohort.

    Every problem is one line: unknown or missing columns, a point that is not a number,
    an empty label, a slide the cohort does not hold.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"{p}: no such label file")
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{p}: not a readable CSV file ({_one_line(str(exc))})"
                                ) from None
    raw.columns = [str(c).strip() for c in raw.columns]
    unknown = [c for c in raw.columns if c not in LABEL_FILE_COLUMNS]
    if unknown:
        raise InvalidInputError(f"{p}: unknown column(s) {', '.join(unknown)}; expected "
                                f"path or slide_id, x_px, y_px, label")
    missing = [c for c in ("x_px", "y_px", "label") if c not in raw.columns]
    if missing or not ({"path", "slide_id"} & set(raw.columns)):
        need = missing + ([] if {"path", "slide_id"} & set(raw.columns)
                          else ["path or slide_id"])
        raise InvalidInputError(f"{p}: lacks column(s) {', '.join(need)}; expected path or "
                                f"slide_id, x_px, y_px, label")
    if raw.empty:
        raise InvalidInputError(f"{p}: no labelled points")
    out = pd.DataFrame({"line": np.arange(len(raw)) + 2})  # line 1 is the header
    for c in ("x_px", "y_px"):
        vals = pd.to_numeric(raw[c].str.strip(), errors="coerce")
        bad = ~np.isfinite(vals.to_numpy(float))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidInputError(f"{p}: line {i + 2}: {c} must be a number, got "
                                    f"{raw[c].iloc[i]!r} ({int(bad.sum())} such lines)")
        out[c] = vals.to_numpy(float)
    out["label"] = raw["label"].str.strip().to_numpy()
    empty = np.flatnonzero(out["label"].to_numpy() == "")
    if len(empty):
        raise InvalidInputError(f"{p}: line {empty[0] + 2}: empty label ({len(empty)} such "
                                f"lines)")
    by_id = set(cohort["slide_id"].astype(str))
    by_path = {str(Path(v).resolve()): s for v, s in zip(cohort["path"], cohort["slide_id"],
                                                          strict=True)}
    sid = raw["slide_id"].str.strip() if "slide_id" in raw.columns else pd.Series([""] * len(raw))
    if "path" in raw.columns:
        via_path = [by_path.get(str((p.parent / v.strip()).resolve()) if v.strip() else "", "")
                    for v in raw["path"]]
        sid = pd.Series([s or v for s, v in zip(sid, via_path, strict=True)])
    unknown_slides = sorted({(raw["path"].iloc[i] if "path" in raw.columns and not s else s)
                             for i, s in enumerate(sid) if s not in by_id})
    if unknown_slides:
        shown = ", ".join(map(str, unknown_slides[:10]))
        more = f" and {len(unknown_slides) - 10} more" if len(unknown_slides) > 10 else ""
        raise InvalidInputError(f"{p}: labels name slide(s) not in the cohort: {shown}{more}")
    out.insert(1, "slide_id", sid.to_numpy(str))
    return out


def match_points(points_xy: np.ndarray, cells: pd.DataFrame, max_dist_px: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nucleus each labelled point names: the one whose outline holds the point, else
    the nearest centroid within ``max_dist_px``.

    Parameters
    ----------
    points_xy : (n, 2) level-0 px (x, y).
    cells : table with ``x_px, y_px``, ``bbox_x0, bbox_y0, bbox_x1, bbox_y1`` and, where
        known, ``outline_px`` (flat x, y vertices, as :func:`~..nuclei.outlines.pack_outlines`).

    Returns
    -------
    row : int64 (n,) row of ``cells``, -1 when unmatched.
    how : str (n,) ``under``, ``nearest`` or ``""``.
    dist_px : float64 (n,) distance to the matched centroid (NaN when unmatched).
    """
    from skimage.measure import points_in_poly

    pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
    n = len(pts)
    row, how, dist = np.full(n, -1, np.int64), np.full(n, "", object), np.full(n, np.nan)
    if n == 0 or len(cells) == 0:
        return row, how.astype(str), dist
    cx, cy = cells["x_px"].to_numpy(float), cells["y_px"].to_numpy(float)
    x0, y0 = cells["bbox_x0"].to_numpy(float), cells["bbox_y0"].to_numpy(float)
    x1, y1 = cells["bbox_x1"].to_numpy(float), cells["bbox_y1"].to_numpy(float)
    outlines = cells["outline_px"].to_numpy() if "outline_px" in cells else None
    for i, (px, py) in enumerate(pts):
        d = np.hypot(cx - px, cy - py)
        inside = np.flatnonzero((px >= x0) & (px <= x1) & (py >= y0) & (py <= y1))
        hits = []
        for j in inside[np.argsort(d[inside])]:
            verts = None if outlines is None else np.asarray(outlines[j], np.float64)
            if verts is None or len(verts) < 6:  # no outline: the box holds it
                hits.append(j)
                break
            if points_in_poly(np.array([[px, py]]), verts.reshape(-1, 2))[0]:
                hits.append(j)
                break
        if hits:
            row[i], how[i] = hits[0], "under"
        else:
            j = int(np.argmin(d))
            if d[j] <= max_dist_px:
                row[i], how[i] = j, "nearest"
        if row[i] >= 0:
            dist[i] = d[row[i]]
    return row, how.astype(str), dist


def labelled_slide_crops(path: str, mpp: float | None, params: CensusParams,
                         points_xy: np.ndarray) -> dict[str, Any]:
    """Segment the tiles of one slide near its labelled points and cut the matched nuclei's
    crops (the census' own segmentation and crops); runs on a worker.

    Returns ``crops`` (m, 32, 32, 3) of the matched points, and per point ``row`` (its
    index among the crops, -1 when unmatched), ``how`` and ``dist_um``.

    Raises InvalidInputError when a point lies outside the image.
    """
    plan = plan_slide(path, mpp, params)
    pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
    h, w = plan.shape
    out_of = np.flatnonzero((pts[:, 0] < 0) | (pts[:, 1] < 0) | (pts[:, 0] >= w)
                            | (pts[:, 1] >= h))
    if len(out_of):
        x, y = pts[out_of[0]]
        raise InvalidInputError(f"{path}: labelled point ({x:g}, {y:g}) lies outside the "
                                f"image ({w} x {h} px; {len(out_of)} such points)")
    reach = _REACH_UM / plan.mpp
    tables, crops = [], []
    for t in plan.tiles:
        near = ((pts[:, 0] >= t.x - reach) & (pts[:, 0] < t.x + t.w + reach)
                & (pts[:, 1] >= t.y - reach) & (pts[:, 1] < t.y + t.h + reach))
        if near.any():
            table, c = segment_tile_task(path, mpp, plan.mpp, t, plan.stain,
                                         replace(params, outlines=True))
            tables.append(table)
            crops.append(c)
    cells = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    c = params.crop_size
    allc = np.concatenate(crops) if crops else np.zeros((0, c, c, 3), np.uint8)
    row, how, dist = match_points(pts, cells, MATCH_UM / plan.mpp)
    why = f"no nucleus within {MATCH_UM:g} µm" if tables else "no tissue tile at the point"
    how = np.where(row < 0, why, how)
    matched = np.flatnonzero(row >= 0)
    index = np.full(len(pts), -1, np.int64)
    index[matched] = np.arange(len(matched))
    return {"crops": allc[row[matched]], "row": index, "how": how.astype(str),
            "dist_um": dist * plan.mpp}


def gather_labelled_crops(client: Any, table: pd.DataFrame, labels: pd.DataFrame,
                          params: CensusParams) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Crops and labels of every matched point of ``labels`` (from
    :func:`read_cell_labels`), and a report of every point (``matched``, ``how``,
    ``dist_um``; unmatched points say why). Slides that fail to open are skipped: their
    points are reported unmatched with the reason; a point outside its image raises."""
    rows = table.set_index(table["slide_id"].astype(str))
    futs = {}
    for sid, grp in labels.groupby("slide_id", sort=False):
        r = rows.loc[sid]
        futs[sid] = client.submit(labelled_slide_crops, r["path"], _row_mpp(r), params,
                                  grp[["x_px", "y_px"]].to_numpy(float), pure=False)
    report = labels.copy()
    report["matched"], report["how"], report["dist_um"] = False, "", np.nan
    crops, names = [], []
    for sid, fut in futs.items():
        idx = labels.index[labels["slide_id"] == sid]
        exc = fut.exception(timeout=None)
        if isinstance(exc, InvalidInputError):
            raise exc
        if exc is not None:
            log.warning("%s: skipped for training: %s", sid, _one_line(exc))
            report.loc[idx, "how"] = f"slide unreadable: {_one_line(exc)}"
            continue
        res = fut.result()
        ok = res["row"] >= 0
        report.loc[idx, "matched"] = ok
        report.loc[idx, "how"] = res["how"]
        report.loc[idx, "dist_um"] = res["dist_um"]
        crops.append(res["crops"])
        names.extend(labels.loc[idx[ok], "label"].tolist())
    c = params.crop_size
    allc = np.concatenate(crops) if crops else np.zeros((0, c, c, 3), np.uint8)
    return allc, np.asarray(names, dtype=str), report


#: Torch threads of the guided training: its network is small, so a second thread gains
#: little and, on a busy 2-core machine, made each epoch 2x slower (OpenMP waits).
GUIDED_THREADS = 1


def _guided_task(model_out: str, crops: np.ndarray, names: np.ndarray, config: Any,
                 guide: Any) -> str:
    """Train the guided model on one worker, reporting each epoch on :data:`TRAIN_TOPIC`."""
    import torch

    from ..models.guided import train_guided
    from .modelfiles import cache_dir, publish_model
    from .tasks import torch_malloc

    def progress(rec: dict[str, Any]) -> None:
        log.info("training epoch %d/%d: loss %.3f, validation macro F1 %.3f", rec["epoch"],
                 rec["total"], rec["loss"], rec["val_macro_f1"])
        try:
            from distributed import get_worker

            get_worker().log_event(TRAIN_TOPIC, {"iteration": rec["epoch"],
                                                 "total": rec["total"], **rec})
        except ValueError:  # not running on a worker
            pass

    before = torch.get_num_threads()
    torch.set_num_threads(min(_training_threads(), GUIDED_THREADS))
    try:
        with torch_malloc():
            target = model_out
            if is_url(model_out):
                target = str(cache_dir() / f"guided-{os.getpid()}.pt")
            train_guided(crops, names, config, guide, target, progress=progress)
            if is_url(model_out):
                publish_model(target, model_out)
                Path(target).unlink()
            return model_out
    finally:
        torch.set_num_threads(before)


def train_guided_from_cohort(
    cohort: str | os.PathLike | pd.DataFrame,
    labels: str | os.PathLike,
    model_out: str | os.PathLike,
    *,
    guide: str | os.PathLike | None = None,
    client: Any | None = None,
    cluster: str = "local",
    params: CensusParams | None = None,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    unmatched_out: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[Path | str, pd.DataFrame]:
    """Train a guided model (Gräbel et al.) from labelled points of the cohort's slides.

    Each point of ``labels`` (see :func:`read_cell_labels`) names the segmented nucleus
    under it, or the nearest one within :data:`MATCH_UM`; points left unmatched are logged
    with their reason and written to ``unmatched_out`` (default: ``<model>.unmatched.csv``
    beside a local model) — never silently dropped. Labels the guide (``guide``, default
    the haematopoietic one) does not place are refused in one line before any work.
    ``settings`` overrides fields of :class:`~slidecensus.models.GuidedConfig`.

    Returns the checkpoint's location and the per-point report.
    """
    from ..models.guided import GuidedConfig, check_labels, load_guide

    params = params or CensusParams()
    table = cohort if isinstance(cohort, pd.DataFrame) else read_cohort(cohort)
    points = read_cell_labels(labels, table)
    g = load_guide(guide)
    check_labels(points["label"].unique().tolist(), g)
    config = GuidedConfig(seed=seed, **(settings or {}))
    params = replace(params.with_model_crops(config.crop_spec()), outlines=False)
    if client is None:
        from ..cluster import get_client

        with get_client(cluster) as c:
            return train_guided_from_cohort(table, labels, model_out, guide=guide, client=c,
                                            params=params, seed=seed, settings=settings,
                                            unmatched_out=unmatched_out, progress=progress)
    config = replace(config, stain_norm=params.stain_norm.describe())
    if "crop_size" not in (settings or {}):
        config = _auto_crop_size(client, table, points, config)
        params = params.with_model_crops(config.crop_spec())
    if progress is not None:
        progress(Progress("sample", 0, int(points["slide_id"].nunique()),
                          dashboard=getattr(client, "dashboard_link", None)))
    crops, names, report = gather_labelled_crops(client, table, points, params)
    bad = report[~report["matched"]]
    log.info("%d of %d labelled points matched a nucleus (%d unmatched)", len(report) - len(bad),
             len(report), len(bad))
    if len(bad):
        where = unmatched_out
        if where is None and not is_url(model_out):
            where = Path(str(model_out) + ".unmatched.csv")
        if where is not None:
            Path(where).parent.mkdir(parents=True, exist_ok=True)
            bad.to_csv(where, index=False)
        for _, r in bad.head(10).iterrows():
            log.warning("unmatched label line %d (%s at %g, %g, %s): %s", r["line"],
                        r["slide_id"], r["x_px"], r["y_px"], r["label"], r["how"])
        if where is not None:
            log.warning("%d unmatched labelled points listed in %s", len(bad), where)
    if len(set(names.tolist())) < 2:
        raise InvalidInputError(f"only {len(names)} labelled points matched a nucleus, of "
                                f"{len(set(names.tolist()))} type(s); training needs two or "
                                f"more types")
    if progress is not None:
        progress(Progress("sample", int(points["slide_id"].nunique()),
                          int(points["slide_id"].nunique()), cells=len(names)))
    if is_url(model_out):
        target = str(model_out)
    else:
        Path(model_out).parent.mkdir(parents=True, exist_ok=True)
        target = str(Path(model_out).resolve())
    client.subscribe_topic(TRAIN_TOPIC, functools.partial(_show_guided, progress=progress))
    try:
        result = client.submit(_guided_task, target, crops, names, config, g,
                               pure=False).result()
    finally:
        client.unsubscribe_topic(TRAIN_TOPIC)
    return (result if is_url(result) else Path(result)), report


def _auto_crop_size(client: Any, table: pd.DataFrame, points: pd.DataFrame,
                    config: Any) -> Any:
    """``config`` with the crop size of :func:`~slidecensus.engine.plan.guided_crop_size`
    for the labelled slides' resolution (read on the workers), logged."""
    rows = table[table["slide_id"].astype(str).isin(set(points["slide_id"].astype(str)))]
    futs = [client.submit(slide_mpp, r["path"], _row_mpp(r), pure=False)
            for _, r in rows.iterrows()]
    mpps = []
    for f in futs:
        try:
            mpps.append(f.result())
        except Exception as exc:  # an unreadable slide fails later, alone, with its reason
            log.debug("no resolution for one labelled slide: %s", exc)
    if not mpps:
        return config
    size = guided_crop_size(mpps, config.crop_window_um)
    log.info("guided crops: %d px for the %g µm window (labelled slides at a median %.3g "
             "µm/px, %d px of their own); --crop-size overrides", size,
             config.crop_window_um, float(np.median(mpps)),
             round(config.crop_window_um / float(np.median(mpps))))
    return replace(config, crop_size=size)


def _show_guided(event: tuple[float, dict], progress: ProgressCallback | None = None) -> None:
    rec = event[1]
    detail = (f"epoch {rec['iteration']}/{rec['total']} loss {rec.get('loss', 0):.3f} "
              f"val macro F1 {rec.get('val_macro_f1', 0):.3f}")
    if progress is None:
        log.info("training: %s", detail)
    else:
        progress(Progress("train", int(rec["iteration"]), int(rec["total"]), unit="epochs",
                          detail=detail))
