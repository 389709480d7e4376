"""Offline checks of Kubernetes objects, shared by the deploy and cluster tests.

* the Dask operator's own CRD schemas (shipped inside dask_kubernetes), converted from
  OpenAPI v3 to JSON Schema with unknown fields forbidden, as ``kubectl apply``'s strict
  field validation forbids them;
* the Kubernetes Python client's models: every field name is checked against the model's
  ``attribute_map`` (unknown fields fail) and its type against ``openapi_types``, and the
  model is then built by the client's deserializer (missing required fields fail);
* the kubelet's ``$(VAR)`` expansion of command lines, and starting ``dask`` processes on
  127.0.0.1 from a container spec.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASK_KINDS = ("DaskCluster", "DaskWorkerGroup", "DaskAutoscaler", "DaskJob")


# ------------------------------------------------------------------ manifests


def load_docs(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    """The Kubernetes object files under deploy/k8s (kustomization files excluded)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one document of ``kind`` (and ``name``)."""
    hits = [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_specs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod specs held by a Dask operator object, by role."""
    spec = doc["spec"]
    if doc["kind"] == "DaskCluster":
        return {"scheduler": spec["scheduler"]["spec"], "worker": spec["worker"]["spec"]}
    if doc["kind"] == "DaskWorkerGroup":
        return {"worker": spec["worker"]["spec"]}
    if doc["kind"] == "DaskJob":
        inner = spec["cluster"]["spec"]
        return {"job": spec["job"]["spec"], "scheduler": inner["scheduler"]["spec"],
                "worker": inner["worker"]["spec"]}
    if doc["kind"] == "Job":
        return {"job": spec["template"]["spec"]}
    return {}


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


# ------------------------------------------------------------------ CRD schemas


def crd_dir() -> Path:
    """The CRDs inside the installed dask_kubernetes (the operator's Helm chart)."""
    import dask_kubernetes

    d = (Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm"
         / "dask-kubernetes-operator" / "crds")
    assert d.is_dir(), f"no CRDs at {d}"
    return d


def openapi_to_jsonschema(node: Any) -> Any:
    """One OpenAPI v3 (structural CRD) schema node as JSON Schema.

    Objects with ``properties`` forbid other keys unless the node says
    ``x-kubernetes-preserve-unknown-fields``; ``nullable`` admits null;
    ``x-kubernetes-int-or-string`` admits both. Descriptions, formats and defaults are
    dropped (``format: int-or-string`` on a ``type: string`` node stays a string, which is
    what the API server accepts for it).
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
    for key in ("required", "enum", "minimum", "maximum", "minItems", "maxItems", "pattern",
                "minLength", "maxLength"):
        if key in node:
            out[key] = node[key]
    if "properties" in node:
        out["properties"] = {k: openapi_to_jsonschema(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = openapi_to_jsonschema(node["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            out[key] = [openapi_to_jsonschema(v) for v in node[key]]
    if "additionalProperties" in node:
        ap = node["additionalProperties"]
        out["additionalProperties"] = openapi_to_jsonschema(ap) if isinstance(ap, dict) else ap
    elif "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema per kind for the whole object (apiVersion, kind, metadata, spec)."""
    schemas = {}
    for path in sorted(crd_dir().glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            root = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
            root["properties"] = {
                "apiVersion": {"const": f"{group}/{version['name']}"},
                "kind": {"const": kind},
                "metadata": {"type": "object"},  # checked against V1ObjectMeta separately
                **root.get("properties", {}),
            }
            root["required"] = ["apiVersion", "kind", "metadata", *root.get("required", [])]
            root["additionalProperties"] = False
            schemas[kind] = root
    assert set(DASK_KINDS) <= set(schemas), sorted(schemas)
    return schemas


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Schema violations of a Dask operator object, each as 'path: message'."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(crd_schemas()[doc["kind"]])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)]


# ------------------------------------------------------------------ Kubernetes models

_LIST = re.compile(r"^list\[(.+)\]$", re.IGNORECASE)
_DICT = re.compile(r"^dict[\[(]str, (.+)[\])]$", re.IGNORECASE)


def _type_errors(data: Any, type_name: str, path: str) -> list[str]:
    from kubernetes import client

    if m := _LIST.match(type_name):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        return [e for i, v in enumerate(data) for e in _type_errors(v, m[1], f"{path}[{i}]")]
    if m := _DICT.match(type_name):
        if not isinstance(data, dict):
            return [f"{path}: expected a map, got {type(data).__name__}"]
        return [e for k, v in data.items() for e in _type_errors(v, m[1], f"{path}.{k}")]
    simple = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
              "datetime": (str,), "date": (str,)}
    if type_name == "object":
        return []
    if type_name in simple:
        ok = isinstance(data, simple[type_name]) and not (
            type_name in ("int", "float") and isinstance(data, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {data!r}"]
    klass = getattr(client, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} object, got {type(data).__name__}"]
    by_json = {json_name: attr for attr, json_name in klass.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        elif value is not None:
            errors.extend(_type_errors(value, klass.openapi_types[by_json[key]],
                                       f"{path}.{key}"))
    return errors


def k8s_errors(data: dict[str, Any], type_name: str) -> list[str]:
    """Violations of the Kubernetes model ``type_name`` (e.g. ``V1PodSpec``): unknown or
    mistyped fields anywhere inside, then missing required fields (via the client's
    deserializer, which refuses to build a model without them)."""
    from kubernetes.client import ApiClient

    errors = _type_errors(data, type_name, type_name)
    if not errors:
        try:
            ApiClient()._ApiClient__deserialize(copy.deepcopy(data), type_name)
        except (ValueError, TypeError) as exc:
            errors.append(f"{type_name}: {exc}")
    return errors


# ------------------------------------------------------------------ the kubelet's part

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of ``$(VAR)`` in command and args: defined variables are
    replaced, undefined references are left as written, ``$$`` is a literal ``$``."""
    def sub(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        return env.get(m[1], m[0])

    return _VAR.sub(sub, text)


def undefined_refs(args: list[str], env_names: set[str]) -> set[str]:
    """``$(VAR)`` references in ``args`` that no env entry defines (the kubelet would pass
    them through literally)."""
    refs = set()
    for a in args:
        for m in _VAR.finditer(a):
            if m[1] and m[1] not in env_names:
                refs.add(m[1])
    return refs


def container_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]
                  ) -> dict[str, str]:
    """The environment the kubelet would give a container: literal values, and Secret keys
    from ``secrets`` (name -> data); a missing optional key is left out."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            data = secrets.get(ref["name"], {})
            if ref["key"] in data:
                env[e["name"]] = data[ref["key"]]
            else:
                assert ref.get("optional"), f"secret key {ref} missing and not optional"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(args: list[str]) -> list[str]:
    """argv for a console script named in a container's args (``dask``, ``slidecensus``),
    through this interpreter when the script is not on PATH."""
    exe = shutil.which(args[0])
    if exe:
        return [exe, *args[1:]]
    module = {"dask": "dask", "slidecensus": "slidecensus"}[args[0]]
    return [sys.executable, "-m", module, *args[1:]]


def on_loopback(args: list[str]) -> list[str]:
    """A ``dask worker`` command line pinned to 127.0.0.1: in a pod it listens on the pod's
    own address and dashboard port; here those would be this machine's interfaces and a
    port other tests may hold."""
    out = list(args)
    if "--dashboard-address" in out:
        out[out.index("--dashboard-address") + 1] = "127.0.0.1:0"
    return [*out, "--host", "127.0.0.1"]


def start_worker(container: dict[str, Any], scheduler: str, secrets: dict[str, dict[str, str]],
                 extra_env: dict[str, str] | None = None, log: Path | None = None,
                 cwd: Path | None = None) -> subprocess.Popen:
    """Start the container's ``dask worker`` command here, as the kubelet would (its env,
    ``$(VAR)`` expanded), against ``scheduler`` and on 127.0.0.1; output to ``log``, working
    directory ``cwd`` (default: the system's temporary folder, never the repository)."""
    env = {**container_env(container, secrets), **(extra_env or {}),
           "DASK_SCHEDULER_ADDRESS": scheduler}
    args = [expand(a, env) for a in container["args"]]
    assert args[:2] == ["dask", "worker"], args
    kw = {"env": {**os.environ, **env}, "cwd": cwd or tempfile.gettempdir()}
    argv = executable(on_loopback(args))
    if log is None:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                **kw)
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kw)


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate processes this test started, last first, then wait for them."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
