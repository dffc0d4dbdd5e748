"""The forward from a serving replica to the control plane (app/api/forward.py), against a stand-in control plane
on a real socket that records what reaches it."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.net import free_port
from tests.support.service import ADMIN_TOKEN, running_app, service_settings

pytestmark = pytest.mark.anyio
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


class StandInControlPlane:
    def __init__(self, port: int = 0) -> None:
        self.seen: list[dict[str, object]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.seen.append({"method": self.command, "path": self.path, "body": body,
                                   "authorization": self.headers.get("Authorization"),
                                   "request_id": self.headers.get("X-Request-ID")})
                answer = json.dumps({"job_runner": "runner", "path": self.path}).encode()
                self.send_response(202 if self.command == "POST" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Location", "/train/abc")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def requests(self, path_prefix: str) -> list[dict[str, object]]:
        return [r for r in self.seen if str(r["path"]).startswith(path_prefix)]


@pytest.fixture
def control() -> Iterator[StandInControlPlane]:
    stand_in = StandInControlPlane()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


async def test_admin_writes_are_forwarded_intact_and_only_after_the_token(control, tiny_checkpoint):
    async with running_app(service_settings(tiny_checkpoint, control_url=control.url)) as (_, client):
        refused = await client.post("/train", json={"epochs": 1})
        assert refused.status_code == 401 and control.requests("/train") == []  # the body never left

        response = await client.post("/train?dry=1", json={"epochs": 1}, headers=AUTH | {"x-request-id": "abc-1"})
        assert response.status_code == 202 and response.headers["location"] == "/train/abc"
        assert response.json()["path"] == "/train?dry=1"
        (forwarded,) = control.requests("/train")
        assert forwarded["method"] == "POST" and json.loads(forwarded["body"]) == {"epochs": 1}
        assert forwarded["authorization"] == AUTH["authorization"] and forwarded["request_id"] == "abc-1"
        assert response.headers["x-request-id"] == "abc-1"

        promoted = await client.post("/admin/promote/v1", headers=AUTH)
        assert promoted.status_code == 202 and control.requests("/admin/promote/v1")

        # Only the control plane's routes, method included: the rest stays on the replica.
        assert (await client.request("PATCH", "/train", headers=AUTH)).status_code == 405
        assert (await client.post("/admin/reload", headers=AUTH, json={"weights": "/etc"})).status_code == 400
        assert (await client.get("/train/a/b/c", headers=AUTH)).status_code == 404
        assert [r["method"] for r in control.requests("/train")] == ["POST"]
        assert control.requests("/admin/reload") == []


async def test_a_control_plane_that_does_not_answer_is_a_503_with_retry_after(tiny_checkpoint):
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with running_app(service_settings(tiny_checkpoint, control_url=nowhere)) as (app, client):
        app.state.control_link.state = "unreachable"  # past start-up: no grace for a refused connection
        response = await client.get("/train", headers=AUTH)
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert "Predictions are not affected" in response.json()["detail"]
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["control_plane"] != "ready"


class DyingPredecessor:
    """A listening socket that resets every connection it accepts, as a killed control plane's socket does until
    the kernel closes it; after ``resets`` of them it is gone and ``StandInControlPlane`` listens on its port."""

    def __init__(self, resets: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reset: list[tuple[str, str]] = []  # (method, path) of each connection it reset
        self.successor: StandInControlPlane | None = None
        self.thread = threading.Thread(target=self._run, args=(resets,), daemon=True)
        self.thread.start()

    def _run(self, resets: int) -> None:
        for _ in range(resets):
            connection, _ = self.listener.accept()
            method, path = connection.recv(256).decode("latin-1").split(" ")[:2]
            self.reset.append((method, path))
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, no FIN
            connection.close()
        self.listener.close()
        self.successor = StandInControlPlane(self.port)


async def test_while_starting_a_reset_read_is_sent_again_and_a_reset_write_is_not(tiny_checkpoint):
    predecessor = DyingPredecessor(resets=3)
    url = f"http://127.0.0.1:{predecessor.port}"
    try:
        async with running_app(service_settings(tiny_checkpoint, control_url=url)) as (app, client):
            written = await client.post("/train", json={"epochs": 1}, headers=AUTH)
            read = await client.get("/train", headers=AUTH)
            predecessor.thread.join(timeout=10)
            assert predecessor.successor is not None
            assert written.status_code == 503 and written.headers["retry-after"] == "2", written.text
            assert read.status_code == 200 and read.json()["path"] == "/train", read.text
            assert ("POST", "/train") in predecessor.reset and ("GET", "/train") in predecessor.reset, predecessor.reset
            assert [r["method"] for r in predecessor.successor.requests("/train")] == ["GET"], "the write was resent"
    finally:
        if predecessor.successor is not None:
            predecessor.successor.server.shutdown()
            predecessor.successor.server.server_close()
