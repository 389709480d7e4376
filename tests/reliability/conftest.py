"""Fixtures of the reliability tests: the bad-input corpus, a local cluster, a tiny model."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from .corpus import Corpus, build


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """The bad-input corpus (and its good slides), generated once per session."""
    return build(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="package")
def client():
    """Two single-threaded worker processes and a scheduler on 127.0.0.1, for this folder's
    tests (it is Dask's default scheduler while it lives: the reports' tests, which run
    after these, must not send their xarray loads to its workers)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def tiny_model_file(path: Path, width: int = 16) -> Path:
    """A briefly trained k=3 checkpoint (its clusters need not mean anything here)."""
    import torch

    from slidecensus.models import TrainConfig, train_infogan

    crops = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only contend
    try:
        return train_infogan(crops, TrainConfig(k=3, width=width, iterations=2, batch_size=32,
                                                seed=0), path, progress=lambda r: None)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_command() -> list[str]:
    exe = shutil.which("dask")
    return [exe] if exe else [sys.executable, "-m", "dask"]


@pytest.fixture
def scheduler_and_two_workers() -> Iterator[str]:
    """A real ``dask scheduler`` and two ``dask worker`` processes (each under its nanny)
    on 127.0.0.1; yields the scheduler address."""
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    base = dask_command()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
             "start_new_session": True}  # own process groups: a nanny and its worker die together
    procs = [subprocess.Popen([*base, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"], **quiet)]
    try:
        time.sleep(1.0)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [*base, "worker", addr, "--nthreads", "1", "--host", "127.0.0.1",
                 "--no-dashboard"], **quiet))
        yield addr
    finally:
        for p in reversed(procs):  # nothing to save: no graceful shutdown
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
