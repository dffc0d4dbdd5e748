"""A closed-loop load generator fast enough for a GPU server: raw HTTP/1.1 keep-alive over asyncio streams,
spread over several processes.

benchmarks/load.py (httpx) tops out near 1-2 k requests/s per process, below what one H100 serves; this
one pre-builds the request bytes once, reads each response by its Content-Length and checks its status
line and that the body names a ``model_version``, so a client process costs ~10x less CPU per request.

    result = run_load("127.0.0.1", 8000, "/predict", body, content_type, concurrency=256, duration=10)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

STARTUP_TIMEOUT_S = 120.0  # for every client process to start; a BrokenBarrierError after it


@dataclass
class LoadResult:
    concurrency: int
    processes: int
    duration_s: float
    requests: int
    requests_per_s: float
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0


def request_bytes(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


def multipart(field_name: str, filename: str, image: bytes, image_type: str) -> tuple[bytes, str]:
    boundary = "benchmarkboundary7d1f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {image_type}\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def _one_connection(host, port, payload, window, latencies, errors):
    reader = writer = None
    while time.perf_counter() < window[1]:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            writer.write(payload)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            finished = time.perf_counter()
            ok = status.split(b" ", 2)[1:2] == [b"200"] and b"model_version" in body
            if window[0] <= finished <= window[1]:
                if ok:
                    latencies.append(finished - started)
                else:
                    errors[f"HTTP {status.split(b' ', 2)[1].decode(errors='replace')}"] += 1
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError) as failure:
            if window[0] <= time.perf_counter() <= window[1]:
                errors[type(failure).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def _process_main(host, port, payload, connections, started, warmup, duration, queue) -> None:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started.wait()

    async def main() -> None:
        window = (time.perf_counter() + warmup, time.perf_counter() + warmup + duration)
        await asyncio.gather(*(_one_connection(host, port, payload, window, latencies, errors)
                               for _ in range(connections)))

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    queue.put((latencies, dict(errors)))


def run_load(host: str, port: int, path: str, body: bytes, content_type: str, *, concurrency: int,
             duration: float, warmup: float = 2.0, processes: int | None = None) -> LoadResult:
    processes = max(1, min(processes or 1, concurrency))
    payload = request_bytes(host, port, path, body, content_type)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    # Every client process starts its clock when all of them have started: a spawned interpreter re-imports
    # the parent's modules (torch among them), which took longer than any fixed head start on a busy machine,
    # so the measuring window had closed before the clients sent a request.
    started = context.Barrier(processes + 1, timeout=STARTUP_TIMEOUT_S)
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    workers = [context.Process(target=_process_main, args=(host, port, payload, share, started, warmup, duration,
                                                           queue))
               for share in shares]
    for worker in workers:
        worker.start()
    started.wait()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    for _ in workers:
        part, part_errors = queue.get()
        latencies.extend(part)
        errors.update(part_errors)
    for worker in workers:
        worker.join()
    result = LoadResult(concurrency=concurrency, processes=processes, duration_s=duration,
                        requests=len(latencies), requests_per_s=len(latencies) / duration, errors=dict(errors))
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        result.p50_ms, result.p90_ms, result.p99_ms = cuts[49] * 1000, cuts[89] * 1000, cuts[98] * 1000
    return result
