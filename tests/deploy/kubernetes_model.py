"""Reading the Kubernetes and KServe manifests as a cluster would, without one: kustomize renders each
kustomization (kubectl's built-in one, else a standalone `kustomize`), kubernetes-validate checks the
result against the Kubernetes API's own schemas, and the KServe kinds are checked against the CRD schemas
committed in data/kserve/. The tests then read the rendered objects through the small accessors here."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = REPO_ROOT / "deploy" / "kubernetes"
KSERVE_DIR = REPO_ROOT / "deploy" / "kserve"
CRD_SCHEMA_DIR = Path(__file__).parent / "data" / "kserve"
OVERLAYS = ("gpu", "cpu")
# Every kustomization in the repository, relative to it: the base, the overlays, the training Jobs, KServe.
KUSTOMIZATIONS = sorted(str(path.parent.relative_to(REPO_ROOT))
                        for path in (REPO_ROOT / "deploy").rglob("kustomization.yaml"))
# The oldest Kubernetes the manifests claim (ReadWriteOncePod is GA in 1.29) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29", "latest")
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-v1beta1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-v1alpha1.json",
}


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.cache
def _render(directory: str) -> str:
    command = kustomize_command()
    assert command is not None
    result = subprocess.run([*command, str(REPO_ROOT / directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} {directory} failed:\n{result.stderr}"
    return result.stdout


def render(directory: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k DIRECTORY` would send, as dicts; skips the test without kustomize."""
    if kustomize_command() is None:
        pytest.skip("neither kubectl nor kustomize is installed, so the kustomizations cannot be rendered "
                    "(install kubectl 1.27+ to run these tests)")
    return [document for document in yaml.safe_load_all(_render(directory)) if document]


def overlay(name: str) -> list[dict[str, Any]]:
    return render(f"deploy/kubernetes/overlays/{name}")


def load_file(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document]


def raw_resources(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The complete objects a kustomization lists under `resources:` (files, not patches or other
    kustomizations), read straight from the files: checkable without kustomize."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_file():
            for document in load_file(path):
                yield path, document


def find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]


def one(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (resource,) = find(resources, kind, name)
    return resource


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    return resource["spec"]["template"]["spec"]


def workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in WORKLOAD_KINDS]


def containers(spec: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def container(resource: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(pod_spec(resource)) if c["name"] == name]
    return found


def env(container_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's environment entries by name (the whole entry: `value` or `valueFrom`)."""
    return {entry["name"]: entry for entry in container_spec.get("env", [])}


def env_value(container_spec: dict[str, Any], name: str) -> str | None:
    entry = env(container_spec).get(name)
    return None if entry is None else entry.get("value")


def runs_the_service(container_spec: dict[str, Any]) -> bool:
    """Whether the container runs either plane, `python -m app` or `python -m app.control`: stated, or by the
    image's CMD when no command is given."""
    command = container_spec.get("command", []) + container_spec.get("args", [])
    return not command or command[:3] in (["python", "-m", "app"], ["python", "-m", "app.control"])


def service_containers(resources: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, c) for w in workloads(resources) for c in containers(pod_spec(w)) if runs_the_service(c)]


def mounts(container_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in container_spec.get("volumeMounts", [])}


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in spec.get("volumes", [])}


def claim_at(spec: dict[str, Any], container_spec: dict[str, Any], path: str) -> str | None:
    """The PersistentVolumeClaim mounted at `path` in the container, or None."""
    mount = mounts(container_spec).get(path)
    if mount is None:
        return None
    claim = volumes(spec)[mount["name"]].get("persistentVolumeClaim")
    return None if claim is None else claim["claimName"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def variable_references(container_spec: dict[str, Any]) -> set[str]:
    """The $(NAME) references Kubernetes expands in command and args (it leaves undefined ones verbatim)."""
    words = container_spec.get("command", []) + container_spec.get("args", [])
    return {name for word in words for name in _REFERENCE.findall(str(word))}


# Kubernetes schemas, through kubernetes-validate.

def kubernetes_error(resource: dict[str, Any], version: str) -> str | None:
    """Why the API server's schema for `version` refuses the object, strictly (unknown fields are errors,
    as with `kubectl apply --validate=strict`), or None."""
    from kubernetes_validate import utils

    version = utils.latest_version() if version == "latest" else version
    try:
        utils.validate(resource, version, strict=True)
    except utils.ValidationError as error:
        where = ".".join(map(str, error.path))
        return f"{resource['kind']}/{resource['metadata'].get('name')}: {where}: {error.message}"
    return None


# KServe's CRD schemas.

def _strict(node: Any) -> Any:
    """An OpenAPI v3 structural schema (a CRD's) as a JSON Schema that refuses unknown fields, as the API
    server does under strict field validation: every object schema with `properties` and no
    `additionalProperties` or `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`,
    and `nullable` admits null."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: _strict(value) for key, value in node.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    if schema.pop("nullable", False) and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    return schema


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((CRD_SCHEMA_DIR / CRD_SCHEMAS[(api_version, kind)]).read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(_strict(schema))


def crd_errors(resource: dict[str, Any]) -> list[str]:
    validator = crd_validator(resource["apiVersion"], resource["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]
    if not resource.get("metadata", {}).get("name"):
        errors.append("metadata.name: required")
    return errors


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as `kubectl patch --type merge` applies it."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
