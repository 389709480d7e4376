"""The Kubernetes manifests in deploy/k8s, checked without a cluster.

Every Dask operator object validates against the operator's own CRD schemas (from the
installed dask_kubernetes), every pod spec, Service spec and object metadata against the
Kubernetes client's models with unknown fields refused, and the Deployments, Service and
Pod that the operator's controller would build from them (its own ``build_*`` functions,
no API server needed) validate as Kubernetes objects too. The spec built in code
(``slidecensus.cluster.kubernetes``) must equal the manifests.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import dask.config
import pytest
from dask.utils import parse_bytes

from slidecensus.cluster import kubernetes as sk

from . import kube

DOCS = kube.all_docs()
CLUSTER = kube.load_docs(kube.K8S / "cluster.yaml")
JOB_FILE = kube.load_docs(kube.K8S / "job.yaml")
JOB = kube.find(JOB_FILE, "DaskJob")
JOB_NAME = JOB["metadata"]["name"]
# what `kubectl create secret generic slidecensus-s3 ...` would hold (test values)
SECRETS = {"slidecensus-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}}


def _id(item) -> str:
    path, doc = item
    return f"{path.relative_to(kube.K8S)}:{doc['kind']}/{doc['metadata']['name']}"


def quantity(q: str) -> float:
    """A Kubernetes quantity ("500m", "2Gi", "1") as a number (cores or bytes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", q)
    assert m, f"not a quantity: {q!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m[2]]
    return float(m[1]) * scale


def arg_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def all_pods() -> list[tuple[str, str, dict]]:
    return [(_id((p, d)), role, pod) for p, d in DOCS for role, pod in kube.pod_specs(d).items()]


# ------------------------------------------------------------------ schemas


def test_only_expected_kinds_and_no_secrets():
    kinds = {d["kind"] for _, d in DOCS}
    assert kinds <= {*kube.DASK_KINDS, "PersistentVolumeClaim", "Job"}, kinds
    assert {"DaskCluster", "DaskWorkerGroup", "DaskAutoscaler", "DaskJob"} <= kinds
    assert all(d["apiVersion"] == sk.API_VERSION for _, d in DOCS if d["kind"] in kube.DASK_KINDS)
    assert all(d["apiVersion"] == "batch/v1" for _, d in DOCS if d["kind"] == "Job")


@pytest.mark.parametrize("item", [i for i in DOCS if i[1]["kind"] in kube.DASK_KINDS], ids=_id)
def test_operator_objects_validate_against_the_operator_crds(item):
    _, doc = item
    assert kube.crd_errors(doc) == []
    assert kube.k8s_errors(doc["metadata"], "V1ObjectMeta") == []


@pytest.mark.parametrize("item", [i for i in DOCS if i[1]["kind"] not in kube.DASK_KINDS],
                         ids=_id)
def test_core_objects_validate_as_kubernetes_models(item):
    _, doc = item
    assert kube.k8s_errors(doc, f"V1{doc['kind']}") == []


@pytest.mark.parametrize("where, role, pod", all_pods(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_pod_specs_validate_as_kubernetes_pod_specs(where, role, pod):
    assert kube.k8s_errors(pod, "V1PodSpec") == []


def test_scheduler_services_validate_and_stay_inside_the_cluster():
    for spec in (kube.find(CLUSTER, "DaskCluster")["spec"], JOB["spec"]["cluster"]["spec"]):
        service = spec["scheduler"]["service"]
        assert kube.k8s_errors(service, "V1ServiceSpec") == []
        assert service["type"] == "ClusterIP"  # the dashboard is not exposed outside
        assert not {"externalIPs", "loadBalancerIP", "nodePort"} & set(service)


def test_the_validators_reject_unknown_and_mistyped_fields():
    """The checks above can fail: a misspelt field, a number where the API wants a string,
    a missing required field and an unknown top-level key are each caught."""
    base = kube.find(CLUSTER, "DaskCluster")
    cases = []
    bad = copy.deepcopy(base)
    bad["spec"]["worker"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    cases.append(bad)
    bad = copy.deepcopy(base)
    bad["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 1
    cases.append(bad)
    bad = copy.deepcopy(base)
    del bad["spec"]["worker"]["spec"]["containers"][0]["name"]
    cases.append(bad)
    for doc in cases:
        assert kube.crd_errors(doc)
        assert kube.k8s_errors(doc["spec"]["worker"]["spec"], "V1PodSpec")
    bad = copy.deepcopy(base)
    bad["spec"]["workers"] = bad["spec"]["worker"]
    assert kube.crd_errors(bad)
    job = copy.deepcopy(JOB)
    job["spec"]["cluster"]["metadata"] = {"labels": {"a": "b"}}  # not in the DaskJob CRD
    assert kube.crd_errors(job)


def test_what_the_operator_builds_from_them_is_valid_kubernetes():
    """The scheduler Deployment and Service, the worker Deployments and the job runner Pod,
    made by the operator controller's own functions from these manifests."""
    from dask_kubernetes.operator.controller import controller as ctl

    ns = "census"
    for cluster_name, spec, groups in (
        ("slidecensus", kube.find(CLUSTER, "DaskCluster")["spec"],
         [kube.find(CLUSTER, "DaskWorkerGroup")]),
        (JOB_NAME, JOB["spec"]["cluster"]["spec"], [kube.find(JOB_FILE, "DaskWorkerGroup")]),
    ):
        dep = ctl.build_scheduler_deployment_spec(cluster_name, spec["scheduler"]["spec"], {},
                                                  {})
        assert kube.k8s_errors(dep, "V1Deployment") == []
        svc = ctl.build_scheduler_service_spec(cluster_name, spec["scheduler"]["service"], {},
                                               {})
        assert kube.k8s_errors(svc, "V1Service") == []
        # the Service selects the scheduler pods the Deployment makes
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert all(g["spec"]["cluster"] == cluster_name for g in groups)
        for name, worker in [(f"{cluster_name}-default", spec["worker"]),
                             *[(g["metadata"]["name"], g["spec"]["worker"]) for g in groups]]:
            dep = ctl.build_worker_deployment_spec(name, ns, cluster_name, "0123456789",
                                                   worker["spec"], {}, {})
            assert kube.k8s_errors(dep, "V1Deployment") == []
            for c in dep["spec"]["template"]["spec"]["containers"]:
                names = {e["name"] for e in c["env"]}
                assert {"DASK_SCHEDULER_ADDRESS", "DASK_WORKER_NAME"} <= names
                assert kube.undefined_refs(c["args"], names) == set()
    pod = ctl.build_job_pod_spec(JOB_NAME, JOB_NAME, ns, JOB["spec"]["job"]["spec"], {}, {})
    assert kube.k8s_errors(pod, "V1Pod") == []
    for c in kube.containers(pod["spec"]):
        assert kube.undefined_refs(c["args"], {e["name"] for e in c.get("env", [])}) == set()


# ------------------------------------------------------------------ code == manifests


def test_cluster_manifest_equals_the_spec_built_in_code():
    assert CLUSTER == sk.cluster_objects(sk.KubernetesOptions())


def test_job_cluster_equals_the_spec_built_in_code():
    opts = sk.KubernetesOptions(name=JOB_NAME)
    built = sk.cluster_objects(opts)
    assert JOB["spec"]["cluster"]["spec"] == kube.find(built, "DaskCluster")["spec"]
    others = [d for d in JOB_FILE if d["kind"] != "DaskJob"]
    assert others == [d for d in built if d["kind"] != "DaskCluster"]


def test_job_and_long_lived_cluster_run_the_same_pods():
    ours = kube.find(CLUSTER, "DaskCluster")["spec"]
    theirs = JOB["spec"]["cluster"]["spec"]
    assert ours["worker"] == theirs["worker"]
    assert ours["scheduler"]["spec"] == theirs["scheduler"]["spec"]
    assert (kube.find(CLUSTER, "DaskWorkerGroup")["spec"]["worker"]
            == kube.find(JOB_FILE, "DaskWorkerGroup")["spec"]["worker"])


def test_names_tie_the_job_objects_together():
    gpu = kube.find(JOB_FILE, "DaskWorkerGroup")
    scaler = kube.find(JOB_FILE, "DaskAutoscaler")
    assert gpu["spec"]["cluster"] == scaler["spec"]["cluster"] == JOB_NAME
    service = JOB["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert service["selector"]["dask.org/cluster-name"] == JOB_NAME
    # the init container waits on this cluster's scheduler Service, on its comm port
    init = JOB["spec"]["job"]["spec"]["initContainers"][0]
    address = kube.container_env(init, {})["DASK_SCHEDULER_ADDRESS"]
    comm = next(p for p in service["ports"] if p["name"] == "tcp-comm")
    assert address == f"tcp://{JOB_NAME}-scheduler:{comm['port']}"


# ------------------------------------------------------------------ security


@pytest.mark.parametrize("where, role, pod", all_pods(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_pods_run_unprivileged(where, role, pod):
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["runAsGroup"] > 0
    assert pod["automountServiceAccountToken"] is False  # no pod here talks to the API
    assert not {"hostNetwork", "hostPID", "hostIPC"} & {k for k, v in pod.items() if v}
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    for c in kube.containers(pod):
        csc = c["securityContext"]
        assert csc.get("privileged", False) is False
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add")
        # a read-only root needs a writable /tmp (Dask's scratch space, HOME in the image)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        assert mounts.get("/tmp") in scratch
        # the data volume is only ever mounted read-only
        for m in c["volumeMounts"]:
            if m["mountPath"] == sk.DATA_MOUNT:
                assert m["readOnly"] is True


def test_credentials_come_only_from_secrets():
    secret_like = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
    seen = set()
    for where, _role, pod in all_pods():
        for c in kube.containers(pod):
            for e in c.get("env", []):
                if secret_like.search(e["name"]):
                    assert "value" not in e, (where, e)
                    ref = e["valueFrom"]["secretKeyRef"]
                    seen.add((ref["name"], ref["key"]))
            assert "envFrom" not in c or all("secretRef" in f for f in c["envFrom"])
    assert {("slidecensus-s3", "AWS_ACCESS_KEY_ID"),
            ("slidecensus-s3", "AWS_SECRET_ACCESS_KEY")} <= seen
    text = "\n".join(p.read_text() for p in kube.manifest_files())
    assert "kind: Secret" not in text


def test_only_pods_that_write_outputs_get_the_credentials():
    """Workers write cell tables and maps, the job writes slides.csv and the manifest; the
    scheduler touches no storage and gets no credentials."""
    for where, role, pod in all_pods():
        names = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
        if role == "scheduler":
            assert not {n for n in names if n.startswith("AWS_")}, where
        else:
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, where


# ------------------------------------------------------------------ sizing and GPU


def _benchmark_worker_peaks_bytes() -> list[float]:
    """Worker peak RSS figures of the census section of docs/benchmarks.md."""
    text = (kube.ROOT / "docs" / "benchmarks.md").read_text()
    section = text.split("## Census", 1)[1].split("\n## ", 1)[0]
    peaks, col = [], None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            col = None
        elif "worker peak RSS" in cells:
            col = cells.index("worker peak RSS")
        elif col is not None and not set(cells[0]) <= set("-: "):
            mb = re.findall(r"\d+", cells[col].replace(",", " "))
            peaks += [float(v) * 1e6 for v in mb]
    assert len(peaks) >= 5, peaks
    return peaks


def _worker(group_doc) -> tuple[dict, list[str]]:
    worker = group_doc["spec"]["worker"]["spec"]["containers"][0]
    return worker, worker["args"]


def test_cpu_workers_are_sized_from_the_census_memory_benchmark():
    peak = max(_benchmark_worker_peaks_bytes())
    worker, args = _worker({"spec": kube.find(CLUSTER, "DaskCluster")["spec"]})
    res = worker["resources"]
    request, limit = quantity(res["requests"]["memory"]), quantity(res["limits"]["memory"])
    assert request >= peak  # the scheduler places a worker where its measured peak fits
    # Dask's limit is the container's: Dask pauses and spills before the OOM killer acts
    assert parse_bytes(arg_value(args, "--memory-limit")) == limit
    pause = dask.config.get("distributed.worker.memory.pause")
    assert pause * limit >= 1.5 * peak  # headroom over the largest slide measured (40k)
    nthreads = int(arg_value(args, "--nthreads"))
    assert nthreads == quantity(res["requests"]["cpu"]) == quantity(res["limits"]["cpu"])


def test_gpu_workers_get_a_gpu_and_the_gpu_resource():
    for doc in (kube.find(CLUSTER, "DaskWorkerGroup"), kube.find(JOB_FILE, "DaskWorkerGroup")):
        worker, args = _worker(doc)
        pod = doc["spec"]["worker"]["spec"]
        gpus = int(worker["resources"]["limits"][sk.GPU_RESOURCE])
        assert gpus == 1
        assert arg_value(args, "--resources") == f"GPU={gpus}"
        assert worker["image"].endswith("-cuda")
        assert pod["nodeSelector"]
        assert any(t["key"] == sk.GPU_RESOURCE and t["effect"] == "NoSchedule"
                   for t in pod["tolerations"])
        limit = quantity(worker["resources"]["limits"]["memory"])
        assert parse_bytes(arg_value(args, "--memory-limit")) == limit
        assert limit >= max(_benchmark_worker_peaks_bytes())  # it segments tiles too
    for spec in (kube.find(CLUSTER, "DaskCluster")["spec"], JOB["spec"]["cluster"]["spec"]):
        cpu = spec["worker"]["spec"]["containers"][0]
        assert "--resources" not in cpu["args"]
        assert sk.GPU_RESOURCE not in cpu["resources"]["limits"]
        assert not cpu["image"].endswith("-cuda")


def test_autoscaler_scales_the_cpu_group_within_bounds():
    for docs, name in ((CLUSTER, "slidecensus"), (JOB_FILE, JOB_NAME)):
        scaler = kube.find(docs, "DaskAutoscaler")
        cluster_spec = (kube.find(docs, "DaskCluster")["spec"] if docs is CLUSTER
                        else JOB["spec"]["cluster"]["spec"])
        assert scaler["spec"]["cluster"] == name
        lo, hi = scaler["spec"]["minimum"], scaler["spec"]["maximum"]
        assert 1 <= lo <= cluster_spec["worker"]["replicas"] <= hi


def _default_routes() -> list[str]:
    """Dask's default scheduler routes, from distributed's own config file (the live config
    is no reference: a scheduler started without bokeh appends a route to it in place)."""
    import distributed
    import yaml

    cfg = yaml.safe_load((Path(distributed.__file__).parent / "distributed.yaml").read_text())
    return cfg["distributed"]["scheduler"]["http"]["routes"]


def test_scheduler_serves_the_api_the_autoscaler_uses():
    """The operator asks ``/api/v1/adaptive_target`` (and retires workers through the API);
    the scheduler's route list must include it and keep Dask's defaults (health probes)."""
    for spec in (kube.find(CLUSTER, "DaskCluster")["spec"], JOB["spec"]["cluster"]["spec"]):
        c = spec["scheduler"]["spec"]["containers"][0]
        env = kube.container_env(c, {})
        with dask.config.set(dask.config.collect_env(env)):
            routes = dask.config.get("distributed.scheduler.http.routes")
        assert "distributed.http.scheduler.api" in routes
        assert set(_default_routes()) <= set(routes)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health"


# ------------------------------------------------------------------ the job


def _job_container() -> dict:
    return JOB["spec"]["job"]["spec"]["containers"][0]


def test_job_command_is_a_census_run_the_cli_accepts():
    from slidecensus.cli import build_parser

    c = _job_container()
    env = {**kube.container_env(c, SECRETS),
           "DASK_SCHEDULER_ADDRESS": f"tcp://{JOB_NAME}-scheduler.census.svc.cluster.local:8786"}
    args = [kube.expand(a, env) for a in c["args"]]
    assert args[0] == "slidecensus"
    ns = build_parser().parse_args(args[1:])
    assert ns.command == "run"
    assert ns.cluster == env["DASK_SCHEDULER_ADDRESS"]  # not an embedded LocalCluster
    assert ns.model == env["MODEL"] and Path(ns.model).is_absolute()
    assert env["OUT"].startswith("s3://")
    for path in (env["COHORT"], env["MODEL"]):  # read from the shared data volume
        assert path.startswith(sk.DATA_MOUNT + "/")
    assert JOB["spec"]["job"]["spec"]["restartPolicy"] == "Never"  # DaskJob ends with the pod


def test_job_output_url_survives_the_cli():
    from slidecensus.cli import build_parser

    c = _job_container()
    env = {**kube.container_env(c, SECRETS), "DASK_SCHEDULER_ADDRESS": "tcp://s:1"}
    ns = build_parser().parse_args([kube.expand(a, env) for a in c["args"]][1:])
    assert str(ns.out) == env["OUT"]
    # a model kept in object storage (trained on the cluster) keeps its URL too
    env["MODEL"] = "s3://slidecensus-results/models/model.pt"
    ns = build_parser().parse_args([kube.expand(a, env) for a in c["args"]][1:])
    assert ns.model == env["MODEL"]


def test_init_container_waits_for_a_gpu_worker():
    from slidecensus.cli import build_parser

    init = JOB["spec"]["job"]["spec"]["initContainers"][0]
    env = kube.container_env(init, {})
    args = [kube.expand(a, env) for a in init["args"]]
    ns = build_parser().parse_args(args[1:])
    assert (ns.command, ns.cluster_command) == ("cluster", "wait")
    assert ns.address == env["DASK_SCHEDULER_ADDRESS"]
    gpu_group = kube.find(JOB_FILE, "DaskWorkerGroup")
    assert 1 <= ns.gpu_workers <= gpu_group["spec"]["worker"]["replicas"]
    assert ns.timeout > 0


def test_kustomize_overlays_patch_existing_fields_and_stay_valid():
    """Kustomize is not installed here: the overlays' JSON 6902 patches are applied with
    jsonpatch to the base documents, each must hit exactly one object, and the results must
    still validate and parse."""
    import jsonpatch
    import yaml

    from slidecensus.cli import build_parser

    base = kube.load_docs(kube.K8S / "kustomization.yaml")[0]
    docs = [d for r in base["resources"] for d in kube.load_docs(kube.K8S / r)]
    assert {d["kind"] for d in docs} == {"DaskJob", "DaskWorkerGroup", "DaskAutoscaler"}
    overlays = sorted((kube.K8S / "overlays").glob("*/kustomization.yaml"))
    assert [p.parent.name for p in overlays] == ["large", "small"]
    maxima = {}
    for path in overlays:
        k = kube.load_docs(path)[0]
        assert k["resources"] == ["../.."]
        out = copy.deepcopy(docs)
        for patch in k["patches"]:
            t = patch["target"]
            hits = [i for i, d in enumerate(out) if d["kind"] == t["kind"]
                    and d["metadata"]["name"] == t["name"]
                    and d["apiVersion"] == f"{t['group']}/{t['version']}"]
            assert len(hits) == 1, (path, t)
            out[hits[0]] = jsonpatch.apply_patch(out[hits[0]], yaml.safe_load(patch["patch"]))
        for d in out:
            assert kube.crd_errors(d) == [], path
        job = kube.find(out, "DaskJob")
        c = job["spec"]["job"]["spec"]["containers"][0]
        env = {**kube.container_env(c, SECRETS), "DASK_SCHEDULER_ADDRESS": "x"}
        build_parser().parse_args([kube.expand(a, env) for a in c["args"]][1:])
        maxima[path.parent.name] = kube.find(out, "DaskAutoscaler")["spec"]["maximum"]
    assert maxima["small"] < maxima["large"]


def test_heatmap_job_draws_the_census_run_of_the_daskjob():
    """The heatmap Job reads the DaskJob's output URL and asks for the blast map of the
    issue (clusters 1,4); its command is one the CLI accepts."""
    from slidecensus.cli import build_parser

    job = kube.find(kube.load_docs(kube.K8S / "heatmap-job.yaml"), "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    env = kube.container_env(c, SECRETS)
    ns = build_parser().parse_args([kube.expand(a, env) for a in c["args"]][1:])
    assert ns.command == "heatmap"
    assert ns.dir == kube.container_env(_job_container(), SECRETS)["OUT"]
    assert (ns.clusters, ns.name) == ("1,4", "blast")
