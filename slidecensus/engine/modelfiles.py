"""Model checkpoints at a local path or an fsspec URL (``s3://bucket/run/model.pt``).

On Kubernetes the run's outputs live in object storage and no disk is shared between pods,
so a model trained on the GPU worker is uploaded next to them, and every process that
classifies with it (workers, the client, report commands) reads it through a local copy.
The copy is cached per process host under ``$SLIDECENSUS_CACHE/models`` (default
``~/.cache/slidecensus/models``), keyed by the URL and the object's version (ETag or
modification time, and size), so a retrained model at the same URL is fetched again. A run
pins the version once, on the client (:func:`pin_model`): every worker then classifies with
exactly the checkpoint whose digest the run records, without asking the store again.
``slidecensus.models`` itself only ever sees local files (it uses torch and numpy only).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError

__all__ = ["ModelRef", "is_url", "local_model", "model_exists", "pin_model", "publish_model"]


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint in object storage at one version (what a run classifies with)."""

    url: str
    version: str

    def __str__(self) -> str:
        return self.url


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


def _version(fs, path: str, url: str) -> str:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InvalidInputError(f"model checkpoint {url} does not exist") from None
    fields = {k: str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime", "size")
              if info.get(k) is not None}
    return json.dumps(fields, sort_keys=True)


def pin_model(model: str | os.PathLike | ModelRef) -> str | ModelRef:
    """``model`` with its current version when it is a URL (a local path is returned as is).

    Raises
    ------
    InvalidInputError
        When there is no object at the URL.
    """
    if isinstance(model, ModelRef) or not is_url(model):
        return model if isinstance(model, ModelRef) else str(model)
    fs, path = _fs(str(model))
    return ModelRef(str(model), _version(fs, path, str(model)))


def local_model(model: str | os.PathLike | ModelRef) -> str:
    """A local path holding the checkpoint ``model`` (``model`` itself when local).

    A URL is pinned to its current version first (one metadata request); a
    :class:`ModelRef` is already pinned, and a cached copy of that version is used without
    asking the store.

    Raises
    ------
    InvalidInputError
        When there is no object at the URL, or it changed since it was pinned.
    """
    if not isinstance(model, ModelRef):
        if not is_url(model):
            return str(model)
        model = pin_model(model)
    key = hashlib.sha256(json.dumps([model.url, model.version]).encode()).hexdigest()[:24]
    target = cache_dir() / f"{key}.pt"
    if target.is_file():
        return str(target)
    fs, path = _fs(model.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fs.get_file(path, str(tmp))
        if _version(fs, path, model.url) != model.version:
            raise InvalidInputError(f"model checkpoint {model.url} changed during the run "
                                    f"(retrained?); rerun to use the new one")
        os.replace(tmp, target)  # concurrent fetches on one host each rename a whole file
    finally:
        tmp.unlink(missing_ok=True)
    return str(target)


def publish_model(local: str | os.PathLike, target: str) -> None:
    """Upload a finished checkpoint to ``target`` (one PUT: the object appears whole)."""
    fs, path = _fs(target)
    fs.put_file(str(local), path)
    fs.invalidate_cache(path)
