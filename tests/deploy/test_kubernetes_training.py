"""The training Jobs (deploy/kubernetes/training): the launch lines are ones torchrun and the training
module accept, on the volumes the rest of the deployment uses; the multi-node Job's pods can find node 0;
and the registration step really registers a checkpoint (run here on a tiny one)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.control.registry import ModelRegistry
from tests.deploy.kubernetes_model import (
    KUBERNETES_DIR,
    claim_at,
    container,
    env,
    mounts,
    one,
    overlay,
    pod_spec,
    render,
    selects,
    variable_references,
    volumes,
)

SINGLE, MULTI = "deploy/kubernetes/training/single-node", "deploy/kubernetes/training/multi-node"
JOBS = {SINGLE: "cifar-serve-train", MULTI: "cifar-serve-train-multinode"}
SCRIPT = KUBERNETES_DIR / "training" / "common" / "register_checkpoint.py"
# What the Job controller and the downward API give each pod, for expanding $(NAME) references here.
SAMPLE_POD = {"JOB_NAME": "cifar-serve-train", "JOB_UID": "0f3c", "NODE_RANK": "0"}


def _job(directory: str) -> dict[str, Any]:
    return one(render(directory), "Job", JOBS[directory])


def _expand(words: list[str], values: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], str(word)) for word in words]


def _launch(train: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, the training module's arguments) of the train container."""
    words = _expand(train["command"] + train.get("args", []), SAMPLE_POD)
    assert words[0] == "torchrun"
    split = words.index("-m")
    assert words[split + 1] == "training"
    return words[1:split], words[split + 2:]


def _torchrun(arguments: list[str]) -> Any:
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args([*arguments, "-m", "training"])


@pytest.mark.parametrize("directory", list(JOBS))
def test_training_runs_first_and_registration_only_after_it(directory: str) -> None:
    job = _job(directory)
    spec = pod_spec(job)
    assert [c["name"] for c in spec["initContainers"]] == ["train"]
    assert [c["name"] for c in spec["containers"]] == ["register"]
    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0


@pytest.mark.parametrize("directory", list(JOBS))
def test_every_referenced_variable_is_defined(directory: str) -> None:
    """Kubernetes leaves an undefined $(NAME) in place, so a typo would become a literal path."""
    for spec_container in pod_spec(_job(directory))["initContainers"] + pod_spec(_job(directory))["containers"]:
        assert variable_references(spec_container) <= set(env(spec_container)), spec_container["name"]
        assert variable_references(spec_container) <= set(SAMPLE_POD)


@pytest.mark.parametrize("directory", list(JOBS))
def test_the_job_identity_comes_from_the_job_controllers_labels(directory: str) -> None:
    train = container(_job(directory), "train")
    paths = {name: entry["valueFrom"]["fieldRef"]["fieldPath"] for name, entry in env(train).items()}
    assert paths["JOB_NAME"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert paths["JOB_UID"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    if directory == MULTI:
        assert paths["NODE_RANK"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@pytest.mark.parametrize("directory", list(JOBS))
def test_the_training_module_accepts_the_jobs_arguments_on_the_deployments_volumes(directory: str,
                                                                                  tmp_path: Path) -> None:
    from training.cli import parse_command

    job = _job(directory)
    spec, train = pod_spec(job), container(job, "train")
    _, arguments = _launch(train)
    data_dir = arguments[arguments.index("--data-dir") + 1]
    run_dir = arguments[arguments.index("--run-dir") + 1]
    # The same claims as the job runner's data, and the training runs' claim from the base.
    runner = one(overlay("gpu"), "Deployment", "cifar-serve-jobs")
    runner_data = claim_at(pod_spec(runner), container(runner, "jobs"), "/var/lib/cifar-serve/data")
    assert claim_at(spec, train, data_dir) == runner_data
    runs_mount = str(Path(run_dir).parent)
    assert claim_at(spec, train, runs_mount) == "cifar-serve-training-runs"
    assert SAMPLE_POD["JOB_UID"] in Path(run_dir).name, "each Job instance gets its own run directory"
    for claim in (runner_data, "cifar-serve-training-runs"):
        assert one(overlay("gpu"), "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    # Parsed as `python -m training` parses it, with the mounts moved under tmp_path.
    (tmp_path / "data").mkdir()
    local = [str(tmp_path / "data") if a == data_dir else str(tmp_path / "run") if a == run_dir else a
             for a in arguments]
    command = parse_command(local)
    assert Path(command.config.data_dir) == tmp_path / "data"
    assert command.run_dir == tmp_path / "run"


def test_single_node_runs_one_process_per_gpu_the_pod_holds() -> None:
    job = _job(SINGLE)
    train = container(job, "train")
    launch = _torchrun(_launch(train)[0])
    assert launch.standalone is True
    assert launch.nproc_per_node == "gpu", "the GPU count lives in one place: the nvidia.com/gpu limit"
    assert int(train["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert mounts(train)["/dev/shm"]["name"] == "dshm"
    assert volumes(pod_spec(job))["dshm"]["emptyDir"]["medium"] == "Memory"


def test_multi_node_pods_find_node_0_through_a_headless_service() -> None:
    resources = render(MULTI)
    job = one(resources, "Job", JOBS[MULTI])
    spec = pod_spec(job)
    launch = _torchrun(_launch(container(job, "train"))[0])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(launch.nnodes)
    assert launch.nproc_per_node == "gpu"
    assert launch.rdzv_backend == "static", "static ranks put global rank 0, the writer, on node 0"
    service = one(resources, "Service", spec["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True, "pods are not Ready while training runs"
    assert selects(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    # An Indexed Job's pod i is named <job>-i, so node 0 answers at <job>-0.<subdomain>.
    assert launch.master_addr == f"{SAMPLE_POD['JOB_NAME']}-0.{spec['subdomain']}"
    assert int(launch.master_port) in [p["port"] for p in service["spec"]["ports"]]
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    register = container(job, "register")["args"]
    assert register[register.index("--node-rank") + 1] == "$(NODE_RANK)"


@pytest.mark.parametrize("directory", list(JOBS))
def test_registration_reads_the_run_training_wrote_into_the_shared_registry(directory: str) -> None:
    job = _job(directory)
    spec = pod_spec(job)
    train, register = container(job, "train"), container(job, "register")
    arguments = register["args"]
    assert arguments[arguments.index("--run-dir") + 1] == train["args"][train["args"].index("--run-dir") + 1]
    registry = arguments[arguments.index("--registry") + 1]
    api = one(overlay("gpu"), "Deployment", "cifar-serve-api")
    assert claim_at(spec, register, registry) == claim_at(pod_spec(api), container(api, "api"),
                                                          "/var/lib/cifar-serve/registry")
    assert not mounts(register)[registry].get("readOnly")
    # The script is the ConfigMap kustomize generated from register_checkpoint.py, mounted where the
    # command looks for it.
    script_dir, script_name = str(Path(register["command"][1]).parent), Path(register["command"][1]).name
    config_map = volumes(spec)[mounts(register)[script_dir]["name"]]["configMap"]["name"]
    generated = one(render(directory), "ConfigMap", config_map)
    assert generated["data"][script_name] == SCRIPT.read_text(encoding="utf-8")


def _register_main():
    spec = importlib.util.spec_from_file_location("register_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_registration_step_registers_a_finished_runs_checkpoint(tiny_checkpoint: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "cifar-serve-train-0f3c"
    shutil.copytree(tiny_checkpoint, run_dir / "checkpoint")
    main = _register_main()
    assert main(["--registry", str(tmp_path / "registry"), "--run-dir", str(run_dir),
                 "--source-job", "cifar-serve-train-0f3c"]) == 0
    registry = ModelRegistry(tmp_path / "registry")
    (version,) = registry.versions()
    assert version.source_job == "cifar-serve-train-0f3c"
    assert registry.current() is None, "registering never changes what is served"
    assert f"/admin/promote/{version.version}" in capsys.readouterr().out


def test_only_node_0_registers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run_dir / "checkpoint")
    assert _register_main()(["--registry", str(tmp_path / "registry"), "--run-dir", str(run_dir),
                             "--node-rank", "1"]) == 0
    assert ModelRegistry(tmp_path / "registry").versions() == []


def test_registration_without_a_checkpoint_fails_with_one_error_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _register_main()(["--registry", str(tmp_path / "registry"), "--run-dir", str(tmp_path / "run")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: cannot register")
