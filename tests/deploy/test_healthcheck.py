"""The image's HEALTHCHECK command, run here against stand-in servers: it must pass on a 200 from
/healthz and fail on an error status, on another path's success, and on no answer at all. The compose
files' check is the same command on /readyz."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.deploy.compose_model import project
from tests.deploy.dockerfile_model import run_healthcheck
from tests.support.net import free_port


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    status_by_path: dict[str, int] = request.param

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status_by_path.get(self.path, 404))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.server
@pytest.mark.parametrize("server", [{"/healthz": 200}], indirect=True)
def test_passes_when_healthz_answers_200(server: int) -> None:
    assert run_healthcheck(server) == 0


@pytest.mark.server
@pytest.mark.parametrize("server", [{"/healthz": 503}, {"/healthz": 500}, {"/": 200}], indirect=True)
def test_fails_when_healthz_does_not_answer_200(server: int) -> None:
    assert run_healthcheck(server) != 0


@pytest.mark.server
@pytest.mark.parametrize(("server", "passes"), [({"/readyz": 200}, True), ({"/readyz": 503, "/healthz": 200}, False)],
                         indirect=["server"])
def test_the_compose_healthcheck_passes_only_once_the_service_is_ready(server: int, passes: bool) -> None:
    command = project("docker-compose.yml")["services"]["api"]["healthcheck"]["test"][1:]
    assert (run_healthcheck(server, command) == 0) is passes


def test_fails_when_nothing_listens() -> None:
    assert run_healthcheck(free_port()) != 0
