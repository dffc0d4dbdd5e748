"""Per-client shares against ``python -m app`` over real sockets (issue 22, item 3): a client over
APP_MAX_CLIENT_IMAGES is refused before its images are decoded, then, while inside the Retry-After it was given,
before a byte of its body is read; other clients are served throughout, and the client is served again once
its back-off has passed."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.app.api.test_admission import address, read_response, upload_head
from tests.support import images
from tests.support.service import live_environment, live_server
from tests.support.waiting import wait_until

pytestmark = pytest.mark.server
SHARE = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    environment = live_environment(tiny_checkpoint, APP_MAX_CLIENT_IMAGES=str(SHARE),
                                   APP_CLIENT_ID_HEADER="X-Client-Id")
    with live_server(tmp_path_factory.mktemp("clients"), environment) as running:
        yield running


def batch(client: str, files: list[bytes], url: str) -> httpx.Response:
    return httpx.post(f"{url}/predict/batch", files=[("files", (f"{n}.png", data, "image/png"))
                                                      for n, data in enumerate(files)],
                      headers={"X-Client-Id": client}, timeout=60)


def test_a_client_over_its_share_is_refused_before_decoding_then_before_its_body(server):
    # Not images at all: decoding them would answer 400, so a 503 shows they were refused undecoded.
    refused = batch("flood", [b"not an image"] * (SHARE + 1), server.url)
    assert refused.status_code == 503, refused.text
    assert "APP_MAX_CLIENT_IMAGES" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1

    # Within its Retry-After, the same client's next request is answered from its head alone: a 16 MiB body is
    # declared and none of it is ever sent.
    head = upload_head(16 * 1024 * 1024, "/predict/batch").replace(b"\r\n\r\n", b"\r\nX-Client-Id: flood\r\n\r\n")
    with socket.create_connection(address(server.url), timeout=60) as connection:
        connection.sendall(head)
        status, headers, body = read_response(connection)
    assert status == 503 and "retry-after" in headers, body
    assert b"asked to wait" in body

    # Another client is served meanwhile, as is a well-formed request within the share once the back-off ends.
    other = batch("polite", [images.png(seed=n) for n in range(SHARE)], server.url)
    assert other.status_code == 200 and len(other.json()["predictions"]) == SHARE
    wait_until(lambda: batch("flood", [images.png(seed=7)], server.url).status_code == 200,
               what="the refused client to be served after its back-off")


def test_without_the_header_a_client_is_its_address(server):
    refused = httpx.post(f"{server.url}/predict/batch", timeout=60,
                         files=[("files", ("x.png", b"not an image", "image/png"))] * (SHARE + 1))
    assert refused.status_code == 503, refused.text
    named = batch("someone-else", [images.png(seed=1)], server.url)
    assert named.status_code == 200, "a named client was refused for the back-off of an unnamed one"
    wait_until(lambda: httpx.post(f"{server.url}/predict", content=images.png(), timeout=60,
                                  headers={"content-type": "image/png"}).status_code == 200,
               what="the address's back-off to pass")
