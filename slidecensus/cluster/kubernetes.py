"""Dask clusters on Kubernetes through the Dask operator (``--cluster kubernetes[:NAME]``).

The cluster is described in code with the operator's own helpers (``make_cluster_spec``,
``make_worker_spec``) and then hardened (non-root, read-only root filesystem, no service
account token) and sized from the census memory benchmark (``docs/benchmarks.md``). The same
description is what ``slidecensus cluster spec`` prints for review and what the manifests in
``deploy/k8s`` hold, so the three cannot drift apart unnoticed (the tests compare them).

Pods of one cluster:

* the scheduler (CPU image), behind a ``ClusterIP`` Service: nothing is exposed outside the
  cluster unless a user port-forwards it;
* the ``default`` worker group: single-threaded CPU workers (segmentation), scaled by a
  ``DaskAutoscaler`` between a minimum and a maximum;
* the ``gpu`` worker group (CUDA image): workers started with ``--resources GPU=1`` on nodes
  with an NVIDIA GPU, where the census sends classification (and training).

Slides, the cohort table and the model are read from a shared volume (a
``PersistentVolumeClaim`` mounted read-only at ``/data`` on every worker and on the job);
outputs go to object storage (``s3://...``) with credentials from a Secret.

dask-kubernetes is imported only inside the functions that need it, so the package (and
``slidecensus cluster wait``, which needs only Dask) works without the ``kubernetes`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .. import __version__
from ..errors import InvalidInputError

log = logging.getLogger(__name__)

API_VERSION = "kubernetes.dask.org/v1"
#: Registry and repository of the images built from ``deploy/docker``; replace with yours.
IMAGE_REPOSITORY = "registry.example.com/slidecensus"
_TAG = __version__.replace("+", "-")
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{_TAG}"
DEFAULT_GPU_IMAGE = f"{IMAGE_REPOSITORY}:{_TAG}-cuda"

#: The numeric user and group of the images (``USER 10001:10001``); pods run as them.
RUN_AS_UID = 10001
DATA_MOUNT = "/data"
SCRATCH_MOUNT = "/tmp"
#: Keys read from the object-storage Secret; the first two are required.
S3_SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                  ("AWS_ENDPOINT_URL", True), ("AWS_DEFAULT_REGION", True))
GPU_RESOURCE = "nvidia.com/gpu"
#: The scheduler's HTTP routes: Dask's defaults plus ``api``, through which the operator's
#: autoscaler asks for the adaptive target and retires workers gracefully.
SCHEDULER_HTTP_ROUTES = (
    "distributed.http.scheduler.prometheus",
    "distributed.http.scheduler.info",
    "distributed.http.scheduler.json",
    "distributed.http.health",
    "distributed.http.proxy",
    "distributed.http.statics",
    "distributed.http.scheduler.api",
)
_INSTALL_HINT = ("--cluster kubernetes and `slidecensus cluster spec` need the Dask operator's "
                 "Python API: pip install slidecensus[kubernetes]")


@dataclass(frozen=True)
class PodSize:
    """CPU and memory of one container, in Kubernetes quantities.

    ``memory_limit`` is also the Dask worker's ``--memory-limit``, so Dask pauses and spills
    (at 80 % / 60 % of it) before the kernel's OOM killer would act.
    """

    cpu: str
    memory_request: str
    memory_limit: str
    threads: int = 1
    gpus: int = 0

    def resources(self) -> dict[str, dict[str, str]]:
        """The container's ``resources`` (requests and limits; CPU limited to the request)."""
        limits = {"cpu": self.cpu, "memory": self.memory_limit}
        if self.gpus:
            limits[GPU_RESOURCE] = str(self.gpus)
        return {"requests": {"cpu": self.cpu, "memory": self.memory_request}, "limits": limits}

    def dask_memory_limit(self) -> str:
        """``memory_limit`` written for ``dask worker --memory-limit`` (``2Gi`` -> ``2GiB``)."""
        q = self.memory_limit
        return q + "B" if q.endswith(("Ki", "Mi", "Gi", "Ti")) else q


# Census workers peaked at 0.62-0.83 GB RSS for 10k-40k px slides with 2048-px tiles
# (docs/benchmarks.md): request 1 GiB, limit 2 GiB, so Dask's 80 % pause line (1.6 GiB)
# stays about twice above the largest measured peak.
CPU_WORKER = PodSize(cpu="1", memory_request="1Gi", memory_limit="2Gi")
# Not measured (no GPU was available): segmentation peak plus the CUDA context and a batch
# of 8 tiles' crops; see docs/kubernetes.md for how to measure it.
GPU_WORKER = PodSize(cpu="2", memory_request="4Gi", memory_limit="8Gi", gpus=1)
SCHEDULER = PodSize(cpu="1", memory_request="1Gi", memory_limit="2Gi")


@dataclass(frozen=True)
class KubernetesOptions:
    """What varies between deployments; everything else is fixed by the functions below."""

    name: str = "slidecensus"
    namespace: str | None = None
    image: str = DEFAULT_IMAGE
    gpu_image: str = DEFAULT_GPU_IMAGE
    cpu_workers: int = 2
    min_cpu_workers: int = 1
    max_cpu_workers: int = 8
    gpu_workers: int = 1
    data_claim: str | None = "slidecensus-data"
    s3_secret: str | None = "slidecensus-s3"
    gpu_node_selector: dict[str, str] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: tuple[dict[str, str], ...] = (
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)
    idle_timeout_s: int = 0
    wait_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_cpu_workers <= self.max_cpu_workers:
            raise InvalidInputError(
                f"expected 0 <= min_cpu_workers <= max_cpu_workers, got "
                f"{self.min_cpu_workers} and {self.max_cpu_workers}")
        if self.cpu_workers < 0 or self.gpu_workers < 0:
            raise InvalidInputError(f"worker counts must be >= 0, got cpu={self.cpu_workers}, "
                                    f"gpu={self.gpu_workers}")


def options_from_env(name: str, env: dict[str, str] | None = None) -> KubernetesOptions:
    """Options for ``--cluster kubernetes:NAME``: defaults, overridden by ``SLIDECENSUS_K8S_*``
    variables (IMAGE, GPU_IMAGE, NAMESPACE, CPU_WORKERS, MAX_CPU_WORKERS, GPU_WORKERS,
    WAIT_S: seconds to wait for the GPU workers of a cluster it creates)."""
    env = os.environ if env is None else env
    kw: dict[str, Any] = {"name": name}
    for key, attr, conv in (("IMAGE", "image", str), ("GPU_IMAGE", "gpu_image", str),
                            ("NAMESPACE", "namespace", str), ("CPU_WORKERS", "cpu_workers", int),
                            ("MAX_CPU_WORKERS", "max_cpu_workers", int),
                            ("GPU_WORKERS", "gpu_workers", int), ("WAIT_S", "wait_s", float)):
        value = env.get(f"SLIDECENSUS_K8S_{key}")
        if value:
            try:
                kw[attr] = conv(value)
            except ValueError:
                raise InvalidInputError(f"SLIDECENSUS_K8S_{key} must be a number, got "
                                        f"{value!r}") from None
    return KubernetesOptions(**kw)


def _operator() -> Any:
    """The ``dask_kubernetes.operator`` module, or an InvalidInputError saying what to install."""
    try:
        import dask_kubernetes.operator as op
    except ImportError as exc:
        raise InvalidInputError(f"{_INSTALL_HINT} ({exc})") from None
    return op


# ------------------------------------------------------------------ pod hardening


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_UID, "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _s3_env(opts: KubernetesOptions) -> list[dict[str, Any]]:
    """Object-storage credentials as references to the Secret, never as values."""
    if not opts.s3_secret:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {
        "name": opts.s3_secret, "key": key, **({"optional": True} if optional else {})}}}
        for key, optional in S3_SECRET_KEYS]


def _harden(pod: dict[str, Any], opts: KubernetesOptions, *, size: PodSize,
            env: list[dict[str, Any]], data: bool) -> dict[str, Any]:
    """Complete a pod spec made by the operator's helpers: security contexts, a writable
    scratch ``/tmp`` (the root filesystem is read-only), the data volume, resources, env."""
    pod = copy.deepcopy(pod)
    volumes = [{"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": SCRATCH_MOUNT}]
    if data and opts.data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {
            "claimName": opts.data_claim, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
    for c in pod["containers"]:
        for key in ("env", "resources"):  # the helpers write None for "not given"
            if c.get(key) is None:
                c.pop(key, None)
        c["env"] = [*c.get("env", []), *env]
        c["resources"] = size.resources()
        c["securityContext"] = _container_security()
        c["volumeMounts"] = mounts
    pod.update(automountServiceAccountToken=False, enableServiceLinks=False,
               securityContext=_pod_security(), volumes=volumes)
    return pod


def _worker_command(size: PodSize, gpu: bool) -> list[str]:
    cmd = ["dask", "worker", "--nthreads", str(size.threads),
           "--memory-limit", size.dask_memory_limit()]
    return [*cmd, "--resources", f"GPU={size.gpus}"] if gpu else cmd


def _worker_env() -> list[dict[str, Any]]:
    # one thread per worker: keep numpy/scipy/OpenMP from oversubscribing the CPU request
    return [{"name": "OMP_NUM_THREADS", "value": "1"}]


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "slidecensus"}


def _metadata(opts: KubernetesOptions, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels()}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


# ------------------------------------------------------------------ the objects


def cpu_worker_spec(opts: KubernetesOptions) -> dict[str, Any]:
    """The ``default`` worker group's ``worker`` block: CPU image, one thread per worker."""
    op = _operator()
    spec = op.make_worker_spec(image=opts.image, n_workers=opts.cpu_workers,
                               worker_command=_worker_command(CPU_WORKER, gpu=False))
    spec["spec"] = _harden(spec["spec"], opts, size=CPU_WORKER,
                           env=[*_worker_env(), *_s3_env(opts)], data=True)
    return spec


def gpu_worker_spec(opts: KubernetesOptions) -> dict[str, Any]:
    """The ``gpu`` worker group's ``worker`` block: CUDA image, ``--resources GPU=1``, one
    ``nvidia.com/gpu`` per pod, scheduled onto GPU nodes (selector and toleration)."""
    op = _operator()
    spec = op.make_worker_spec(image=opts.gpu_image, n_workers=opts.gpu_workers,
                               worker_command=_worker_command(GPU_WORKER, gpu=True))
    pod = _harden(spec["spec"], opts, size=GPU_WORKER, env=[*_worker_env(), *_s3_env(opts)],
                  data=True)
    pod["nodeSelector"] = dict(opts.gpu_node_selector)
    pod["tolerations"] = [dict(t) for t in opts.gpu_tolerations]
    spec["spec"] = pod
    return spec


def scheduler_spec(opts: KubernetesOptions) -> dict[str, Any]:
    """The ``scheduler`` block: ``dask scheduler`` behind a ClusterIP Service (the operator's
    default, kept so the dashboard is reachable only from inside the cluster)."""
    op = _operator()
    spec = op.make_scheduler_spec(cluster_name=opts.name, image=opts.image,
                                  scheduler_service_type="ClusterIP")
    routes = {"name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES",
              "value": json.dumps(list(SCHEDULER_HTTP_ROUTES))}
    pod = _harden(spec["spec"], opts, size=SCHEDULER, env=[routes], data=False)
    for c in pod["containers"]:
        if c["args"][:1] == ["dask-scheduler"]:  # the helper's console script is gone
            c["args"] = ["dask", "scheduler", *c["args"][1:]]
    spec["spec"] = pod
    return spec


def cluster_spec(opts: KubernetesOptions) -> dict[str, Any]:
    """The ``DaskCluster``: scheduler plus the CPU worker group (``make_cluster_spec``)."""
    op = _operator()
    spec = op.make_cluster_spec(name=opts.name, image=opts.image, n_workers=opts.cpu_workers,
                                idle_timeout=opts.idle_timeout_s,
                                scheduler_service_type="ClusterIP")
    spec["metadata"] = _metadata(opts, opts.name)
    spec["spec"]["worker"] = cpu_worker_spec(opts)
    spec["spec"]["scheduler"] = scheduler_spec(opts)
    return spec


def gpu_worker_group(opts: KubernetesOptions) -> dict[str, Any]:
    """The ``DaskWorkerGroup`` of GPU workers, named ``<cluster>-gpu`` as
    ``KubeCluster.add_worker_group("gpu")`` names it."""
    return {"apiVersion": API_VERSION, "kind": "DaskWorkerGroup",
            "metadata": _metadata(opts, f"{opts.name}-gpu"),
            "spec": {"cluster": opts.name, "worker": gpu_worker_spec(opts)}}


def autoscaler(opts: KubernetesOptions) -> dict[str, Any]:
    """The ``DaskAutoscaler`` of the CPU (``default``) group; GPU workers are not autoscaled."""
    return {"apiVersion": API_VERSION, "kind": "DaskAutoscaler",
            "metadata": _metadata(opts, opts.name),
            "spec": {"cluster": opts.name, "minimum": opts.min_cpu_workers,
                     "maximum": opts.max_cpu_workers}}


def cluster_objects(opts: KubernetesOptions) -> list[dict[str, Any]]:
    """Everything one cluster needs, in apply order (the GPU group only when asked for)."""
    objs = [cluster_spec(opts)]
    if opts.gpu_workers:
        objs.append(gpu_worker_group(opts))
    objs.append(autoscaler(opts))
    return objs


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream, keys in their natural order, no anchors."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------ connecting


def count_workers(client: Any) -> tuple[int, int]:
    """(CPU workers, GPU workers) connected to the client's scheduler."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    gpu = sum(1 for w in workers.values() if w.get("resources", {}).get("GPU", 0) > 0)
    return len(workers) - gpu, gpu


def wait_for_workers(target: Any, *, gpu_workers: int = 0, cpu_workers: int = 0,
                     timeout_s: float = 600.0, poll_s: float = 1.0) -> tuple[int, int]:
    """Block until the scheduler has at least this many CPU and GPU workers.

    ``target`` is a ``distributed.Client`` or a scheduler address (retried until the
    scheduler answers: on Kubernetes the job may start before it). The census decides once,
    at its start, whether classification goes to GPU workers, so a job waits here first.
    Returns the counts seen; raises TimeoutError naming what was missing.
    """
    deadline = time.monotonic() + timeout_s
    if isinstance(target, str):
        from distributed import Client

        while True:
            left = deadline - time.monotonic()
            try:
                client = Client(target, timeout=max(1.0, min(left, 30.0)))
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no scheduler answered at {target} within "
                                       f"{timeout_s:g} s ({exc})") from None
                time.sleep(poll_s)
        with client:
            return wait_for_workers(client, gpu_workers=gpu_workers, cpu_workers=cpu_workers,
                                    timeout_s=max(0.0, deadline - time.monotonic()),
                                    poll_s=poll_s)
    while True:
        cpu, gpu = count_workers(target)
        if cpu >= cpu_workers and gpu >= gpu_workers:
            return cpu, gpu
        if time.monotonic() >= deadline:
            raise TimeoutError(f"after {timeout_s:g} s: {cpu} CPU and {gpu} GPU workers, "
                               f"expected at least {cpu_workers} and {gpu_workers}")
        time.sleep(poll_s)


@contextlib.contextmanager
def kubernetes_client(name: str, options: KubernetesOptions | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client`` on the operator's cluster NAME, creating it if needed.

    An existing ``DaskCluster`` NAME (from ``deploy/k8s`` or ``slidecensus cluster spec |
    kubectl apply -f -``) is connected to and left running. Otherwise the cluster of
    :func:`cluster_spec` is created with its GPU group and CPU autoscaler, the GPU workers
    are waited for (up to ``wait_s``), and the cluster is deleted on exit.
    """
    op = _operator()
    from distributed import Client

    opts = options or options_from_env(name)
    if opts.name != name:
        opts = replace(opts, name=name)
    cluster = op.KubeCluster(custom_cluster_spec=cluster_spec(opts), namespace=opts.namespace,
                             quiet=True)
    created = bool(cluster.shutdown_on_close)  # True only when this call made the cluster
    try:
        if created:
            log.info("created DaskCluster %s", name)
            if opts.gpu_workers:
                cluster.add_worker_group("gpu", custom_spec=gpu_worker_spec(opts))
            cluster.adapt(minimum=opts.min_cpu_workers, maximum=opts.max_cpu_workers)
        else:
            log.info("connected to the existing DaskCluster %s", name)
        with Client(cluster) as client:
            want_gpu = opts.gpu_workers if created else 0
            try:
                cpu, gpu = wait_for_workers(client, gpu_workers=want_gpu, timeout_s=opts.wait_s)
            except TimeoutError as exc:
                log.warning("%s", exc)
                cpu, gpu = count_workers(client)
            if opts.gpu_workers and not gpu:
                log.warning("no GPU worker on %s yet: classification runs on CPU workers "
                            "(`slidecensus cluster wait ADDRESS --gpu-workers 1` waits)", name)
            log.info("DaskCluster %s: %d CPU and %d GPU workers", name, cpu, gpu)
            yield client
    finally:
        cluster.close()  # deletes the DaskCluster only when this call created it
