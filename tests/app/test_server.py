"""The HTTP server's limits (app/server.py), against ``python -m app`` over real sockets: slow clients are cut
off at their deadline while other requests are served, and oversized heads and too many connections refused."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.service import live_environment, live_server
from tests.support.waiting import wait_until

pytestmark = pytest.mark.server

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 8
# How late past its deadline a connection may be closed: the shared 2-core machine is often busy.
SLACK_S = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    environment = live_environment(tiny_checkpoint, APP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
                                   APP_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S), APP_MAX_HEADER_BYTES="8192",
                                   APP_MAX_CONNECTIONS=str(MAX_CONNECTIONS))
    with live_server(tmp_path_factory.mktemp("limits"), environment) as running:
        yield running


def connect(server) -> socket.socket:
    address = urlsplit(server.url)
    return socket.create_connection((address.hostname, address.port), timeout=SLACK_S)


def closed(connection: socket.socket, wait_s: float) -> bytes | None:
    """What the server sent before closing, once it has closed; None while it is still open after ``wait_s``."""
    connection.settimeout(wait_s)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def test_a_client_that_sends_its_head_byte_by_byte_is_cut_off_while_others_are_served(server):
    served = 0
    with connect(server) as slow:
        started = time.monotonic()
        head = b"POST /predict HTTP/1.1\r\nHost: service\r\nX-Never-Ends: " + b"a" * 4000
        for byte in head:
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            if (answer := closed(slow, 0.1)) is not None:
                break
            if httpx.get(f"{server.url}/healthz", timeout=SLACK_S).status_code == 200:
                served += 1
            assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S, "the slow client was never cut off"
        else:
            pytest.fail("the server read the whole slow head without closing the connection")
        elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    assert served >= 2, "other requests were not served while the slow client sent its head"


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(server):
    with connect(server) as idle:
        started = time.monotonic()
        assert closed(idle, HEADER_TIMEOUT_S + SLACK_S) is not None, "the idle connection was never closed"
        assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.1


def test_a_body_that_stops_arriving_is_cut_off_at_the_body_deadline(server):
    with connect(server) as stalled:
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: service\r\nContent-Type: image/png\r\n"
                        b"Content-Length: 100000\r\n\r\n" + b"\0" * 100)
        started = time.monotonic()
        assert closed(stalled, BODY_TIMEOUT_S + SLACK_S) is not None, "the stalled body was never cut off"
        assert time.monotonic() - started >= BODY_TIMEOUT_S - 0.1
    assert httpx.get(f"{server.url}/healthz", timeout=SLACK_S).status_code == 200


def test_a_head_over_the_limit_gets_431_and_the_connection_is_closed(server):
    with connect(server) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: service\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        answer = closed(client, SLACK_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431"), answer
    assert b"APP_MAX_HEADER_BYTES" in answer


def test_past_the_connection_limit_requests_get_503(server):
    with ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):
            stack.enter_context(connect(server))
        response = httpx.get(f"{server.url}/healthz", timeout=SLACK_S)
        assert response.status_code == 503
    wait_until(lambda: httpx.get(f"{server.url}/healthz", timeout=SLACK_S).status_code == 200, SLACK_S,
               "the service to answer again once the connections closed")


def test_the_rest_of_a_body_answered_before_it_was_read_is_not_taken_for_a_head(server):
    """It is read and dropped, under the body deadline: closing at once would reset the connection under a
    client still sending, losing it the answer."""
    with connect(server) as client:
        client.sendall(b"POST /train HTTP/1.1\r\nHost: service\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 10000000\r\n\r\n" + b"\0" * 1000)
        answer = b""
        while not answer.endswith(b"}"):  # the 401's JSON body
            answer += client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401"), answer
        client.sendall(b"\0" * 100_000)  # more than APP_MAX_HEADER_BYTES, after the answer
        client.settimeout(1.0)
        more = b""
        try:
            while chunk := client.recv(65536):
                more += chunk
        except TimeoutError:
            pass
    assert b"HTTP/1.1" not in more, more


def test_a_large_body_answered_before_it_was_read_is_not_read_and_the_answer_still_arrives(server):
    """15 MB refused: the server half-closes after its answer and stops reading, so the client's upload fails
    instead of being read and thrown away (uvicorn read it all, costing the event loop the whole upload)."""
    declared = 15_000_000
    sent: list[BaseException | None] = []
    with connect(server) as client:
        client.sendall(b"POST /train HTTP/1.1\r\nHost: service\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % declared)

        def upload() -> None:
            try:
                client.sendall(b"\0" * declared)
                sent.append(None)
            except OSError as error:
                sent.append(error)

        sender = threading.Thread(target=upload)
        sender.start()
        answer = closed(client, SLACK_S)
        sender.join(SLACK_S)
    assert answer is not None, "the connection was still open"
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert sent and isinstance(sent[0], OSError), "the whole refused body was read"


def test_a_small_body_answered_before_it_was_read_is_dropped_and_the_connection_serves_on(server):
    with connect(server) as client:
        client.sendall(b"POST /train HTTP/1.1\r\nHost: service\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100000\r\n\r\n" + b"\0" * 100_000)
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: service\r\n\r\n")
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2 or not answers.endswith(b"}"):
            chunk = client.recv(65536)
            assert chunk, f"closed after {answers!r}"
            answers += chunk
    assert answers.startswith(b"HTTP/1.1 401"), answers[:200]
    assert b"HTTP/1.1 200" in answers, answers
