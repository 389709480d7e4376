"""The census output folder, local or on object storage (any fsspec URL, e.g. ``s3://``).

Every file is committed atomically: on a local disk it is written under a temporary name and
renamed; on object storage a PUT is atomic per object. Credentials and endpoints come from
the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``),
never from arguments, so they stay out of logs and manifests.

One run at a time per folder: :class:`RunLock` holds ``DIR/.lock`` (pid, host, start time)
for the length of a run, so a second run on the same folder is refused instead of
interleaving its writes with the first one's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import OutputLockedError

log = logging.getLogger(__name__)

#: Name of the lock file inside an output folder.
LOCK_NAME = ".lock"


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


# ------------------------------------------------------------------ the run lock


class RunLock:
    """Exclusive use of an output folder by one run, through ``DIR/.lock``.

    On a local disk the lock file is created with ``O_CREAT | O_EXCL`` (atomic: of two runs
    one wins) and holds the holder's pid, host name and start time. A lock left by a run
    that died (same host, pid no longer running, or running but started after the lock was
    taken, i.e. a reused pid) is stale and taken over; a lock of a live run, or of a run on
    another host (whose pid cannot be checked from here), is refused with
    :class:`~slidecensus.errors.OutputLockedError` naming the holder.

    On object storage (any fsspec URL) there is no atomic create-if-absent, so the lock is
    advisory: the object is read, written if absent or stale, and read back to check that
    this run's token won. It stops the usual mistake (the same command started twice) but
    two runs starting within the same instant could both pass. A run on another host that
    died leaves a lock that must be deleted by hand (the message says which object).
    """

    def __init__(self, out: OutputDir) -> None:
        self.out = out
        self.info: dict[str, Any] | None = None

    @property
    def location(self) -> str:
        return self.out.url(LOCK_NAME)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise OutputLockedError (stale locks are taken over)."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "token": uuid.uuid4().hex}
        for _ in range(3):
            if self._create(info):
                self.info = info
                return
            holder = self._read()
            if holder is not None and _is_stale(holder):
                log.warning("%s: taking over the stale lock of pid %s on %s (no longer "
                            "running)", self.out.location, holder.get("pid"),
                            holder.get("host"))
                self._remove_if(holder)
                continue
            raise OutputLockedError(self._message(holder))
        raise OutputLockedError(self._message(self._read()))

    def release(self) -> None:
        """Remove the lock if this run still holds it (a no-op otherwise)."""
        if self.info is None:
            return
        self._remove_if(self.info)
        self.info = None

    # -- storage
    def _create(self, info: dict[str, Any]) -> bool:
        data = json.dumps(info).encode()
        if self.out.local:
            try:
                fd = os.open(self.out.path(LOCK_NAME), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        if self.out.exists(LOCK_NAME):
            return False
        self.out.write_bytes(LOCK_NAME, data)
        back = self._read()
        return back is not None and back.get("token") == info["token"]

    def _read(self) -> dict[str, Any] | None:
        data = self.out.read_bytes(LOCK_NAME)
        if data is None:
            return None
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def _remove_if(self, holder: dict[str, Any]) -> None:
        """Delete the lock if it still is ``holder``'s; on a local disk under an flock of
        the folder, so two runs breaking the same stale lock cannot delete each other's."""
        guard = contextlib.nullcontext()
        if self.out.local:
            guard = _flocked(self.out.root)
        with guard:
            current = self._read()
            if current is not None and current.get("token") == holder.get("token"):
                with contextlib.suppress(FileNotFoundError):
                    self.out.fs.rm_file(self.out.path(LOCK_NAME))

    def _message(self, holder: dict[str, Any] | None) -> str:
        where = self.out.location
        if holder is None:
            return (f"{where} is in use by another slidecensus run (its lock {self.location} "
                    f"is being written or is unreadable); if no run is using {where}, delete "
                    f"{self.location}")
        return (f"{where} is in use by another slidecensus run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started_at')}); wait for it to "
                f"finish, or if that run is gone, delete {self.location}")


@contextlib.contextmanager
def _flocked(folder: str):
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _is_stale(holder: dict[str, Any]) -> bool:
    """A lock is stale when it was taken on this host by a process no longer running."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        pid, started = int(holder["pid"]), float(holder["started"])
    except (KeyError, TypeError, ValueError):
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its parent
            return True
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # exists but cannot be inspected: assume it is the holder
        return False
    return created > started + 1.0  # the pid was reused by a process started later
