"""The container engines deploy/smoke_image.py drives: Docker where an engine answers, else buildah as root
(chroot isolation, overlay storage in the run's own folder); and the Debian stand-in for a base image that
cannot be pulled. Standard library only."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STANDIN_TAG = "localhost/cifar-serve-python-standin:{suite}"
STANDIN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
# The PATH and LANG that python:*-slim sets: an imported root file system has no ENV at all, and the
# Dockerfile's `ENV PATH=/opt/venv/bin:$PATH` would otherwise lose /usr/bin.
STANDIN_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
STOP_GRACE_S = 45  # docker-compose.yml's stop_grace_period
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Each run works in a folder of its own, PREFIX + random, under --work-parent. It holds an flock on OWNER_LOCK
# there while it runs, and lists in REMOVALS the commands that undo what it made outside that folder (Docker's
# images and containers), so that a later run can clean up after one that was killed (SIGKILL, a lost
# session, a power cut), which no `finally` survives.
RUN_FOLDER_PREFIX = "cifar-serve-image-"
OWNER_LOCK = "owner.lock"
REMOVALS = "removals.json"
# A folder of a run without its lock (made by an older version of this script, or whose run was killed
# between making it and locking it) counts as abandoned once it is this old.
UNLOCKED_GRACE_S = 600

_started = time.monotonic()


def log(message: str) -> None:
    elapsed = int(time.monotonic() - _started)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


def run(command: list[str], *, check: bool = True, env: dict[str, str] | None = None) -> int:
    """Run a command, its output streamed into the log, indented; returns the exit status."""
    log("$ " + " ".join(command))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          errors="replace") as process:
        assert process.stdout is not None  # stdout=PIPE
        try:
            for line in process.stdout:
                print("    | " + line.rstrip(), flush=True)
        except BaseException:  # interrupted (SIGTERM, Ctrl-C): stop the command too, before cleaning up
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if check and process.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[:4])} ...` exited {process.returncode}")
    return process.returncode


def output(command: list[str], *, check: bool = True, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """Run a command quietly and return what it printed."""
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[:4])} ...` exited {result.returncode}: {result.stderr[-2000:]}")
    return result


@dataclass(frozen=True)
class ImageConfig:
    """What the smoke test reads from the built image, not from the Dockerfile: what runs, as whom, where."""

    command: list[str]
    user: str
    env: dict[str, str]
    port: int
    healthcheck: list[str]

    @classmethod
    def from_docker_config(cls, config: dict) -> ImageConfig:
        ports = [int(key.split("/")[0]) for key in (config.get("ExposedPorts") or {})]
        if len(ports) != 1:
            raise ValueError(f"expected one EXPOSEd port in the image, found {ports}")
        return cls(command=[*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])],
                   user=config.get("User") or "0", env=dict(item.split("=", 1) for item in config.get("Env") or []),
                   port=ports[0], healthcheck=(config.get("Healthcheck") or {}).get("Test") or [])

    @property
    def uid(self) -> int | None:
        user = self.user.split(":")[0]
        return int(user) if user.isdigit() else None


def container_argv(test: list[str]) -> list[str]:
    """A HEALTHCHECK's Test (["CMD", ...] or ["CMD-SHELL", "..."]) as the argv to run in the container."""
    if test and test[0] == "CMD":
        return test[1:]
    if test and test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    raise ValueError(f"the image has no HEALTHCHECK command to run (Test = {test!r})")


@dataclass
class Engine:
    """What the smoke test needs from a container engine. `cleanup` undoes everything the run created."""

    work: Path
    removals: list[list[str]] = field(default_factory=list)

    name = "engine"

    def version(self) -> str: raise NotImplementedError
    def pull(self, ref: str) -> bool: raise NotImplementedError
    def import_rootfs(self, tar: Path, tag: str) -> None: raise NotImplementedError
    def build(self, tag: str, build_args: dict[str, str]) -> None: raise NotImplementedError
    def config(self, tag: str) -> ImageConfig: raise NotImplementedError
    def size_and_layers(self, tag: str) -> tuple[int, list[tuple[int, str]]]: raise NotImplementedError
    def start(self, tag: str, config: ImageConfig) -> None: raise NotImplementedError
    def alive(self) -> bool: raise NotImplementedError
    def url_and_prefix(self) -> tuple[str, list[str]]: raise NotImplementedError  # prefix: reaches its network
    def exec(self, argv: list[str]) -> subprocess.CompletedProcess[str]: raise NotImplementedError
    def service_users(self) -> list[tuple[int, str]]: raise NotImplementedError
    def stop(self) -> float: raise NotImplementedError
    def service_log(self) -> str: raise NotImplementedError

    def remember(self, removal: list[str]) -> None:
        """A command that undoes something this run is about to make outside its folder; written down
        before it is made, so that a later run can undo it even if this one is killed."""
        self.removals.append(removal)
        (self.work / REMOVALS).write_text(json.dumps(self.removals))

    def cleanup(self) -> None:
        for command in reversed(self.removals):
            run(command, check=False)


class Docker(Engine):
    name = "docker"
    container = ""
    host_port = 0

    def version(self) -> str:
        return "Docker Engine " + output(["docker", "version", "--format", "{{.Server.Version}}"]).stdout.strip()

    def pull(self, ref: str) -> bool:
        if output(["docker", "image", "inspect", ref], check=False).returncode == 0:
            return True
        pulled = run(["docker", "pull", ref], check=False) == 0
        if pulled:  # not here before this run: leave the machine as it was
            self.remember(["docker", "rmi", ref])
        return pulled

    def import_rootfs(self, tar: Path, tag: str) -> None:
        changes = [arg for env in STANDIN_ENV for arg in ("--change", f"ENV {env}")]
        self.remember(["docker", "rmi", "-f", tag])
        run(["docker", "import", *changes, "--change", 'CMD ["python3"]', str(tar), tag])

    def build(self, tag: str, build_args: dict[str, str]) -> None:
        args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
        self.remember(["docker", "rmi", "-f", tag])
        run(["docker", "build", "--progress=plain", *args, "-t", tag, str(REPO_ROOT)],
            env=os.environ | {"DOCKER_BUILDKIT": "1"})

    def config(self, tag: str) -> ImageConfig:
        image = json.loads(output(["docker", "image", "inspect", tag]).stdout)[0]
        return ImageConfig.from_docker_config(image["Config"])

    def size_and_layers(self, tag: str) -> tuple[int, list[tuple[int, str]]]:
        size = int(output(["docker", "image", "inspect", "--format", "{{.Size}}", tag]).stdout)
        rows = output(["docker", "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}",
                       tag]).stdout.splitlines()
        layers = [(int(row.split("\t", 1)[0]), row.split("\t", 1)[1]) for row in reversed(rows)]
        return size, [layer for layer in layers if layer[0] > 0]

    def start(self, tag: str, config: ImageConfig) -> None:
        self.container = f"cifar-serve-smoke-{os.getpid()}"
        self.remember(["docker", "rm", "-f", self.container])
        run(["docker", "run", "-d", "--name", self.container, "-p", f"127.0.0.1::{config.port}", tag])
        mapped = output(["docker", "port", self.container, f"{config.port}/tcp"]).stdout.split()[0]
        self.host_port = int(mapped.rsplit(":", 1)[1])

    def alive(self) -> bool:
        state = output(["docker", "inspect", "--format", "{{.State.Running}}", self.container], check=False)
        return state.stdout.strip() == "true"

    def url_and_prefix(self) -> tuple[str, list[str]]:
        return f"http://127.0.0.1:{self.host_port}", []

    def exec(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return output(["docker", "exec", self.container, *argv], check=False)

    def service_users(self) -> list[tuple[int, str]]:
        rows = output(["docker", "top", self.container, "-eo", "uid,args"]).stdout.splitlines()[1:]
        return [(int(row.split(None, 1)[0]), row.split(None, 1)[1]) for row in rows]

    def stop(self) -> float:
        start = time.monotonic()
        run(["docker", "stop", "-t", str(STOP_GRACE_S), self.container])
        return time.monotonic() - start

    def service_log(self) -> str:
        logs = output(["docker", "logs", self.container], check=False)
        return logs.stdout + logs.stderr


class Buildah(Engine):
    """buildah as root with chroot isolation and overlay storage in the run's own folder, deleted afterwards,
    so that it never sees or touches another user's images.

    chroot isolation shares the caller's network namespace, so the service runs under `unshare --net`: its
    own CMD listens on its own port in a namespace of its own, as in a container, and the probes and the
    HEALTHCHECK enter that namespace with nsenter."""

    name = "buildah"
    container = ""
    process: subprocess.Popen[bytes] | None = None
    netns = 0
    port = 0
    user = ""

    def _base(self) -> list[str]:
        return ["buildah", "--root", str(self.work / "storage"), "--runroot", str(self.work / "runroot"),
                "--storage-driver", "overlay"]

    def _env(self) -> dict[str, str]:
        # buildah's temporary files and its RUN --mount=type=cache folders live under TMPDIR: keep them in
        # the run's folder, so that they are measured and removed with it.
        (self.work / "tmp").mkdir(exist_ok=True)
        return os.environ | {"TMPDIR": str(self.work / "tmp"), "BUILDAH_ISOLATION": "chroot"}

    def _run(self, args: list[str], check: bool = True) -> int:
        return run([*self._base(), *args], check=check, env=self._env())

    def _output(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return output([*self._base(), *args], check=check, env=self._env())

    def version(self) -> str:
        return self._output(["--version"]).stdout.strip()

    def pull(self, ref: str) -> bool:
        qualified = ref if "/" in ref.split(":")[0] else f"docker.io/library/{ref}"
        return self._run(["pull", qualified], check=False) == 0

    def import_rootfs(self, tar: Path, tag: str) -> None:
        container = self._output(["from", "scratch"]).stdout.strip()
        self._run(["add", container, str(tar), "/"])
        changes = [arg for env in STANDIN_ENV for arg in ("--env", env)]
        self._run(["config", *changes, "--cmd", "python3", container])
        self._run(["commit", "--format", "docker", "--rm", container, tag])

    def build(self, tag: str, build_args: dict[str, str]) -> None:
        args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
        # The build trusts what this machine trusts: where registries are reached through a TLS-inspecting
        # proxy, pip inside the build needs the host's CA bundle (pip reads /etc/pip.conf to find it).
        mounts: list[str] = []
        if CA_BUNDLE.is_file():
            pip_conf = self.work / "pip.conf"
            pip_conf.write_text(f"[global]\ncert = {CA_BUNDLE}\n")
            mounts = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
            log(f"the build's RUN steps see this machine's CA bundle ({CA_BUNDLE}) and a pip.conf naming it")
        # docker format: the OCI format has no HEALTHCHECK, and buildah drops it with only a warning.
        # --pull=never: the base is in this run's storage already, pulled or built as a stand-in.
        self._run(["bud", "--isolation", "chroot", "--network", "host", "--layers", "--format", "docker",
                   "--pull=never", *mounts, *args, "-t", tag, str(REPO_ROOT)])

    def _docker_view(self, tag: str) -> dict:
        return json.loads(self._output(["inspect", "--type", "image", tag]).stdout)["Docker"]

    def config(self, tag: str) -> ImageConfig:
        return ImageConfig.from_docker_config(self._docker_view(tag)["config"])

    def size_and_layers(self, tag: str) -> tuple[int, list[tuple[int, str]]]:
        docker = self._docker_view(tag)
        layers_file = self.work / "storage" / "overlay-layers" / "layers.json"
        sizes = {layer.get("diff-digest"): layer.get("diff-size", 0) for layer in json.loads(layers_file.read_text())}
        steps = [step.get("created_by", "") for step in docker.get("history", []) if not step.get("empty_layer")]
        diff_ids = docker["rootfs"]["diff_ids"]
        # An imported base has no history entry for its layer: pair layers with steps from the end.
        steps = (["(base image)"] * len(diff_ids) + steps)[-len(diff_ids):]
        layers = [(sizes.get(digest, 0), step) for digest, step in zip(diff_ids, steps, strict=True)]
        return sum(size for size, _ in layers), layers

    def start(self, tag: str, config: ImageConfig) -> None:
        self.container = self._output(["from", "--pull=never", tag]).stdout.strip()
        self.user, self.port = config.user, config.port
        log(f"$ unshare --net -- buildah run --isolation chroot --user {self.user} {self.container} -- "
            + " ".join(config.command))
        with open(self.work / "service.log", "wb") as service_log:
            self.process = subprocess.Popen(
                ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *self._base(),
                 "run", "--isolation", "chroot", "--user", self.user, self.container, "--", *config.command],
                stdout=service_log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        namespace = Path(f"/proc/{self.process.pid}/ns/net")
        deadline = time.monotonic() + 10
        # unshare moves itself into the new namespace before it execs: wait until it has.
        while namespace.stat().st_ino == Path("/proc/self/ns/net").stat().st_ino:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"unshare --net did not start: {self.service_log()}")
            time.sleep(0.05)
        self.netns = namespace.stat().st_ino

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError("the container's service has not been started")
        return self.process

    def url_and_prefix(self) -> tuple[str, list[str]]:
        return f"http://127.0.0.1:{self.port}", ["nsenter", f"--net=/proc/{self._started().pid}/ns/net"]

    def exec(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        _, prefix = self.url_and_prefix()
        return output([*prefix, *self._base(), "run", "--isolation", "chroot", "--user", self.user, self.container,
                       "--", *argv], check=False, env=self._env())

    def _processes(self) -> list[tuple[int, int, str]]:
        """(pid, uid, command line) of each process in the service's network namespace: all started by
        this run, since the namespace is its own."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "ns" / "net").stat().st_ino == self.netns:
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append((int(entry.name), entry.stat().st_uid, command.strip()))
            except OSError:
                continue
        return found

    def service_users(self) -> list[tuple[int, str]]:
        return [(uid, command) for _, uid, command in self._processes()]

    def _signal(self, signum: int, only_the_command: bool = False) -> None:
        """Signal every process in the namespace, or only the CMD's own: the image user's processes that
        are not buildah's (chroot isolation runs the CMD under buildah-chroot-exec, as that user too)."""
        for pid, uid, command in self._processes():
            if only_the_command and (uid != int(self.user.split(":")[0]) or command.startswith("buildah")):
                continue
            try:
                os.kill(pid, signum)
            except OSError:
                continue

    def stop(self) -> float:
        """SIGTERM to the CMD's process, as `docker stop` signals PID 1; SIGKILL after the grace period."""
        start = time.monotonic()
        self._signal(signal.SIGTERM, only_the_command=True)
        try:
            self._started().wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log(f"still running {STOP_GRACE_S} s after SIGTERM: SIGKILL")
            self._signal(signal.SIGKILL)
            self._started().wait()
        return time.monotonic() - start

    def service_log(self) -> str:
        path = self.work / "service.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        super().cleanup()
        if self.netns:
            self._signal(signal.SIGKILL)
            if self.process is not None:
                self.process.wait()
        if (self.work / "storage").exists():
            self._run(["rm", "--all"], check=False)
            self._run(["rmi", "--all", "--force"], check=False)
        unmount_under(self.work)


def unmount_under(folder: Path) -> None:
    """Whatever is still mounted under a run's folder (overlay layers, buildah's bind mounts) must go before
    the folder is deleted, or rmtree would delete through them; deepest first."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{folder}/")), key=len, reverse=True):
        run(["umount", "-l", mount], check=False)


def lock_run_folder(work: Path) -> int:
    """Mark `work` as in use by this process for as long as it lives: the kernel drops an flock when its
    holder dies, however it dies. Returns the descriptor, to keep open."""
    descriptor = os.open(work / OWNER_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def is_abandoned(folder: Path, now: float | None = None) -> bool:
    """Whether no live run owns this run folder: its lock can be taken, or it has none and is old."""
    lock = folder / OWNER_LOCK
    if not lock.exists():
        return (now or time.time()) - folder.stat().st_mtime > UNLOCKED_GRACE_S
    try:
        descriptor = os.open(lock, os.O_RDONLY)
    except PermissionError:  # another user's run: not ours to judge, nor to clean up
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)  # releases the lock if it was taken
    return True


def abandoned_run_folders(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted(folder for folder in parent.iterdir() if folder.name.startswith(RUN_FOLDER_PREFIX)
                  and folder.is_dir() and not folder.is_symlink() and is_abandoned(folder))


def processes_using(folder: Path) -> Iterator[int]:
    """Processes whose command line or working directory lies in `folder`: what a killed run left running
    (a build, the service under buildah run, a debootstrap), and nothing else."""
    inside = f"{folder}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if any(word == str(folder) or inside in word for word in words) or f"{cwd}/".startswith(inside):
            yield int(entry.name)


def recover_abandoned(folder: Path) -> None:
    """Undo all that a killed run left: its processes, its Docker images and containers (its REMOVALS),
    its buildah storage and mounts, and its folder."""
    log(f"cleaning up after a run that did not finish: {folder}")
    for pid in processes_using(folder):
        log(f"    ending process {pid}, left running by that run")
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    deadline = time.monotonic() + 30
    while any(True for _ in processes_using(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Buildah's storage: only buildah can release what it holds there; without buildah, unmount and delete.
    buildah_storage = (folder / "storage").exists() and shutil.which("buildah")
    engine: Engine = Buildah(folder) if buildah_storage else Engine(folder)
    removals = folder / REMOVALS
    if removals.is_file():
        engine.removals = json.loads(removals.read_text())
    engine.cleanup()
    unmount_under(folder)
    shutil.rmtree(folder, ignore_errors=True)


def choose_engine(choice: str, work: Path) -> Engine:
    if choice in ("auto", "docker") and shutil.which("docker"):
        if output(["docker", "info"], check=False).returncode == 0:
            return Docker(work)
        if choice == "docker":
            raise SystemExit("--engine docker: the docker client cannot reach an engine (`docker info` fails)")
    if choice in ("auto", "buildah") and shutil.which("buildah"):
        if os.geteuid() != 0:
            raise SystemExit("without a Docker engine this script runs buildah as root (chroot isolation, "
                             "unshare, nsenter): run it with sudo")
        return Buildah(work)
    raise SystemExit("no container engine: needs a Docker engine (`docker info` answers) or, as root, buildah "
                     "and debootstrap (Debian or Ubuntu: apt-get install buildah debootstrap)")


def standin_suite(base: str) -> tuple[str, str]:
    """(Python version, Debian suite) of a python:3.X-slim-SUITE base image, which a stand-in can replace."""
    match = re.fullmatch(r"(?:docker\.io/(?:library/)?)?python:(3\.\d+)-slim-([a-z]+)", base)
    if not match:
        raise SystemExit(f"{base} cannot be pulled, and only python:3.X-slim-SUITE has a Debian stand-in here")
    return match.group(1), match.group(2)


# What makes debian:SUITE-slim, which python:*-slim is built on, slim (debuerreotype's slimify and its apt
# configuration): dpkg leaves out documentation, manuals and translations, and apt deletes the packages it
# downloaded. Without these the Dockerfile's own apt-get layer and the base would be larger than on Docker Hub.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/info/*", "/usr/share/man/*", "/usr/share/groff/*",
                 "/usr/share/linda/*", "/usr/share/lintian/overrides/*", "/usr/share/locale/*")
_APT_DELETE = '"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"'
APT_CLEAN = (f"DPkg::Post-Invoke {{ {_APT_DELETE}; }};\nAPT::Update::Post-Invoke {{ {_APT_DELETE}; }};\n"
             'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n')


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def slim(rootfs: Path) -> None:
    """Make a debootstrapped root file system what debian:SUITE-slim is, as far as size goes."""
    rules = [f"path-exclude {pattern}" for pattern in DPKG_EXCLUDES] + ["path-include /usr/share/doc/*/copyright"]
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text("\n".join(rules) + "\n")
    (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
    for pattern in DPKG_EXCLUDES:
        for path in rootfs.glob(pattern.lstrip("/")):
            if pattern == "/usr/share/doc/*" and path.is_dir() and not path.is_symlink():
                for inner in path.iterdir():
                    if inner.name != "copyright":
                        _remove(inner)
            else:
                _remove(path)
    for cached in [*(rootfs / "var/cache/apt/archives").glob("*.deb"), *(rootfs / "var/lib/apt/lists").glob("*_*"),
                   *(rootfs / "var/cache/apt").glob("*.bin")]:
        cached.unlink()


def standin_rootfs(base: str, work: Path, cache: Path | None) -> Path:
    """A tarball of a Debian root file system with the base image's Python: the stand-in for `base`."""
    python, suite = standin_suite(base)
    if cache is not None and cache.is_file():
        log(f"the stand-in's root file system: {cache}, made by an earlier run")
        return cache
    if not shutil.which("debootstrap"):
        raise SystemExit(f"{base} cannot be pulled, and debootstrap (to build a stand-in) is not installed")
    rootfs, tar = work / "rootfs", cache or work / "rootfs.tar"
    run(["debootstrap", "--variant=minbase", f"--include={STANDIN_PACKAGES}", suite, str(rootfs)])
    if not (rootfs / "usr" / "bin" / f"python{python}").exists():
        raise SystemExit(f"Debian {suite}'s python3 is not Python {python}: no faithful stand-in for {base}")
    (rootfs / "usr" / "bin" / "python").symlink_to("python3")  # python:*-slim has `python` too
    slim(rootfs)
    run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tar), "."])
    shutil.rmtree(rootfs)
    return tar
