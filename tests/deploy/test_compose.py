"""The Compose files, checked without Docker: each file and each documented combination validates against
the Compose Specification's JSON Schema, and the deployment has what docs/deploy.md promises (GPU, port,
volumes, healthcheck, one job runner, no committed secret)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.deploy.compose_model import (
    COMPOSE_FILES,
    REPO_ROOT,
    load,
    project,
    schema,
    secret_value_problem,
    untagged,
)
from tests.deploy.dockerfile_model import env as dockerfile_env
from tests.deploy.dockerfile_model import final_stage, healthcheck_command
from tests.support import docs

BASE = "docker-compose.yml"
CPU = "docker-compose.cpu.yml"
SCALE = "docker-compose.scale.yml"
# The combinations the README documents, as `docker compose -f ... -f ...` would merge them.
COMBINATIONS = [(BASE,), (BASE, CPU), (BASE, SCALE)]
VALIDATOR = jsonschema.Draft7Validator(schema())
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


def _errors(document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]


def test_the_documented_compose_files_exist() -> None:
    assert {path.name for path in COMPOSE_FILES} >= {BASE, CPU, SCALE}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_each_file_is_valid_compose(path: Path) -> None:
    assert _errors(untagged(load(path))) == []


@pytest.mark.parametrize("files", COMBINATIONS, ids="+".join)
def test_each_combination_is_valid_compose(files: tuple[str, ...]) -> None:
    model = project(*files)
    assert _errors(model) == []
    for name, service in model["services"].items():
        assert "image" in service or "build" in service, f"{name} has neither image nor build"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith("."):
                assert source in model.get("volumes", {}), f"{name} mounts undeclared volume {source}"


def test_schema_rejects_what_compose_rejects() -> None:
    """The schema is live, not a stub that accepts anything."""
    broken = untagged(load(REPO_ROOT / BASE))
    broken["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]["colour"] = "green"
    broken["services"]["api"]["restart"] = ["always"]
    assert len(_errors(broken)) == 2


def _api(*files: str) -> dict[str, Any]:
    return project(*files)["services"]["api"]


def _control(*files: str) -> dict[str, Any]:
    return project(*files)["services"]["control"]


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_api_and_control_reserve_nvidia_gpus() -> None:
    for service in (_api(BASE), _control(BASE)):
        (device,) = _gpu_devices(service)
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert "count" in device or "device_ids" in device
    assert _api(BASE)["environment"]["APP_DEVICE"] == "cuda"
    assert _control(BASE)["environment"]["APP_TRAINING_DEVICE"] == "cuda"


def test_cpu_variant_drops_the_gpu_and_serves_and_trains_on_the_cpu() -> None:
    api, control = _api(BASE, CPU), _control(BASE, CPU)
    assert _gpu_devices(api) == [] and _gpu_devices(control) == []
    assert api["environment"]["APP_DEVICE"] == "cpu"
    assert control["environment"]["APP_TRAINING_DEVICE"] == "cpu"
    assert api["image"] != _api(BASE)["image"], "the CPU-only image must not overwrite the CUDA one's tag"
    assert control["image"] == api["image"] and control["build"] == api["build"], "one image, two commands"
    # Everything else is the GPU services'.
    for key in ("ports", "volumes", "healthcheck", "restart"):
        assert api[key] == _api(BASE)[key]
    for key in ("command", "volumes", "healthcheck", "restart", "shm_size"):
        assert control[key] == _control(BASE)[key]


def test_the_planes_are_two_services_of_one_image() -> None:
    api, control = _api(BASE), _control(BASE)
    assert control["image"] == api["image"] and control["build"] == api["build"]
    assert "command" not in api, "the serving service runs the image's CMD (python -m app)"
    assert control["command"][:3] == ["python", "-m", "app.control"]
    port = control["command"][control["command"].index("--port") + 1]
    # The serving service starts no control plane of its own: it forwards to this one, by its compose name.
    assert api["environment"]["APP_CONTROL_URL"] == f"http://control:{port}"
    assert control["environment"]["APP_RUN_JOBS"] == "true"
    assert "ports" not in control, "the control plane is reached through the serving port (or nginx) only"
    assert f"127.0.0.1:{port}/readyz" in " ".join(control["healthcheck"]["test"])
    # Predictions never wait for the control plane.
    assert "depends_on" not in api


def test_publishes_http_on_8000_and_grpc_on_8081() -> None:
    assert _api(BASE)["ports"] == ["8000:8000", "8081:8081"]


def test_healthcheck_is_the_images_command_on_readiness() -> None:
    # Compose routes on it (depends_on: service_healthy), so it must wait for a warm model: /readyz.
    check = _api(BASE)["healthcheck"]
    assert check["test"][0] == "CMD"
    assert check["test"][1:] == [part.replace("/healthz", "/readyz") for part in healthcheck_command(final_stage())]
    assert "/readyz" in " ".join(check["test"]) and "/healthz" not in " ".join(check["test"])
    assert check["retries"] >= 1 and check["start_period"]


def test_restarts_and_has_room_in_shared_memory_for_training() -> None:
    api, control = _api(BASE), _control(BASE)
    assert api["restart"] in ("always", "unless-stopped", "on-failure")
    assert control["restart"] in ("always", "unless-stopped", "on-failure")
    assert "shm_size" not in api, "training runs in the control service"
    size = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(control["shm_size"]).lower())
    assert size, control["shm_size"]
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[size[2]]
    assert int(size[1]) * scale >= 1 * 2**30, "DataLoader workers and NCCL need more than Docker's 64 MB"


def test_named_volumes_hold_registry_job_state_and_data_where_the_service_looks() -> None:
    api, control = _api(BASE), _control(BASE)
    # The serving service reads the registry only; the job database and the data are the control plane's.
    assert dict(volume.split(":")[:2] for volume in api["volumes"]) == {
        "registry": api["environment"]["APP_REGISTRY_DIR"]}
    mounts = dict(volume.split(":")[:2] for volume in control["volumes"])
    environment = control["environment"]
    assert mounts == {
        "registry": environment["APP_REGISTRY_DIR"],
        "state": environment["APP_STATE_DIR"],
        "cifar10": environment["APP_DATA_DIR"],
    }
    assert set(project(BASE)["volumes"]) == set(mounts)
    # The image creates the same mount points (owned by its user), so a new volume is writable.
    image = dockerfile_env(final_stage())
    for key in ("APP_REGISTRY_DIR", "APP_STATE_DIR", "APP_DATA_DIR"):
        assert environment[key] == image[key]


def _secret_values(model: dict[str, Any]) -> list[tuple[str, str, Any]]:
    found = []
    for name, service in model.get("services", {}).items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in environment)
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                found.append((name, key, value))
        for key, value in (service.get("build", {}).get("args", {}) or {}).items():
            if SECRET_NAME.search(key):
                found.append((name, key, value))
    return found


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_secret_has_a_value_in_a_compose_file(path: Path) -> None:
    for service, key, value in _secret_values(untagged(load(path))):
        problem = secret_value_problem(value)
        assert problem is None, f"{path.name}: {service}.{key} has {problem}; take it from the environment"
    assert "env_file" not in path.read_text(encoding="utf-8"), "secrets come from the environment or .env"


def test_the_admin_token_comes_from_the_environment_with_no_default() -> None:
    assert _api(BASE)["environment"]["APP_ADMIN_TOKEN"] is None
    assert _control(BASE)["environment"]["APP_ADMIN_TOKEN"] is None
    example = (REPO_ROOT / "deploy" / "env.example").read_text(encoding="utf-8")
    assert re.search(r"^APP_ADMIN_TOKEN=$", example, re.MULTILINE), "the example leaves the token empty"


def test_no_env_file_is_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "--", ".env", "*.env", "**/.env"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert tracked == []


def test_scale_out_has_one_control_plane_and_serving_replicas_sharing_its_registry() -> None:
    services = project(BASE, SCALE)["services"]
    api, replica, balancer, control = services["api"], services["api-replica"], services["lb"], services["control"]
    runners = [n for n, s in services.items() if s.get("environment", {}).get("APP_RUN_JOBS") == "true"]
    assert runners == ["control"], "exactly one service runs training jobs: the control plane"
    serving = [n for n, s in services.items() if s.get("image", "").startswith("cifar-serve") and n != "control"]
    assert sorted(serving) == ["api", "api-replica"]
    for name in serving:  # none starts a control plane of its own
        assert services[name]["environment"]["APP_CONTROL_URL"] == api["environment"]["APP_CONTROL_URL"]
        assert "command" not in services[name] and "shm_size" not in services[name]
    assert replica["deploy"]["replicas"] >= 2
    # All see the same registry, at the same path; only the control plane has the job database.
    mount = next(v for v in control["volumes"] if v.startswith("registry:"))
    assert mount in api["volumes"] and mount in replica["volumes"]
    assert not any(v.startswith("state:") for v in api["volumes"] + replica["volumes"])
    # One public port, on the load balancer; the services are reached through it.
    assert "ports" not in api and "ports" not in replica and "ports" not in control
    assert balancer["ports"] == ["8000:8000"]
    assert {"api", "api-replica"} <= set(balancer["depends_on"]) and "control" not in balancer["depends_on"]


def test_replicas_run_the_same_image_and_settings_as_api() -> None:
    services = project(BASE, SCALE)["services"]
    api, replica = services["api"], services["api-replica"]
    for key in ("build", "image", "healthcheck", "restart", "init", "volumes", "environment"):
        assert replica[key] == api[key], key
    assert _gpu_devices(replica) == _gpu_devices(api)


def test_load_balancer_config_is_mounted_and_sends_admin_writes_to_the_control_plane() -> None:
    balancer = project(BASE, SCALE)["services"]["lb"]
    (mount,) = balancer["volumes"]
    source, target, mode = mount.split(":")
    assert (REPO_ROOT / source).is_file() and target == "/etc/nginx/nginx.conf" and mode == "ro"
    config = (REPO_ROOT / source).read_text(encoding="utf-8")
    control = re.search(r"upstream control \{(.*?)\}", config, re.DOTALL)[1]
    everyone = re.search(r"upstream api_all \{(.*?)\}", config, re.DOTALL)[1]
    command = _control(BASE, SCALE)["command"]
    assert re.findall(r"server (\S+)", control) == [f"control:{command[command.index('--port') + 1]}"]
    assert re.findall(r"server (\S+)", everyone) == ["api:8000", "api-replica:8000"]
    assert re.search(r"location /train \{[^}]*proxy_pass http://control;", config)
    assert re.search(r"location /admin/promote/ \{[^}]*proxy_pass http://control;", config)
    assert "listen 8000;" in config


def test_the_deploy_page_documents_only_combinations_checked_here() -> None:
    section = docs.section(docs.page("docs/deploy.md"), "## Deploy with Docker")
    documented = set()
    for line in section.splitlines():
        files = re.findall(r"-f (\S+)", line)
        colon_list = re.search(r"COMPOSE_FILE=(\S+?)`", line)
        if colon_list:
            files = colon_list[1].split(":")
        if files:
            documented.add(tuple(files))
    assert documented, "docs/deploy.md's Docker section shows how to combine compose files"
    assert documented <= set(COMBINATIONS), documented - set(COMBINATIONS)
    assert "docker compose up --build -d" in section


def test_compose_waits_longer_than_the_servers_graceful_shutdown() -> None:
    """app/__main__.py gives uvicorn APP_REQUEST_TIMEOUT_S + 5 s to drain requests after SIGTERM; a shorter
    stop_grace_period would SIGKILL it mid-request."""
    from app.config import Settings

    drain_s = Settings.model_fields["request_timeout_s"].default + 5
    for service in project(BASE, SCALE)["services"].values():
        if service.get("image", "").startswith("cifar-serve"):
            assert int(service["stop_grace_period"].removesuffix("s")) > drain_s
