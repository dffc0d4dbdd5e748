"""Starting the image's service outside Docker, as a container of a compose service would start it.

The command is the Dockerfile's CMD, word for word, except `python` (this interpreter) and the port (a
free one). The environment is the image's ENV overlaid with the compose service's, then moved to this
machine: devices set to the CPU, volume paths to folders the caller gives, APP_WEIGHTS to a checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy.compose_model import REPO_ROOT
from tests.deploy.dockerfile_model import container_command, final_stage
from tests.deploy.dockerfile_model import env as dockerfile_env
from tests.support.net import free_port, wait_for_http

READY_TIMEOUT_S = 600  # importing torch has taken minutes on the shared 2-core machine
VOLUME_SETTINGS = ("APP_STATE_DIR", "APP_REGISTRY_DIR", "APP_DATA_DIR")


@dataclass(frozen=True)
class RunningService:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def container_environment(service: dict[str, Any], volumes: Path, weights: Path,
                          extra: dict[str, str] | None = None) -> dict[str, str]:
    """What the service's process sees: image ENV, then compose `environment`, then this machine's paths."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
    image = dockerfile_env(final_stage())
    for machine_specific in ("PATH", "HOME"):  # this machine's own, not the image's
        image.pop(machine_specific)
    compose = {key: str(value) for key, value in service.get("environment", {}).items() if value is not None}
    environment |= image | compose
    for key in VOLUME_SETTINGS:
        if key in environment:
            environment[key] = str(volumes / key.lower())
    environment |= {"APP_WEIGHTS": str(weights), "APP_DEVICE": "cpu", "APP_TRAINING_DEVICE": "cpu",
                    # each container has its own gRPC port 8081; here they share one machine's ports
                    "APP_GRPC_PORT": str(free_port())}
    # Stands in for the image's installed package: an editable install made before a package existed
    # (app/, training/) does not find it, and the working directory is not the checkout.
    environment["PYTHONPATH"] = str(REPO_ROOT)
    return environment | (extra or {})


def start_command(port: int, service: dict[str, Any] | None = None) -> list[str]:
    """The service's compose `command` if it has one (the control plane's), else the image's CMD."""
    command = list((service or {}).get("command") or container_command(final_stage()))
    command[0] = sys.executable
    command[command.index("--port") + 1] = str(port)
    if "--host" in command:
        command[command.index("--host") + 1] = "127.0.0.1"  # the container's 0.0.0.0, on a shared machine
    return command


@contextmanager
def running(environment: dict[str, str], workdir: Path, service: dict[str, Any] | None = None,
            port: int | None = None) -> Iterator[RunningService]:
    """The service's start command running until /readyz answers 200; killed on exit if still running."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)  # the image's WORKDIR: nothing imported from the checkout
    log = workdir / "service.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(start_command(port, service), cwd=workdir, env=environment,
                                   stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/readyz", process, log, READY_TIMEOUT_S)
        yield RunningService(url, port, process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
