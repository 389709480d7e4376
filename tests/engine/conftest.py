"""Fixtures shared by the engine tests: a real S3-compatible server on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest


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
