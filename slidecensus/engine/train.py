"""Training the cell model on a cohort: a seeded crop sample gathered to one worker.

:func:`train_from_cohort`: a seeded sample of tiles per slide is segmented
(:func:`sample_slide_crops`), a capped, seeded sample of their crops is gathered to one
(GPU) worker, which trains the InfoGAN and writes the checkpoint, reporting its progress to
the client on :data:`TRAIN_TOPIC`.
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
from .plan import CensusParams, cohort_stain_target, plan_slide, slide_lab_stats
from .tasks import segment_tile_task

__all__ = [
    "TRAIN_TOPIC",
    "sample_slide_crops",
    "train_from_cohort",
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
