"""deploy/smoke_image.py, the image's build and smoke test (docs/docker-image.md).

The full run is marked `image_build` and deselected by default (pyproject's addopts): on this 2-core machine
it took about 17 minutes (408 s of CPU for the build), about 21 GB of disk at its peak and 3 GB of downloads,
and it needs a Docker engine or root with buildah, so CI does not run it (docs/docker-image.md). Run it with
`.venv/bin/python -m pytest -m image_build tests/deploy`. The other tests here are cheap and always run: the
refusal on a small disk, the cleanup after a killed run, and the pieces the script reads from the
Dockerfile and from the built image."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.compose_model import REPO_ROOT
from tests.deploy.dockerfile_model import container_command, final_stage, healthcheck_command
from tests.deploy.dockerfile_model import env as dockerfile_env
from tests.support.waiting import wait_until

SCRIPT = REPO_ROOT / "deploy" / "smoke_image.py"
sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling module as a script would
import image_engines  # noqa: E402
import smoke_image  # noqa: E402


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_refuses_to_start_with_less_free_disk_than_asked(tmp_path: Path) -> None:
    result = run_script("--work-parent", str(tmp_path), "--min-free-gb", "1000000", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to start" in result.stderr and "GB free" in result.stderr
    assert list(tmp_path.iterdir()) == [], "it made its working folder before checking the disk"


def run_folder(parent: Path, name: str) -> Path:
    folder = parent / f"{image_engines.RUN_FOLDER_PREFIX}{name}"
    folder.mkdir()
    return folder


def test_a_run_folder_is_abandoned_once_the_process_holding_its_lock_is_killed(tmp_path: Path) -> None:
    live, finished = run_folder(tmp_path, "live"), run_folder(tmp_path, "finished")
    os.close(image_engines.lock_run_folder(finished))
    (tmp_path / "another-tool").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
         "import image_engines; image_engines.lock_run_folder(Path(sys.argv[2])); print('locked', flush=True); "
         "time.sleep(600)", str(SCRIPT.parent), str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert image_engines.abandoned_run_folders(tmp_path) == [finished]
    finally:
        holder.kill()  # SIGKILL, as a lost session ends a run: no finally of the run's own runs
        holder.wait()
    assert image_engines.abandoned_run_folders(tmp_path) == [finished, live]


def test_a_run_folder_without_a_lock_is_abandoned_only_once_it_is_old(tmp_path: Path) -> None:
    run_folder(tmp_path, "young")
    old = run_folder(tmp_path, "old")
    long_ago = time.time() - image_engines.UNLOCKED_GRACE_S - 60
    os.utime(old, (long_ago, long_ago))
    assert image_engines.abandoned_run_folders(tmp_path) == [old]


def sleeper(*words: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *words], cwd=cwd)


def test_recovering_an_abandoned_run_ends_its_processes_undoes_its_removals_and_deletes_it(tmp_path: Path) -> None:
    folder = run_folder(tmp_path, "killed")
    (folder / "tmp").mkdir()
    undone = tmp_path / "undone"
    engine = image_engines.Engine(folder)
    engine.remember(["touch", str(undone)])  # as Docker's engine writes down `docker rmi` before it builds
    left_running = [sleeper(str(folder / "storage")), sleeper(cwd=folder / "tmp")]
    bystanders = [sleeper(str(tmp_path)), sleeper(f"{folder}-other")]
    try:
        image_engines.recover_abandoned(folder)
        assert [process.wait(timeout=60) for process in left_running] == [-signal.SIGKILL] * 2
        assert [process.poll() for process in bystanders] == [None, None], "it ended a process not of that run"
        assert undone.exists() and not folder.exists()
    finally:
        for process in left_running + bystanders:
            process.kill()
            process.wait()


def test_a_run_cleans_up_after_a_killed_one_before_it_checks_the_disk(tmp_path: Path) -> None:
    abandoned = run_folder(tmp_path, "killed")
    os.close(image_engines.lock_run_folder(abandoned))
    result = run_script("--work-parent", str(tmp_path), "--min-free-gb", "1000000", timeout=120)
    assert result.returncode == 2 and "refusing to start" in result.stderr, result.stdout + result.stderr
    assert f"cleaning up after a run that did not finish: {abandoned}" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_run_folder_is_measured_as_the_disk_holds_it(tmp_path: Path) -> None:
    """Each hard link once, so that overlay layers that share files are not counted twice."""
    (tmp_path / "layer").write_bytes(os.urandom(3_000_000))
    os.link(tmp_path / "layer", tmp_path / "same-layer")
    assert 3_000_000 <= smoke_image.folder_bytes(tmp_path) < 3_200_000


def test_the_disk_watch_reports_the_run_folders_peak(tmp_path: Path) -> None:
    (tmp_path / "layer").write_bytes(os.urandom(2_000_000))
    watch = smoke_image.DiskWatch(tmp_path)
    try:
        wait_until(lambda: watch.folder_peak >= 2_000_000, timeout_s=60, what="a sample of the run folder")
    finally:
        folder_peak, _ = watch.stop()
    assert 2_000_000 <= folder_peak < 2_200_000


def test_the_default_free_disk_floor_is_30_gb() -> None:
    assert smoke_image.parse_args([]).min_free_gb == 30


def test_the_base_image_is_the_dockerfile_default_and_has_a_stand_in() -> None:
    base = smoke_image.dockerfile_base_image()
    assert base == "python:3.11-slim-bookworm"
    assert image_engines.standin_suite(base) == ("3.11", "bookworm")
    with pytest.raises(SystemExit, match="stand-in"):
        image_engines.standin_suite("nvidia/cuda:13.0.0-runtime-ubuntu24.04")


def test_reads_what_runs_from_the_image_config_as_the_dockerfile_sets_it() -> None:
    """The config a build of this Dockerfile carries (Docker's schema), read as the script reads it."""
    stage = final_stage()
    user = next(i.arguments for i in stage if i.keyword == "USER")
    config = {"Cmd": container_command(stage), "User": user, "ExposedPorts": {"8000/tcp": {}},
              "Env": [f"{k}={v}" for k, v in dockerfile_env(stage).items()],
              "Healthcheck": {"Test": ["CMD", *healthcheck_command(stage)]}}
    image = image_engines.ImageConfig.from_docker_config(config)
    assert image.command == ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
    assert (image.uid, image.port, image.env["APP_SHIPPED_WEIGHTS"]) == (10001, 8000, "/app/weights")
    assert image_engines.container_argv(image.healthcheck) == healthcheck_command(stage)


def test_healthcheck_forms() -> None:
    assert image_engines.container_argv(["CMD-SHELL", "curl -f x"]) == ["/bin/sh", "-c", "curl -f x"]
    with pytest.raises(ValueError, match="no HEALTHCHECK"):
        image_engines.container_argv([])  # what buildah leaves of it in an OCI-format image


def engine_available() -> bool:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return True
    return bool(shutil.which("buildah") and shutil.which("debootstrap")) and os.geteuid() == 0


@pytest.mark.image_build
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not engine_available(), reason="needs a Docker engine, or root with buildah and debootstrap")
def test_the_image_builds_and_serves_the_shipped_model(tmp_path: Path) -> None:
    if shutil.disk_usage(tmp_path).free < 30 * 10**9:
        pytest.skip("less than 30 GB free where pytest keeps its temporary files")
    result_path = tmp_path / "result.json"
    work_parent = tmp_path / "work"
    script = run_script("--python", sys.executable, "--work-parent", str(work_parent), "--json", str(result_path),
                        timeout=3300)
    assert result_path.is_file(), script.stdout[-5000:] + script.stderr[-5000:]
    result = json.loads(result_path.read_text())
    failed = [check for check in result["checks"] if not check["ok"]]
    assert script.returncode == 0 and not failed and "error" not in result, (failed, result.get("error"),
                                                                             script.stdout[-5000:])
    predicted = json.loads(result["answers"]["/predict"]["body"])
    assert predicted["label"] == result["outside"]["predict"]["label"]
    assert result["answers"]["HEALTHCHECK"]["exit"] == 0
    assert all(entry["readable"] and not entry["writable"] for entry in result["weights_rights"])
    assert result["work_folder_removed"] and result["mounts_left"] == [] and list(work_parent.iterdir()) == []


def test_the_stand_in_is_slimmed_as_debian_slim_images_are(tmp_path: Path) -> None:
    """Documentation, manuals, translations and downloaded packages go, and stay out of later apt-get
    installs (the Dockerfile's g++ layer); copyright files stay, as in debian:*-slim."""
    for folder in ("etc/dpkg/dpkg.cfg.d", "etc/apt/apt.conf.d", "usr/share/doc/bash", "usr/share/man/man1",
                   "usr/share/locale/de", "var/cache/apt/archives", "var/lib/apt/lists", "usr/bin"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("usr/share/doc/bash/copyright", "usr/share/doc/bash/NEWS.gz", "usr/share/man/man1/ls.1.gz",
                 "usr/share/locale/de/bash.mo", "var/cache/apt/archives/g++.deb", "var/lib/apt/lists/deb_Packages",
                 "usr/bin/python3.11"):
        (tmp_path / name).write_text("")
    image_engines.slim(tmp_path)
    left = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()}
    assert left == {"usr/share/doc/bash/copyright", "usr/bin/python3.11", "etc/dpkg/dpkg.cfg.d/docker",
                    "etc/apt/apt.conf.d/docker-clean"}
    assert "path-exclude /usr/share/doc/*" in (tmp_path / "etc/dpkg/dpkg.cfg.d/docker").read_text()
    assert "rm -f /var/cache/apt/archives/*.deb" in (tmp_path / "etc/apt/apt.conf.d/docker-clean").read_text()
