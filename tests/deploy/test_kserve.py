"""The KServe objects (deploy/kserve), checked without a cluster against the CRD schemas of a KServe
release (data/kserve/): the runtime runs the service's image speaking v2 on KServe's port 8080 and serves
/mnt/models, the InferenceService uses that runtime with a registry version and a GPU, and every probe in
the repository's manifests names a route the service has."""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import sys
from typing import Any

import pytest

from app.config import Settings
from tests.deploy.kubernetes_model import (
    CRD_SCHEMA_DIR,
    KSERVE_DIR,
    KUSTOMIZATIONS,
    REPO_ROOT,
    containers,
    crd_errors,
    env,
    env_value,
    find,
    load_file,
    mounts,
    one,
    overlay,
    pod_spec,
    render,
    workloads,
)

KSERVE = "deploy/kserve"
KSERVE_PORT = 8080  # what KServe and Knative expect of a custom runtime
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer (or a pvc:// mount) puts the model


def _files() -> dict[str, dict[str, Any]]:
    return {r["kind"]: r for name in ("servingruntime.yaml", "inferenceservice.yaml")
            for r in load_file(KSERVE_DIR / name)}


def _runtime_container(runtime: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    return found


# The schemas.

@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_the_files_pass_kserves_crd_schemas(kind: str) -> None:
    assert crd_errors(_files()[kind]) == []


def test_the_rendered_objects_pass_kserves_crd_schemas() -> None:
    resources = render(KSERVE)
    assert sorted(r["kind"] for r in resources) == ["InferenceService", "ServingRuntime"]
    for resource in resources:
        assert crd_errors(resource) == [], resource["kind"]


def test_the_crd_schemas_refuse_what_the_api_server_refuses() -> None:
    """The schemas are live: a misspelt field, a wrong type and a value out of the enum are all errors."""
    service = copy.deepcopy(_files()["InferenceService"])
    model = service["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")
    service["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    service["spec"]["predictor"]["scaleMetric"] = "queue"
    errors = crd_errors(service)
    assert len(errors) == 3, errors
    runtime = copy.deepcopy(_files()["ServingRuntime"])
    _runtime_container(runtime)["readinessProbe"]["httpGet"].pop("port")
    assert any("'port' is a required property" in e for e in crd_errors(runtime))


def test_the_committed_schemas_are_the_ones_their_readme_names() -> None:
    readme = (CRD_SCHEMA_DIR / "README.md").read_text(encoding="utf-8")
    assert "github.com/kserve/kserve" in readme
    assert re.search(r"commit `[0-9a-f]{40}`", readme), "the source commit is recorded"
    for path in sorted(CRD_SCHEMA_DIR.glob("*.json")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{path.name}`"))
        cells = [cell.strip(" `") for cell in row.strip(" |").split("|")]
        assert "config/crd/" in cells[1], f"{path.name}: the source path is recorded"
        assert cells[-1] == digest, f"{path.name} changed since its README entry"


# The runtime.

def test_the_runtime_starts_the_service_on_kserves_port() -> None:
    runtime = _files()["ServingRuntime"]
    server = _runtime_container(runtime)
    command = server["command"] + server["args"]
    assert command[:3] == ["python", "-m", "app"]
    assert command[command.index("--port") + 1] == str(KSERVE_PORT)
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert [p["containerPort"] for p in server["ports"]] == [KSERVE_PORT], "Knative allows one port"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["port"] == KSERVE_PORT, "Knative refuses probes on other ports"


def test_the_service_takes_the_host_and_port_options_the_runtime_passes() -> None:
    result = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout and "--host" in result.stdout


def test_the_runtime_speaks_v2_and_serves_the_model_kserve_mounts() -> None:
    runtime = _files()["ServingRuntime"]
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    server = _runtime_container(runtime)
    assert env_value(server, "APP_WEIGHTS") == MODEL_DIR
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 300


def test_a_revision_never_changes_its_own_model() -> None:
    """No jobs, no following a registry, no admin routes: the model a revision starts with is the one it
    serves, which is what a canary split compares."""
    server = _runtime_container(_files()["ServingRuntime"])
    assert env_value(server, "APP_RUN_JOBS") == "false"
    assert float(env_value(server, "APP_REGISTRY_POLL_S")) == 0
    assert "APP_ADMIN_TOKEN" not in env(server)


def test_the_runtime_runs_locked_down_with_writable_volumes_where_the_service_writes() -> None:
    runtime = _files()["ServingRuntime"]
    server = _runtime_container(runtime)
    security = server["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "securityContext" not in runtime["spec"], "Knative refuses a pod-level securityContext by default"
    state = env_value(server, "APP_STATE_DIR")
    emptydirs = {v["name"] for v in runtime["spec"]["volumes"] if "emptyDir" in v}
    for path in (state, "/tmp", "/home/app"):
        assert mounts(server)[path]["name"] in emptydirs, path


# The InferenceService.

def test_the_inference_service_uses_the_runtime_with_a_gpu() -> None:
    files = _files()
    runtime, service = files["ServingRuntime"], files["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert int(model["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert env_value(_runtime_container(runtime), "APP_DEVICE") == "cuda"


def test_the_inference_service_is_named_as_the_v2_model_it_serves() -> None:
    files = _files()
    name = env_value(_runtime_container(files["ServingRuntime"]), "APP_MODEL_NAME")
    assert files["InferenceService"]["metadata"]["name"] == name


def test_the_model_comes_from_the_kubernetes_deployments_registry_claim() -> None:
    service = one(render(KSERVE), "InferenceService", "resnet50")
    uri = service["spec"]["predictor"]["model"]["storageUri"]
    match = re.fullmatch(r"pvc://([a-z0-9-]+)/versions/([A-Za-z0-9][A-Za-z0-9._-]*)", uri)
    assert match, uri
    claim = one(overlay("gpu"), "PersistentVolumeClaim", match[1])
    assert service["metadata"]["namespace"] == claim["metadata"]["namespace"]


def test_knative_autoscales_on_concurrency_in_the_mode_that_splits_traffic() -> None:
    service = _files()["InferenceService"]
    predictor = service["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0
    assert predictor["minReplicas"] >= 1, "a cold start loads CUDA and the model"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("Knative", "Serverless")
    assert "canaryTrafficPercent" not in predictor, "the first revision takes all the traffic"


# Probes everywhere name routes the service has.

def _openapi_paths() -> dict[str, set[str]]:
    from app.factory import create_app

    return {path: set(methods) for path, methods in create_app(Settings()).openapi()["paths"].items()}


def _probes(spec: dict[str, Any]) -> list[str]:
    return [c[probe]["httpGet"]["path"] for c in containers(spec)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe") if probe in c]


def test_every_probe_in_the_manifests_is_a_get_route_of_the_service() -> None:
    routes = _openapi_paths()
    probed = set(_probes(_files()["ServingRuntime"]["spec"]))
    for directory in KUSTOMIZATIONS:
        if directory != KSERVE:
            resources = render(directory)
            probed |= {path for w in workloads(resources) for path in _probes(pod_spec(w))}
            assert not find(resources, "ServingRuntime")
    assert probed >= {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
    for path in probed:
        assert "get" in routes.get(path, set()), f"{path} is not a GET route of the service"
