"""Admission control over bytes and disconnected clients, against ``python -m app`` over real sockets (issue 22,
item 3): held partial uploads fill the upload budget, the next upload gets 503 before a byte of its body is
sent, small requests still succeed, and a client that sends a request and closes is logged and counted as
499 with its image never computed."""

from __future__ import annotations

import json
import re
import socket
from contextlib import ExitStack

import httpx
import pytest

from tests.support import images
from tests.support.service import live_environment, live_server
from tests.support.waiting import wait_until

pytestmark = pytest.mark.server
MIB = 1024 * 1024
BUDGET = 3 * MIB + MIB // 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    # A whole second of batching delay: a request's one image waits that long for company before its pass, a
    # window in which the engine must notice that its client left.
    environment = live_environment(tiny_checkpoint, APP_MAX_UPLOAD_BYTES=str(MIB),
                                   APP_MAX_UPLOAD_BYTES_IN_FLIGHT=str(BUDGET), APP_MAX_BATCH_DELAY_MS="1000",
                                   APP_LOG_FORMAT="json")
    with live_server(tmp_path_factory.mktemp("admission"), environment) as running:
        yield running


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def upload_head(length: int, path: str = "/predict") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def metric(server, name: str, **labels: str) -> float:
    """The sample of ``name`` with (at least) ``labels``; 0 when there is none yet."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for found in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", text, re.MULTILINE):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or ""))
        if labels.items() <= pairs.items():
            return float(found.group(2))
    return 0.0


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {key.lower(): value for key, value in headers.items()}
    while len(body) < int(headers.get("content-length", 0)):
        body += connection.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_held_uploads_fill_the_budget_and_the_next_is_refused_before_its_body(server):
    host_port = address(server.url)
    with ExitStack() as held:
        for _ in range(3):  # 3 MiB of the 3.5 MiB budget, each half sent and then held
            connection = held.enter_context(socket.create_connection(host_port, timeout=60))
            connection.sendall(upload_head(MIB) + b"\0" * (MIB // 2))
        wait_until(lambda: metric(server, "http_upload_bytes_in_flight") == 3 * MIB,
                   what="the held uploads to be reserved")

        # Only the head: the answer comes before a byte of the body is sent.
        refused = held.enter_context(socket.create_connection(host_port, timeout=60))
        refused.sendall(upload_head(MIB))
        status, headers, body = read_response(refused)
        assert status == 503, body
        assert int(headers["retry-after"]) >= 1
        assert "APP_MAX_UPLOAD_BYTES_IN_FLIGHT" in json.loads(body)["detail"]

        # A chunked body declares no length: its bytes are counted as they come, and refused past the budget.
        chunked = held.enter_context(socket.create_connection(host_port, timeout=60))
        chunked.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"\0" * (256 * 1024)
        for _ in range(3):
            chunked.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, _, body = read_response(chunked)
        assert status == 503 and b"APP_MAX_UPLOAD_BYTES_IN_FLIGHT" in body

        # A well-behaved small request fits in what is left.
        small = httpx.post(f"{server.url}/predict", content=images.png(seed=3),
                           headers={"content-type": "image/png"}, timeout=60)
        assert small.status_code == 200, small.text
        assert metric(server, "http_upload_bytes_in_flight") == 3 * MIB
    wait_until(lambda: metric(server, "http_upload_bytes_in_flight") == 0,
               what="the held uploads' bytes to be freed when their connections closed")


def test_a_client_that_disconnects_is_logged_499_and_its_image_is_never_computed(server):
    host_port = address(server.url)
    computed = metric(server, "inference_batch_images_sum")
    disconnects = metric(server, "http_requests_total", route="/predict", status="499")
    body = images.png(seed=4)
    head = upload_head(len(body)).replace(b"\r\n\r\n", b"\r\nX-Request-ID: left-early\r\n\r\n")
    with socket.create_connection(host_port, timeout=60) as connection:
        connection.sendall(head + body)

    def logged() -> list[dict]:
        entries = [json.loads(line) for line in server.log_lines() if line.startswith("{")]
        return [entry for entry in entries if entry.get("request_id") == "left-early" and "status" in entry]

    (entry,) = wait_until(logged, what="the disconnected request's access-log line")
    assert entry["status"] == 499 and entry["path"] == "/predict"
    assert metric(server, "http_requests_total", route="/predict", status="499") == disconnects + 1
    # Dropped before its decoding or from the engine's queue (where the second of batching delay would have
    # kept its image): either way never computed.
    assert metric(server, "inference_batch_images_sum") == computed, "the image of a client that left was computed"
