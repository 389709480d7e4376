"""The container images in deploy/docker, without a Docker engine.

No engine runs here, so the Dockerfiles are linted by reading them (rules in the spirit of
hadolint, named by its codes), checked against the manifests and the project's pins, and
every command in them is run on this host: pip installs as ``--dry-run`` (the pins must be
what the tests run with), the smoke import and the default command as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from slidecensus.cluster import kubernetes as sk

from . import kube

DOCKER = kube.DEPLOY / "docker"
FILES = {"cpu": DOCKER / "cpu.Dockerfile", "gpu": DOCKER / "gpu.Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1].strip() + " "
            continue
        instr, _, rest = (buf + s).partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def run_commands(path: Path) -> list[list[str]]:
    """Each shell command of each RUN (split at ``&&``) as argv."""
    return [shlex.split(part) for instr, args in instructions(path) if instr == "RUN"
            for part in args.split("&&")]


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for instr, args in instructions(path):
        if instr == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def build_tag(path: Path) -> str:
    """The tag of the build command in the file's header comment."""
    m = re.search(r"docker build -f \S+ -t (\S+) \.", path.read_text())
    assert m, f"{path.name}: no build command in the header"
    return m[1]


@pytest.mark.parametrize("which", sorted(FILES))
def test_dockerfile_lint(which):
    path = FILES[which]
    ins = instructions(path)
    names = [i for i, _ in ins]
    # DL3006/DL3007: a tagged base, not latest; a patch release of this project's Python
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", froms[0])
    assert m, froms[0]
    assert (int(m[1]), int(m[2])) == sys.version_info[:2]
    assert "ADD" not in names  # DL3020
    assert "MAINTAINER" not in names  # DL4000
    for i, a in ins:
        if i == "WORKDIR":
            assert a.startswith("/")  # DL3000
        if i in ("CMD", "ENTRYPOINT"):  # DL3025: exec form
            v = json.loads(a)
            assert isinstance(v, list) and all(isinstance(x, str) for x in v)
        if i == "RUN":
            assert not re.search(r"(^|\s)cd\s", a)  # DL3003: WORKDIR, not cd
            assert "sudo" not in a.split()  # DL3004
            assert "apt-get" not in a and "apk " not in a  # no system packages needed
            assert "|" not in a or "SHELL" in names  # DL4006
            assert "curl" not in a and "wget" not in a  # nothing fetched outside pip
        if i == "ENV":
            for key in env_of(path):
                assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", key), key
    # DL3045: a relative COPY destination only once a WORKDIR is set
    for k, (i, a) in enumerate(ins):
        if i == "COPY" and not a.split()[-1].startswith("/"):
            assert "WORKDIR" in names[:k]
    # DL3002: ends as a non-root user, numeric (runAsNonRoot checks a number), after all RUN
    users = [k for k, i in enumerate(names) if i == "USER"]
    assert users and max(k for k, i in enumerate(names) if i == "RUN") < users[-1]
    uid, _, gid = ins[users[-1]][1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    for cmd in run_commands(path):
        if cmd[:4] == ["python", "-m", "pip", "install"]:
            assert "--no-cache-dir" in cmd  # DL3042
            pkgs = [c for c in cmd[4:] if not c.startswith("-") and not c.startswith("http")]
            for p in pkgs:  # DL3013: named packages pinned; the project itself from the tree
                assert "==" in p or p.startswith("."), p


@pytest.mark.parametrize("which", sorted(FILES))
def test_dockerfile_copies_only_what_exists_and_the_context_sends(which):
    path = FILES[which]
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    rules = [r.strip() for r in ignore if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"  # everything excluded, then re-included by name
    included = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for i, a in instructions(path):
        if i == "COPY":
            for src in a.split()[:-1]:
                assert (kube.ROOT / src).exists(), src
                assert src.rstrip("/") in included, src


def test_images_match_the_manifests_and_the_uid():
    """The build tags are the images the pods run, and the image's user is the pods' user."""
    cpu, gpu = build_tag(FILES["cpu"]), build_tag(FILES["gpu"])
    assert (cpu, gpu) == (sk.DEFAULT_IMAGE, sk.DEFAULT_GPU_IMAGE)
    users = {[a for i, a in instructions(path) if i == "USER"][-1] for path in FILES.values()}
    for _, doc in kube.all_docs():
        for role, pod in kube.pod_specs(doc).items():
            where = f"{doc['kind']}/{doc['metadata']['name']}/{role}"
            sc = pod["securityContext"]
            assert users == {f"{sc['runAsUser']}:{sc['runAsGroup']}"}, where
            for c in kube.containers(pod):
                gpu_pod = sk.GPU_RESOURCE in c["resources"]["limits"]
                assert c["image"] == (gpu if gpu_pod else cpu), (where, c["name"])


def test_torch_pins_are_the_projects_pin():
    """Both images pin the torch release that scripts/setup-env installs for the tests."""
    setup = (kube.ROOT / "scripts" / "setup-env").read_text()
    pin = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-(torch==[\w.]+)\}", setup)[1]
    for path in FILES.values():
        torch = [c for cmd in run_commands(path) for c in cmd if c.startswith("torch")]
        assert torch == [pin], (path.name, torch)
    cpu_cmd = next(c for c in run_commands(FILES["cpu"]) if any("torch" in x for x in c))
    assert cpu_cmd[cpu_cmd.index("--index-url") + 1].endswith("/whl/cpu")
    gpu_cmd = next(c for c in run_commands(FILES["gpu"]) if any("torch" in x for x in c))
    assert "--index-url" not in gpu_cmd  # PyPI's Linux wheels are the CUDA builds


def _host_env(path: Path) -> dict[str, str]:
    env = {**os.environ, **env_of(path)}
    env["HOME"] = os.environ.get("HOME", "/root")  # keep this host's pip configuration
    return env


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(FILES))
def test_every_command_in_the_image_runs_on_this_host(which, tmp_path):
    """pip installs with ``--dry-run`` from the repository root (where the COPY sources
    are), the smoke import and the default command verbatim: all must succeed."""
    path = FILES[which]
    env = {**_host_env(path), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    for cmd in run_commands(path):
        if cmd[:4] == ["python", "-m", "pip", "install"]:
            argv = [sys.executable, "-m", "pip", "install", "--dry-run", *cmd[4:]]
            res = subprocess.run(argv, cwd=kube.ROOT, env=env, capture_output=True, text=True,
                                 timeout=300)
            assert res.returncode == 0, res.stderr[-2000:]
            if any(c.startswith(".") for c in cmd[4:]):
                assert "Would install slidecensus" in res.stdout
            else:  # the pinned wheels are the ones installed here
                assert "Would install" not in res.stdout, res.stdout[-2000:]
        elif cmd[0] == "python" and "-c" in cmd:
            res = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-2000:]
        else:
            pytest.fail(f"{path.name}: no host check for {shlex.join(cmd)}")
    cmd = json.loads(next(a for i, a in instructions(path) if i == "CMD"))
    res = subprocess.run(kube.executable(cmd), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "cluster" in res.stdout
