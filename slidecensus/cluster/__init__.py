"""Getting a ``distributed.Client`` from a cluster spec string; knows only Dask.

Specs (``--cluster``):

* ``local`` — an embedded LocalCluster of single-threaded CPU worker processes sized to
  the machine, plus one worker per visible CUDA device carrying the ``GPU`` resource;
* ``local:N`` — the same with N CPU workers;
* ``tcp://host:port`` — an existing scheduler (``dask scheduler`` + ``dask worker``);
* ``kubernetes[:NAME]`` — the Dask operator's cluster NAME, connected to or created
  (:mod:`slidecensus.cluster.kubernetes`; needs ``pip install slidecensus[kubernetes]``).

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


#: Share of the machine's memory given to local workers; the rest stays for the client
#: (which writes the maps), the scheduler and the system.
LOCAL_MEMORY_FRACTION = 0.85


def local_memory_limit(n_workers: int, total_bytes: int | None = None) -> int:
    """Bytes each of ``n_workers`` local workers may use: an even share of
    :data:`LOCAL_MEMORY_FRACTION` of the machine's memory (cgroup limits included).

    Dask's ``"auto"`` gives every single-threaded worker memory / cores whatever the
    number of workers, which over-commits the machine with ``local:N`` for N above the core
    count or with an extra GPU worker; an explicit share cannot.
    """
    if n_workers < 1:
        raise InvalidInputError(f"n_workers must be >= 1, got {n_workers}")
    if total_bytes is None:
        from distributed.system import MEMORY_LIMIT

        total_bytes = MEMORY_LIMIT
    return int(total_bytes * LOCAL_MEMORY_FRACTION) // n_workers


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
    if cs.kind == "kubernetes":  # needs the `kubernetes` extra; imported only here
        from .kubernetes import kubernetes_client

        with kubernetes_client(cs.name) as client:
            yield client
        return
    n = cs.n_workers or default_workers()
    gpus = cuda_device_count()
    # "auto": an explicit, even share of the machine per worker (GPU workers included)
    limit = local_memory_limit(n + gpus) if memory_limit == "auto" else memory_limit
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0" if dashboard else None, memory_limit=limit,
    )
    try:
        for i in range(gpus):  # one GPU-pinned worker per device
            _add_gpu_worker(cluster, i, limit)
        with Client(cluster) as client:
            if dashboard and client.dashboard_link:
                log.debug("Dask dashboard: %s", client.dashboard_link)
            yield client
    finally:
        cluster.close()


def _add_gpu_worker(cluster: Any, device: int, memory_limit: Any = "auto") -> None:
    """Add a worker with the ``GPU`` resource pinned to one CUDA device."""
    from distributed import Nanny

    spec = {
        "cls": Nanny,
        "options": {"nthreads": 1, "resources": {"GPU": 1}, "host": "127.0.0.1",
                    "env": {"CUDA_VISIBLE_DEVICES": str(device)},
                    "memory_limit": memory_limit},
    }
    cluster.worker_spec[f"gpu-{device}"] = spec
    cluster.sync(cluster._correct_state)
