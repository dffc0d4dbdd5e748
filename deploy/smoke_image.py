#!/usr/bin/env python3
"""Build the repository's Dockerfile into an image and smoke-test the image (docs/docker-image.md).

    sudo python3 deploy/smoke_image.py --python .venv/bin/python [--json RESULT.json] | tee smoke.log

With a Docker engine (`docker info` answers) it uses `docker build` and `docker run`; without one, buildah
(run as root) with chroot isolation and overlay storage in a private folder, so it never touches another
user's images. When the Dockerfile's base image cannot be pulled, it builds a Debian stand-in with
debootstrap and says so. It then runs the image's own CMD as the image's own USER, waits for /readyz, and
checks /healthz, /readyz, /model, a /predict of an examples/ image (the label must be the one the same
checkpoint gives outside the container: `--python`'s `python -m app` serving this checkout's weights/),
the image's HEALTHCHECK command run inside the container, the user the service runs as and the rights on
the shipped weights. It reports the build time, the image size and its layers, the start-up time, and the
disk used, and removes its containers, images and folders afterwards, whatever happens; a run that was
killed outright is cleaned up by the next one. It refuses to start with less than 30 GB free: the CUDA
image's overlay build takes about 21 GB at its peak.

Standard library only, so it runs with any Python 3.11+, outside the project's virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from image_engines import (
    REPO_ROOT,
    RUN_FOLDER_PREFIX,
    STANDIN_PACKAGES,
    STANDIN_TAG,
    STOP_GRACE_S,
    Engine,
    abandoned_run_folders,
    choose_engine,
    container_argv,
    lock_run_folder,
    log,
    output,
    recover_abandoned,
    standin_rootfs,
)

GB = 10**9
LARGEST_FOLDERS = "/opt/venv/lib/python3*/site-packages/* /usr/* /usr/lib/* /var/* /app/* /home/*"
# A request from the host's Python: stdlib only, so that it also runs inside another network namespace.
PROBE = r"""
import json, mimetypes, sys, urllib.error, urllib.request, uuid
url, data, headers = sys.argv[1], None, {}
if len(sys.argv) > 2:
    boundary, path = uuid.uuid4().hex, sys.argv[2]
    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.rsplit("/", 1)[-1]}"'
            f'\r\nContent-Type: {kind}\r\n\r\n')
    data = head.encode() + open(path, "rb").read() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
try:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as r:
        status, body = r.status, r.read().decode()
except urllib.error.HTTPError as error:
    status, body = error.code, error.read().decode()
except OSError as error:
    status, body = None, str(error)
print(json.dumps({"status": status, "body": body}))
"""
# Run inside the container as the image's user: what that user may do with each shipped file.
WEIGHTS_RIGHTS = r"""
import json, os, stat, sys
rights = []
for folder, _, files in os.walk(sys.argv[1]):
    for name in [".", *files]:
        path = os.path.normpath(os.path.join(folder, name))
        info = os.stat(path)
        rights.append({"path": path, "mode": stat.filemode(info.st_mode), "owner": f"{info.st_uid}:{info.st_gid}",
                       "readable": os.access(path, os.R_OK), "writable": os.access(path, os.W_OK)})
print(json.dumps(rights))
"""

def probe(prefix: list[str], url: str, upload: Path | None = None) -> tuple[int | None, str]:
    command = [*prefix, sys.executable, "-c", PROBE, url, *([str(upload)] if upload else [])]
    answer = json.loads(output(command).stdout)
    return answer["status"], answer["body"]


def wait_ready(prefix: list[str], url: str, alive: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until GET /readyz answers 200. Raises if the service dies, says its checkpoint could not be
    served (app/factory.py's reason; waiting longer would not help), or the timeout passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not alive():
            raise RuntimeError("the service exited before /readyz answered 200")
        status, body = probe(prefix, f"{url}/readyz")
        if status == 200:
            return time.monotonic() - start
        if "could not be served" in body:
            raise RuntimeError(f"/readyz answered {status}: {body}")
        time.sleep(0.5)
    raise RuntimeError(f"/readyz did not answer 200 within {timeout_s:.0f} s")


def children_cpu_s() -> float:
    """User and system CPU seconds of the finished child processes (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_tail(text: str, lines: int = 40) -> str:
    """The end of a service log, without its access lines (one per readiness probe)."""
    kept = [line for line in text.splitlines() if '"logger": "app.access"' not in line]
    return "\n".join(kept[-lines:])


def dockerfile_base_image(dockerfile: Path = REPO_ROOT / "Dockerfile") -> str:
    """The default of the Dockerfile's `ARG PYTHON_IMAGE=...`: the base image a plain build pulls."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile.read_text(encoding="utf-8"), re.MULTILINE)
    if not match:
        raise ValueError(f"{dockerfile} has no `ARG PYTHON_IMAGE=...` line")
    return match.group(1)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def folder_bytes(folder: Path) -> int:
    """Bytes the files under `folder` take on its own file system, each hard link once; not what is mounted
    there (an overlay's merged view shows layers that are already counted where they lie)."""
    result = output(["du", "-sxB1", str(folder)], check=False)
    return int(result.stdout.split()[0]) if result.stdout.strip() else 0


class DiskWatch:
    """The most the run's own folder (its storage, cache and stand-in) took, sampled every FOLDER_EVERY_S;
    and the most this file system's use grew above its level at the start, sampled every second, which
    counts whatever other processes write to the same disk meanwhile."""

    FOLDER_EVERY_S = 15.0

    def __init__(self, folder: Path) -> None:
        self.folder, self.start = folder, shutil.disk_usage(folder).used
        self.file_system_peak = self.folder_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        next_folder = 0.0
        while not self._stop.wait(1.0):
            self.file_system_peak = max(self.file_system_peak, shutil.disk_usage(self.folder).used - self.start)
            if time.monotonic() >= next_folder and self.folder.exists():
                self.folder_peak = max(self.folder_peak, folder_bytes(self.folder))
                next_folder = time.monotonic() + self.FOLDER_EVERY_S

    def stop(self) -> tuple[int, int]:
        """(the folder's peak, the file system's peak growth), in bytes."""
        self._stop.set()
        self._thread.join()
        return self.folder_peak, self.file_system_peak


def reference_prediction(python: str, example: Path, work: Path) -> tuple[dict, dict]:
    """/predict and /model from the service run outside any container on this checkout's weights/."""
    state = work / "outside"
    state.mkdir()
    with socket.socket() as probe_socket:  # a port free now; the service binds it a moment later
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")} | {
        "APP_SHIPPED_WEIGHTS": str(REPO_ROOT / "weights"), "APP_STATE_DIR": str(state / "state"),
        "APP_DATA_DIR": str(state / "data"), "APP_DEVICE": "cpu"}
    log(f"outside the container: {python} -m app --port {port}, APP_SHIPPED_WEIGHTS={REPO_ROOT / 'weights'}")
    with open(state / "service.log", "wb") as service_log:
        process = subprocess.Popen([python, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO_ROOT, env=env, stdout=service_log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready([], url, lambda: process.poll() is None, 300)
        except RuntimeError as error:
            raise RuntimeError(f"{error}; its log:\n{log_tail((state / 'service.log').read_text())}") from None
        status, body = probe([], f"{url}/predict", example)
        if status != 200:
            raise RuntimeError(f"/predict outside the container answered {status}: {body}")
        return json.loads(body), json.loads(probe([], f"{url}/model")[1])
    finally:
        process.terminate()
        process.wait()


def machine() -> dict[str, str | int]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count() or 0, "kernel": platform.release()}


def git_commit() -> str:
    result = output(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"], check=False)
    return result.stdout.strip() or "unknown"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def smoke(engine: Engine, args: argparse.Namespace, work: Path, result: dict) -> list[Check]:
    checks: list[Check] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append(Check(name, ok, detail))
        log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")

    expected, expected_model = reference_prediction(args.python, args.example, work)
    log(f"outside the container: {args.example.name} -> {expected['label']} ({expected['confidence']:.4f}), "
        f"model {expected_model['version']} ({expected_model['origin']})")
    result["outside"] = {"predict": expected, "model": expected_model}

    build_args = dict(arg.split("=", 1) for arg in args.build_arg)
    base = build_args.get("PYTHON_IMAGE") or dockerfile_base_image()
    start = time.monotonic()
    if engine.pull(base):
        result["base_image"] = base
    else:
        tag = STANDIN_TAG.format(suite=base.rsplit("-", 1)[-1])
        log(f"the base image {base} cannot be pulled: building a Debian stand-in for it with debootstrap, "
            f"{tag} (Debian's python3 and pip instead of python.org's build in /usr/local)")
        engine.import_rootfs(standin_rootfs(base, work, args.standin_cache), tag)
        build_args["PYTHON_IMAGE"] = tag
        result["base_image"] = f"{tag} (stand-in for {base}: debootstrap --variant=minbase, {STANDIN_PACKAGES})"
        result["standin_s"] = round(time.monotonic() - start, 1)
        log(f"stand-in ready in {result['standin_s']:.0f} s")

    tag = f"localhost/cifar-serve:smoke-{os.getpid()}"
    start, cpu_before, load_before = time.monotonic(), children_cpu_s(), os.getloadavg()[0]
    engine.build(tag, build_args)
    result["build_s"] = round(time.monotonic() - start, 1)
    # Wall time depends on what else the machine runs; CPU time (buildah's and pip's, not a Docker
    # daemon's) and the load say how much of it was this build.
    result["build_cpu_s"] = round(children_cpu_s() - cpu_before, 1)
    result["load_average_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    log(f"build: {result['build_s']:.0f} s wall, {result['build_cpu_s']:.0f} s of CPU; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    size, layers = engine.size_and_layers(tag)
    result["image_bytes"], result["layers"] = size, [{"bytes": b, "step": s} for b, s in layers]
    log(f"built {tag} in {result['build_s']:.0f} s; image {size / GB:.2f} GB in {len(layers)} layers:")
    for layer_bytes, step in layers:
        print(f"    {layer_bytes / 1e6:10.1f} MB  {step[:110]}", flush=True)

    config = engine.config(tag)
    result["image"] = {"cmd": config.command, "user": config.user, "port": config.port,
                       "healthcheck": config.healthcheck}
    log(f"image CMD {config.command}, USER {config.user}, port {config.port}, HEALTHCHECK {config.healthcheck}")
    start = time.monotonic()
    engine.start(tag, config)
    url, prefix = engine.url_and_prefix()
    try:
        result["startup_to_ready_s"] = round(wait_ready(prefix, url, engine.alive, args.ready_timeout), 2)
    except RuntimeError as error:
        raise RuntimeError(f"{error}; the service's log:\n{log_tail(engine.service_log())}") from None
    check("ready", True, f"/readyz 200 {result['startup_to_ready_s']:.1f} s after the container started")

    answers = result["answers"] = {}
    for path in ("/healthz", "/readyz", "/model"):
        status, body = probe(prefix, f"{url}{path}")
        answers[path] = {"status": status, "body": body}
        check(f"GET {path}", status == 200, f"{status} {body[:200]}")
    status, body = probe(prefix, f"{url}/predict", args.example)
    answers["/predict"] = {"status": status, "body": body}
    label = json.loads(body).get("label") if status == 200 else None
    check(f"POST /predict {args.example.name}", label == expected["label"],
          f"{status}, label {label!r}; outside the container {expected['label']!r}")
    if status == 200:
        served = json.loads(answers["/model"]["body"])
        check("same checkpoint", served.get("version") == expected_model["version"],
              f"inside {served.get('version')} ({served.get('origin')}), outside {expected_model['version']}")
        inside = json.loads(body)["probabilities"]
        result["largest_probability_difference"] = max(abs(p - expected["probabilities"][c]) for c, p in inside.items())
        log(f"{label}: {inside[label]:.6f} inside, {expected['confidence']:.6f} outside; the largest difference "
            f"over the classes {result['largest_probability_difference']:.2e}")

    try:
        health = engine.exec(container_argv(config.healthcheck))
        answers["HEALTHCHECK"] = {"exit": health.returncode, "output": (health.stdout + health.stderr)[-500:]}
        check("HEALTHCHECK in the container", health.returncode == 0,
              f"exit {health.returncode} {health.stderr[-300:]}")
    except ValueError as error:
        check("HEALTHCHECK in the container", False, str(error))

    users = engine.service_users()
    result["service_processes"] = [{"uid": u, "command": c} for u, c in users]
    server = [u for u, c in users if " -m app" in c and not c.startswith("buildah")]  # not buildah's own
    check("runs as the image's USER", bool(server) and all(u == config.uid for u in server),
          f"python -m app runs as UID {sorted(set(server))}; USER is {config.user}")

    weights = config.env.get("APP_SHIPPED_WEIGHTS", "/app/weights")
    listing = engine.exec(["python", "-c", WEIGHTS_RIGHTS, weights])
    rights = json.loads(listing.stdout) if listing.returncode == 0 else []
    result["weights_rights"] = rights
    for entry in rights:
        print(f"    {entry['mode']} {entry['owner']:>9}  readable={entry['readable']!s:5} "
              f"writable={entry['writable']!s:5} {entry['path']}", flush=True)
    check(f"{weights} readable, not writable, by {config.user}",
          bool(rights) and all(e["readable"] and not e["writable"] for e in rights),
          f"{len(rights)} entries" if rights else listing.stderr[-300:])

    # Where the image's bytes are, for deciding what the runtime stage need not carry.
    sizes = engine.exec(["sh", "-c", f"du -xsm {LARGEST_FOLDERS} 2>/dev/null | sort -rn | head -20"])
    result["largest_folders_mb"] = [line.split("\t")[::-1] for line in sizes.stdout.splitlines()]
    log("largest folders in the image (MB):\n" + "\n".join(f"    {line}" for line in sizes.stdout.splitlines()))

    result["stop_s"] = round(engine.stop(), 2)
    check("stops on SIGTERM", result["stop_s"] < STOP_GRACE_S, f"{result['stop_s']:.1f} s (grace {STOP_GRACE_S} s)")
    result["service_log_head"] = engine.service_log().splitlines()[:20]
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["auto", "docker", "buildah"], default="auto",
                        help="auto: docker when `docker info` answers, else buildah (default: auto)")
    parser.add_argument("--python", default=str(REPO_ROOT / ".venv" / "bin" / "python"),
                        help="a Python with the project installed, to run the service outside the container "
                             "for the expected label (default: .venv/bin/python)")
    parser.add_argument("--example", type=Path, default=REPO_ROOT / "examples" / "cat.png",
                        help="the image sent to /predict (default: examples/cat.png)")
    parser.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to the build; e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu "
                             "for the CPU-only image of docker-compose.cpu.yml")
    parser.add_argument("--work-parent", type=Path, default=Path(os.environ.get("TMPDIR", "/var/tmp")),
                        help="where the run's folder (storage, stand-in, logs) is made and then deleted")
    parser.add_argument("--min-free-gb", type=float, default=30.0,
                        help="refuse to start with less free disk than this (default: 30)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    parser.add_argument("--standin-cache", type=Path, default=None,
                        help="keep the stand-in's root file system tarball here and reuse it next time")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if any("=" not in arg for arg in args.build_arg):
        parser.error("--build-arg takes KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_parent.mkdir(parents=True, exist_ok=True)
    # A run that was killed (no `finally` survives SIGKILL) left its folder, storage and mounts: ~21 GB.
    for folder in abandoned_run_folders(args.work_parent):
        recover_abandoned(folder)
    free = free_bytes(args.work_parent)
    if free < args.min_free_gb * GB:
        print(f"refusing to start: {free / GB:.1f} GB free on {args.work_parent}, and the build needs "
              f"{args.min_free_gb:.0f} GB (the CUDA image's build peaked near 21 GB). Free some disk, or "
              "point --work-parent at a larger file system.", file=sys.stderr)
        return 2
    if not Path(args.python).exists():
        print(f"--python {args.python} does not exist: give a Python with the project installed "
              "(README, Install)", file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # through the finally below, so everything is cleaned up

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    work = Path(tempfile.mkdtemp(prefix=RUN_FOLDER_PREFIX, dir=args.work_parent))
    owner = lock_run_folder(work)  # held until this process ends: tells a later run this folder is in use
    result: dict = {"machine": machine(), "commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                    time.gmtime()), "free_bytes_before": free, "example": args.example.name}
    engine: Engine | None = None
    checks: list[Check] = []
    disk = DiskWatch(work)
    try:
        engine = choose_engine(args.engine, work)
        result["engine"] = f"{engine.name} {engine.version()}"
        log(f"engine: {result['engine']}; working folder {work}; {free / GB:.0f} GB free")
        checks = smoke(engine, args, work, result)
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as error:
        result["error"] = str(error)
        log(f"FAILED: {error}")
    finally:
        log("cleaning up: containers, images, the run's folder")
        if engine is not None:
            engine.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        os.close(owner)
        result["run_folder_peak_bytes"], result["file_system_peak_growth_bytes"] = disk.stop()
        result["free_bytes_after"] = free_bytes(args.work_parent)
        result["work_folder_removed"] = not work.exists()
        result["mounts_left"] = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                                 if line.split()[4].startswith(f"{work}/")]
        result["checks"] = [asdict(check) for check in checks]
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    cleaned = result["work_folder_removed"] and not result["mounts_left"]
    if not cleaned:
        log(f"FAILED to clean up: {work} {'removed' if result['work_folder_removed'] else 'is still there'}, "
            f"mounts left under it: {result['mounts_left']}")
    ok = "error" not in result and bool(checks) and all(check.ok for check in checks) and cleaned
    print(f"\n{'engine':24} {result.get('engine', '-')}\n{'base image':24} {result.get('base_image', '-')}")
    for key, label, unit, scale in [("standin_s", "stand-in", "s", 1), ("build_s", "build", "s", 1),
                                    ("build_cpu_s", "build CPU time", "s", 1),
                                    ("image_bytes", "image size", "GB", GB),
                                    ("startup_to_ready_s", "start-up to /readyz", "s", 1),
                                    ("stop_s", "stop on SIGTERM", "s", 1),
                                    ("run_folder_peak_bytes", "run folder's peak", "GB", GB),
                                    ("file_system_peak_growth_bytes", "disk use's peak growth", "GB", GB),
                                    ("free_bytes_before", "free before", "GB", GB),
                                    ("free_bytes_after", "free after cleanup", "GB", GB)]:
        if key in result:
            print(f"{label:24} {result[key] / scale:.2f} {unit}")
    print(f"{'checks':24} {sum(c.ok for c in checks)}/{len(checks)} passed{'' if ok else ' -- FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
