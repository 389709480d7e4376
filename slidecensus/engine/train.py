"""Training the cell model on a cohort: a seeded crop sample gathered to one worker.

:func:`train_from_cohort`: a seeded sample of tiles per slide is segmented
(:func:`sample_slide_crops`), a capped, seeded sample of their crops is gathered to one
(GPU) worker, which trains the InfoGAN and writes the checkpoint, reporting its progress to
the client on :data:`TRAIN_TOPIC`.
"""

from __future__ import annotations

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
from .census import _has_gpu_worker, _one_line
from .cohort import read_cohort
from .modelfiles import is_url
from .plan import CensusParams, plan_slide
from .tasks import segment_tile_task

__all__ = [
    "TRAIN_TOPIC",
    "sample_slide_crops",
    "train_from_cohort",
]

log = logging.getLogger(__name__)


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
