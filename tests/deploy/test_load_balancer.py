"""deploy/nginx.conf, run by a real nginx (tests/deploy/load_balancer.py) in front of three stand-in servers that
answer with their names: `api`, `api-replica` and `control`. Skipped where nginx is not installed
(apt-get install nginx-light)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.deploy.load_balancer import NGINX, running_nginx

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")]


class StandInServer:
    """An HTTP server that answers every request with its own name, and counts what it was asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits: Counter[str] = Counter()
        self.forwarded_for: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                owner.hits[f"{self.command} {self.path}"] += 1
                owner.forwarded_for.add(self.headers.get("X-Forwarded-For", ""))
                body = json.dumps({"backend": owner.name, "received": length}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# The balancer's URL, and the stand-ins for the serving `api` and `api-replica`, and for `control`.
Balancer = tuple[str, StandInServer, StandInServer, StandInServer]


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    api, replica, control = StandInServer("api"), StandInServer("api-replica"), StandInServer("control")
    try:
        with running_nginx(tmp_path_factory.mktemp("nginx"), api.port, replica.port, control.port) as url:
            yield url, api, replica, control
    finally:
        for server in (api, replica, control):
            server.close()


def test_answers_its_own_health_check(balancer: Balancer) -> None:
    url, *_ = balancer
    response = httpx.get(f"{url}/lb-healthz")
    assert (response.status_code, response.text) == (200, "ok\n")


def test_spreads_predictions_over_the_serving_services_only(balancer: Balancer) -> None:
    url, runner, replica, control = balancer
    with httpx.Client(base_url=url, timeout=10) as client:
        backends = Counter(client.post("/predict", content=b"x" * 1000).json()["backend"] for _ in range(20))
    assert set(backends) == {"api", "api-replica"}, backends
    assert runner.forwarded_for | replica.forwarded_for == {"127.0.0.1"}
    assert not any(hit.split()[1].startswith("/predict") for hit in control.hits)


def test_sends_every_admin_write_to_the_control_plane(balancer: Balancer) -> None:
    url, api, replica, control = balancer
    with httpx.Client(base_url=url, timeout=10) as client:
        answers = [answer for _ in range(3) for answer in (
            client.post("/train", json={"epochs": 1}), client.get("/train"),
            client.get("/train/abc123"), client.delete("/train/abc123"), client.post("/admin/promote/v1"),
        )]
        reload = client.post("/admin/reload")  # one replica's engine: a serving route
    assert {a.json()["backend"] for a in answers} == {"control"}
    for serving in (api, replica):
        assert not any(hit.split()[1].startswith(("/train", "/admin/promote")) for hit in serving.hits)
    assert control.hits["POST /train"] == 3 and control.hits["POST /admin/promote/v1"] == 3
    assert reload.json()["backend"] in ("api", "api-replica")


def test_passes_uploads_up_to_the_services_own_limit(balancer: Balancer) -> None:
    """nginx must not refuse what the service would accept: the service's 413 says what to do."""
    url, *_ = balancer
    size = 16 * 2**20
    response = httpx.post(f"{url}/predict", content=b"\0" * size, timeout=30)
    assert response.status_code == 200 and response.json()["received"] == size
