"""Model checkpoints at a local path or an fsspec URL (``s3://bucket/run/model.pt``).

On Kubernetes the run's outputs live in object storage and no disk is shared between pods,
so a model trained on the GPU worker is uploaded next to them, and every process that
classifies with it (workers, the client, report commands) reads it through a local copy.
The copy is cached per process host under ``$SLIDECENSUS_CACHE/models`` (default
``~/.cache/slidecensus/models``), keyed by the URL and the object's version (ETag or
modification time, and size), so a retrained model at the same URL is fetched again; each
process checks a URL's version at most once every :data:`RECHECK_S` seconds.
``slidecensus.models`` itself only ever sees local files (it uses torch and numpy only).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..errors import InvalidInputError

__all__ = ["is_url", "local_model", "model_exists", "publish_model"]

#: Seconds a fetched URL's version is trusted before the object is checked again.
RECHECK_S = 60.0
_RECENT: dict[str, tuple[float, str]] = {}


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _fs(url: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)  # listings cached by an earlier call may predate an upload
    return fs, path


def cache_dir() -> Path:
    """Where fetched checkpoints are kept on this host."""
    root = os.environ.get("SLIDECENSUS_CACHE") or Path.home() / ".cache" / "slidecensus"
    return Path(root) / "models"


def model_exists(model: str | os.PathLike) -> bool:
    """Whether a checkpoint is at ``model`` (a local file or an object)."""
    if not is_url(model):
        return Path(model).is_file()
    fs, path = _fs(str(model))
    return bool(fs.exists(path))


def local_model(model: str | os.PathLike) -> str:
    """A local path holding the checkpoint at ``model`` (``model`` itself when local).

    Raises
    ------
    InvalidInputError
        When there is no object at the URL.
    """
    if not is_url(model):
        return str(model)
    url = str(model)
    seen = _RECENT.get(url)
    if seen is not None and time.monotonic() - seen[0] < RECHECK_S and Path(seen[1]).is_file():
        return seen[1]  # one version check per URL a minute, not one per classify task
    fs, path = _fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InvalidInputError(f"model checkpoint {url} does not exist") from None
    version = {k: str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime", "size")
               if info.get(k) is not None}
    key = hashlib.sha256(json.dumps([url, version], sort_keys=True).encode()).hexdigest()[:24]
    target = cache_dir() / f"{key}.pt"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            fs.get_file(path, str(tmp))
            os.replace(tmp, target)  # concurrent fetches on one host each rename a whole file
        finally:
            tmp.unlink(missing_ok=True)
    _RECENT[url] = (time.monotonic(), str(target))
    return str(target)


def publish_model(local: str | os.PathLike, target: str) -> None:
    """Upload a finished checkpoint to ``target`` (one PUT: the object appears whole)."""
    fs, path = _fs(target)
    fs.put_file(str(local), path)
    fs.invalidate_cache(path)
    _RECENT.pop(target, None)  # this process sees the new version at once
