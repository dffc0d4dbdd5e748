"""deploy/nginx.conf, run by a real nginx in front of two stand-in API servers on loopback ports.

Only Docker's DNS parts are swapped for this machine: the `resolver` line and the `resolve` flags go
(Debian's nginx 1.22 predates `resolve` on upstream servers, and there is no 127.0.0.11 here), and the
service names become 127.0.0.1 ports. The routing, limits and headers under test are the committed ones.
Skipped where nginx is not installed (apt-get install nginx-light)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.deploy.compose_model import REPO_ROOT
from tests.deploy.net import free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")


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


def render(config: str, listen: int, runner: int, replica: int) -> str:
    config = re.sub(r"^\s*resolver .*;\n", "", config, flags=re.MULTILINE)
    config = config.replace(" resolve;", ";")
    config = config.replace("server api:8000", f"server 127.0.0.1:{runner}")
    config = config.replace("server api-replica:8000", f"server 127.0.0.1:{replica}")
    return config.replace("listen 8000;", f"listen 127.0.0.1:{listen};")


# The balancer's URL, and the stand-ins for `api` (the job runner) and `api-replica`.
Balancer = tuple[str, StandInServer, StandInServer]


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    runner, replica = StandInServer("api"), StandInServer("api-replica")
    directory = tmp_path_factory.mktemp("nginx")
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(render((REPO_ROOT / "deploy" / "nginx.conf").read_text(), port, runner.port, replica.port))
    base = [NGINX, "-p", str(directory), "-c", str(config)]
    globals_ = f"pid {directory}/nginx.pid; error_log {directory}/error.log;"
    checked = subprocess.run([*base, "-t", "-g", globals_], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([*base, "-g", f"daemon off; {globals_}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/lb-healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (directory / "error.log").read_text()
            time.sleep(0.1)
        yield url, runner, replica
    finally:
        process.terminate()
        process.wait(timeout=20)
        runner.close()
        replica.close()


def test_answers_its_own_health_check(balancer: Balancer) -> None:
    url, _, _ = balancer
    response = httpx.get(f"{url}/lb-healthz")
    assert (response.status_code, response.text) == (200, "ok\n")


def test_spreads_predictions_over_the_runner_and_the_replica(balancer: Balancer) -> None:
    url, runner, replica = balancer
    with httpx.Client(base_url=url, timeout=10) as client:
        backends = Counter(client.post("/predict", content=b"x" * 1000).json()["backend"] for _ in range(20))
    assert set(backends) == {"api", "api-replica"}, backends
    assert runner.forwarded_for | replica.forwarded_for == {"127.0.0.1"}


def test_sends_every_training_request_to_the_runner(balancer: Balancer) -> None:
    url, runner, replica = balancer
    with httpx.Client(base_url=url, timeout=10) as client:
        answers = [answer for _ in range(3) for answer in (
            client.post("/train", json={"epochs": 1}), client.get("/train"),
            client.get("/train/abc123"), client.delete("/train/abc123"),
        )]
    assert {a.json()["backend"] for a in answers} == {"api"}
    assert not any(hit.split()[1].startswith("/train") for hit in replica.hits)
    assert runner.hits["POST /train"] == 3


def test_passes_uploads_up_to_the_services_own_limit(balancer: Balancer) -> None:
    """nginx must not refuse what the service would accept: the service's 413 says what to do."""
    url, _, _ = balancer
    size = 16 * 2**20
    response = httpx.post(f"{url}/predict", content=b"\0" * size, timeout=30)
    assert response.status_code == 200 and response.json()["received"] == size
