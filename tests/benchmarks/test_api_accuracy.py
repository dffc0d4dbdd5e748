import asyncio
import threading
import time

import httpx
import pytest

from benchmarks.api_accuracy import RETRIES_503, post


class FullQueueServer:
    """A loopback HTTP server that answers the first ``busy`` POSTs 503 with ``Retry-After: <retry_after>``
    (the engine's full queue), then 200."""

    def __init__(self, busy: int, retry_after: str = "0") -> None:
        self.busy, self.retry_after = busy, retry_after
        self.arrivals: list[float] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader, writer) -> None:
        try:
            while await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.arrivals.append(time.monotonic())
                if len(self.arrivals) <= self.busy:
                    head = f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {self.retry_after}\r\n"
                    body = b'{"detail":"the queue is full"}'
                else:
                    head, body = "HTTP/1.1 200 OK\r\n", b'{"label":"cat","model_version":"v1"}'
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def post_once(port: int, retried: list[int]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await post(client, "/predict", [("file", ("0.png", b"png", "image/png"))], retried)


def test_a_full_queue_is_waited_out_as_retry_after_says():
    server = FullQueueServer(busy=3, retry_after="1")
    retried: list[int] = []
    response = asyncio.run(post_once(server.port, retried))
    assert response.json()["model_version"] == "v1"
    assert len(retried) == 3 and len(server.arrivals) == 4
    gaps = [later - earlier for earlier, later in zip(server.arrivals, server.arrivals[1:])]
    assert all(0.9 <= gap < 3 for gap in gaps)  # the service's one second, not the client's own back-off


def test_a_queue_that_stays_full_fails_after_the_bounded_retries():
    server = FullQueueServer(busy=10 ** 6)
    retried: list[int] = []
    with pytest.raises(httpx.HTTPStatusError, match="503"):
        asyncio.run(post_once(server.port, retried))
    assert len(retried) == RETRIES_503 and len(server.arrivals) == RETRIES_503 + 1
