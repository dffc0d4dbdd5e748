import json
import logging

import pytest
from fastapi import APIRouter

from tests.support import images
from tests.support.asgi import call_with_endless_body
from tests.support.service import ADMIN_TOKEN

pytestmark = pytest.mark.anyio


async def test_a_request_id_is_made_when_the_client_sends_none(client):
    first, second = (await client.get("/healthz")).headers, (await client.get("/healthz")).headers
    assert len(first["x-request-id"]) == 32 and first["x-request-id"] != second["x-request-id"]


@pytest.mark.parametrize("sent", ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "trace.42:span_7"])
async def test_a_sane_client_request_id_is_echoed(client, sent):
    response = await client.post("/predict", content=images.TEXT, headers={"x-request-id": sent,
                                                                           "content-type": "image/png"})
    assert response.status_code == 415 and response.headers["x-request-id"] == sent


@pytest.mark.parametrize("sent", ["", "has space", "x" * 129, "line\tbreak"])
async def test_an_unsafe_client_request_id_is_replaced(client, sent):
    response = await client.get("/healthz", headers={"x-request-id": sent})
    assert response.headers["x-request-id"] != sent and len(response.headers["x-request-id"]) == 32


async def test_log_lines_are_json_and_name_the_request(client, caplog):
    from app.logging import JsonFormatter

    with caplog.at_level(logging.INFO, logger="app.access"):
        logging.getLogger("app.access").addHandler(caplog.handler)
        try:
            await client.post("/predict", content=images.png(), headers={"x-request-id": "log-me-1",
                                                                        "content-type": "image/png"})
        finally:
            logging.getLogger("app.access").removeHandler(caplog.handler)
    records = [r for r in caplog.records if getattr(r, "route", None) == "/predict"]
    assert records, "no access-log line for the request"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "log-me-1" and line["status"] == 200 and line["method"] == "POST"
    assert line["message"] == "request" and line["ms"] > 0


async def test_an_unexpected_error_is_a_plain_json_500_with_the_request_id(service):
    router = APIRouter()

    @router.get("/test-only/boom")
    async def boom() -> None:
        raise ZeroDivisionError("secret internals")

    service.app.include_router(router)
    response = await service.client.get("/test-only/boom", headers={"x-request-id": "boom-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "boom-1"
    assert response.json() == {"detail": "internal error; it has been logged under request ID boom-1"}
    assert (await service.client.get("/healthz")).status_code == 200


ADMIN_BODIES = ["/train", "/admin/reload", "/admin/promote/some-version"]


@pytest.mark.parametrize("path", ADMIN_BODIES)
@pytest.mark.parametrize(("authorization", "status"), [(None, 401), (b"Bearer wrong-token-but-long-enough", 403)])
async def test_an_admin_body_is_not_read_before_the_token_is_checked(service, path, authorization, status):
    headers = [(b"content-type", b"application/json")]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    status_seen, pulled, body = await call_with_endless_body(service.app, path, headers, chunks=64)
    assert status_seen == status and "token" in body["detail"]
    assert pulled == 0, f"read {pulled} bytes of the body before refusing the token"


@pytest.mark.parametrize("path", ADMIN_BODIES)
async def test_an_admin_body_over_the_json_limit_is_cut_off(service, path):
    limit = service.app.state.settings.max_json_bytes
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {ADMIN_TOKEN}".encode())]
    status, pulled, body = await call_with_endless_body(service.app, path, headers, chunks=64, chunk=16 * 1024)
    assert status == 413 and "APP_MAX_JSON_BYTES" in body["detail"]
    assert pulled <= limit + 16 * 1024


async def test_a_declared_admin_body_over_the_limit_is_refused_unread(service):
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
               (b"content-length", b"100000000")]
    status, pulled, _ = await call_with_endless_body(service.app, "/train", headers, chunks=64)
    assert status == 413 and pulled == 0


async def test_a_client_that_goes_away_mid_body_is_no_server_error(service, caplog):
    """What the server's body deadline (app/server.py) does to a stalled upload: the app sees a disconnect."""
    messages = iter([{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"service"), (b"content-type", b"image/png")], "client": ("127.0.0.1", 1),
             "server": ("service", 80)}
    with caplog.at_level(logging.INFO):
        await service.app(scope, receive, send)
    assert not [r for r in caplog.records if r.name == "app.errors"], "a client going away was logged as a failure"
    assert any(getattr(r, "status", None) == 499 for r in caplog.records if r.name == "app.access")
