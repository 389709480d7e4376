"""The command lines of deploy/k8s/job.yaml, run here as real processes.

The scheduler, a CPU worker and a GPU worker are started from the manifest's own args and
env (``$(VAR)`` expanded as the kubelet does, the worker's env as the operator's controller
builds it), on 127.0.0.1 instead of pod addresses; the job's init container and its
``slidecensus run`` then run against them on a small synthetic cohort, with outputs to a
loopback S3 server (moto). Only what cannot run here is replaced: the API server and the
operator that would start these pods, the pod network (loopback), the GPU itself (a worker
that carries the ``GPU`` resource, as in tests/engine/test_pipeline.py), the Secret (test
credentials for the S3 server) and the data volume (the COHORT and MODEL paths).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from dask.utils import parse_bytes

from . import kube

pytestmark = pytest.mark.slow

DOCS = kube.load_docs(kube.K8S / "job.yaml")
JOB = kube.find(DOCS, "DaskJob")
JOB_NAME = JOB["metadata"]["name"]
BUCKET = "census-bucket"


def _moto(tmp: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """A real S3-compatible server on 127.0.0.1 with one bucket; its Secret data."""
    import fsspec

    port = kube.free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secret = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    fs = fsspec.filesystem("s3", key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": secret["AWS_ENDPOINT_URL"]})
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.mkdir(BUCKET)
            return proc, secret
        except Exception:
            if time.monotonic() > deadline:
                kube.stop([proc])
                raise
            time.sleep(0.2)


def _wait_for(client, n: int, timeout: float = 90) -> None:
    client.wait_for_workers(n, timeout=timeout)


def _run(args: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float
         ) -> subprocess.CompletedProcess:
    with open(log, "w") as fh:
        return subprocess.run(kube.executable(args), env={**os.environ, **env}, cwd=cwd,
                              stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """Start the manifest's processes, run the init container and the job; record what
    happened for the tests below."""
    from dask_kubernetes.operator.controller import controller as ctl
    from distributed import Client

    from slidecensus.models import TrainConfig, train_infogan
    from slidecensus.tiling.synth import synth_cohort

    tmp = tmp_path_factory.mktemp("k8s")
    logs = tmp / "logs"
    logs.mkdir()
    cohort = synth_cohort(tmp / "slides", n_slides=2, size=(512, 640), seed=3, mpp=0.5)
    model = tmp / "model.pt"
    crops = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    train_infogan(crops, TrainConfig(k=3, width=16, iterations=2, batch_size=32, seed=0), model)

    procs: list[subprocess.Popen] = []
    rec: dict = {"logs": logs}
    try:
        moto, s3 = _moto(tmp)
        procs.append(moto)
        secrets = {"slidecensus-s3": s3}
        cluster = JOB["spec"]["cluster"]["spec"]

        # the scheduler: its container's args and env, on loopback ports of our choosing
        sched = cluster["scheduler"]["spec"]["containers"][0]
        port, dash = kube.free_port(), kube.free_port()
        args = list(sched["args"])
        args[args.index("--host") + 1] = "127.0.0.1"
        args += ["--port", str(port), "--dashboard-address", f"127.0.0.1:{dash}"]
        with open(logs / "scheduler.log", "wb") as fh:
            procs.append(subprocess.Popen(
                kube.executable(args), env={**os.environ, **kube.container_env(sched, secrets)},
                stdout=fh, stderr=subprocess.STDOUT, cwd=tmp))
        address = f"tcp://127.0.0.1:{port}"
        client = Client(address, timeout=60)
        with client:
            for path in ("/health", "/api/v1/adaptive_target", "/status"):
                with urllib.request.urlopen(f"http://127.0.0.1:{dash}{path}", timeout=30) as r:
                    rec[path] = (r.status, r.read().decode())

            # workers: the Deployments the operator would make, their containers run here
            groups = [(f"{JOB_NAME}-default", cluster["worker"]),
                      *[(g["metadata"]["name"], g["spec"]["worker"]) for g in DOCS
                        if g["kind"] == "DaskWorkerGroup"]]
            deployments = {name: ctl.build_worker_deployment_spec(
                name, "census", JOB_NAME, f"{i:010d}", w["spec"], {}, {})
                for i, (name, w) in enumerate(groups)}
            rec["deployments"] = deployments
            gpu_name = next(n for n in deployments if n != f"{JOB_NAME}-default")
            cpu_c = deployments[f"{JOB_NAME}-default"]["spec"]["template"]["spec"][
                "containers"][0]
            procs.append(kube.start_worker(cpu_c, address, secrets, log=logs / "cpu.log",
                                           cwd=tmp))
            _wait_for(client, 1)

            # the init container, before any GPU worker exists: it must give up (short wait)
            init = JOB["spec"]["job"]["spec"]["initContainers"][0]
            init_env = {**kube.container_env(init, secrets), "DASK_SCHEDULER_ADDRESS": address}
            init_args = [kube.expand(a, init_env) for a in init["args"]]
            short = list(init_args)
            short[short.index("--timeout") + 1] = "3"
            rec["wait_without_gpu"] = _run(short, init_env, tmp, logs / "wait0.log", 120)

            gpu_c = deployments[gpu_name]["spec"]["template"]["spec"]["containers"][0]
            procs.append(kube.start_worker(gpu_c, address, secrets, log=logs / "gpu.log",
                                           cwd=tmp))
            rec["wait_with_gpu"] = _run(init_args, init_env, tmp, logs / "wait1.log", 180)
            _wait_for(client, 2)
            rec["workers"] = client.scheduler_info(n_workers=-1)["workers"]
            rec["containers"] = {"cpu": cpu_c, "gpu": gpu_c}

            # the job's main container: the manifest's args; COHORT, OUT, MODEL pointed here
            main = JOB["spec"]["job"]["spec"]["containers"][0]
            env = kube.container_env(main, secrets)
            assert {"COHORT", "OUT", "MODEL"} <= set(env)
            env.update(COHORT=str(cohort), OUT=f"s3://{BUCKET}/k8s-run", MODEL=str(model),
                       DASK_SCHEDULER_ADDRESS=address)
            rec["env"] = env
            run_dir = tmp / "runner"
            run_dir.mkdir()
            rec["run_dir"] = run_dir
            client.get_task_stream()  # the scheduler records tasks from here on
            t0 = time.time()
            rec["job"] = _run([kube.expand(a, env) for a in main["args"]], env, run_dir,
                              logs / "job.log", 300)
            rec["tasks"] = client.get_task_stream(start=t0)
        yield rec
    finally:
        kube.stop(procs)


def _log(rec, name: str) -> str:
    return (rec["logs"] / name).read_text()[-3000:]


def test_scheduler_from_the_manifest_serves_probes_and_the_autoscaler_api(job_run):
    status, body = job_run["/health"]
    assert status == 200 and body.strip() == "ok"
    status, body = job_run["/api/v1/adaptive_target"]
    assert status == 200 and "workers" in json.loads(body)


def test_scheduler_from_the_manifest_serves_the_dashboard(job_run):
    """The images install the `dashboard` extra (bokeh), so 8787 is the Dask dashboard (a
    Bokeh document loading bokeh.min.js), not Dask's "Dask needs bokeh" page."""
    status, body = job_run["/status"]
    assert status == 200 and "static/js/bokeh.min.js" in body and "Dask needs" not in body


def test_workers_from_the_manifest_register_as_specified(job_run):
    by_name = {w["name"]: w for w in job_run["workers"].values()}
    for kind, c in job_run["containers"].items():
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        w = by_name[env["DASK_WORKER_NAME"]]  # --name $(DASK_WORKER_NAME) was expanded
        args = c["args"]
        assert w["nthreads"] == int(args[args.index("--nthreads") + 1])
        assert w["memory_limit"] == parse_bytes(args[args.index("--memory-limit") + 1])
        assert (w.get("resources") or {}) == ({"GPU": 1} if kind == "gpu" else {})


def test_init_container_waits_for_a_gpu_worker(job_run):
    without, with_gpu = job_run["wait_without_gpu"], job_run["wait_with_gpu"]
    assert without.returncode == 1, _log(job_run, "wait0.log")
    assert "0 GPU" in _log(job_run, "wait0.log")
    assert with_gpu.returncode == 0, _log(job_run, "wait1.log")
    assert "1 GPU workers" in _log(job_run, "wait1.log")


def test_job_runs_the_census_and_classifies_on_the_gpu_worker(job_run):
    assert job_run["job"].returncode == 0, _log(job_run, "job.log")
    gpu = {a for a, w in job_run["workers"].items() if (w.get("resources") or {}).get("GPU")}
    ran: dict[str, set] = {}
    for t in job_run["tasks"]:
        ran.setdefault(t["key"].split("-")[0], set()).add(t["worker"])
    assert ran.get("classify_task") == gpu
    assert ran.get("segment_tile_task")


def test_job_writes_its_outputs_to_object_storage(job_run):
    import fsspec
    import pandas as pd

    env = job_run["env"]
    fs = fsspec.filesystem("s3", key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    # nothing written beside the runner or the workers
    assert not (job_run["run_dir"] / "s3:").exists()
    assert not (job_run["run_dir"].parent / "s3:").exists()
    with fs.open(f"{BUCKET}/k8s-run/slides.csv") as fh:
        table = pd.read_csv(fh)
    assert (table.status == "ok").all() and len(table) == 2
    assert fs.exists(f"{BUCKET}/k8s-run/census.zarr")
