"""Security: checkpoints never run pickled code; the local cluster listens on loopback only
(and shares the machine's memory explicitly). Hostile slide ids and shell syntax in cohort
paths are exercised end to end by the corpus run in test_bad_inputs.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import psutil
import pytest
import torch

from slidecensus.cli import main
from slidecensus.engine.census import run_cohort
from slidecensus.errors import InvalidInputError
from slidecensus.models import load_model
from slidecensus.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
)


class Payload:
    """Unpickling this object calls ``open(marker, "w")``: code run by loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def hostile_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A checkpoint shaped like ours whose config holds a foreign pickled object."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION,
                "config": {"k": 3, "hook": Payload(marker)}, "weights": {}, "summary": {}},
               path)
    return path, marker


def test_checkpoint_with_foreign_objects_is_refused_without_running_them(hostile_checkpoint):
    path, marker = hostile_checkpoint
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"refused: the checkpoint holds a pickled "
                                                  r"object \(.*open\)") as info:
            load(path)
        assert "\n" not in str(info.value)
    assert not marker.exists()
    # the file really is hostile: an unrestricted load runs its code
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_run_with_a_hostile_model_stops_before_any_work(hostile_checkpoint, tmp_path, capsys):
    path, marker = hostile_checkpoint
    csv = tmp_path / "cohort.csv"
    csv.write_text(f"path,slide_id\n{tmp_path / 'a.svs'},a\n")
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=r"hostile.pt: refused: the checkpoint holds "
                                                r"a pickled object \(.*open\)"):
        run_cohort(csv, out, model=path, cluster="local:1")
    assert main(["run", str(csv), "--out", str(out), "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights_only=True" in err and len(err.splitlines()) == 1
    assert not out.exists() and not marker.exists()


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.pid, c.laddr.ip, c.laddr.port))
    return out


def test_local_cluster_listens_on_loopback_only_and_shares_memory():
    """Scheduler, nannies, workers and dashboard of ``get_client("local:3")`` bind
    127.0.0.1 and nothing else; three workers on this machine share its memory without
    over-committing it (Dask's "auto" would give each memory / cores)."""
    from distributed.system import MEMORY_LIMIT

    from slidecensus.cluster import get_client

    me = psutil.Process()
    with get_client("local:3") as client:
        info = client.scheduler_info(n_workers=-1)
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = info["workers"]
        assert len(workers) == 3
        for addr, w in workers.items():
            assert addr.startswith("tcp://127.0.0.1:")
            assert w["nanny"].startswith("tcp://127.0.0.1:")
        pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
        worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
        assert worker_pids <= pids
        sockets = _listening(pids)
        limits = [w["memory_limit"] for w in workers.values()]
    assert {pid for pid, _, _ in sockets} >= worker_pids  # the workers' sockets were seen
    for pid, ip, port in sockets:
        assert ipaddress.ip_address(ip).is_loopback, (pid, ip, port)
    assert len(set(limits)) == 1 and limits[0] > 0
    assert sum(limits) <= MEMORY_LIMIT
    assert sum(limits) >= 0.5 * MEMORY_LIMIT  # and does not starve them either
