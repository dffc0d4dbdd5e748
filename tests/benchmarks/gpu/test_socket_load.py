import asyncio
import threading

from benchmarks.gpu.socket_load import multipart, run_load


class TinyServer:
    """Answers every POST on one keep-alive connection: 200 with a model_version, or 503 every n-th."""

    def __init__(self, fail_every: int = 0) -> None:
        self.fail_every = fail_every
        self.bodies: list[bytes] = []
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
            while True:
                if not await reader.readline():
                    break  # the client closed the connection
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.bodies.append(await reader.readexactly(length))
                failing = self.fail_every and len(self.bodies) % self.fail_every == 0
                body = b'{"detail":"queue full"}' if failing else b'{"label":"cat","model_version":"v1"}'
                status = b"503 Service Unavailable" if failing else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def test_load_counts_answers_in_the_window_and_sends_the_exact_body():
    server = TinyServer()
    body, content_type = multipart("file", "x.png", b"\x89PNG-bytes", "image/png")
    result = run_load("127.0.0.1", server.port, "/predict", body, content_type, concurrency=4, duration=1.0,
                      warmup=0.2, processes=2)
    assert result.requests > 50 and result.errors == {}
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert set(server.bodies) == {body}
    assert b'name="file"; filename="x.png"' in body and body.endswith(b"--\r\n")


def test_non_200_answers_are_errors_not_throughput():
    server = TinyServer(fail_every=2)
    body, content_type = multipart("file", "x.png", b"img", "image/png")
    result = run_load("127.0.0.1", server.port, "/predict", body, content_type, concurrency=2, duration=1.0,
                      warmup=0.2, processes=1)
    assert result.errors.get("HTTP 503", 0) > 0
    assert abs(result.errors["HTTP 503"] - result.requests) <= 2
