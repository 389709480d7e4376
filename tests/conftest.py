"""Shared fixtures: the real reference data beside the project (../shared/data), and a
real S3-compatible server on loopback (used by the engine and the reports tests)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SLIDECENSUS_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real test images; tests needing it skip where it is absent.

    In CI (``CI`` set) a missing folder is an error, so the real-data tests cannot be
    skipped silently there.
    """
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data not found at {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_svs(shared_data: Path) -> Path:
    """The real Aperio slide CMU-1-Small-Region.svs (JPEG tiles, 0.499 µm/px)."""
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def marrow_pngs(shared_data: Path) -> list[Path]:
    """The 8 bone-marrow H&E PNGs (1200 x 1200) with annotated cell centres."""
    return sorted((shared_data / "bone-marrow-he" / "images").glob("*.png"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, with a bucket."""
    port = free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import fsspec
    import s3fs

    # fsspec caches filesystems by their arguments, not by the endpoint in the environment:
    # an instance left by an earlier server's test would point at a port now closed
    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.mkdir("census-bucket")
            break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    proc.terminate()
    proc.wait(10)


class _ArraySlide:
    """The two members of a Slide that tile readers use (``shape``, ``read_region``), over
    an in-memory array."""

    def __init__(self, a):
        self.a, self.shape = a, a.shape[:2]

    def read_region(self, level, x, y, w, h):
        return self.a[y:y + h, x:x + w].copy()


@pytest.fixture
def array_slide():
    """Wrap an RGB array as a minimal slide: ``array_slide(rgb)``."""
    return _ArraySlide
