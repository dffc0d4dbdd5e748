"""A closed-loop load generator for image classifiers: ``concurrency`` clients, each sending its next request
as soon as its previous answer arrives, for a fixed duration after a warm-up.

    result = asyncio.run(drive("http://127.0.0.1:8000/predict", upload, concurrency=32, duration=15))

``Upload`` says how the image travels: a multipart field (what a browser form, ``curl -F`` and most
tutorials' clients send, and what every server in ``benchmarks/compare.py`` accepts) or a raw body with an
``image/*`` Content-Type. ``V2Request`` is a KServe v2 infer request instead, with JSON or binary tensors
(``check=check_v2_answer``), and ``drive_grpc`` sends the protocol's gRPC ``ModelInfer``. Every response is
checked: a non-200 status (a gRPC status but OK), a body without the expected fields, a timeout or a refused
connection counts as an error of its kind, never as a served request, and never stops the run. Throughput and
latencies are of the successful requests completed inside the measured window.

The generator shares the machine with the server, so it is kept cheap: the request body is encoded once,
and clients share httpx pools of 8 connections (httpcore scans its whole pool on every request; one pool
of 64 cost 2.5 ms of client CPU per request instead of 1, as benchmarks/serve_load.py measured); gRPC
clients share channels of 8 the same way, and send and receive the messages' bytes as they are. The CPU
time of the generator and of the server's whole process tree is recorded per level.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

RESPONSE_FIELDS = ("label", "index", "confidence", "probabilities", "top_k", "model_version")
CONNECTIONS_PER_POOL = 8


@dataclass(frozen=True)
class Upload:
    image: bytes
    filename: str = "image.png"
    content_type: str = "image/png"
    field: str | None = "file"  # multipart field name; None sends the raw bytes as the body

    def encoded(self, url: str) -> tuple[bytes, dict[str, str]]:
        """The request body and its Content-Type header, encoded once for every request."""
        if self.field is None:
            return self.image, {"content-type": self.content_type}
        request = httpx.Request("POST", url, files={self.field: (self.filename, self.image, self.content_type)})
        return request.read(), {"content-type": request.headers["content-type"]}


@dataclass(frozen=True)
class V2Request:
    """A KServe v2 infer request for ``pixels`` (UINT8 [N, H, W, 3]), its tensors as JSON numbers or, as
    tritonclient sends them by default, as binary data after the JSON (both ways)."""

    pixels: np.ndarray
    binary: bool

    def encoded(self, url: str) -> tuple[bytes, dict[str, str]]:
        tensor = {"name": "pixels", "shape": list(self.pixels.shape), "datatype": "UINT8"}
        if not self.binary:
            body = {"inputs": [tensor | {"data": self.pixels.ravel().tolist()}]}
            return json.dumps(body).encode(), {"content-type": "application/json"}
        raw = self.pixels.tobytes()
        document = json.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": len(raw)}}],
                               "parameters": {"binary_data_output": True}}).encode()
        return document + raw, {"content-type": "application/octet-stream",
                                "inference-header-content-length": str(len(document))}


def v2_grpc_request(pixels: np.ndarray, model: str) -> bytes:
    """The serialised gRPC ModelInferRequest for ``pixels``, its tensor in ``raw_input_contents``."""
    from app.grpc import inference_pb2

    request = inference_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request.SerializeToString()


@dataclass
class LevelResult:
    concurrency: int
    duration_s: float
    requests: int  # successful answers completed in the measured window
    errors: dict[str, int] = field(default_factory=dict)
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_cores: float | None = None  # CPU seconds per second of the server's process tree
    load_generator_cpu_cores: float | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "error_count": self.error_count}


def check_answer(response: httpx.Response) -> str | None:
    """None for a good answer, else the kind of error it is."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or any(name not in body for name in RESPONSE_FIELDS):
        return "missing fields"
    return None


def check_v2_answer(response: httpx.Response) -> str | None:
    """None for a good KServe v2 answer (JSON, or JSON then binary outputs), else the kind of error it is."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    length = response.headers.get("inference-header-content-length")
    try:
        body = json.loads(response.content[:int(length)] if length else response.content)
    except ValueError:
        return "not JSON"
    return None if isinstance(body, dict) and body.get("outputs") else "missing fields"


async def drive(url: str, upload: Upload | V2Request, *, concurrency: int, duration: float, warmup: float = 2.0,
                timeout: float = 60.0, server_pid: int | None = None,
                check: Callable[[httpx.Response], str | None] = check_answer) -> LevelResult:
    """Run ``concurrency`` closed-loop clients against ``url`` for ``warmup`` + ``duration`` seconds."""
    body, headers = upload.encoded(url)
    pools = [httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=CONNECTIONS_PER_POOL))
             for _ in range(-(-concurrency // CONNECTIONS_PER_POOL))]

    def client(pool: httpx.AsyncClient) -> Callable[[], Awaitable[str | None]]:
        async def send() -> str | None:
            try:
                return check(await pool.post(url, content=body, headers=headers))
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError as failure:
                return type(failure).__name__

        return send

    try:
        return await closed_loop([client(pools[n // CONNECTIONS_PER_POOL]) for n in range(concurrency)],
                                 duration=duration, warmup=warmup, server_pid=server_pid)
    finally:
        for pool in pools:
            await pool.aclose()


async def drive_grpc(address: str, request: bytes, *, concurrency: int, duration: float, warmup: float = 2.0,
                     timeout: float = 60.0, server_pid: int | None = None) -> LevelResult:
    """``drive`` for the KServe v2 gRPC ``ModelInfer`` at ``address`` (host:port), sending ``request`` (a
    serialised ModelInferRequest, ``v2_grpc_request``)."""
    import grpc

    from app.grpc import inference_pb2

    # A local subchannel pool each, so that channels to one address are separate connections, as pools are.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(-(-concurrency // CONNECTIONS_PER_POOL))]
    calls = [channel.unary_unary("/inference.GRPCInferenceService/ModelInfer") for channel in channels]

    def client(call: Callable[..., Awaitable[bytes]]) -> Callable[[], Awaitable[str | None]]:
        async def send() -> str | None:
            try:
                answer = inference_pb2.ModelInferResponse.FromString(await call(request, timeout=timeout))
            except grpc.aio.AioRpcError as failure:
                return f"gRPC {failure.code().name}"
            return None if answer.raw_output_contents else "missing fields"

        return send

    try:
        return await closed_loop([client(calls[n // CONNECTIONS_PER_POOL]) for n in range(concurrency)],
                                 duration=duration, warmup=warmup, server_pid=server_pid)
    finally:
        for channel in channels:
            await channel.close()


async def closed_loop(clients: list[Callable[[], Awaitable[str | None]]], *, duration: float, warmup: float,
                      server_pid: int | None) -> LevelResult:
    """Each of ``clients`` (a request sent and checked: None, or the kind of error) called back to back for
    ``warmup`` + ``duration`` seconds; the measured window is the last ``duration``."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    now = time.perf_counter()
    window_start, window_stop = now + warmup, now + warmup + duration

    async def client_loop(send: Callable[[], Awaitable[str | None]]) -> None:
        while (started := time.perf_counter()) < window_stop:
            error = await send()
            finished = time.perf_counter()
            # Counted by completion time: in a steady state, completions per second in the window are the
            # throughput, whereas keeping only requests that also started in it would drop the ones in
            # flight at its start (up to `concurrency` of them).
            if window_start <= finished <= window_stop:
                if error is None:
                    latencies.append(finished - started)
                else:
                    errors[error] += 1
            if error is not None and error.startswith(("Connect", "Remote", "gRPC UNAVAILABLE")):
                await asyncio.sleep(0.05)  # a server that is down would otherwise be hammered in a busy loop

    async def measure_cpu() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        # The generator's own process only: the server may be its child.
        server, client = tree_cpu_seconds(server_pid), cpu_seconds(os.getpid())
        await asyncio.sleep(max(0.0, window_stop - time.perf_counter()))
        return tree_cpu_seconds(server_pid) - server, cpu_seconds(os.getpid()) - client

    measuring = asyncio.create_task(measure_cpu())
    await asyncio.gather(*(client_loop(send) for send in clients))
    server_cpu, client_cpu = await measuring
    result = LevelResult(concurrency=len(clients), duration_s=duration, requests=len(latencies),
                         errors=dict(errors), requests_per_s=len(latencies) / duration,
                         server_cpu_cores=server_cpu / duration if server_pid else None,
                         load_generator_cpu_cores=client_cpu / duration)
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        result.p50_ms, result.p90_ms, result.p99_ms = cuts[49] * 1000, cuts[89] * 1000, cuts[98] * 1000
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0  # it exited meanwhile, or this is not Linux


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds in a /proc ``stat`` file: a process's, or one thread's (``task/<tid>/stat``)."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of a process and all its descendants (a server's workers)."""
    return 0.0 if pid is None else sum(cpu_seconds(process) for process in [pid, *_descendants(pid)])


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            frontier += children
    return found


@contextmanager
def server_process(start: Callable[[int], tuple[list[str], dict[str, str]]], log: Path, cwd: Path
                   ) -> Iterator[tuple[int, int]]:
    """Run a server on a free port of 127.0.0.1: ``start(port)`` gives its command line and environment; its
    output goes to ``log``. Yields the port and the process id; stops the server's whole process group
    afterwards (SIGTERM, then SIGKILL after 30 s, and SIGKILL for workers that outlived their parent)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command, environment = start(port)
    with open(log, "ab") as output:
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield port, process.pid
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def app_service(settings: dict[str, str], log: Path, cwd: Path) -> Iterator[tuple[str, int]]:
    """``python -m app`` with ``settings`` (``APP_*`` variables; none inherited from this process) and a
    state directory of its own, removed afterwards. Yields its base URL and process id."""
    state = Path(tempfile.mkdtemp(prefix="benchmark_state_"))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("APP_")} | {
        "APP_STATE_DIR": str(state), "APP_RUN_JOBS": "false"} | settings
    try:
        with server_process(lambda port: ([sys.executable, "-m", "app", "--port", str(port)], environment), log,
                            cwd) as (port, pid):
            yield f"http://127.0.0.1:{port}", pid
    finally:
        shutil.rmtree(state, ignore_errors=True)
