"""Does ``/predict`` keep answering whatever happens around it? The product as a user deploys it, under steady
load, with one fault injected at a time (issue 22).

    .venv/bin/python -m benchmarks.faults                        # every fault, 10 s a phase
    .venv/bin/python -m benchmarks.faults --faults postgres-frozen batch-flood --duration 5

Starts a PostgreSQL server of its own (Debian's binaries, as the tests do) and ``python -m app`` on the
shipped model with that database, an admin token and both planes (the serving process and its supervised
control process). Well-behaved clients (``--concurrency`` closed-loop clients, each posting
``examples/cat.png`` to ``/predict`` as soon as its previous answer arrives: ``benchmarks/load.py``) run
through three phases per fault: before, during (the fault is injected as the phase starts and held through
it) and after (once the fault is undone and the service has recovered). Per fault it reports the well-behaved
clients' p50/p99 and failed requests in each phase, the serving process's peak RSS, how the offending
clients were answered, and the recovery time (from undoing the fault until the product works again:
``/readyz`` clean and, for control-plane faults, ``GET /train`` answering).

The targets (issue 22): 0 failed well-behaved predictions under every fault, p99 during the fault at most
1.5x the fault's own "before" p99, and RSS under the held uploads within the upload budget + 300 MiB. Every
process shares the machine's cores with the load generator and the offending clients, so the figures are
for this machine, which the JSON names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.queues
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import httpx

from benchmarks.compare import git_revision
from benchmarks.control_start import cpu_seconds
from benchmarks.cpu_backends import describe_machine
from benchmarks.load import LevelResult, Upload, _descendants, drive, server_process
from tests.support.postgres import PostgresServer, running_server

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
IMAGE = REPO_ROOT / "examples" / "cat.png"
GOAL_P99_RATIO = 1.5
RSS_ALLOWANCE = 300 * 2**20


@dataclass
class Deployment:
    """What the faults act on: the running product and its parts."""

    url: str
    pid: int
    token: str
    state: Path
    postgres: PostgresServer
    database_url: str
    upload_budget: int

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def control_pid(self) -> int | None:
        """The supervised control process: the serving process's child running ``app.control``."""
        for pid in _descendants(self.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.startswith(b"app.control") for part in command):
                return pid
        return None

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_s(self) -> float:
        """CPU seconds used so far by the serving process and its descendants (the control plane, the decode
        and verification workers): the living ones' own, and those of the ones that ended and were waited for,
        which their parent's count keeps (a killed control plane's seconds no longer vanish from a phase)."""
        total = 0.0
        for pid in [self.pid, *_descendants(self.pid)]:
            with contextlib.suppress(OSError):  # it ended since it was listed
                total += cpu_seconds(pid, reaped_children=True)
        return total


@dataclass
class Fault:
    name: str
    what: str
    inject: Callable[[Deployment], object]  # returns what undo needs
    undo: Callable[[Deployment, object], None]
    # Offending clients that run through the "during" phase; they return a count of their answers by kind.
    offender: Callable[[Deployment, StopSignal], dict[str, int]] | None = None
    checks_control: bool = False  # recovery waits for GET /train too


@dataclass
class FaultRow:
    name: str
    what: str
    phases: dict[str, dict] = field(default_factory=dict)
    rss_peak_mib: float = 0.0
    rss_before_mib: float = 0.0
    offenders: dict[str, int] = field(default_factory=dict)
    offender_cpu_s: float | None = None  # CPU seconds the offending clients' process used, on the same cores
    recovery_s: float | None = None
    during_readyz: dict | None = None
    notes: list[str] = field(default_factory=list)


class StopSignal(Protocol):
    """When the offending clients stop: a threading or multiprocessing Event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


# -- the deployment --------------------------------------------------------------------------------------

@contextmanager
def deployment(log: Path, upload_budget_mib: int, extra: dict[str, str]) -> Iterator[Deployment]:
    token = secrets.token_urlsafe(24)
    state = Path(tempfile.mkdtemp(prefix="faults_state_"))
    with running_server() as postgres:
        database = postgres.create_database()
        environment = {key: value for key, value in os.environ.items() if not key.startswith("APP_")} | {
            "APP_STATE_DIR": str(state), "APP_ADMIN_TOKEN": token, "APP_DATABASE_URL": database,
            "APP_LOG_LEVEL": "warning", "APP_REGISTRY_POLL_S": "0.5",
            "APP_MAX_UPLOAD_BYTES_IN_FLIGHT": str(upload_budget_mib * 2**20)} | extra
        try:
            with server_process(lambda port: ([sys.executable, "-m", "app", "--port", str(port)], environment),
                                log, REPO_ROOT) as (port, pid):
                serving = Deployment(f"http://127.0.0.1:{port}", pid, token, state, postgres, database,
                                     upload_budget_mib * 2**20)
                wait_for(lambda: _get(serving.url + "/readyz").status_code == 200, 300, "the service to be ready")
                # On a CPU unlike the one that measured the checkpoint's backends, the service verifies them in a
                # child process and may swap one in: minutes of CPU beside serving, then another speed. Faults are
                # measured against the steady state after it.
                wait_for(lambda: _verification_settled(serving), 1200, "the service's backend verification")
                yield serving
        finally:
            shutil.rmtree(state, ignore_errors=True)


def _verification_settled(serving: Deployment) -> bool:
    answer = _get(serving.url + "/model")
    status = (answer.json().get("backend_verification") or {}) if answer.status_code == 200 else {"phase": "waiting"}
    return status.get("phase") not in ("waiting", "verifying")


def _get(url: str, **kwargs) -> httpx.Response:
    try:
        return httpx.get(url, timeout=5, **kwargs)
    except httpx.HTTPError:
        return httpx.Response(599)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def recovered(serving: Deployment, with_control: bool) -> bool:
    """Ready, reading the registry again and, for control-plane faults, the job API answering through it."""
    ready = _get(serving.url + "/readyz")
    if ready.status_code != 200 or ready.json().get("registry_error") is not None:
        return False
    if not with_control:
        return True
    return (ready.json().get("control_plane") == "ready"
            and _get(serving.url + "/train", headers=serving.admin()).status_code == 200)


# -- the faults ------------------------------------------------------------------------------------------

def _signal_tree(pid: int, signum: int) -> None:
    for process in [pid, *_descendants(pid)]:
        try:
            os.kill(process, signum)
        except ProcessLookupError:
            pass


def _postmaster(serving: Deployment) -> int:
    return int((serving.postgres._data / "postmaster.pid").read_text().splitlines()[0])


def poison_job(serving: Deployment) -> None:
    """A running job's record whose parameters no longer parse, then a restart of the control plane, whose
    recovery reads it (before issue 22, recover() raised and the whole service exited)."""
    import psycopg

    with psycopg.connect(serving.database_url, autocommit=True) as connection:
        connection.execute("INSERT INTO jobs (id, status, params, error) VALUES "
                           "('poisoned', 'running', '{\"norm_lr_scale\": null, \"a_renamed_option\": 3}', NULL)")
    kill_control(serving)


def freeze_postgres(serving: Deployment) -> int:
    pid = _postmaster(serving)
    _signal_tree(pid, signal.SIGSTOP)
    return pid


def thaw_postgres(_serving: Deployment, pid: object) -> None:
    _signal_tree(int(pid), signal.SIGCONT)  # type: ignore[call-overload]


def unreadable_pointer(serving: Deployment) -> bytes | None:
    pointer = serving.state / "registry" / "current"
    before = pointer.read_bytes() if pointer.is_file() else None
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_bytes(b"\xff\xfe not a version \xc3\x28\n")
    return before


def restore_pointer(serving: Deployment, before: object) -> None:
    pointer = serving.state / "registry" / "current"
    if before is None:
        pointer.unlink(missing_ok=True)
    else:
        pointer.write_bytes(before)  # type: ignore[arg-type]


def kill_control(serving: Deployment) -> None:
    pid = serving.control_pid()
    if pid is None:
        raise RuntimeError("no control process under the serving process: is the two-plane start in place?")
    os.kill(pid, signal.SIGKILL)


def _raw_request(serving: Deployment, path: str, headers: str, body: bytes, timeout: float = 5) -> socket.socket:
    port = int(serving.url.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode() + body)
    return client


def _status_of(client: socket.socket) -> str:
    try:
        line = client.recv(64).split(b"\r\n", 1)[0].decode(errors="replace")
        return line.split(" ")[1] if line.startswith("HTTP/") else "no answer"
    except OSError as error:
        return type(error).__name__


def held_uploads(count: int, size: int) -> Callable[[Deployment, StopSignal], dict[str, int]]:
    """``count`` clients that declare a ``size``-byte multipart upload, send all of it but the last byte and
    hold it there until the phase ends."""
    def offend(serving: Deployment, stop: StopSignal) -> dict[str, int]:
        boundary = "faultsboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode()
        body = head + b"\0" * (size - len(head))
        headers = f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {size}\r\n"
        answers: dict[str, int] = {}
        held: list[socket.socket] = []
        lock = threading.Lock()

        def one_client() -> None:
            # Each on its own connection at once, as many clients would be: a refused upload is now cut off
            # by the server (app/server.py), which a client sending them one after another would wait out.
            try:
                client = _raw_request(serving, "/predict", headers, b"", timeout=5)
            except OSError as error:
                kind = f"could not connect ({type(error).__name__})"
            else:
                try:
                    client.sendall(body[:-1])
                except OSError:  # what the server answered before it stopped reading
                    kind = f"{_status_of(client)}, then cut off while sending"
                    client.close()
                else:
                    with lock:
                        held.append(client)
                    return
            with lock:
                answers[kind] = answers.get(kind, 0) + 1

        clients = [threading.Thread(target=one_client) for _ in range(count)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        for client in held:  # an early answer (503 before the body) is waiting in the socket already
            client.settimeout(0.05)
            try:
                peek = client.recv(64, socket.MSG_PEEK)
            except (TimeoutError, BlockingIOError):
                peek = b""
            except OSError:
                peek = b"reset"
            kind = peek.split(b"\r\n", 1)[0].decode(errors="replace") if peek else "held by the server"
            answers[kind] = answers.get(kind, 0) + 1
        stop.wait()
        for client in held:
            client.close()
        return answers
    return offend


def batch_flood(clients: int, images: int, image: bytes) -> Callable[[Deployment, StopSignal], dict[str, int]]:
    def offend(serving: Deployment, stop: StopSignal) -> dict[str, int]:
        answers: dict[str, int] = {}
        lock = threading.Lock()

        # Encoded once: encoding 64 files per request cost the offenders' process ~10 ms of CPU a request, on
        # the cores the server runs on, where a real flood's clients would spend their own machines' CPU.
        upload = httpx.Request("POST", serving.url + "/predict/batch",
                               files=[("files", (f"{n}.png", image, "image/png")) for n in range(images)])
        body = upload.read()

        def one_client(number: int) -> None:
            headers = {"X-Client-Id": f"flood-{number}", "Content-Type": upload.headers["Content-Type"]}
            with httpx.Client(timeout=60, headers=headers) as client:
                while not stop.is_set():
                    try:
                        status = str(client.post(serving.url + "/predict/batch", content=body).status_code)
                    except httpx.HTTPError as error:
                        status = type(error).__name__
                    with lock:
                        answers[status] = answers.get(status, 0) + 1
                    if status == "503":
                        stop.wait(0.2)  # a well-behaved retry, short of the Retry-After it is given
        threads = [threading.Thread(target=one_client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers
    return offend


def vanishing_clients(count: int, image: bytes) -> Callable[[Deployment, StopSignal], dict[str, int]]:
    """``count`` clients, in waves through the phase, that send a whole /predict and hang up at once."""
    def offend(serving: Deployment, stop: StopSignal) -> dict[str, int]:
        headers = f"Content-Type: image/png\r\nContent-Length: {len(image)}\r\n"
        sent = 0
        while sent < count and not stop.is_set():
            for _ in range(min(50, count - sent)):
                try:
                    _raw_request(serving, "/predict", headers, image).close()
                    sent += 1
                except OSError:
                    pass
            stop.wait(0.5)
        stop.wait()
        return {"sent and hung up": sent}
    return offend


def faults(image: bytes, upload_bytes: int, held: int) -> list[Fault]:
    return [
        Fault("poisoned-job-record", "a job record whose parameters no longer parse, then GET /train and a "
              "control restart", lambda s: poison_job(s), lambda s, _: None, checks_control=True),
        Fault("postgres-stopped", "PostgreSQL shut down (immediate)", lambda s: s.postgres.stop(),
              lambda s, _: s.postgres.start(), checks_control=True),
        Fault("postgres-frozen", "PostgreSQL and its backends SIGSTOPped", freeze_postgres, thaw_postgres,
              checks_control=True),
        Fault("registry-pointer-unreadable", "the registry pointer replaced by invalid UTF-8",
              unreadable_pointer, restore_pointer),
        Fault("control-killed", "the control process SIGKILLed (its supervisor restarts it)", kill_control,
              lambda s, _: None, checks_control=True),
        Fault("held-uploads", f"{held} clients holding {upload_bytes / 2**20:.0f} MiB uploads one byte short",
              lambda s: None, lambda s, _: None, offender=held_uploads(held, upload_bytes)),
        Fault("batch-flood", "10 clients posting /predict/batch of 64 images back to back", lambda s: None,
              lambda s, _: None, offender=batch_flood(10, 64, image)),
        Fault("vanishing-clients", "500 clients that send /predict and disconnect at once", lambda s: None,
              lambda s, _: None, offender=vanishing_clients(500, image)),
    ]


# -- measuring --------------------------------------------------------------------------------------------

def phase(serving: Deployment, upload: Upload, concurrency: int, duration: float) -> dict:
    cpu_before = serving.cpu_s()
    result: LevelResult = asyncio.run(drive(serving.url + "/predict", upload, concurrency=concurrency,
                                            duration=duration, warmup=0.5, timeout=30))
    return {"requests": result.requests, "failed": result.error_count, "errors": result.errors,
            "server_cpu_s": round(serving.cpu_s() - cpu_before, 2),
            "requests_per_s": round(result.requests_per_s, 1), "p50_ms": round(result.p50_ms, 1),
            "p99_ms": round(result.p99_ms, 1)}


# Forked, so the offending clients (closures over the fault's settings) need not be picklable.
OFFENDERS = multiprocessing.get_context("fork")


def _offend(offender: Callable[[Deployment, StopSignal], dict[str, int]], serving: Deployment, stop: StopSignal,
            answers: multiprocessing.queues.Queue) -> None:
    started = time.process_time()  # this process and its threads: the offenders' share of the machine's cores
    answers.put((offender(serving, stop), round(time.process_time() - started, 2)))


def run_fault(serving: Deployment, fault: Fault, upload: Upload, concurrency: int, duration: float) -> FaultRow:
    row = FaultRow(fault.name, fault.what)
    row.phases["before"] = phase(serving, upload, concurrency, duration)
    row.rss_before_mib = serving.rss() / 2**20
    peak = [serving.rss()]
    stop, sampling_done = OFFENDERS.Event(), threading.Event()

    def sample_rss() -> None:
        while not sampling_done.wait(0.1):
            peak[0] = max(peak[0], serving.rss())

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    undo_with = fault.inject(serving)
    offender_answers: dict[str, int] = {}
    offender = answers = None
    if fault.offender is not None:
        # In a process of their own, as clients on other machines would be: in this one they shared the
        # well-behaved clients' GIL, and what they cost the measuring client was counted as the server's delay.
        # They still share this machine's cores.
        answers = OFFENDERS.Queue()
        offender = OFFENDERS.Process(target=_offend, args=(fault.offender, serving, stop, answers), daemon=True)
        offender.start()
    try:
        row.phases["during"] = phase(serving, upload, concurrency, duration)
        ready = _get(serving.url + "/readyz")
        row.during_readyz = {"status": ready.status_code, "body": _json_or_text(ready)}
    finally:
        stop.set()
        if offender is not None and answers is not None:
            offender_answers, row.offender_cpu_s = answers.get(timeout=120)
            offender.join()
        fault.undo(serving, undo_with)
        undone = time.monotonic()
    try:
        wait_for(lambda: recovered(serving, fault.checks_control), 120, f"recovery from {fault.name}")
        row.recovery_s = round(time.monotonic() - undone, 2)
    except RuntimeError as error:
        row.notes.append(str(error))
    sampling_done.set()
    sampler.join()
    row.rss_peak_mib = round(peak[0] / 2**20, 1)
    row.offenders = offender_answers
    row.phases["after"] = phase(serving, upload, concurrency, duration)
    return row


def _json_or_text(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def swap_while_idle(serving: Deployment, image: bytes) -> dict:
    """A reload staged while a many-batch request is half computed, then no more requests: the swap must
    still finish."""
    shipped = REPO_ROOT / "weights" / "fastcnn"
    files = [("files", (f"{n}.png", image, "image/png")) for n in range(64)]
    with httpx.Client(timeout=120) as client:
        request = threading.Thread(target=lambda: client.post(serving.url + "/predict/batch", files=files))
        request.start()
        started = time.monotonic()
        answer = client.post(serving.url + "/admin/reload", headers=serving.admin(),
                             json={"weights": str(shipped)})
        request.join()
    return {"status": answer.status_code, "seconds": round(time.monotonic() - started, 2),
            "body": _json_or_text(answer)}


def start_with_control_broken(log: Path) -> dict:
    """``python -m app`` with its job database unreachable: seconds to the first 200 from /predict."""
    state = Path(tempfile.mkdtemp(prefix="faults_broken_"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("APP_")} | {
        "APP_STATE_DIR": str(state), "APP_ADMIN_TOKEN": secrets.token_urlsafe(24), "APP_LOG_LEVEL": "warning",
        "APP_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{closed_port}/jobs"}
    body = IMAGE.read_bytes()
    try:
        started = time.monotonic()
        with server_process(lambda port: ([sys.executable, "-m", "app", "--port", str(port)], environment),
                            log, REPO_ROOT) as (port, _pid):
            url = f"http://127.0.0.1:{port}/predict"

            def answers() -> bool:
                try:
                    return httpx.post(url, content=body, headers={"content-type": "image/png"},
                                      timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False
            try:
                seconds = wait_for(answers, 120, "/predict with the control plane broken")
                return {"predict_200_after_s": round(time.monotonic() - started, 2), "ok": True,
                        "waited_s": round(seconds, 2)}
            except RuntimeError as error:
                return {"ok": False, "error": str(error)}
    finally:
        shutil.rmtree(state, ignore_errors=True)


def table(result: dict) -> str:
    lines = ["| fault | p99 before / during / after (ms) | during ÷ before | failed (before/during/after) "
             "| RSS peak (MiB) | offending clients | recovery (s) |",
             "|---|---|---:|---|---:|---|---:|"]
    for row in result["faults"]:
        phases = row["phases"]
        p99 = [phases.get(name, {}).get("p99_ms", float("nan")) for name in ("before", "during", "after")]
        failed = [str(phases.get(name, {}).get("failed", "-")) for name in ("before", "during", "after")]
        ratio = p99[1] / p99[0] if p99[0] else float("nan")
        offenders = ", ".join(f"{re.sub(r'HTTP/[0-9.]+ ', '', kind)}: {count}"
                              for kind, count in row["offenders"].items()) or "-"
        lines.append(f"| {row['name']} | {p99[0]:.0f} / {p99[1]:.0f} / {p99[2]:.0f} | {ratio:.2f} | "
                     f"{' / '.join(failed)} | {row['rss_peak_mib']:.0f} | {offenders} | {row['recovery_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", nargs="*", help="which faults (default: all)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per phase (default 10)")
    parser.add_argument("--concurrency", type=int, default=8, help="well-behaved clients (default 8)")
    parser.add_argument("--held-uploads", type=int, default=200)
    parser.add_argument("--upload-mib", type=int, default=15)
    parser.add_argument("--upload-budget-mib", type=int, default=256,
                        help="APP_MAX_UPLOAD_BYTES_IN_FLIGHT for the run, in MiB (default 256)")
    parser.add_argument("--max-client-images", type=int, default=0,
                        help="APP_MAX_CLIENT_IMAGES for the run (default 0: off, the service's default); the flood's "
                             "clients name themselves in X-Client-Id, which the run sets as APP_CLIENT_ID_HEADER")
    args = parser.parse_args(argv)
    extra = {"APP_MAX_CLIENT_IMAGES": str(args.max_client_images), "APP_CLIENT_ID_HEADER": "x-client-id"} \
        if args.max_client_images else {}
    image = IMAGE.read_bytes()
    upload = Upload(image, filename="cat.png")
    chosen = [fault for fault in faults(image, args.upload_mib * 2**20, args.held_uploads)
              if not args.faults or fault.name in args.faults]
    log = Path(tempfile.mkdtemp(prefix="faults_log_")) / "server.log"
    result: dict = {"benchmark": "faults", "when": datetime.now(UTC).isoformat(timespec="seconds"),
                    "git": git_revision(), "machine": describe_machine(), "concurrency": args.concurrency,
                    "phase_s": args.duration, "upload_budget_mib": args.upload_budget_mib, "settings": extra,
                    "goal_p99_ratio": GOAL_P99_RATIO, "faults": []}
    with deployment(log, args.upload_budget_mib, extra) as serving:
        served = _get(serving.url + "/model").json()
        result["served"] = {"backend": served.get("backend"),
                            "backend_verification": (served.get("backend_verification") or {}).get("phase")}
        phase(serving, upload, args.concurrency, args.duration)  # warm-up: the first phase's figures are not kept
        for fault in chosen:
            print(f"-- {fault.name}: {fault.what}", flush=True)
            row = run_fault(serving, fault, upload, args.concurrency, args.duration)
            result["faults"].append(row.__dict__)
            print(json.dumps(row.__dict__), flush=True)
        if not args.faults or "swap-while-idle" in args.faults:
            result["swap_while_idle"] = swap_while_idle(serving, image)
            print("swap while idle:", result["swap_while_idle"], flush=True)
    if not args.faults or "start-with-control-broken" in args.faults:
        result["start_with_control_broken"] = start_with_control_broken(log)
        print("start with the control plane broken:", result["start_with_control_broken"], flush=True)
    result["server_log_tail"] = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
    print(table(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"faults-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
