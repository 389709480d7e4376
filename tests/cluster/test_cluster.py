"""Cluster specs and the embedded LocalCluster."""

from __future__ import annotations

import pytest

from slidecensus.cluster import ClusterSpec, get_client, parse_spec
from slidecensus.errors import InvalidInputError


@pytest.mark.parametrize("text, spec", [
    (None, ClusterSpec("local")),
    ("local", ClusterSpec("local")),
    ("local:3", ClusterSpec("local", n_workers=3)),
    ("tcp://10.0.0.5:8786", ClusterSpec("address", address="tcp://10.0.0.5:8786")),
    ("kubernetes", ClusterSpec("kubernetes", name="slidecensus")),
    ("kubernetes:big", ClusterSpec("kubernetes", name="big")),
])
def test_parse_spec(text, spec):
    assert parse_spec(text) == spec


@pytest.mark.parametrize("bad", ["local:0", "local:x", "yarn", "http://host:8786"])
def test_bad_specs_name_the_accepted_forms(bad):
    with pytest.raises(InvalidInputError, match="local"):
        parse_spec(bad)


def test_local_cluster_listens_on_loopback_only():
    with get_client("local:2", dashboard=False) as client:
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert len(info["workers"]) == 2
        for addr, w in info["workers"].items():
            assert addr.startswith("tcp://127.0.0.1:")
            assert w["nthreads"] == 1
            assert not w.get("resources")  # no CUDA here: no GPU worker
        assert client.submit(sum, [1, 2, 3]).result() == 6
