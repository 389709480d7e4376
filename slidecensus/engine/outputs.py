"""The census output folder, local or on object storage (any fsspec URL, e.g. ``s3://``).

Every file is committed atomically: on a local disk it is written under a temporary name and
renamed; on object storage a PUT is atomic per object. Credentials and endpoints come from
the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``),
never from arguments, so they stay out of logs and manifests.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


class OutputDir:
    """A folder of outputs addressed by relative paths; picklable, so workers write to it."""

    def __init__(self, location: str | os.PathLike) -> None:
        import fsspec

        text = str(location)
        self.location = text
        self.fs, self.root = fsspec.core.url_to_fs(text)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))
        if self.local:
            self.root = str(Path(self.root).resolve())

    def __repr__(self) -> str:
        return f"OutputDir({self.location!r})"

    def __reduce__(self):
        return (OutputDir, (self.location,))

    def path(self, rel: str) -> str:
        """Path of ``rel`` inside the folder, as the filesystem names it."""
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def url(self, rel: str) -> str:
        """A URL (or local path) of ``rel`` for libraries that take one (xarray, zarr)."""
        if self.local:
            return self.path(rel)
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return f"{proto}://{self.path(rel)}"

    def makedirs(self) -> None:
        """Create the folder (object stores need no folders; a missing bucket is an error)."""
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Commit ``data`` at ``rel`` atomically."""
        if not self.local:
            self.fs.pipe_file(self.path(rel), data)
            return
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, rel: str) -> bytes | None:
        """The bytes at ``rel``, or None when there is no such file."""
        try:
            return self.fs.cat_file(self.path(rel))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, default=_json_default) + "\n")
                         .encode())

    def read_json(self, rel: str) -> Any | None:
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def write_parquet(self, rel: str, table: pd.DataFrame) -> None:
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pd.DataFrame:
        with self.fs.open(self.path(rel), "rb") as fh:
            return pd.read_parquet(fh)

    def write_csv(self, rel: str, table: pd.DataFrame) -> None:
        self.write_bytes(rel, table.to_csv(index=False).encode())

    def remove_stale_temporaries(self) -> None:
        """Delete half-written files an interrupted local run left (never read)."""
        if not self.local:
            return
        for folder in (Path(self.root), Path(self.root) / "cells", Path(self.root) / "slides"):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
