from pathlib import Path

import pytest

from benchmarks.gpu.wheels import DEVICE_PACKAGES, plan, project_requirements, read_device_packages, requirement_name


def package(name, version, *requires):
    return {"name": name, "version": version, "requires": list(requires), "url": f"https://x/{name}", "sha256": "0"}


# A closure as pip resolves it: fastapi needs opentelemetry-api (the device lacks it) and typing-extensions (the
# device has it, version unknown); matplotlib's python-dateutil needs tzdata, which is the device's own business.
RESOLVED = [
    package("fastapi", "0.165.0", "starlette", "opentelemetry-api", "typing-extensions"),
    package("starlette", "1.10.0", "anyio"),
    package("opentelemetry-api", "1.45.3", "typing-extensions"),
    package("anyio", "4.16.0"),
    package("typing-extensions", "4.16.0"),
    package("torch", "2.11.0", "typing-extensions"),
    package("matplotlib", "3.11.2", "python-dateutil"),
    package("python-dateutil", "4.0.0", "tzdata"),
    package("tzdata", "2026.6"),
]
DEVICE = {"anyio": None, "typing-extensions": None, "torch": "2.11.0", "matplotlib": None, "python-dateutil": None}


def names(packages):
    return [p["name"] for p in packages]


def test_what_the_device_lacks_travels_with_what_it_needs_and_nothing_a_device_package_needs():
    carried, spares, standin = plan(RESOLVED, DEVICE, ["fastapi", "torch", "matplotlib"])
    assert names(carried) == ["fastapi", "starlette", "opentelemetry-api"]
    assert "tzdata" not in names(carried)  # python-dateutil's need: met on the device already
    assert names(spares) == ["anyio", "typing-extensions"]  # unknown there, needed by carried wheels
    assert set(names(standin)) == set(DEVICE)


def test_a_known_device_version_the_resolver_did_not_keep_stops_the_plan():
    with pytest.raises(SystemExit, match="torch 2.12.0, not the device's 2.11.0"):
        plan([package("torch", "2.12.0")], {"torch": "2.11.0"}, ["torch"])


def test_the_device_list_reads_versions_and_merges_spellings():
    device = read_device_packages(DEVICE_PACKAGES)
    assert device["torch"] == "2.11.0" and device["numpy"] == "2.5.2"
    assert device["huggingface-hub"] == "1.33.0"  # listed as huggingface-hub and huggingface_hub==1.33.0
    assert device["pillow"] is None
    assert "fastapi" not in device and "pydantic" not in device


def test_the_requirements_are_the_projects_with_the_tools_run_sh_uses():
    wanted = {requirement_name(requirement) for requirement in project_requirements()}
    assert {"torch", "fastapi", "pydantic", "pydantic-settings", "uvicorn", "python-multipart"} <= wanted
    assert {"pytest", "pytest-timeout", "httpx", "onnxruntime"} <= wanted
    assert "schemathesis" not in wanted and "playwright" not in wanted
    assert "grpcio" not in wanted, "the device run serves HTTP only; grpcio would not fit in what a call carries"


def test_the_device_run_serves_without_grpc():
    run = (Path(__file__).parents[3] / "benchmarks" / "gpu" / "run.sh").read_text()
    assert "export APP_GRPC_PORT=0" in run
