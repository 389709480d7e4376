"""``--cluster kubernetes[:NAME]`` and ``slidecensus cluster spec|wait``.

The spec is built with the Dask operator's real helpers and validated against its CRDs.
There is no Kubernetes API server here, so ``KubeCluster`` is replaced by a stand-in that
plays the operator's part with real processes: it "creates" a cluster by starting a Dask
scheduler and a worker on 127.0.0.1, and adds the GPU group by starting that group's own
``dask worker`` command line from the spec it is given.
"""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest
import yaml

from slidecensus.cli import main
from slidecensus.cluster import get_client
from slidecensus.cluster import kubernetes as sk
from slidecensus.errors import InvalidInputError
from tests.deploy import kube


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# ------------------------------------------------------------------ the spec


def test_spec_is_built_from_the_operator_helpers():
    """Our worker and scheduler blocks keep what the operator's helpers produce (its worker
    name, dashboard and ports), with our command in front."""
    from dask_kubernetes.operator import make_scheduler_spec, make_worker_spec

    opts = sk.KubernetesOptions()
    ours = sk.cpu_worker_spec(opts)["spec"]["containers"][0]
    theirs = make_worker_spec(image=opts.image, worker_command=["dask", "worker"])
    theirs = theirs["spec"]["containers"][0]
    assert ours["args"][:2] == ["dask", "worker"]
    tail = theirs["args"][2:]  # what the helper appends: --name $(DASK_WORKER_NAME) ...
    assert ours["args"][-len(tail):] == tail
    assert ours["ports"] == theirs["ports"] and ours["image"] == theirs["image"]
    sched = sk.scheduler_spec(opts)
    helper = make_scheduler_spec(cluster_name=opts.name, image=opts.image)
    assert sched["service"] == helper["service"]
    c, h = sched["spec"]["containers"][0], helper["spec"]["containers"][0]
    assert c["ports"] == h["ports"] and c["readinessProbe"] == h["readinessProbe"]
    assert c["args"][2:] == h["args"][1:]  # `dask scheduler` for the helper's dask-scheduler


@pytest.mark.parametrize("argv", [[], ["--name", "big", "--gpu-workers", "3", "--image",
                                       "example.org/census:1", "--max-cpu-workers", "20"]])
def test_cluster_spec_command_prints_valid_consistent_objects(argv, capsys):
    assert main(["cluster", "spec", *argv]) == 0
    docs = _docs(capsys.readouterr().out)
    for d in docs:
        assert kube.crd_errors(d) == [], d["kind"]
        for pod in kube.pod_specs(d).values():
            assert kube.k8s_errors(pod, "V1PodSpec") == []
    name = argv[argv.index("--name") + 1] if "--name" in argv else "slidecensus"
    cluster = kube.find(docs, "DaskCluster", name)
    gpu = kube.find(docs, "DaskWorkerGroup", f"{name}-gpu")
    scaler = kube.find(docs, "DaskAutoscaler", name)
    assert gpu["spec"]["cluster"] == scaler["spec"]["cluster"] == name
    assert cluster["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    if "--image" in argv:
        image = argv[argv.index("--image") + 1]
        assert cluster["spec"]["worker"]["spec"]["containers"][0]["image"] == image
        assert cluster["spec"]["scheduler"]["spec"]["containers"][0]["image"] == image
        assert gpu["spec"]["worker"]["spec"]["containers"][0]["image"] != image  # CUDA image
    if "--gpu-workers" in argv:
        assert gpu["spec"]["worker"]["replicas"] == int(argv[argv.index("--gpu-workers") + 1])
    if "--max-cpu-workers" in argv:
        assert scaler["spec"]["maximum"] == int(argv[argv.index("--max-cpu-workers") + 1])


def test_no_gpu_group_when_no_gpu_workers(capsys):
    assert main(["cluster", "spec", "--gpu-workers", "0"]) == 0
    kinds = [d["kind"] for d in _docs(capsys.readouterr().out)]
    assert kinds == ["DaskCluster", "DaskAutoscaler"]


def test_cluster_spec_refuses_inconsistent_bounds(capsys):
    assert main(["cluster", "spec", "--min-cpu-workers", "5", "--max-cpu-workers", "2"]) == 2
    assert "min_cpu_workers" in capsys.readouterr().err


def test_options_from_env():
    opts = sk.options_from_env("x", {"SLIDECENSUS_K8S_IMAGE": "a/b:1",
                                     "SLIDECENSUS_K8S_GPU_WORKERS": "0",
                                     "SLIDECENSUS_K8S_NAMESPACE": "census"})
    assert (opts.name, opts.image, opts.gpu_workers, opts.namespace) == ("x", "a/b:1", 0,
                                                                         "census")
    assert sk.cluster_spec(opts)["metadata"]["namespace"] == "census"
    with pytest.raises(InvalidInputError, match="SLIDECENSUS_K8S_GPU_WORKERS"):
        sk.options_from_env("x", {"SLIDECENSUS_K8S_GPU_WORKERS": "two"})


# ------------------------------------------------------------------ without the extra


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    """dask_kubernetes made unimportable (as when the `kubernetes` extra is not installed)."""
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(InvalidInputError, match=r"pip install slidecensus\[kubernetes\]"):
        sk.cluster_spec(sk.KubernetesOptions())
    with pytest.raises(InvalidInputError, match=r"pip install slidecensus\[kubernetes\]"):
        with get_client("kubernetes:census"):
            pass
    assert main(["cluster", "spec"]) == 2
    assert "pip install slidecensus[kubernetes]" in capsys.readouterr().err


def test_package_and_wait_work_without_the_extra():
    """The images carry no `kubernetes` extra: importing the package and `cluster wait`
    (which needs only Dask) must not touch dask_kubernetes or kubernetes."""
    code = ("import sys\n"
            "sys.modules['dask_kubernetes'] = None; sys.modules['kubernetes'] = None\n"
            "import slidecensus.cluster, slidecensus.cluster.kubernetes\n"
            "from slidecensus.cli import main\n"
            "sys.exit(main(['cluster', 'wait', 'tcp://127.0.0.1:9', '--timeout', '1']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr  # a timeout, not an ImportError
    assert "no scheduler answered" in res.stderr


# ------------------------------------------------------------------ connecting


class FakeKubeCluster:
    """Stands in for ``dask_kubernetes.operator.KubeCluster`` (no API server here).

    ``existing`` says whether the DaskCluster already exists: then the real class connects
    and will not delete it on close (``shutdown_on_close`` False); otherwise it creates it
    (True). The scheduler and one CPU worker are a real LocalCluster on 127.0.0.1; a worker
    group is added by running the group spec's own ``dask worker`` command.
    """

    existing = False
    made: ClassVar[list[FakeKubeCluster]] = []

    def __init__(self, *, custom_cluster_spec, namespace=None, quiet=False):
        from distributed import LocalCluster

        self.spec = custom_cluster_spec
        self.name = custom_cluster_spec["metadata"]["name"]
        self.shutdown_on_close = not type(self).existing
        self.groups: dict = {}
        self.adapted = None
        self.closed = False
        self._procs: list = []
        self._local = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0")
        self.scheduler_address = self._local.scheduler_address
        type(self).made.append(self)

    def __getattr__(self, attr):  # status, loop, ... as the Client asks for them
        return getattr(self._local, attr)

    def add_worker_group(self, name, custom_spec=None, **kwargs):
        self.groups[name] = custom_spec
        c = custom_spec["spec"]["containers"][0]
        secrets = {"slidecensus-s3": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}}
        self._procs.append(kube.start_worker(
            c, self.scheduler_address, secrets,
            extra_env={"DASK_WORKER_NAME": f"{self.name}-{name}-worker-0"}))

    def adapt(self, minimum=None, maximum=None):
        self.adapted = (minimum, maximum)

    def close(self):
        kube.stop(self._procs)
        self._local.close()
        self.closed = True


@pytest.fixture
def fake_operator(monkeypatch):
    import dask_kubernetes.operator

    FakeKubeCluster.made = []
    FakeKubeCluster.existing = False
    monkeypatch.setattr(dask_kubernetes.operator, "KubeCluster", FakeKubeCluster)
    return FakeKubeCluster


def test_kubernetes_spec_creates_the_cluster_with_its_gpu_group(fake_operator, monkeypatch):
    monkeypatch.setenv("SLIDECENSUS_K8S_WAIT_S", "120")
    with get_client("kubernetes:census") as client:
        cpu, gpu = sk.count_workers(client)
        assert (cpu, gpu) == (1, 1)  # waited for the GPU worker before handing over
        assert client.submit(sum, [1, 2], resources={"GPU": 1}).result(timeout=60) == 3
    (kc,) = fake_operator.made
    opts = sk.options_from_env("census")
    assert kc.spec == sk.cluster_spec(opts)
    assert kc.groups == {"gpu": sk.gpu_worker_spec(opts)}
    assert kc.adapted == (opts.min_cpu_workers, opts.max_cpu_workers)
    assert kc.closed


def test_kubernetes_spec_connects_to_an_existing_cluster_without_changing_it(fake_operator):
    fake_operator.existing = True
    with get_client("kubernetes") as client:
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3
    (kc,) = fake_operator.made
    assert kc.name == "slidecensus"  # the default NAME
    assert kc.groups == {} and kc.adapted is None
    assert kc.shutdown_on_close is False  # close() leaves the DaskCluster running


def test_wait_for_workers_times_out_naming_what_is_missing():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,  # in-process
                      dashboard_address="127.0.0.1:0") as lc, Client(lc) as client:
        assert sk.wait_for_workers(client, cpu_workers=1, timeout_s=5) == (1, 0)
        with pytest.raises(TimeoutError, match="1 CPU and 0 GPU workers"):
            sk.wait_for_workers(client, gpu_workers=1, timeout_s=0.5, poll_s=0.1)
