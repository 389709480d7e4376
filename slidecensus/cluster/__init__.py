"""Getting a ``distributed.Client`` from a cluster spec string; knows only Dask.

Specs (``--cluster``):

* ``local`` — an embedded LocalCluster of single-threaded CPU worker processes sized to
  the machine, plus one worker per visible CUDA device carrying the ``GPU`` resource;
* ``local:N`` — the same with N CPU workers;
* ``tcp://host:port`` — an existing scheduler (``dask scheduler`` + ``dask worker``);
* ``kubernetes[:NAME]`` — a cluster made by the Dask Kubernetes operator (deploy issue).

The local cluster binds to 127.0.0.1: nothing listens on other interfaces.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value."""

    kind: str  # "local", "address" or "kubernetes"
    n_workers: int | None = None
    address: str | None = None
    name: str | None = None


def parse_spec(spec: str | None) -> ClusterSpec:
    """Parse a ``--cluster`` string; raises InvalidInputError naming the accepted forms."""
    s = (spec or "local").strip()
    if s == "local":
        return ClusterSpec("local")
    if s.startswith("local:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise InvalidInputError(f"local:N needs a positive worker count, got {spec!r}")
        return ClusterSpec("local", n_workers=n)
    if s.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        return ClusterSpec("address", address=s)
    if s == "kubernetes" or s.startswith("kubernetes:"):
        name = s.split(":", 1)[1] if ":" in s else None
        return ClusterSpec("kubernetes", name=name or "slidecensus")
    raise InvalidInputError(f"unknown cluster spec {spec!r}; expected local, local:N, "
                     f"tcp://host:port or kubernetes[:NAME]")


def cuda_device_count() -> int:
    """Visible CUDA devices, without importing torch when it is absent."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_workers() -> int:
    """CPU workers for ``local``: one per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def get_client(spec: str | None = "local", *, memory_limit: str = "auto",
               dashboard: bool = True) -> Iterator[Any]:
    """Yield a connected ``distributed.Client`` for ``spec``; tear down what it started."""
    from distributed import Client, LocalCluster

    cs = parse_spec(spec)
    if cs.kind == "address":
        with Client(cs.address) as client:
            log.info("connected to scheduler %s", cs.address)
            yield client
        return
    if cs.kind == "kubernetes":
        raise InvalidInputError(
            "--cluster kubernetes is not available yet (deployment issue); use tcp://ADDRESS "
            "of a scheduler started by the Dask operator")
    n = cs.n_workers or default_workers()
    gpus = cuda_device_count()
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0" if dashboard else None, memory_limit=memory_limit,
    )
    try:
        for i in range(gpus):  # one GPU-pinned worker per device
            _add_gpu_worker(cluster, i)
        with Client(cluster) as client:
            if dashboard and client.dashboard_link:
                log.info("Dask dashboard: %s", client.dashboard_link)
            yield client
    finally:
        cluster.close()


def _add_gpu_worker(cluster: Any, device: int) -> None:
    """Add a worker with the ``GPU`` resource pinned to one CUDA device."""
    from distributed import Nanny

    spec = {
        "cls": Nanny,
        "options": {"nthreads": 1, "resources": {"GPU": 1}, "host": "127.0.0.1",
                    "env": {"CUDA_VISIBLE_DEVICES": str(device)}},
    }
    cluster.worker_spec[f"gpu-{device}"] = spec
    cluster.sync(cluster._correct_state)
