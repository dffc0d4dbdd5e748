"""The Kubernetes manifests (deploy/kubernetes), checked without a cluster: every kustomization renders,
the result passes the Kubernetes API's schemas, and it has what docs/deploy-kubernetes.md promises: the
probes, the GPUs, a locked-down security context, resources, one job runner, the admin token from a
user-made Secret, the registry on a shared volume, and an autoscaler on a metric the service exports."""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.config import Settings
from tests.deploy import compose_model
from tests.deploy.dockerfile_model import container_command, final_stage
from tests.deploy.dockerfile_model import env as dockerfile_env
from tests.deploy.kubernetes_model import (
    KUBERNETES_DIR,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    OVERLAYS,
    REPO_ROOT,
    claim_at,
    container,
    containers,
    crd_errors,
    env,
    env_value,
    find,
    kubernetes_error,
    mounts,
    one,
    overlay,
    pod_spec,
    raw_resources,
    render,
    selects,
    service_containers,
    volumes,
    workloads,
)

API, RUNNER = "cifar-serve-api", "cifar-serve-jobs"
NAMESPACE = "cifar-serve"
ADMIN_SECRET, ADMIN_SECRET_KEY = "cifar-serve-admin", "token"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
IMAGE_USER = final_stage()


def _image_uid() -> int:
    (user,) = [i.arguments for i in IMAGE_USER if i.keyword == "USER"]
    return int(user.split(":")[0])


def _image_port() -> int:
    command = container_command(IMAGE_USER)
    return int(command[command.index("--port") + 1])


def _kserve_free(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if not r["apiVersion"].startswith("serving.kserve.io/")]


# Rendering and schemas.

@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_kustomization_renders(directory: str) -> None:
    resources = render(directory)
    assert resources, f"{directory} renders nothing"
    if directory.endswith(("overlays/gpu", "overlays/cpu", "single-node", "multi-node", "deploy/kserve")):
        assert {r["metadata"].get("namespace") for r in resources} == {NAMESPACE}, directory


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_rendered_objects_pass_the_kubernetes_schemas(directory: str, version: str) -> None:
    errors = [kubernetes_error(r, version) for r in _kserve_free(render(directory))]
    assert [e for e in errors if e] == []


def test_raw_manifest_files_pass_the_schemas_without_kustomize() -> None:
    """What CI checks even where kubectl is absent: each complete object in the manifests' files (the
    overlays' patches are partial by design and checked once rendered)."""
    checked = 0
    for directory in sorted({p.parent for p in (REPO_ROOT / "deploy").rglob("kustomization.yaml")}):
        for path, resource in raw_resources(directory):
            checked += 1
            if resource["apiVersion"].startswith("serving.kserve.io/"):
                assert crd_errors(resource) == [], path
            else:
                assert kubernetes_error(resource, "1.29") is None, path
    assert checked >= 12


def test_the_schemas_refuse_what_the_api_server_refuses() -> None:
    """The validator is live: a misspelt field and a wrong type are both errors."""
    deployment = copy.deepcopy(one(overlay("gpu"), "Deployment", API))
    api = container(deployment, "api")
    api["readinessprobe"] = api.pop("readinessProbe")
    assert "readinessprobe" in kubernetes_error(deployment, "1.29")
    job = copy.deepcopy(one(render("deploy/kubernetes/training/single-node"), "Job", "cifar-serve-train"))
    job["spec"]["backoffLimit"] = "never"
    assert "backoffLimit" in kubernetes_error(job, "latest")


# Probes.

def _http_get(probe: dict[str, Any]) -> tuple[str, Any]:
    return probe["httpGet"]["path"], probe["httpGet"]["port"]


def _budget_s(probe: dict[str, Any]) -> int:
    return probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_api_probes_startup_then_readiness_on_readyz_and_liveness_on_healthz(name: str) -> None:
    api = container(one(overlay(name), "Deployment", API), "api")
    assert _http_get(api["startupProbe"]) == ("/healthz", "http")
    assert _budget_s(api["startupProbe"]) >= 300, "the start-up (torch, CUDA, binding) may take 5 minutes"
    assert _http_get(api["readinessProbe"]) == ("/readyz", "http")
    assert _http_get(api["livenessProbe"]) == ("/healthz", "http")
    assert api["livenessProbe"]["failureThreshold"] >= 3


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_runner_is_ready_without_a_model_so_it_can_train_the_first_one(name: str) -> None:
    runner = container(one(overlay(name), "Deployment", RUNNER), "jobs")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _http_get(runner[probe]) == ("/healthz", "http"), probe
    assert _budget_s(runner["startupProbe"]) >= 300


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_probed_port_is_the_one_the_process_listens_on(name: str) -> None:
    for workload, service in service_containers(overlay(name)):
        ports = {p["name"]: p["containerPort"] for p in service["ports"]}
        if workload["metadata"]["name"] == RUNNER:  # the control plane: the same image, its own command
            command = service["command"]
            assert command[:3] == ["python", "-m", "app.control"] and "args" not in service
            assert ports == {"http": int(command[command.index("--port") + 1])}
            continue
        assert "command" not in service and "args" not in service, "the image's CMD sets host and port"
        assert ports["http"] == _image_port() and set(ports) <= {"http", "grpc"}
        default = Settings.model_fields["grpc_port"].default
        assert ports.get("grpc", default) == default, "the gRPC server's default port"


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_outlast_the_servers_own_drain(name: str) -> None:
    """SIGKILL only after preStop plus the server's graceful shutdown (APP_REQUEST_TIMEOUT_S + 5 s)."""
    drain_s = Settings.model_fields["request_timeout_s"].default + 5
    for workload, service in service_containers(overlay(name)):
        pre_stop = service["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod_spec(workload)["terminationGracePeriodSeconds"] > drain_s + int(pre_stop[1]), workload["metadata"]


# GPUs and resources.

def test_gpu_overlay_gives_each_service_pod_a_gpu_and_requires_cuda() -> None:
    for workload, service in service_containers(overlay("gpu")):
        assert int(service["resources"]["limits"]["nvidia.com/gpu"]) >= 1, workload["metadata"]["name"]
        assert env_value(service, "APP_DEVICE") == "cuda"
        tolerations = pod_spec(workload).get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)
    assert env_value(container(one(overlay("gpu"), "Deployment", RUNNER), "jobs"), "APP_TRAINING_DEVICE") == "cuda"


def test_cpu_overlay_asks_for_no_gpu_and_sizes_threads_to_its_cores() -> None:
    for workload, service in service_containers(overlay("cpu")):
        assert "nvidia.com/gpu" not in service["resources"].get("limits", {})
        assert env_value(service, "APP_DEVICE") == "cpu"
        # The automatic plan would count the node's cores; the pod's request is what it may use.
        cores = int(service["resources"]["requests"]["cpu"])
        parallel, threads = (int(env_value(service, f"APP_{n}")) for n in ("PARALLEL_BATCHES", "TORCH_THREADS"))
        if workload["metadata"]["name"] == API:
            assert parallel * threads == cores


@pytest.mark.parametrize("directory", [d for d in KUSTOMIZATIONS if d.startswith("deploy/kubernetes/")])
def test_every_container_requests_cpu_and_memory_and_limits_memory(directory: str) -> None:
    for workload in workloads(render(directory)):
        for spec in containers(pod_spec(workload)):
            resources = spec.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (workload["metadata"]["name"], spec["name"])
            assert "memory" in resources.get("limits", {}), (workload["metadata"]["name"], spec["name"])


# Security context.

@pytest.mark.parametrize("directory", [d for d in KUSTOMIZATIONS if d.startswith("deploy/kubernetes/")])
def test_pods_run_as_the_images_user_with_a_read_only_root(directory: str) -> None:
    for workload in workloads(render(directory)):
        spec = pod_spec(workload)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == _image_uid()
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for spec_container in containers(spec):
            security = spec_container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, spec_container["name"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "privileged" not in security and "runAsUser" not in security


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_service_can_write_exactly_where_it_writes(name: str) -> None:
    """With a read-only root, every folder the service writes to must be a writable volume: its state,
    its registry, the runner's data, /tmp and $HOME (the Dockerfile's) for the caches."""
    image_env = dockerfile_env(IMAGE_USER)
    for workload, service in service_containers(overlay(name)):
        written = {env_value(service, "APP_STATE_DIR"), env_value(service, "APP_REGISTRY_DIR"), "/tmp",
                   image_env["HOME"]}
        if env_value(service, "APP_RUN_JOBS") == "true":
            written |= {env_value(service, "APP_DATA_DIR"), "/dev/shm"}
        spec_mounts = mounts(service)
        for path in written:
            assert path in spec_mounts, f"{workload['metadata']['name']} cannot write {path}"
            assert not spec_mounts[path].get("readOnly"), path
        assert set(spec_mounts) == written, "a writable mount nobody writes to"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_volume_paths_are_the_images_defaults(name: str) -> None:
    """The manifests name the same folders as the image's ENV, so a setting left out still lands on a volume."""
    image_env = dockerfile_env(IMAGE_USER)
    for _, service in service_containers(overlay(name)):
        for setting in ("APP_STATE_DIR", "APP_REGISTRY_DIR", "APP_DATA_DIR"):
            if setting in env(service):
                assert env_value(service, setting) == image_env[setting]


# Exactly one job runner.

@pytest.mark.parametrize("name", OVERLAYS)
def test_exactly_one_job_runner(name: str) -> None:
    resources = overlay(name)
    pairs = service_containers(resources)
    # APP_RUN_JOBS defaults to true (app/config.py): a container that omits it would run jobs too.
    assert all("APP_RUN_JOBS" in env(c) for _, c in pairs)
    runners = [(w, c) for w, c in pairs if env_value(c, "APP_RUN_JOBS") == "true"]
    assert [w["metadata"]["name"] for w, _ in runners] == [RUNNER]
    ((runner, runner_container),) = runners
    assert runner["kind"] == "Deployment"
    assert runner["spec"]["replicas"] == 1
    assert runner["spec"]["strategy"] == {"type": "Recreate"}, "RollingUpdate would overlap two runners"
    targeted = {h["spec"]["scaleTargetRef"]["name"] for h in find(resources, "HorizontalPodAutoscaler")}
    assert RUNNER not in targeted
    labels = runner["spec"]["template"]["metadata"]["labels"]
    budgets = find(resources, "PodDisruptionBudget")
    assert not [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
    for workload in workloads(resources):
        if workload is not runner:
            assert not selects(workload["spec"]["selector"]["matchLabels"], labels)
    # The job database's claim: mountable by one pod only, and mounted by no other workload.
    state_claim = claim_at(pod_spec(runner), runner_container, env_value(runner_container, "APP_STATE_DIR"))
    assert one(resources, "PersistentVolumeClaim", state_claim)["spec"]["accessModes"] == ["ReadWriteOncePod"]
    for workload in workloads(resources):
        if workload is not runner:
            claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes(pod_spec(workload)).values()
                      if "persistentVolumeClaim" in v}
            assert state_claim not in claims, workload["metadata"]["name"]
    for _, replica in pairs:
        if replica is not runner_container:
            assert env_value(replica, "APP_RUN_JOBS") == "false"


@pytest.mark.parametrize("name", OVERLAYS)
def test_replicas_forward_admin_writes_to_the_control_planes_service(name: str) -> None:
    resources = overlay(name)
    api = container(one(resources, "Deployment", API), "api")
    url = urlsplit(env_value(api, "APP_CONTROL_URL"))
    service = one(resources, "Service", url.hostname)
    runner = one(resources, "Deployment", RUNNER)
    assert selects(service["spec"]["selector"], runner["spec"]["template"]["metadata"]["labels"])
    assert url.port in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_prediction_service_reaches_the_api_replicas_only(name: str) -> None:
    resources = overlay(name)
    selector = one(resources, "Service", "cifar-serve")["spec"]["selector"]
    assert selects(selector, one(resources, "Deployment", API)["spec"]["template"]["metadata"]["labels"])
    assert not selects(selector, one(resources, "Deployment", RUNNER)["spec"]["template"]["metadata"]["labels"])


# The admin token.

@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_the_admin_token_comes_from_the_users_secret_and_no_secret_is_committed(directory: str) -> None:
    resources = render(directory)
    assert find(resources, "Secret") == [], "the user creates the Secret; none is committed"
    for workload in workloads(resources) + find(resources, "ServingRuntime"):
        spec = workload["spec"] if workload["kind"] == "ServingRuntime" else pod_spec(workload)
        for spec_container in containers(spec):
            for name, entry in env(spec_container).items():
                if SECRET_NAME.search(name):
                    assert "value" not in entry, f"{name} has a literal value"
            token = env(spec_container).get("APP_ADMIN_TOKEN")
            if token is not None:
                reference = token["valueFrom"]["secretKeyRef"]
                assert (reference["name"], reference["key"]) == (ADMIN_SECRET, ADMIN_SECRET_KEY)
                assert reference.get("optional") is not True, "a missing Secret must stop the pod, not disable admin"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_pod_that_serves_admin_routes_gets_the_token(name: str) -> None:
    for workload, service in service_containers(overlay(name)):
        assert "APP_ADMIN_TOKEN" in env(service), workload["metadata"]["name"]


def test_no_kustomization_generates_a_secret() -> None:
    for path in (REPO_ROOT / "deploy").rglob("kustomization.yaml"):
        assert "secretGenerator" not in yaml.safe_load(path.read_text(encoding="utf-8")), path


# Every APP_* variable is a setting the service knows (a misspelt one would be ignored silently).

@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_app_variable_is_a_real_setting(directory: str) -> None:
    known = {f"APP_{name.upper()}" for name in Settings.model_fields}
    resources = render(directory)
    specs = [pod_spec(w) for w in workloads(resources)] + [r["spec"] for r in find(resources, "ServingRuntime")]
    for spec in specs:
        for spec_container in containers(spec):
            unknown = {n for n in env(spec_container) if n.startswith("APP_")} - known
            assert not unknown, f"{spec_container['name']}: {unknown}"


# The registry.

@pytest.mark.parametrize("name", OVERLAYS)
def test_every_service_pod_shares_the_registry_on_a_read_write_many_claim(name: str) -> None:
    resources = overlay(name)
    claims = set()
    for workload, service in service_containers(resources):
        claims.add(claim_at(pod_spec(workload), service, env_value(service, "APP_REGISTRY_DIR")))
    (claim,) = claims
    assert one(resources, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


# Autoscaling and disruption.

def _queue_metric(hpa: dict[str, Any]) -> tuple[str, str]:
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    return metric["pods"]["metric"]["name"], metric["pods"]["target"]["averageValue"]


def _exported_metrics() -> dict[str, str]:
    from app.service_metrics import ServiceMetrics

    text = ServiceMetrics().render().decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_autoscaler_follows_the_queue_the_service_exports(name: str) -> None:
    from app.engine.device import AUTO_BATCH_SIZE

    resources = overlay(name)
    hpa = one(resources, "HorizontalPodAutoscaler", API)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": API}
    metric, target = _queue_metric(hpa)
    assert _exported_metrics().get(metric) == "gauge", f"the service exports no gauge {metric}"
    device = env_value(container(one(resources, "Deployment", API), "api"), "APP_DEVICE")
    assert int(target) == AUTO_BATCH_SIZE[device], "the target is one batch of the device's automatic size"
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in one(resources, "Deployment", API)["spec"], "the autoscaler owns the replica count"


def test_prometheus_adapter_serves_the_metric_the_autoscaler_asks_for() -> None:
    values = yaml.safe_load((KUBERNETES_DIR / "prometheus-adapter-values.yaml").read_text(encoding="utf-8"))
    (rule,) = values["rules"]["custom"]
    metric, _ = _queue_metric(one(overlay("gpu"), "HorizontalPodAutoscaler", API))
    assert rule["name"]["as"] == metric
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])[1]
    assert series in _exported_metrics()
    assert re.fullmatch(rule["name"]["matches"], series)
    assert {"<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", rule["metricsQuery"]))
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}, "a Pods metric is per pod"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_disruption_budget_covers_the_api_replicas_and_lets_drains_proceed(name: str) -> None:
    resources = overlay(name)
    (budget,) = find(resources, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    api_labels = one(resources, "Deployment", API)["spec"]["template"]["metadata"]["labels"]
    assert selects(budget["spec"]["selector"]["matchLabels"], api_labels)
    assert one(resources, "HorizontalPodAutoscaler", API)["spec"]["minReplicas"] > budget["spec"]["maxUnavailable"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_are_scraped_on_the_metrics_route(name: str) -> None:
    for workload, service in service_containers(overlay(name)):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == service["ports"][0]["containerPort"]
        assert annotations["prometheus.io/path"] == "/metrics"


# The image.

@pytest.mark.parametrize(("name", "files"), [("gpu", ("docker-compose.yml",)),
                                             ("cpu", ("docker-compose.yml", "docker-compose.cpu.yml"))])
def test_each_overlay_runs_the_image_compose_builds_for_its_device(name: str, files: tuple[str, ...]) -> None:
    built = compose_model.project(*files)["services"]["api"]["image"]
    for _, service in service_containers(overlay(name)):
        assert service["image"] == built
